"""The original fairseq checkpoint format (``.pt``): key map, cfg reader and writer."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from xlsr.checkpoints.errors import CheckpointError
from xlsr.checkpoints.keymap import fuse_qkv, rename
from xlsr.config import Wav2Vec2Config, parse_conv_layers

logger = logging.getLogger(__name__)

# fairseq key -> our key ({n}: a layer number). Order matters only where patterns overlap.
FAIRSEQ_KEY_MAP = [
    ("mask_emb", "mask_embedding"),
    ("feature_extractor.conv_layers.{n}.0.weight", "feature_extractor.conv_layers.{n}.conv.weight"),
    ("feature_extractor.conv_layers.{n}.0.bias", "feature_extractor.conv_layers.{n}.conv.bias"),
    ("feature_extractor.conv_layers.{n}.2.1.weight", "feature_extractor.conv_layers.{n}.norm.weight"),  # layer norm
    ("feature_extractor.conv_layers.{n}.2.1.bias", "feature_extractor.conv_layers.{n}.norm.bias"),
    ("feature_extractor.conv_layers.{n}.2.weight", "feature_extractor.conv_layers.{n}.norm.weight"),  # group norm
    ("feature_extractor.conv_layers.{n}.2.bias", "feature_extractor.conv_layers.{n}.norm.bias"),
    ("layer_norm.weight", "feature_projection.layer_norm.weight"),
    ("layer_norm.bias", "feature_projection.layer_norm.bias"),
    ("post_extract_proj.weight", "feature_projection.projection.weight"),
    ("post_extract_proj.bias", "feature_projection.projection.bias"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv.conv.bias"),
    ("encoder.pos_conv.0.weight_g", "encoder.pos_conv.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv.0.weight_v", "encoder.pos_conv.conv.parametrizations.weight.original1"),
    ("encoder.layer_norm.weight", "encoder.layer_norm.weight"),
    ("encoder.layer_norm.bias", "encoder.layer_norm.bias"),
    *[
        (f"encoder.layers.{{n}}.{theirs}.{p}", f"encoder.layers.{{n}}.{ours}.{p}")
        for theirs, ours in [
            ("self_attn.q_proj", "attention.q_proj"),
            ("self_attn.k_proj", "attention.k_proj"),
            ("self_attn.v_proj", "attention.v_proj"),
            ("self_attn.out_proj", "attention.out_proj"),
            ("self_attn_layer_norm", "attention_norm"),
            ("fc1", "feed_forward.fc1"),
            ("fc2", "feed_forward.fc2"),
            ("final_layer_norm", "ffn_norm"),
        ]
        for p in ("weight", "bias")
    ],
    ("quantizer.vars", "quantizer.codebook"),
    ("quantizer.weight_proj.weight", "quantizer.weight_proj.weight"),
    ("quantizer.weight_proj.bias", "quantizer.weight_proj.bias"),
    ("project_q.weight", "project_q.weight"),
    ("project_q.bias", "project_q.bias"),
    ("final_proj.weight", "final_proj.weight"),
    ("final_proj.bias", "final_proj.bias"),
]

# newer torch spells the weight-norm pieces this way; accept them on input
_PARAMETRIZED_POS_CONV = {
    "encoder.pos_conv.0.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
    "encoder.pos_conv.0.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v",
}

_EXTRACTOR_MODES = {"default": "group_norm", "layer_norm": "layer_norm"}
# fields whose name differs between fairseq's cfg and ours
_RENAMED_FIELDS = {"conv_feature_layers": "conv_layers"}
# fairseq cfg fields that change nothing in the forward computations we implement, or that we only support at
# their default value (checked below)
_REQUIRED_VALUES = {
    "quantize_targets": True,
    "quantize_input": False,
    "target_glu": False,
    "negatives_from_everywhere": False,
    "layer_type": "transformer",
    "pos_conv_depth": 1,
    "mask_selection": "static",
    "activation_fn": "gelu",
}


def _as_dict(section: Any) -> dict[str, Any]:
    if section is None:
        return {}
    if isinstance(section, argparse.Namespace):
        return vars(section)
    if isinstance(section, dict):
        return section
    raise CheckpointError(f"unexpected cfg section of type {type(section).__name__}")


def config_from_fairseq(model_cfg: dict[str, Any], task_cfg: dict[str, Any]) -> Wav2Vec2Config:
    """fairseq model (+ task) cfg -> Wav2Vec2Config. Unknown keys are ignored (logged at debug level);
    missing ones take the original defaults."""
    name = model_cfg.get("_name") or model_cfg.get("arch")
    if name is not None and not str(name).startswith("wav2vec2"):
        raise CheckpointError(
            f"this is a {name!r} checkpoint, not a wav2vec 2.0 / XLS-R pretraining checkpoint"
            + (" (a fine-tuned CTC model: load it with xlsr.Wav2Vec2ForCTC.from_pretrained)" if "ctc" in str(name)
               else " (a fine-tuned model; load its pretrained base instead)" if "seq2seq" in str(name) else "")
        )
    known = {f.name for f in dataclasses.fields(Wav2Vec2Config)}
    values: dict[str, Any] = {}
    ignored = []
    for key, value in model_cfg.items():
        key = _RENAMED_FIELDS.get(key, key)
        if key in _REQUIRED_VALUES:
            if value is not None and value != _REQUIRED_VALUES[key]:
                raise CheckpointError(f"unsupported model setting {key}={value!r} (we implement {_REQUIRED_VALUES[key]!r})")
        elif key == "extractor_mode":
            if value not in _EXTRACTOR_MODES:
                raise CheckpointError(f"unknown extractor_mode {value!r}")
            values[key] = _EXTRACTOR_MODES[value]
        elif key == "conv_layers":
            values[key] = parse_conv_layers(value)
        elif key in known and key not in ("normalize", "sample_rate"):
            values[key] = value
        else:
            ignored.append(key)
    if ignored:
        logger.debug("ignored fairseq cfg keys: %s", ", ".join(sorted(ignored)))
    for key in ("normalize", "sample_rate"):
        if task_cfg.get(key) is not None:
            values[key] = task_cfg[key]
    if values.get("latent_temp") is not None:
        values["latent_temp"] = tuple(values["latent_temp"])
    return Wav2Vec2Config(**values)


def config_to_fairseq(cfg: Wav2Vec2Config) -> dict[str, Any]:
    """Wav2Vec2Config -> fairseq's model cfg fields (the inverse of ``config_from_fairseq``; ``normalize`` and
    ``sample_rate`` belong to fairseq's task cfg and are left out)."""
    ours_to_fairseq = {ours: theirs for theirs, ours in _RENAMED_FIELDS.items()}
    modes = {ours: theirs for theirs, ours in _EXTRACTOR_MODES.items()}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("normalize", "sample_rate"):
            continue
        if f.name == "conv_layers":
            value = str([tuple(layer) for layer in value])
        elif f.name == "extractor_mode":
            value = modes[value]
        values[ours_to_fairseq.get(f.name, f.name)] = value
    return values


