"""Training checkpoints: what one holds, writing it atomically, keep-last-K, resuming, archiving an earlier run.

``<output_dir>/checkpoints/checkpoint_<update>.pt`` is one ``torch.save``'d dict (rank 0 writes it):

| key | value |
|---|---|
| ``xlsr_training_checkpoint`` | 1: marks the file as ours (``from_pretrained`` reads its model too) |
| ``model``, ``model_config`` | model state dict; ``Wav2Vec2Config.to_dict()`` |
| ``optimizer``, ``scaler`` | AdamW and fp16 ``GradScaler`` state dicts |
| ``num_updates``, ``epoch``, ``batches_done_in_epoch``, ``epoch_offset`` | where the run is: updates made, epoch (from 1), this rank's batches of the epoch done (padding batches included) after the epoch's first ``epoch_offset`` global batches (trained before a resume with another number of ranks; usually 0) |
| ``world_size``, ``strategy`` | how many ranks wrote it, ddp or fsdp (resuming with another number of ranks continues at the epoch's first untrained batch) |
| ``rng`` | ``torch``, ``cuda``, ``numpy``, ``python`` generator states |
| ``best`` | the best validation so far when ``checkpoint.best_metric`` is set: ``{"metric", "value", "update"}`` (what ``output_dir/best/best.json`` holds), else None |
| ``config`` | the resolved ``PretrainConfig`` as a plain dict |

The Gumbel temperature and the LR are functions of ``num_updates``, so they resume with it.

With ``distributed.strategy=fsdp`` a checkpoint is a folder ``checkpoint_<update>/`` instead, each rank writing its
shard (``xlsr/checkpoints/sharded.py``); both kinds resume in either strategy and at any world size.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from xlsr.checkpoints import CheckpointError, safe_torch_load
from xlsr.checkpoints.sharded import read_sharded_checkpoint
from xlsr.checkpoints.training import TRAINING_CHECKPOINT_MARK, is_training_checkpoint
from xlsr.files import write_atomic

logger = logging.getLogger("xlsr.training")

_NAME = re.compile(r"^checkpoint_(\d+)(\.pt)?$")  # a file checkpoint_<N>.pt or a sharded folder checkpoint_<N>


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save through :func:`xlsr.files.write_atomic`: a crash never leaves a half-written ``path``."""
    return write_atomic(path, lambda handle: torch.save(state, handle))


def checkpoint_path(directory: str | Path, num_updates: int) -> Path:
    return Path(directory) / f"checkpoint_{num_updates}.pt"


def sharded_checkpoint_path(directory: str | Path, num_updates: int) -> Path:
    return Path(directory) / f"checkpoint_{num_updates}"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory`` (files and sharded folders), oldest first (temporary ones ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _NAME.match(p.name)) and p.is_dir() != bool(m.group(2))]
    return [p for _, p in sorted(found)]


def remove_path(path: Path) -> None:
    """Delete a file or a folder (gone already is fine)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune(directory: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and stale temporary files and folders)."""
    if keep_last > 0:
        for old in list_checkpoints(directory)[:-keep_last]:
            remove_path(old)
    for stale in Path(directory).glob("checkpoint_*.tmp"):
        remove_path(stale)


# What a run writes into its output_dir (besides hydra's own folder): moved aside together by archive_previous_run.
BEST_DIR = "best"  # output_dir/best: the model of the best validation (checkpoint.best_metric)
BEST_RECORD = "best.json"  # inside it: {"metric", "value", "update"}
RUN_OUTPUTS = ("metrics.jsonl", "config.yaml", "model", BEST_DIR, "tensorboard")


def is_better(value: float, best: dict[str, Any] | None, maximize: bool) -> bool:
    """Whether a validation's ``value`` beats ``best`` (a ``best.json`` record, None = nothing yet); a NaN never."""
    if value != value:
        return False
    if best is None:
        return True
    return value > best["value"] if maximize else value < best["value"]


def replace_directory(tmp: Path, dest: Path) -> None:
    """Put the finished folder ``tmp`` at ``dest``, replacing what is there: readers see the old folder or the new
    one, never a half-written one (a crash between the two renames leaves ``dest.old`` and no ``dest``)."""
    old = dest.with_name(dest.name + ".old")
    remove_path(old)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    remove_path(old)


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


def training_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]
) -> dict[str, Any]:
    """The checkpoint dict of the table above: ``progress`` (:func:`progress_state`) + model and optimizer."""
    return {**progress, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def progress_state(
    model_config: dict[str, Any], scaler: torch.amp.GradScaler, *, num_updates: int, epoch: int,
    batches_done_in_epoch: int, epoch_offset: int = 0, config: dict[str, Any], best: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The table's entries other than ``model`` and ``optimizer`` (a sharded checkpoint's ``trainer_state.pt``)."""
    return {
        TRAINING_CHECKPOINT_MARK: 1,
        "model_config": model_config,
        "scaler": scaler.state_dict(),
        "num_updates": num_updates,
        "epoch": epoch,
        "batches_done_in_epoch": batches_done_in_epoch,
        "epoch_offset": epoch_offset,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "strategy": (config.get("distributed") or {}).get("strategy", "ddp"),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        "config": config,
        "best": best,
    }


def restore_progress(state: dict[str, Any], scaler: torch.amp.GradScaler) -> tuple[int, int, int]:
    """Load a checkpoint dict's scaler and RNG states; returns (num_updates, epoch, batches done in the epoch)."""
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        restore_cuda_rng_states(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return state["num_updates"], state["epoch"], state["batches_done_in_epoch"]


def restore_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Each visible CUDA device's generator from ``states`` (one per device of the run that saved them, in index
    order). Fewer devices than states (a checkpoint of an 8-GPU node resumed on 2): the first ones are restored;
    more devices: the others keep theirs. A warning when the counts differ. (Training reseeds every micro-batch, so
    only what draws outside a batch depends on these states.)"""
    count = torch.cuda.device_count()
    if len(states) != count:
        logger.warning("the checkpoint holds the CUDA RNG states of %d device(s), %d are visible: restoring %d",
                       len(states), count, min(len(states), count))
    for index, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state, index)


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint ``python -m xlsr.pretrain`` wrote; CheckpointError (naming the file) for anything else.

    A sharded folder is verified and its trainer state returned with ``sharded_path`` (collective: every rank)."""
    if Path(path).is_dir():
        return read_sharded_checkpoint(Path(path))
    state = safe_torch_load(path)
    if not is_training_checkpoint(state):
        raise CheckpointError(f"{path}: not a training checkpoint of xlsr.pretrain (resume needs one)")
    return state


def newest_readable_checkpoint(directory: str | Path, warn) -> tuple[dict | None, Path | None, list[Path]]:
    """(state, path) of the newest checkpoint in ``directory`` that loads, and the newer ones that did not
    (each reported through ``warn(message)``); (None, None, [...]) when none loads or there is none."""
    unreadable = []
    for candidate in reversed(list_checkpoints(directory)):
        try:
            return load_training_checkpoint(candidate), candidate, unreadable
        except CheckpointError as err:
            warn(f"cannot resume from {candidate}: {err}; trying the one before")
            unreadable.append(candidate)
    return None, None, unreadable
