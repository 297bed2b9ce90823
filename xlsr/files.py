"""Small file helpers shared by the package: crash-safe writes and JSON reads that name the file on error."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` through ``write(handle)`` into ``path.tmp``, fsync, then rename it over ``path``.

    A crash leaves either the old ``path`` or the new one, never half a file (only ``path.tmp`` may remain).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` of UTF-8 text."""
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """The JSON value in ``path`` (a UTF-8 byte-order mark at the start ignored); ``error("<path>: invalid JSON
    (...)")`` if it does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise error(f"{path}: invalid JSON ({err})") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err})") from None
