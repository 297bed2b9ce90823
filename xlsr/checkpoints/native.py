"""Our own format: a directory with ``config.json`` (Wav2Vec2Config fields) and ``model.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xlsr.checkpoints.safe_pickle import CheckpointError
from xlsr.config import Wav2Vec2Config

MODEL_TYPE = "xlsr-wav2vec2"
TRAINING_CHECKPOINT_MARK = "xlsr_training_checkpoint"  # key present in the .pt files python -m xlsr.pretrain writes
WEIGHTS_NAME = "model.safetensors"


def save_native(model: nn.Module, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.cfg.save(out_dir / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", "model_type": MODEL_TYPE})
    return out_dir


def read_native(path: str | Path) -> tuple[Wav2Vec2Config, dict[str, torch.Tensor], dict]:
    path = Path(path)
    try:
        values = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / 'config.json'}: invalid JSON ({err})") from None
    values.pop("model_type", None)
    try:
        config = Wav2Vec2Config.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path / 'config.json'}: {err}") from None
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_NAME}")
    try:
        state_dict = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{weights}: cannot read ({err})") from None
    return config, state_dict, {"format": "native"}


def read_training_checkpoint(checkpoint: dict, path: str | Path) -> tuple[Wav2Vec2Config, dict[str, torch.Tensor], dict]:
    """A checkpoint written by ``python -m xlsr.pretrain`` -> (config, state dict, info)."""
    try:
        config = Wav2Vec2Config.from_dict(checkpoint["model_config"])
        state_dict = checkpoint["model"]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged training checkpoint ({err})") from None
    return config, state_dict, {"format": "xlsr-training", "num_updates": int(checkpoint.get("num_updates", 0))}
