"""Hugging Face ``transformers`` wav2vec 2.0 directories: key map, config reader/writer, loader and exporter.

A Hugging Face export is a directory with ``config.json`` (``model_type: "wav2vec2"``), the weights
(``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``) and, usually, the
feature extractor's settings, which say whether the input is normalised: ``preprocessor_config.json`` (what
transformers 4.x writes, and 5.x still reads) or, from transformers 5, nested under ``feature_extractor`` in
``processor_config.json`` (what 5.x writes, and reads first; 4.x does not read it). We read
``Wav2Vec2ForPreTraining`` exports (keys under ``wav2vec2.`` plus ``quantizer.*``, ``project_hid.*``, ``project_q.*``)
and bare ``Wav2Vec2Model`` exports (the same keys without the ``wav2vec2.`` prefix and without the pretraining head), and write
``Wav2Vec2ForPreTraining`` exports that ``transformers`` loads with no missing or unexpected key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from xlsr.checkpoints.errors import CheckpointError
from xlsr.checkpoints.reading import read_json_object, read_safetensors
from xlsr.checkpoints.keymap import fuse_qkv, rename, split_qkv
from xlsr.checkpoints.safe_loading import check_file, load_weights_only
from xlsr.config import Wav2Vec2Config

logger = logging.getLogger(__name__)

MODEL_TYPE = "wav2vec2"
ARCHITECTURE = "Wav2Vec2ForPreTraining"
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"
# where transformers >= 5 nests the feature extractor's settings inside processor_config.json (audio models)
_NESTED_FEATURE_EXTRACTOR_KEYS = ("feature_extractor", "audio_processor")
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# our config fields that Hugging Face's Wav2Vec2Config has no place for: kept under this key of config.json
# (transformers keeps unknown config entries as plain attributes), so that ours -> HF -> ours is lossless
EXTRA_FIELDS_KEY = "xlsr_config"

_BASE = "wav2vec2."
_POS_CONV = "wav2vec2.encoder.pos_conv_embed.conv"

# Hugging Face key -> our key ({n}: a layer number). Where two HF spellings map to the same key of ours, the first
# is the one we write: ``weight_g``/``weight_v`` is what the released hub checkpoints hold and what every
# transformers version loads (newer ones rename it to ``parametrizations.weight.original0/1`` on load).
HF_KEY_MAP = [
    ("wav2vec2.masked_spec_embed", "mask_embedding"),
    *[
        (f"wav2vec2.feature_extractor.conv_layers.{{n}}.{theirs}.{p}", f"feature_extractor.conv_layers.{{n}}.{ours}.{p}")
        # group-norm layout: only conv_layers.0 has a ``layer_norm`` (a GroupNorm); layer-norm layout: every layer
        for theirs, ours in [("conv", "conv"), ("layer_norm", "norm")]
        for p in ("weight", "bias")
    ],
    ("wav2vec2.feature_projection.layer_norm.weight", "feature_projection.layer_norm.weight"),
    ("wav2vec2.feature_projection.layer_norm.bias", "feature_projection.layer_norm.bias"),
    ("wav2vec2.feature_projection.projection.weight", "feature_projection.projection.weight"),
    ("wav2vec2.feature_projection.projection.bias", "feature_projection.projection.bias"),
    (f"{_POS_CONV}.bias", "encoder.pos_conv.conv.bias"),
    (f"{_POS_CONV}.weight_g", "encoder.pos_conv.conv.parametrizations.weight.original0"),
    (f"{_POS_CONV}.weight_v", "encoder.pos_conv.conv.parametrizations.weight.original1"),
    (f"{_POS_CONV}.parametrizations.weight.original0", "encoder.pos_conv.conv.parametrizations.weight.original0"),
    (f"{_POS_CONV}.parametrizations.weight.original1", "encoder.pos_conv.conv.parametrizations.weight.original1"),
    ("wav2vec2.encoder.layer_norm.weight", "encoder.layer_norm.weight"),
    ("wav2vec2.encoder.layer_norm.bias", "encoder.layer_norm.bias"),
    *[
        (f"wav2vec2.encoder.layers.{{n}}.{theirs}.{p}", f"encoder.layers.{{n}}.{ours}.{p}")
        for theirs, ours in [
            ("attention.q_proj", "attention.q_proj"),
            ("attention.k_proj", "attention.k_proj"),
            ("attention.v_proj", "attention.v_proj"),
            ("attention.out_proj", "attention.out_proj"),
            ("layer_norm", "attention_norm"),
            ("feed_forward.intermediate_dense", "feed_forward.fc1"),
            ("feed_forward.output_dense", "feed_forward.fc2"),
            ("final_layer_norm", "ffn_norm"),
        ]
        for p in ("weight", "bias")
    ],
    ("quantizer.codevectors", "quantizer.codebook"),
    ("quantizer.weight_proj.weight", "quantizer.weight_proj.weight"),
    ("quantizer.weight_proj.bias", "quantizer.weight_proj.bias"),
    ("project_q.weight", "project_q.weight"),
    ("project_q.bias", "project_q.bias"),
    ("project_hid.weight", "final_proj.weight"),
    ("project_hid.bias", "final_proj.bias"),
]

# top-level prefixes of the HF pretraining head (everything else of a pretraining model lives under ``wav2vec2.``)
_HEAD_PREFIXES = ("quantizer.", "project_hid.", "project_q.")
# modules of other HF wav2vec 2.0 classes that we do not implement, with what they are (for the error message)
_FOREIGN_MODULES = [
    (re.compile(r"^lm_head\."), "the CTC head of a fine-tuned Wav2Vec2ForCTC model: load it with xlsr.Wav2Vec2ForCTC"),
    (re.compile(r"^(projector|classifier|layer_weights)\b"), "a sequence/frame classification head"),
    (re.compile(r"^(tdnn|objective|feature_extractor\.|classifier)\b"), "an x-vector head"),
    (re.compile(r"^wav2vec2\.adapter\."), "an output adapter (add_adapter=True)"),
    (re.compile(r"\.adapter_layer\."), "attention adapters (adapter_attn_dim)"),
]

_EXTRACTOR_MODES = {"group": "group_norm", "layer": "layer_norm"}
# HF config field -> our field, where the meaning is the same
_RENAMED_FIELDS = {
    "hidden_size": "encoder_embed_dim",
    "num_hidden_layers": "encoder_layers",
    "intermediate_size": "encoder_ffn_embed_dim",
    "num_attention_heads": "encoder_attention_heads",
    "do_stable_layer_norm": "layer_norm_first",
    "conv_bias": "conv_bias",
    "num_conv_pos_embeddings": "conv_pos",
    "num_conv_pos_embedding_groups": "conv_pos_groups",
    "num_codevectors_per_group": "latent_vars",
    "num_codevector_groups": "latent_groups",
    "codevector_dim": "latent_dim",  # HF: total codebook dimension (all groups)
    "proj_codevector_dim": "final_dim",
    "contrastive_logits_temperature": "logit_temp",
    "num_negatives": "num_negatives",
    "mask_time_prob": "mask_prob",
    "mask_time_length": "mask_length",
    "mask_time_min_masks": "min_masks",
    "mask_feature_prob": "mask_channel_prob",
    "mask_feature_length": "mask_channel_length",
    "layerdrop": "encoder_layerdrop",
    "hidden_dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout",
    "feat_proj_dropout": "dropout_input",
    "feat_quantizer_dropout": "dropout_features",
}
# head dims whose value 0 means "same as another dim" in our config; HF always spells them out
_SPELLED_DIMS = ("final_dim", "latent_dim")
_GELU = ("gelu", "gelu_python")
_LAYER_NORM_EPS = 1e-5  # every LayerNorm of ours uses torch's default


def _check_supported(d: dict[str, Any]) -> None:
    """Raise for Hugging Face settings that change the computation in a way we do not implement."""
    problems = []
    for key in ("hidden_act", "feat_extract_activation"):
        if d.get(key, "gelu") not in _GELU:
            problems.append(f"{key}={d[key]!r} (we implement 'gelu')")
    if d.get("feat_extract_norm", "group") not in _EXTRACTOR_MODES:
        problems.append(f"feat_extract_norm={d['feat_extract_norm']!r} (expected 'group' or 'layer')")
    eps = d.get("layer_norm_eps", _LAYER_NORM_EPS)
    if eps is None or not math.isclose(float(eps), _LAYER_NORM_EPS, rel_tol=1e-6):
        problems.append(f"layer_norm_eps={eps!r} (we implement {_LAYER_NORM_EPS})")
    if d.get("add_adapter"):
        problems.append("add_adapter=True (output adapter layers)")
    if d.get("adapter_attn_dim") is not None:
        problems.append(f"adapter_attn_dim={d['adapter_attn_dim']!r} (attention adapters)")
    if d.get("position_embeddings_type") not in (None, "conv"):
        problems.append(f"position_embeddings_type={d['position_embeddings_type']!r} (we implement the convolutional one)")
    for key in ("num_conv_pos_embedding_layers", "conv_pos_depth"):
        if d.get(key) not in (None, 1):
            problems.append(f"{key}={d[key]!r} (we implement one positional conv layer)")
    if problems:
        raise CheckpointError("unsupported Hugging Face wav2vec 2.0 setting(s): " + "; ".join(problems))


def config_from_huggingface(d: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> Wav2Vec2Config:
    """HF ``config.json`` (+ optional ``preprocessor_config.json``) dict -> Wav2Vec2Config.

    Fields HF lacks take our defaults, unless a previous ``config_to_huggingface`` stored them under
    ``xlsr_config``. Settings we do not implement raise ``CheckpointError``.
    """
    model_type = d.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise CheckpointError(f"model_type {model_type!r} is not a Hugging Face wav2vec 2.0 model ('wav2vec2')")
    _check_supported(d)
    values: dict[str, Any] = {}
    for theirs, ours in _RENAMED_FIELDS.items():
        if d.get(theirs) is not None:
            values[ours] = d[theirs]
    values["extractor_mode"] = _EXTRACTOR_MODES[d.get("feat_extract_norm", "group")]
    dims, kernels, strides = d.get("conv_dim"), d.get("conv_kernel"), d.get("conv_stride")
    if dims is not None or kernels is not None or strides is not None:
        if dims is None or kernels is None or strides is None or not len(dims) == len(kernels) == len(strides):
            raise CheckpointError(
                f"conv_dim, conv_kernel and conv_stride must be lists of the same length, got {dims}, {kernels}, {strides}"
            )
        values["conv_layers"] = [(int(c), int(k), int(s)) for c, k, s in zip(dims, kernels, strides)]
    values["activation_fn"] = "gelu"
    extras = d.get(EXTRA_FIELDS_KEY) or {}
    if not isinstance(extras, dict):
        raise CheckpointError(f"{EXTRA_FIELDS_KEY} must be a JSON object, got {type(extras).__name__}")
    known = {f.name for f in dataclasses.fields(Wav2Vec2Config)}
    for key, value in extras.items():
        if key in known and key not in values:
            values[key] = value
    if preprocessor:
        if preprocessor.get("do_normalize") is not None:
            values["normalize"] = bool(preprocessor["do_normalize"])
        if preprocessor.get("sampling_rate") is not None:
            values["sample_rate"] = int(preprocessor["sampling_rate"])
    if values.get("latent_temp") is not None:
        values["latent_temp"] = tuple(values["latent_temp"])
    try:
        config = Wav2Vec2Config(**values)
        # our 0 = "same as" spellings of the two head dims, when an export of ours recorded them and they agree
        spelled = {k: extras[k] for k in _SPELLED_DIMS if isinstance(extras.get(k), int)}
        if spelled:
            respelled = dataclasses.replace(config, **spelled)
            if (respelled.proj_dim, respelled.codebook_dim) == (config.proj_dim, config.codebook_dim):
                config = respelled
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"invalid wav2vec 2.0 configuration: {err}") from None
    return config


def config_to_huggingface(cfg: Wav2Vec2Config) -> dict[str, Any]:
    """Wav2Vec2Config -> HF ``config.json`` dict for ``Wav2Vec2ForPreTraining``.

    Our fields HF has no place for go under ``xlsr_config`` (transformers ignores them; we read them back).
    Input normalisation and the sample rate belong to ``preprocessor_config.json`` (``preprocessor_to_huggingface``).
    """
    if cfg.activation_fn != "gelu":
        raise ValueError(f"activation_fn {cfg.activation_fn!r} has no Hugging Face equivalent here")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "feat_extract_norm": "layer" if cfg.extractor_mode == "layer_norm" else "group",
        "feat_extract_activation": "gelu",
        "conv_dim": [c for c, _, _ in cfg.conv_layers],
        "conv_kernel": [k for _, k, _ in cfg.conv_layers],
        "conv_stride": [s for _, _, s in cfg.conv_layers],
        "conv_bias": cfg.conv_bias,
        "num_feat_extract_layers": len(cfg.conv_layers),
        "hidden_size": cfg.encoder_embed_dim,
        "num_hidden_layers": cfg.encoder_layers,
        "intermediate_size": cfg.encoder_ffn_embed_dim,
        "num_attention_heads": cfg.encoder_attention_heads,
        "hidden_act": "gelu",
        "do_stable_layer_norm": cfg.layer_norm_first,
        "layer_norm_eps": _LAYER_NORM_EPS,
        "num_conv_pos_embeddings": cfg.conv_pos,
        "num_conv_pos_embedding_groups": cfg.conv_pos_groups,
        "num_codevectors_per_group": cfg.latent_vars,
        "num_codevector_groups": cfg.latent_groups,
        "codevector_dim": cfg.codebook_dim,
        "proj_codevector_dim": cfg.proj_dim,
        "contrastive_logits_temperature": cfg.logit_temp,
        "num_negatives": cfg.num_negatives,
        "diversity_loss_weight": 0.1,
        "apply_spec_augment": True,
        "mask_time_prob": cfg.mask_prob,
        "mask_time_length": cfg.mask_length,
        "mask_time_min_masks": cfg.min_masks,
        "mask_feature_prob": cfg.mask_channel_prob,
        "mask_feature_length": cfg.mask_channel_length,
        "mask_feature_min_masks": 0,
        "layerdrop": cfg.encoder_layerdrop,
        "hidden_dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "feat_proj_dropout": cfg.dropout_input,
        "feat_quantizer_dropout": cfg.dropout_features,
        "final_dropout": 0.0,
        "add_adapter": False,
        "initializer_range": 0.02,
    }
    mapped = set(_RENAMED_FIELDS.values()) | {"extractor_mode", "conv_layers", "activation_fn", "normalize", "sample_rate"}
    out[EXTRA_FIELDS_KEY] = {k: v for k, v in cfg.to_dict().items() if k not in mapped or k in _SPELLED_DIMS}
    return out


def preprocessor_to_huggingface(cfg: Wav2Vec2Config) -> dict[str, Any]:
    """A minimal ``preprocessor_config.json`` for ``Wav2Vec2FeatureExtractor`` matching ``cfg``.

    We write this file, not transformers 5's ``processor_config.json`` (the feature extractor nested inside):
    transformers 4.x reads only ``preprocessor_config.json``, and 5.x still reads it when ``processor_config.json``
    is absent, so one file serves both."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "processor_class": "Wav2Vec2Processor",
        "feature_size": 1,
        "sampling_rate": cfg.sample_rate,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": cfg.normalize,
        # group-norm models (wav2vec 2.0 base) were trained without attention masks; layer-norm models take one
        "return_attention_mask": cfg.extractor_mode == "layer_norm",
    }


