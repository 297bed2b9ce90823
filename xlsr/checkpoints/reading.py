"""Reading the JSON and safetensors files of checkpoint directories (any failure: a CheckpointError naming the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from xlsr.checkpoints.errors import CheckpointError
from xlsr.files import read_json


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a ``config.json``, a shard index, ...)."""
    try:
        value = read_json(path, CheckpointError)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types for damaged files)
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(err).__name__}: {err})") from None
