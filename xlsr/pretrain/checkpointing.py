"""Training checkpoints: atomic writes, keep-last-K, finding the newest one to resume from."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^checkpoint_(\d+)\.pt$")


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save to ``path.tmp``, fsync, then rename over ``path``: a crash never leaves a half-written ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def checkpoint_path(directory: str | Path, num_updates: int) -> Path:
    return Path(directory) / f"checkpoint_{num_updates}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(directory: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and stale temporary files)."""
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            old.unlink(missing_ok=True)
    for stale in Path(directory).glob("checkpoint_*.pt.tmp"):
        stale.unlink(missing_ok=True)
