"""Training checkpoints: atomic writes, keep-last-K, finding the newest one to resume from, archiving old runs."""

from __future__ import annotations

import os
import re
import time
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


# What a run writes into its output_dir (besides hydra's own folder): moved aside together by archive_previous_run.
RUN_OUTPUTS = ("metrics.jsonl", "config.yaml", "model", "tensorboard")


def previous_run_outputs(output_dir: str | Path, checkpoint_dir: str | Path) -> list[Path]:
    """The files and folders an earlier run left in ``output_dir`` (empty list when there are none)."""
    output_dir, checkpoint_dir = Path(output_dir), Path(checkpoint_dir)
    found = [output_dir / name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        found.append(checkpoint_dir)
    return found


def archive_previous_run(output_dir: str | Path, checkpoint_dir: str | Path) -> Path | None:
    """Move an earlier run's outputs into ``output_dir/previous_runs/<time>/`` so a new run starts clean.

    Nothing is deleted: the new run's metrics are not appended to the old ones, and ``keep_last`` pruning (by
    update number) cannot remove the new run's checkpoints. Returns the archive folder, or None if there was
    nothing to move.
    """
    outputs = previous_run_outputs(output_dir, checkpoint_dir)
    if not outputs:
        return None
    archive = Path(output_dir) / "previous_runs" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while archive.exists():
        archive = archive.with_name(f"{archive.name.split('.')[0]}.{suffix}")
        suffix += 1
    archive.mkdir(parents=True)
    for path in outputs:
        path.rename(archive / path.name)
    return archive