# ---------------------------------------------------------------------------------------------- state dicts
def _pos_conv_from_plain_weight(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Positional conv stored without weight norm (``conv.weight`` only) -> the (g, v) pair: g = ||w|| over all dims
    but the kernel axis, v = w (so g * v / ||v|| == w)."""
    plain = f"{_POS_CONV}.weight"
    if plain not in state:
        return state
    has_pair = any(k.startswith((f"{_POS_CONV}.weight_", f"{_POS_CONV}.parametrizations.")) for k in state)
    state = dict(state)
    weight = state.pop(plain)
    if not has_pair:  # otherwise the plain weight is a derived copy: drop it
        state[f"{_POS_CONV}.weight_g"] = torch.linalg.vector_norm(weight.float(), dim=(0, 1), keepdim=True).to(weight.dtype)
        state[f"{_POS_CONV}.weight_v"] = weight
    return state


def state_dict_from_huggingface(
    hf_state: dict[str, torch.Tensor], source: Any = "checkpoint"
) -> dict[str, torch.Tensor]:
    """HF ``Wav2Vec2ForPreTraining`` (or bare ``Wav2Vec2Model``) state dict -> ours (the feature projection kept
    as HF has it: ``fit_feature_projection`` fits it to our model).

    Keys of HF heads or modules we do not have are an error naming them.
    """
    if not any(k.startswith(_BASE) for k in hf_state):
        # a bare Wav2Vec2Model export: its keys lack the ``wav2vec2.`` prefix
        hf_state = {(k if k.startswith(_HEAD_PREFIXES) else _BASE + k): v for k, v in hf_state.items()}
    hf_state = _pos_conv_from_plain_weight(hf_state)
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("num_batches_tracked")}
    foreign: dict[str, list[str]] = {}
    for key in hf_state:
        for pattern, what in _FOREIGN_MODULES:
            if pattern.search(key):
                foreign.setdefault(what, []).append(key)
                break
    if foreign:
        details = "; ".join(f"{what}: {', '.join(keys)}" for what, keys in foreign.items())
        raise CheckpointError(f"{source}: this Hugging Face checkpoint has modules we do not implement ({details})")
    renamed, unmatched = rename(hf_state, HF_KEY_MAP)
    if unmatched:
        raise CheckpointError(f"{source}: unexpected keys in the Hugging Face state dict: {', '.join(unmatched)}")
    try:
        state = fuse_qkv(renamed)
    except KeyError as err:
        raise CheckpointError(f"{source}: {err.args[0]}") from None
    return state


def fit_feature_projection(
    cfg: Wav2Vec2Config, state: dict[str, torch.Tensor]
) -> tuple[Wav2Vec2Config, dict[str, torch.Tensor]]:
    """HF always has ``feature_projection.projection``; our model (as fairseq's) has none when the conv dimension
    equals the hidden size, unless ``keep_feature_projection``. For such a model: an identity projection (what
    ``state_dict_to_huggingface`` writes for ours) is dropped, any other one kept with ``keep_feature_projection``
    set. Returns (config, state dict in our key names)."""
    weight = state.get("feature_projection.projection.weight")
    if cfg.conv_dim != cfg.encoder_embed_dim or weight is None or cfg.keep_feature_projection:
        return cfg, state
    bias = state.get("feature_projection.projection.bias")
    eye = torch.eye(weight.shape[0], dtype=weight.dtype)
    if weight.shape == eye.shape and torch.equal(weight, eye) and (bias is None or not bias.count_nonzero()):
        state = {k: v for k, v in state.items() if not k.startswith("feature_projection.projection.")}
        return cfg, state
    return dataclasses.replace(cfg, keep_feature_projection=True), state


def state_dict_to_huggingface(state_dict: dict[str, torch.Tensor], cfg: Wav2Vec2Config) -> dict[str, torch.Tensor]:
    """Ours -> HF ``Wav2Vec2ForPreTraining`` key names."""
    state = dict(state_dict)
    if "feature_projection.projection.weight" not in state and cfg.conv_dim == cfg.encoder_embed_dim:
        # fairseq's layout (no projection when C == D): HF's always has one, so write the identity
        ref = state["feature_projection.layer_norm.weight"]
        state["feature_projection.projection.weight"] = torch.eye(cfg.conv_dim, dtype=ref.dtype)
        state["feature_projection.projection.bias"] = torch.zeros(cfg.conv_dim, dtype=ref.dtype)
    if cfg.mask_prob <= 0 and cfg.mask_channel_prob <= 0:
        # HF builds masked_spec_embed only when some masking is configured
        logger.warning("mask_prob and mask_channel_prob are 0: the mask embedding is not exported")
        state.pop("mask_embedding", None)
    renamed, unmatched = rename(split_qkv(state), HF_KEY_MAP, reverse=True)
    if unmatched:
        raise KeyError(f"no Hugging Face name for: {', '.join(unmatched)}")
    return renamed


# ---------------------------------------------------------------------------------------------- files
def _load_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` (or one shard of one): a pickled dict of tensors and nothing else."""
    check_file(path, "missing weights file")
    state = load_weights_only(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def _load_sharded(index_path: Path, loader) -> tuple[dict[str, torch.Tensor], list[str]]:
    index = read_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' in the shard index")
    files = sorted(set(weight_map.values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        shard = loader(index_path.parent / name)
        state.update(shard)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{index_path}: keys listed in the index but absent from the shards: {', '.join(missing)}")
    return state, files


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of an HF directory (safetensors preferred) and the file names it came from."""
    if (path / SAFETENSORS_NAME).is_file():
        return read_safetensors(path / SAFETENSORS_NAME), [SAFETENSORS_NAME]
    if (path / SAFETENSORS_INDEX_NAME).is_file():
        return _load_sharded(path / SAFETENSORS_INDEX_NAME, read_safetensors)
    if (path / PYTORCH_NAME).is_file():
        return _load_torch_bin(path / PYTORCH_NAME), [PYTORCH_NAME]
    if (path / PYTORCH_INDEX_NAME).is_file():
        return _load_sharded(path / PYTORCH_INDEX_NAME, _load_torch_bin)
    raise CheckpointError(
        f"{path}: no weights found (looked for {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, {PYTORCH_NAME}, "
        f"{PYTORCH_INDEX_NAME})"
    )


def read_feature_extractor_settings(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """An HF directory's feature-extractor settings, looked up as transformers 5 does: nested under
    ``feature_extractor`` (or ``audio_processor``) in ``processor_config.json`` first, else
    ``preprocessor_config.json`` (transformers 4.x's only place). Returns (settings, the file name they came
    from), (None, None) when neither holds them."""
    processor_file = path / PROCESSOR_NAME
    if processor_file.is_file():
        processor = read_json_object(processor_file)
        for key in _NESTED_FEATURE_EXTRACTOR_KEYS:
            if key in processor:
                if not isinstance(processor[key], dict):
                    raise CheckpointError(f"{processor_file}: {key!r} must be a JSON object")
                return processor[key], PROCESSOR_NAME
    preprocessor_file = path / PREPROCESSOR_NAME
    if preprocessor_file.is_file():
        return read_json_object(preprocessor_file), PREPROCESSOR_NAME
    return None, None


def read_huggingface_config(path: Path) -> tuple[Wav2Vec2Config, dict[str, Any], str]:
    """An HF directory's ``config.json`` (+ the feature extractor's settings where present:
    ``read_feature_extractor_settings``) -> (our config, the HF config as read, the file ``normalize`` came from:
    "default" when no file says, with a warning); problems are CheckpointErrors naming the file."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{path}: missing {CONFIG_NAME}")
    hf_config = read_json_object(config_file)
    preprocessor, preprocessor_file = read_feature_extractor_settings(path)
    try:
        config = config_from_huggingface(hf_config, preprocessor)
    except CheckpointError as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    if preprocessor is None or preprocessor.get("do_normalize") is None:
        logger.warning("%s: no do_normalize in %s or %s; assuming normalize=%s", path, PROCESSOR_NAME,
                       PREPROCESSOR_NAME, config.normalize)
        return config, hf_config, "default"
    return config, hf_config, preprocessor_file


def read_huggingface(path: str | Path) -> tuple[Wav2Vec2Config, dict[str, torch.Tensor], dict]:
    """Read an HF wav2vec 2.0 directory -> (config, our state dict, info)."""
    path = Path(path)
    config, hf_config, normalize_from = read_huggingface_config(path)
    hf_state, files = read_weights(path)
    config, state_dict = fit_feature_projection(config, state_dict_from_huggingface(hf_state, path))
    info: dict[str, Any] = {"format": "huggingface", "weights": files}
    if hf_config.get("architectures"):
        info["architectures"] = list(hf_config["architectures"])
    if hf_config.get("diversity_loss_weight") is not None:
        info["diversity_loss_weight"] = float(hf_config["diversity_loss_weight"])
    info["normalize_from"] = normalize_from
    return config, state_dict, info


def save_huggingface(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``model`` (our Wav2Vec2Model) as an HF ``Wav2Vec2ForPreTraining`` directory:
    ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``."""
    cfg: Wav2Vec2Config = model.cfg
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf_state = {k: v.contiguous() for k, v in state_dict_to_huggingface(state, cfg).items()}
    hf_config = config_to_huggingface(cfg)
    (out_dir / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
    (out_dir / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor_to_huggingface(cfg), indent=2) + "\n")
    save_file(hf_state, str(out_dir / SAFETENSORS_NAME), metadata={"format": "pt"})
    return out_dir
