"""Training checkpoints: the ``.pt`` files ``python -m xlsr.pretrain`` writes, read as pretrained weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from xlsr.checkpoints.errors import CheckpointError
from xlsr.config import Wav2Vec2Config

TRAINING_CHECKPOINT_MARK = "xlsr_training_checkpoint"  # key present in the .pt files python -m xlsr.pretrain writes
SHARDED_TRAINER_STATE = "trainer_state.pt"  # in a sharded checkpoint folder (distributed.strategy=fsdp)
SHARDED_MANIFEST = "shards.json"  # ... written last: every file's size and CRC-32


def is_training_checkpoint(checkpoint: Any) -> bool:
    """Whether an unpickled ``.pt`` is one ``python -m xlsr.pretrain`` wrote (and not a fairseq checkpoint)."""
    return isinstance(checkpoint, dict) and TRAINING_CHECKPOINT_MARK in checkpoint


def is_sharded_training_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder written as a sharded checkpoint (``xlsr/checkpoints/sharded.py``;
    whether it is complete, its ``shards.json`` tells)."""
    return (Path(path) / SHARDED_TRAINER_STATE).is_file()


def read_training_checkpoint(checkpoint: dict, path: str | Path) -> tuple[Wav2Vec2Config, dict[str, torch.Tensor], dict]:
    """A checkpoint written by ``python -m xlsr.pretrain`` (unpickled from ``path``) -> (config, state dict, info)."""
    try:
        config = Wav2Vec2Config.from_dict(checkpoint["model_config"])
        state_dict = checkpoint["model"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged training checkpoint ({err})") from None
    return config, state_dict, {"format": "xlsr-training", "num_updates": int(checkpoint.get("num_updates", 0))}
