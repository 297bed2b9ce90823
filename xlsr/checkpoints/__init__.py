"""Reading and writing checkpoints: our format, fairseq ``.pt`` files and Hugging Face directories.

This module holds format detection and ``load_pretrained``, which maps keys onto our modules and loads strictly: a
missing or unexpected key, or a shape mismatch, is an error that names it. One module per format: ``native``,
``fairseq``, ``huggingface``, and ``training`` (the ``.pt`` files ``python -m xlsr.pretrain`` writes), plus ``ctc``
(fine-tuned CTC models of all three formats, for ``xlsr.Wav2Vec2ForCTC``); the shared
pieces: ``errors`` (CheckpointError), ``safe_loading`` (``safe_torch_load``), ``files`` (JSON and safetensors
reading), ``keymap`` (renaming state-dict keys), ``hub`` (Hugging Face Hub ids, resolved to their cached snapshot).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from xlsr.checkpoints.errors import CheckpointError
from xlsr.checkpoints.reading import read_json_object
from xlsr.checkpoints.hub import resolve_checkpoint_path
from xlsr.checkpoints.safe_loading import safe_torch_load
from xlsr.checkpoints.fairseq import read_fairseq_checkpoint
from xlsr.checkpoints.huggingface import read_huggingface
from xlsr.checkpoints.native import read_native
from xlsr.checkpoints.sharded import read_sharded_training_checkpoint
from xlsr.checkpoints.training import is_sharded_training_checkpoint, is_training_checkpoint, read_training_checkpoint
from xlsr.config import Wav2Vec2Config

__all__ = ["CheckpointError", "safe_torch_load", "detect_format", "read_checkpoint", "load_pretrained",
           "load_state_dict_checked"]


def detect_format(path: str | Path) -> str:
    """'native', 'native_ctc' (our Wav2Vec2ForCTC), 'native_classification' (our Wav2Vec2ForSequenceClassification) or 'huggingface' (directories), 'sharded-training' (a folder
    ``python -m xlsr.pretrain distributed.strategy=fsdp`` wrote), 'fairseq' (a ``.pt`` file: fairseq's or our
    training checkpoint)."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file() and is_sharded_training_checkpoint(path):
            return "sharded-training"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: directory without config.json (expected our or a Hugging Face export)")
        model_type = read_json_object(config_file).get("model_type")
        if model_type == "xlsr-wav2vec2":
            return "native"
        if model_type == "xlsr-wav2vec2-ctc":
            return "native_ctc"
        if model_type == "xlsr-wav2vec2-classification":
            return "native_classification"
        if model_type == "wav2vec2":
            return "huggingface"
        raise CheckpointError(f"{config_file}: model_type {model_type!r} is not a wav2vec 2.0 model")
    if path.is_file():
        return "fairseq"
    raise CheckpointError(f"{path}: no such file or directory")


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[Wav2Vec2Config, dict[str, torch.Tensor], dict]:
    """Any supported format (or a Hugging Face Hub id: ``hub.resolve_checkpoint_path``) -> (config, state dict in
    our key names, info)."""
    path = resolve_checkpoint_path(path)
    fmt = detect_format(path)
    if fmt == "native":
        return read_native(path)
    if fmt == "native_ctc":
        raise CheckpointError(f"{path}: a fine-tuned CTC model: load it with xlsr.Wav2Vec2ForCTC.from_pretrained")
    if fmt == "huggingface":
        return read_huggingface(path)
    if fmt == "sharded-training":
        return read_sharded_training_checkpoint(path)

    checkpoint = safe_torch_load(path, map_location)
    if is_training_checkpoint(checkpoint):
        return read_training_checkpoint(checkpoint, path)
    return read_fairseq_checkpoint(checkpoint, path)


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], *, strict: bool = True,
                            source: Any = "checkpoint", assign: bool = False) -> None:
    """``load_state_dict`` with errors that name every missing/unexpected key and both shapes of a mismatch."""
    expected = model.state_dict()
    problems = []
    for key, value in state_dict.items():
        if key in expected and tuple(expected[key].shape) != tuple(value.shape):
            problems.append(f"{key}: checkpoint has shape {tuple(value.shape)}, model expects {tuple(expected[key].shape)}")
    if problems:
        raise CheckpointError(f"{source}: shape mismatch:\n  " + "\n  ".join(problems))
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if strict and (missing or unexpected):
        lines = [f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected]
        raise CheckpointError(f"{source}: state dict does not match the model (pass strict=False to load anyway):\n  "
                              + "\n  ".join(lines))
    model.load_state_dict(state_dict, strict=False, assign=assign)


def load_pretrained(cls: type, path: str | Path, *, strict: bool = True, map_location: str = "cpu") -> nn.Module:
    """Build ``cls(config)`` from a checkpoint of any supported format (or a Hugging Face Hub id) and load its
    weights."""
    path = resolve_checkpoint_path(path)  # once here: what follows gets the local folder, no second Hub look-up
    config, state_dict, info = read_checkpoint(path, map_location)
    state_dict = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    if strict:
        # build without initialising, then adopt the checkpoint's tensors (no second copy of a large model)
        with torch.device("meta"):
            model = cls(config)
        load_state_dict_checked(model, state_dict, strict=True, source=path, assign=True)
    else:
        model = cls(config)
        load_state_dict_checked(model, state_dict, strict=False, source=path)
    if "num_updates" in info:
        model.set_num_updates(info["num_updates"])
    model.checkpoint_info = info
    return model.eval()
