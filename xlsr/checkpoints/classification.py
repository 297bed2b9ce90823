"""Classification checkpoints: HF ``Wav2Vec2ForSequenceClassification`` directories, fairseq ``wav2vec_classification``
``.pt`` files (mean pooling) and ours, read into ``xlsr.Wav2Vec2ForSequenceClassification``; ours and HF's written.

Our layout is HF's: ``wav2vec2.*`` (the encoder's own key names), ``projector.*``, ``classifier.*`` and, with
``use_weighted_layer_sum``, ``layer_weights``; labels in index order (HF ``id2label``). fairseq's
``MeanPoolingFast``: ``w2v_encoder.w2v_model.*``, ``pooling_layer.linear.*`` (= ``projector``) and
``pooling_layer.projection.*`` (= ``classifier``), its ``activation_fn`` after the masked mean
(``ClassificationConfig.pooling_activation``), labels from ``dict.<labels>.txt`` beside the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from xlsr.checkpoints import detect_format, load_state_dict_checked, read_checkpoint
from xlsr.checkpoints.ctc import HEAD as CTC_HEAD
from xlsr.checkpoints.ctc import is_ctc_checkpoint, read_ctc, read_fairseq_dictionary
from xlsr.checkpoints.errors import CheckpointError
from xlsr.checkpoints.fairseq import _as_dict, config_from_fairseq, state_dict_from_fairseq
from xlsr.checkpoints.hub import resolve_checkpoint_path
from xlsr.checkpoints.huggingface import (
    CONFIG_NAME,
    PREPROCESSOR_NAME,
    SAFETENSORS_NAME,
    config_to_huggingface,
    fit_feature_projection,
    preprocessor_to_huggingface,
    read_huggingface_config,
    read_weights,
    state_dict_from_huggingface,
    state_dict_to_huggingface,
)
from xlsr.checkpoints.reading import read_json_object, read_safetensors
from xlsr.checkpoints.safe_loading import safe_torch_load
from xlsr.config import ClassificationConfig, finetuning_encoder_config
from xlsr.text import normalize_unicode

logger = logging.getLogger(__name__)

MODEL_TYPE = "xlsr-wav2vec2-classification"
WEIGHTS_NAME = "model.safetensors"
HF_ARCHITECTURE = "Wav2Vec2ForSequenceClassification"
ENCODER = "wav2vec2."
HEAD_PREFIXES = ("projector.", "classifier.", "layer_weights")
_PRETRAINING_HEAD = ("quantizer.", "project_q.", "final_proj.")
FAIRSEQ_NAME = "wav2vec_classification"
FAIRSEQ_ENCODER = "w2v_encoder.w2v_model."
FAIRSEQ_HEAD = {"pooling_layer.linear.": "projector.", "pooling_layer.projection.": "classifier."}
_FAIRSEQ_ACTIVATIONS = {"linear": "identity"}  # fairseq activation_fn -> ours
Read = tuple[ClassificationConfig, dict[str, torch.Tensor], list[str], dict[str, Any]]


def _labels_from_id2label(id2label: Any, num_labels: int, source: Any) -> list[str]:
    if not id2label:
        return [f"LABEL_{i}" for i in range(num_labels)]  # transformers' default names
    if not isinstance(id2label, dict):
        raise CheckpointError(f"{source}: id2label must be a JSON object (index -> label)")
    try:
        by_index = {int(k): normalize_unicode(str(v)) for k, v in id2label.items()}
    except ValueError:
        raise CheckpointError(f"{source}: id2label keys must be integers, got {sorted(id2label)}") from None
    if sorted(by_index) != list(range(num_labels)):
        raise CheckpointError(f"{source}: id2label has indices {sorted(by_index)}, expected 0..{num_labels - 1}")
    return [by_index[i] for i in range(num_labels)]


# ---------------------------------------------------------------------------------------------- readers
def is_classification_checkpoint(path: Path) -> bool:
    """Whether the local ``path`` holds a classification model (ours, HF's, fairseq's)."""
    fmt = detect_format(path)
    if fmt == "native_classification":
        return True
    if fmt == "huggingface":
        state, _ = read_weights(path)
        return any(k.startswith("classifier.") for k in state)
    if fmt != "fairseq":
        return False
    state = safe_torch_load(path).get("model")
    return isinstance(state, dict) and any(str(k).startswith("pooling_layer.") for k in state)


def read_huggingface_classification(path: Path) -> Read:
    """An HF ``Wav2Vec2ForSequenceClassification`` directory -> (config, our state, labels, info)."""
    encoder_cfg, hf_config, normalize_from = read_huggingface_config(path)
    hf_state, files = read_weights(path)
    head = {k: v for k, v in hf_state.items() if k.startswith(HEAD_PREFIXES)}
    if not {"projector.weight", "classifier.weight"} <= set(head):
        raise CheckpointError(f"{path}: no classification head (projector, classifier) in {', '.join(files)}")
    encoder_state = state_dict_from_huggingface({k: v for k, v in hf_state.items() if k not in head}, path)
    encoder_cfg, encoder_state = fit_feature_projection(encoder_cfg, encoder_state)
    if "mask_embedding" not in encoder_state:  # HF builds masked_spec_embed only when masking is configured
        encoder_state["mask_embedding"] = torch.empty(encoder_cfg.encoder_embed_dim).uniform_()
    state = {ENCODER + k: v for k, v in encoder_state.items() if not k.startswith(_PRETRAINING_HEAD)}
    state.update(head)
    num_labels = head["classifier.weight"].shape[0]
    try:
        cfg = ClassificationConfig(
            encoder=encoder_cfg,
            num_labels=num_labels,
            classifier_proj_size=head["projector.weight"].shape[0],
            use_weighted_layer_sum="layer_weights" in head,
            apply_mask=bool(hf_config.get("apply_spec_augment", True)),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: {err}") from None
    labels = _labels_from_id2label(hf_config.get("id2label"), num_labels, path / CONFIG_NAME)
    return cfg, state, labels, {"format": "huggingface", "weights": files, "normalize_from": normalize_from}


def read_fairseq_classification(checkpoint: Any, path: Path) -> Read:
    """An unpickled fairseq ``wav2vec_classification`` checkpoint (mean pooling) -> (config, our state, labels,
    info). Labels: ``dict.<task.labels>.txt`` beside the file, else ``LABEL_<i>``."""
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    if checkpoint.get("cfg") is not None:
        cfg = _as_dict(checkpoint["cfg"])
        model_cfg, task_cfg = _as_dict(cfg.get("model")), _as_dict(cfg.get("task"))
    else:
        model_cfg = task_cfg = _as_dict(checkpoint.get("args"))
    name = model_cfg.get("_name") or model_cfg.get("arch")
    if name != FAIRSEQ_NAME:
        raise CheckpointError(f"{path}: a {name!r} checkpoint, not a fairseq {FAIRSEQ_NAME!r} model")
    pooling = model_cfg.get("pooling", "first_token")
    if pooling != "mean":
        raise CheckpointError(f"{path}: pooling {pooling!r}: only fairseq's 'mean' pooling is supported")
    w2v_args = model_cfg.get("w2v_args")
    if w2v_args is None:
        raise CheckpointError(f"{path}: no w2v_args in the model cfg: cannot tell the encoder's architecture")
    if isinstance(w2v_args, argparse.Namespace):
        w2v_model = w2v_task = vars(w2v_args)
    else:
        w2v_args = _as_dict(w2v_args)
        w2v_model, w2v_task = _as_dict(w2v_args.get("model")), _as_dict(w2v_args.get("task"))
    try:
        encoder_cfg = config_from_fairseq(w2v_model, w2v_task)
    except (CheckpointError, ValueError) as err:
        raise CheckpointError(f"{path}: w2v_args: {err}") from None
    encoder_state, head, foreign = {}, {}, []
    for key, value in checkpoint["model"].items():
        if key.startswith(FAIRSEQ_ENCODER):
            encoder_state[key[len(FAIRSEQ_ENCODER):]] = value
            continue
        prefix = next((p for p in FAIRSEQ_HEAD if key.startswith(p)), None)
        if prefix is None:
            foreign.append(key)
        else:
            head[FAIRSEQ_HEAD[prefix] + key[len(prefix):]] = value
    if foreign:
        raise CheckpointError(f"{path}: unexpected keys in the fairseq classification state dict: "
                              f"{', '.join(foreign)}")
    expected = {f"{p}{k}" for p in FAIRSEQ_HEAD.values() for k in ("weight", "bias")}
    if set(head) != expected:
        raise CheckpointError(f"{path}: the pooling layer needs pooling_layer.linear and pooling_layer.projection "
                              f"weight and bias, found {sorted(head)}")
    renamed = state_dict_from_fairseq(encoder_state, path)
    state = {ENCODER + k: v for k, v in renamed.items() if not k.startswith(_PRETRAINING_HEAD)}
    state.update(head)
    num_labels = head["classifier.weight"].shape[0]
    labels = [f"LABEL_{i}" for i in range(num_labels)]
    labels_from = "default"
    dict_file = path.parent / f"dict.{task_cfg.get('labels') or 'lang'}.txt"
    if dict_file.is_file():
        # a label dictionary without fairseq's four special symbols (its audio_classification task adds none)
        labels = [s for s in read_fairseq_dictionary(dict_file) if s not in ("<s>", "<pad>", "</s>", "<unk>")]
        labels_from = dict_file.name
        if len(labels) != num_labels:
            raise CheckpointError(f"{dict_file}: {len(labels)} labels for a head of {num_labels} outputs")
    activation = str(model_cfg.get("activation_fn") or "gelu")
    try:
        cfg = ClassificationConfig(
            encoder=encoder_cfg,
            num_labels=num_labels,
            classifier_proj_size=head["projector.weight"].shape[0],
            pooling_activation=_FAIRSEQ_ACTIVATIONS.get(activation, activation),
            apply_mask=bool(model_cfg.get("apply_mask", False)),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    return cfg, state, labels, {"format": "fairseq", "labels_from": labels_from}


def read_native_classification(path: Path) -> Read:
    """One of our classification directories -> (config, state, labels, info)."""
    config_file = path / CONFIG_NAME
    values = read_json_object(config_file)
    values.pop("model_type", None)
    values.pop("label2id", None)  # written for HF's readers; id2label is the one read
    id2label = values.pop("id2label", None)
    try:
        cfg = ClassificationConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    labels = _labels_from_id2label(id2label, cfg.num_labels, config_file)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_NAME}")
    return cfg, read_safetensors(weights), labels, {"format": "native"}


def read_classification(path: Path, map_location: str = "cpu") -> Read:
    """A local classification checkpoint of any format -> (config, state in our key names, labels, info)."""
    fmt = detect_format(path)
    if fmt == "native_classification":
        return read_native_classification(path)
    if fmt == "huggingface":
        return read_huggingface_classification(path)
    return read_fairseq_classification(safe_torch_load(path, map_location), path)


# ---------------------------------------------------------------------------------------------- loading
def load_classification(cls: type, path: str | Path, labels: Sequence[str] | None, *, strict: bool = True,
                        map_location: str = "cpu", settings: dict[str, Any] | None = None) -> nn.Module:
    """``Wav2Vec2ForSequenceClassification.from_pretrained``: see there."""
    path = resolve_checkpoint_path(path)
    settings = dict(settings or {})
    head_fields = {f.name for f in dataclasses.fields(ClassificationConfig)} - {"encoder", "num_labels"}
    head_settings = {k: settings.pop(k) for k in list(settings) if k in head_fields}
    if labels is None:
        if not is_classification_checkpoint(path):
            raise CheckpointError(f"{path}: not a classification model (no classification head); pass "
                                  "labels=[...] to put a new head on its encoder")
        cfg, state, labels, info = read_classification(path, map_location)
        new_head = False
    else:
        if is_classification_checkpoint(path):
            encoder_cfg, state, _, info = read_classification(path, map_location)
            encoder_cfg = encoder_cfg.encoder
        elif is_ctc_checkpoint(path):
            ctc_cfg, state, _, info = read_ctc(path, map_location)
            encoder_cfg = ctc_cfg.encoder
        else:
            encoder_cfg, encoder_state, info = read_checkpoint(path, map_location)
            encoder_cfg = finetuning_encoder_config(encoder_cfg)
            state = {ENCODER + k: v for k, v in encoder_state.items()}
        state = {k: v for k, v in state.items() if k.startswith(ENCODER)
                 and not k[len(ENCODER):].startswith(_PRETRAINING_HEAD)}
        cfg = ClassificationConfig(encoder=encoder_cfg, num_labels=len(labels))
        new_head = True
    try:
        if settings:
            cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **settings))
        if head_settings:
            cfg = dataclasses.replace(cfg, **head_settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    model = cls(cfg, labels)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    if new_head:
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)})
    load_state_dict_checked(model, state, strict=strict, source=path)
    model.checkpoint_info = {**info, "new_head": new_head}
    return model.eval()


# ---------------------------------------------------------------------------------------------- writers
def _label_maps(labels: Sequence[str]) -> dict[str, Any]:
    return {"id2label": {str(i): s for i, s in enumerate(labels)}, "label2id": {s: i for i, s in enumerate(labels)}}


def save_classification_native(model: nn.Module, out_dir: str | Path) -> Path:
    """Write ``config.json`` (our config + HF's ``id2label`` / ``label2id``) + ``model.safetensors`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, **model.cfg.to_dict(), **_label_maps(model.labels)}
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", "model_type": MODEL_TYPE})
    return out_dir


def save_classification_huggingface(model: nn.Module, out_dir: str | Path) -> Path:
    """Write an HF ``Wav2Vec2ForSequenceClassification`` directory (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``) that ``AutoModelForAudioClassification`` and ``pipeline("audio-classification")``
    load. HF's head has no activation after the pooling: a model with ``pooling_activation`` other than "identity"
    (fairseq's gelu) is refused, since HF would compute other logits."""
    cfg: ClassificationConfig = model.cfg
    if cfg.pooling_activation != "identity":
        raise CheckpointError(f"pooling_activation={cfg.pooling_activation!r} (fairseq's activation_fn after the "
                              "mean): Hugging Face's Wav2Vec2ForSequenceClassification has no such activation and "
                              "would compute different logits; save it in our format (save_pretrained) instead")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf_state = state_dict_to_huggingface({k[len(ENCODER):]: v for k, v in state.items() if k.startswith(ENCODER)},
                                         cfg.encoder)
    hf_state.update({k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)})
    hf_config = config_to_huggingface(cfg.encoder)
    hf_config.update({
        "architectures": [HF_ARCHITECTURE],
        "num_labels": cfg.num_labels,
        **_label_maps(model.labels),
        "classifier_proj_size": cfg.classifier_proj_size,
        "use_weighted_layer_sum": cfg.use_weighted_layer_sum,
        "apply_spec_augment": cfg.apply_mask,
    })
    (out_dir / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor_to_huggingface(cfg.encoder), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out_dir / SAFETENSORS_NAME),
              metadata={"format": "pt"})
    return out_dir
