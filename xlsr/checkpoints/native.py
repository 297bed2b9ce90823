"""Our own format: a directory with ``config.json`` (Wav2Vec2Config fields) and ``model.safetensors``."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from xlsr.checkpoints.errors import CheckpointError
from xlsr.checkpoints.reading import read_json_object, read_safetensors
from xlsr.config import Wav2Vec2Config

MODEL_TYPE = "xlsr-wav2vec2"
WEIGHTS_NAME = "model.safetensors"


def save_native(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``model`` (our Wav2Vec2Model) as ``config.json`` + ``model.safetensors`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.cfg.save(out_dir / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", "model_type": MODEL_TYPE})
    return out_dir


def read_native_config(config_file: Path, config_class: type = Wav2Vec2Config):
    """Our ``config.json`` -> ``config_class.from_dict`` of its fields (``model_type`` dropped); a bad field is a
    CheckpointError naming the file."""
    values = read_json_object(config_file)
    values.pop("model_type", None)
    try:
        return config_class.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: {err}") from None


def read_native(path: str | Path) -> tuple[Wav2Vec2Config, dict[str, torch.Tensor], dict]:
    """Read one of our directories -> (config, state dict, info)."""
    path = Path(path)
    config = read_native_config(path / "config.json")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_NAME}")
    return config, read_safetensors(weights), {"format": "native"}