def read_fairseq_checkpoint(checkpoint: Any, path: str | Path) -> tuple[Wav2Vec2Config, dict, dict]:
    """An unpickled fairseq ``.pt`` (read from ``path``) -> (config, our state dict, info).

    The cfg may be a plain dict (``cfg``, fairseq >= 0.10) or an argparse Namespace (``args``, older
    wav2vec 2.0 releases). info: num_updates and the criterion's loss weights where present.
    """
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    cfg = checkpoint.get("cfg")
    if cfg is not None:
        cfg = _as_dict(cfg)
        model_cfg, task_cfg = _as_dict(cfg.get("model")), _as_dict(cfg.get("task"))
        criterion_cfg = _as_dict(cfg.get("criterion"))
    elif checkpoint.get("args") is not None:
        model_cfg = task_cfg = criterion_cfg = _as_dict(checkpoint["args"])
    else:
        raise CheckpointError(f"{path}: fairseq checkpoint without 'cfg' or 'args'")
    try:
        config = config_from_fairseq(model_cfg, task_cfg)
    except (CheckpointError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    state_dict = state_dict_from_fairseq(checkpoint["model"], path)
    info: dict[str, Any] = {"format": "fairseq"}
    history = checkpoint.get("optimizer_history") or []
    if history and isinstance(history[-1], dict) and "num_updates" in history[-1]:
        info["num_updates"] = int(history[-1]["num_updates"])
    if criterion_cfg.get("loss_weights") is not None:
        info["loss_weights"] = list(criterion_cfg["loss_weights"])
    return config, state_dict, info


def state_dict_from_fairseq(model_state: dict[str, torch.Tensor], source: Any = "checkpoint") -> dict[str, torch.Tensor]:
    """fairseq state dict -> ours. Keys with no rule are an error naming them."""
    model_state = {_PARAMETRIZED_POS_CONV.get(k, k): v for k, v in model_state.items()}
    renamed, unmatched = rename(model_state, FAIRSEQ_KEY_MAP)
    if unmatched:
        raise CheckpointError(f"{source}: unexpected keys in the fairseq state dict: {', '.join(unmatched)}")
    return fuse_qkv(renamed)
