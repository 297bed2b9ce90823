"""Loading ``torch.save`` pickles without running code from them: ``safe_torch_load`` and its pieces.

``torch.load(weights_only=True)`` refuses any class it does not know. Official fairseq checkpoints carry a few:
``argparse.Namespace`` (the ``args`` of wav2vec 2.0 base/large), numpy scalars in training metadata, and, in
older ones, fairseq's own meter objects in ``extra_state``. We allow the harmless standard ones, and replace
fairseq's classes by inert stand-ins (plain attribute bags: their data is kept, no fairseq code runs). Anything
else is refused with the class named.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xlsr.checkpoints.errors import CheckpointError

_INERT_PREFIXES = ("fairseq.", "omegaconf.")
# what torch.load raises for a damaged or foreign file
_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError)


def _allowed_standard_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {"argparse.Namespace": argparse.Namespace}
    numpy_objects = [np.dtype, np.ndarray]
    for qualname in ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
                     "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"):
        module, _, name = qualname.rpartition(".")
        try:
            obj = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
        allowed[qualname] = obj
    for obj in numpy_objects:
        allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    for dtype_class in vars(np.dtypes).values():
        if isinstance(dtype_class, type):
            allowed[f"{dtype_class.__module__}.{dtype_class.__qualname__}"] = dtype_class
    return allowed


def _inert_class(qualified_name: str) -> type:
    """A stand-in class that records pickled state and runs nothing."""
    module, _, name = qualified_name.rpartition(".")

    def __setstate__(self, state):  # noqa: N807
        self.__dict__["_state"] = state

    cls = type(name, (), {"__setstate__": __setstate__, "__repr__": lambda self: f"<inert {qualified_name}>"})
    cls.__module__ = module
    cls.__qualname__ = name
    return cls


def check_file(path: Path, missing: str = "no such file") -> None:
    """CheckpointError ``"<path>: <missing>"`` unless ``path`` is a file, and another if it is empty."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {missing}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")


def load_weights_only(path: Path, map_location: str | torch.device = "cpu", allowed: list[Any] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` that also accepts the classes in ``allowed``; a file it cannot read
    is a CheckpointError naming it. mmap needs the zip format of torch >= 1.6; older pickles are read whole."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=zipfile.is_zipfile(path))
    except _READ_ERRORS as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True, mmap=True)`` that also reads official fairseq checkpoints."""
    path = Path(path)
    check_file(path)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head[:1] != b"\x80":
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if is_zip else []
    except Exception as err:  # truncated or damaged archive
        raise CheckpointError(f"{path}: damaged or truncated checkpoint ({err})") from None
    standard = _allowed_standard_globals()
    allowed: list[Any] = list(standard.values())
    for name in unsafe:
        if name in standard:
            continue
        if name.startswith(_INERT_PREFIXES):
            allowed.append(_inert_class(name))
        else:
            raise CheckpointError(f"{path}: refusing to unpickle {name!r} (code outside the checkpoint formats we read)")
    return load_weights_only(path, map_location, allowed)
