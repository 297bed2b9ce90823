"""Sharded training checkpoints (``distributed.strategy=fsdp``): a folder per checkpoint, each rank writes its shard.

``<output_dir>/checkpoints/checkpoint_<update>/``:

| file | written by | holds |
|---|---|---|
| ``__<rank>_0.distcp``, ``.metadata`` | every rank (``torch.distributed.checkpoint``) | ``{"model": ..., "optimizer": ...}``, keyed by parameter name, each rank its shards |
| ``trainer_state.pt`` | rank 0 | the rest of ``checkpointing.py``'s table: marker, update, epoch position, RNG, scaler, config, model config, and the strategy and world size that wrote it |
| ``shards.json`` | rank 0, last | size and CRC-32 of every file above |

The folder is written as ``checkpoint_<update>.tmp/`` and renamed when every rank has finished, so a crash mid-save
leaves the previous checkpoint the newest. Before loading, every file is checked against ``shards.json`` (the ranks
share the work); a missing, truncated or damaged file is a ``CheckpointError`` naming it. ``torch.distributed.
checkpoint`` reshards on load, so a checkpoint resumes on any number of ranks, and also without sharding (DDP or one
process: each rank then loads the whole model).
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from xlsr.checkpoints.errors import CheckpointError
from xlsr.checkpoints.safe_loading import safe_torch_load
from xlsr.checkpoints.training import SHARDED_MANIFEST as SHARDS
from xlsr.checkpoints.training import SHARDED_TRAINER_STATE as TRAINER_STATE
from xlsr.checkpoints.training import is_training_checkpoint
from xlsr.config import Wav2Vec2Config


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _gather(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def save_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any], path: Path, rank: int
) -> Path:
    """Write the sharded checkpoint folder ``path`` (collective: every rank calls it). ``trainer_state``: rank 0's
    dict of everything but model and optimizer. Returns ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    if _distributed():
        dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    mine = {p.name: [p.stat().st_size, _crc32(p)] for p in sorted(tmp.glob(f"__{rank}_*.distcp"))}
    files = {name: info for part in _gather(mine) for name, info in part.items()}
    if rank == 0:
        torch.save(trainer_state, tmp / TRAINER_STATE)
        for name in (".metadata", TRAINER_STATE):
            files[name] = [(tmp / name).stat().st_size, _crc32(tmp / name)]
        (tmp / SHARDS).write_text(json.dumps({"files": files}, indent=1))
        if path.exists():  # an earlier run's folder of the same update (resume=path re-runs it)
            shutil.rmtree(path)
        tmp.rename(path)
    if _distributed():
        dist.barrier()
    return path


def _problems(path: Path, files: dict[str, list[int]], names: list[str]) -> list[str]:
    problems = []
    for name in names:
        size, crc = files[name]
        file = path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != size:
            problems.append(f"{file}: {file.stat().st_size} bytes, {size} were written (truncated or replaced)")
        elif _crc32(file) != crc:
            problems.append(f"{file}: damaged (CRC-32 differs from the one written)")
    return problems


def verify_sharded(path: Path, collective: bool = True) -> None:
    """Check every file of the checkpoint folder against ``shards.json``; CheckpointError naming the bad file(s).
    ``collective`` (when distributed): every rank calls it and rank r checks files r, r + K, ...; else this process
    checks all."""
    collective = collective and _distributed()
    manifest = path / SHARDS
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        problems = [f"{manifest}: unreadable ({err}): the checkpoint is incomplete"]
    else:
        names = sorted(files)
        rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
        problems = _problems(path, files, names[rank::world])
    if collective:
        problems = [p for part in _gather(problems) for p in part]
    if problems:
        raise CheckpointError("; ".join(problems))


def _verified_trainer_state(path: Path, collective: bool) -> dict[str, Any]:
    """The folder's ``trainer_state.pt`` once every file passed :func:`verify_sharded`."""
    verify_sharded(path, collective=collective)
    state = safe_torch_load(path / TRAINER_STATE)
    if not is_training_checkpoint(state):
        raise CheckpointError(f"{path / TRAINER_STATE}: not a training checkpoint of xlsr")
    return state


def read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """Verify the folder and return its trainer state, with ``sharded_path`` = the folder (model and optimizer
    are loaded later by :func:`load_sharded_into`)."""
    state = _verified_trainer_state(path, collective=True)
    state["sharded_path"] = str(path)
    return state


def load_sharded_into(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Load the folder's model and optimizer into ``model`` (sharded or not, any world size) and ``optimizer``."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # noqa: BLE001 - a file that passed the CRC check but does not fit this model
        raise CheckpointError(f"{path}: cannot load its model/optimizer into this run ({err})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_sharded_model(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """The whole model of a sharded checkpoint folder in this process (no process group used, whatever the world
    size that wrote it): (model config dict, state dict, trainer state). For ``from_pretrained``."""
    path = Path(path)
    state = _verified_trainer_state(path, collective=False)
    entries = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in entries.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    dcp.load({"model": model}, checkpoint_id=str(path), no_dist=True)
    return state["model_config"], model, state


def load_full_into(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load an unsharded checkpoint's model and (``optimizer.state_dict()``-style) optimizer state into a sharded
    ``model``: every rank passes the full tensors (memory-mapped from the file) and keeps its shards."""
    by_name = optimizer_state_by_name(model, optimizer_state)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))


def optimizer_state_by_name(model: nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (parameters numbered in ``model.parameters()`` order, as the trainer builds its
    optimizer) -> the same keyed by parameter name (``torch.distributed.checkpoint.state_dict``'s layout)."""
    names = [name for name, _ in model.named_parameters()]
    state = {names[index]: value for index, value in optimizer_state["state"].items()}
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in optimizer_state["param_groups"]]
    return {"state": state, "param_groups": groups}


def read_sharded_training_checkpoint(path: str | Path) -> tuple[Wav2Vec2Config, dict[str, torch.Tensor], dict]:
    """A sharded checkpoint folder (``distributed.strategy=fsdp``) -> (config, whole state dict, info), read in this
    process from all its shards."""
    model_config, state_dict, state = read_sharded_model(path)
    if "encoder" in model_config:
        raise CheckpointError(f"{path}: a fine-tuning checkpoint (CTC): load the run's model/ folder with "
                              "xlsr.Wav2Vec2ForCTC.from_pretrained")
    try:
        config = Wav2Vec2Config.from_dict(model_config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged training checkpoint ({err})") from None
    return config, state_dict, {"format": "xlsr-sharded-training", "num_updates": int(state.get("num_updates", 0))}
