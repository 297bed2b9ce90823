"""CTC (speech recognition) checkpoints: fairseq ``wav2vec_ctc`` ``.pt`` files, HF ``Wav2Vec2ForCTC`` directories and
ours, read into ``xlsr.Wav2Vec2ForCTC``; our and HF directories written from it.

Our layout: ``wav2vec2.*`` (the encoder's own key names, its pretraining head removed) and ``lm_head.{weight,bias}``.
fairseq: ``w2v_encoder.w2v_model.*`` (renamed with ``FAIRSEQ_KEY_MAP``) and ``w2v_encoder.proj.*``; the encoder's
architecture comes from ``cfg.model.w2v_args`` (the pretraining cfg, fine-tuning overrides already applied by fairseq),
the vocabulary from the ``Dictionary`` pickled into ``task_state`` (read as inert data) or a ``dict.<labels>.txt``
beside the file; the blank is index 0 (``<s>``). HF: ``wav2vec2.*`` (``HF_KEY_MAP``), ``lm_head.*``, ``vocab.json``
(symbol -> index), the blank is ``pad_token_id``; ``tokenizer_config.json`` names the unknown-letter symbol and the
word delimiter, and our transcripts of an HF folder follow HF's tokenizer (``CTCConfig.text_style``).

Blank naming in an HF export: HF's CTC tokenizer drops its ``pad_token`` from the text and nothing else (transformers'
ASR pipeline decodes with ``skip_special_tokens=False``), so the blank must be the tokenizer's ``pad_token``. Without
a ``tokenizer_config.json`` the pad_token is ``<pad>``, which in fairseq's vocabulary is index 1, not the blank
(``<s>``, index 0): HF then printed every blank as ``<s>``. HF's own fairseq converter renames index 0 ``<pad>`` and
index 1 ``<s>``. We keep fairseq's names and write ``tokenizer_config.json`` with ``pad_token`` = the blank's name
(``<s>``): HF's text then equals fairseq's for index 1 too (fairseq prints it as ``<pad>``; under the converter's
names HF prints ``<s>``), and the vocabulary read back is the source's, the one ``dict.ltr.txt`` gives (so fine-tuning
continues an export with the same dictionary). The one difference left is fairseq's ``</s>`` (index 2), which
fairseq's ``Dictionary.string`` drops and HF's tokenizer prints; it is never a CTC target, so a fine-tuned model does
not emit it. Our transcripts of an HF folder follow HF's rule (``text_style="huggingface"``): they equal the
pipeline's for every output.
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
from xlsr.checkpoints.errors import CheckpointError
from xlsr.checkpoints.fairseq import _as_dict, config_from_fairseq, state_dict_from_fairseq
from xlsr.checkpoints.reading import read_json_object, read_safetensors
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
from xlsr.checkpoints.native import read_native_config
from xlsr.checkpoints.safe_loading import safe_torch_load
from xlsr.config import CTCConfig, Wav2Vec2Config, finetuning_encoder_config
from xlsr.vocabulary import SPECIAL_SYMBOLS, UNK_SYMBOLS, Dictionary, LabelError, vocab_from_mapping

logger = logging.getLogger(__name__)

MODEL_TYPE = "xlsr-wav2vec2-ctc"
WEIGHTS_NAME = "model.safetensors"
VOCAB_NAME = "vocab.json"
ADDED_TOKENS_NAME = "added_tokens.json"  # HF tokenizers keep symbols added after training here
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"  # HF tokenizer settings: special tokens, word delimiter
HF_TOKENIZER_CLASS = "Wav2Vec2CTCTokenizer"
HF_PROCESSOR_CLASS = "Wav2Vec2Processor"
HF_DEFAULT_PAD = "<pad>"  # the pad_token (= CTC blank) of an HF tokenizer whose config does not name one
HF_ARCHITECTURE = "Wav2Vec2ForCTC"
HF_EXTRA_KEY = "xlsr_ctc_config"  # CTCConfig fields HF has no place for (kept in config.json, read back by us)
ENCODER = "wav2vec2."
HEAD = "lm_head."
_PRETRAINING_HEAD = ("quantizer.", "project_q.", "final_proj.")
FAIRSEQ_ENCODER = "w2v_encoder.w2v_model."
FAIRSEQ_HEAD = "w2v_encoder.proj."
FAIRSEQ_SPECIALS = SPECIAL_SYMBOLS  # fairseq Dictionary's first four symbols (bos, pad, eos, unk)
FAIRSEQ_UNK = UNK_SYMBOLS[0]


# ---------------------------------------------------------------------------------------------- which kind
def _fairseq_model_cfg(checkpoint: Any) -> dict[str, Any]:
    if not isinstance(checkpoint, dict):
        return {}
    if checkpoint.get("cfg") is not None:
        return _as_dict(_as_dict(checkpoint["cfg"]).get("model"))
    return _as_dict(checkpoint.get("args"))


def _is_fairseq_ctc(checkpoint: Any) -> bool:
    model_cfg = _fairseq_model_cfg(checkpoint)
    if (model_cfg.get("_name") or model_cfg.get("arch")) == "wav2vec_ctc":
        return True
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    return isinstance(state, dict) and any(str(k).startswith(FAIRSEQ_HEAD) for k in state)


def _is_hf_ctc(path: Path) -> bool:
    config = read_json_object(path / CONFIG_NAME)
    if HF_ARCHITECTURE in (config.get("architectures") or []):
        return True
    if config.get("architectures"):
        return False
    state, _ = read_weights(path)  # no architectures recorded: look for the head
    return any(k.startswith(HEAD) for k in state)


def is_ctc_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (or a Hugging Face Hub id) holds a CTC model (ours, HF ``Wav2Vec2ForCTC``, fairseq
    ``wav2vec_ctc``)."""
    path = resolve_checkpoint_path(path)
    fmt = detect_format(path)
    if fmt == "native_ctc":
        return True
    if fmt == "huggingface":
        return _is_hf_ctc(path)
    if fmt in ("native", "sharded-training", "native_classification"):
        return False
    return _is_fairseq_ctc(safe_torch_load(path))


# ---------------------------------------------------------------------------------------------- vocabularies
def read_fairseq_dictionary(path: Path) -> list[str]:
    """A fairseq ``Dictionary`` text file (``dict.ltr.txt``) -> symbols in index order, fairseq's four specials
    first (:meth:`xlsr.vocabulary.Dictionary.load`); CheckpointError naming the file and line if it is bad."""
    try:
        return Dictionary.load(path).symbols
    except (OSError, LabelError) as err:
        raise CheckpointError(f"{path}: cannot read dictionary ({err})") from None


def _pickled_symbols(dictionary: Any) -> list[str] | None:
    """The ``symbols`` list of a pickled fairseq Dictionary (an inert stand-in object, or a plain dict)."""
    state = getattr(dictionary, "__dict__", {}).get("_state", dictionary)
    if isinstance(state, dict):
        symbols = state.get("symbols")
        if isinstance(symbols, (list, tuple)) and all(isinstance(s, str) for s in symbols):
            return list(symbols)
    return None


def _read_vocab_file(path: Path) -> list[str]:
    mapping = read_json_object(path)
    added = path.parent / ADDED_TOKENS_NAME
    if added.is_file():
        for symbol, index in read_json_object(added).items():
            mapping.setdefault(symbol, index)
    try:
        return vocab_from_mapping(mapping)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------------- readers
Read = tuple[Any, dict[str, torch.Tensor], list[str], dict[str, Any]]  # (CTCConfig, state dict, vocab, info)


def read_fairseq_ctc(checkpoint: Any, path: Path) -> Read:
    """An unpickled fairseq ``wav2vec_ctc`` checkpoint (read from ``path``) -> (CTCConfig, our state, vocab, info)."""
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    if checkpoint.get("cfg") is not None:
        cfg = _as_dict(checkpoint["cfg"])
        model_cfg, task_cfg, criterion_cfg = (_as_dict(cfg.get(k)) for k in ("model", "task", "criterion"))
    elif checkpoint.get("args") is not None:
        model_cfg = task_cfg = criterion_cfg = _as_dict(checkpoint["args"])
    else:
        raise CheckpointError(f"{path}: fairseq checkpoint without 'cfg' or 'args'")
    name = model_cfg.get("_name") or model_cfg.get("arch")
    if name != "wav2vec_ctc":
        raise CheckpointError(f"{path}: a {name!r} checkpoint, not a fairseq CTC model ('wav2vec_ctc')")
    w2v_args = model_cfg.get("w2v_args")
    if w2v_args is None:
        raise CheckpointError(f"{path}: no w2v_args in the model cfg (the pretrained encoder's cfg): "
                              "cannot tell the architecture")
    if isinstance(w2v_args, argparse.Namespace):
        w2v_model = w2v_task = vars(w2v_args)
    else:
        w2v_args = _as_dict(w2v_args)
        w2v_model, w2v_task = _as_dict(w2v_args.get("model")), _as_dict(w2v_args.get("task"))
    try:
        encoder_cfg = config_from_fairseq(w2v_model, w2v_task)
    except (CheckpointError, ValueError) as err:
        raise CheckpointError(f"{path}: w2v_args: {err}") from None
    if w2v_model.get("mask_channel_selection", "static") != "static" or w2v_model.get("pct_holes", 0) or \
            w2v_model.get("mask_dropout", 0):
        logger.warning("%s: channel-mask selection / mask dropout settings we do not implement: training masks "
                       "will differ from fairseq's (inference is unaffected)", path)

    encoder_state: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    foreign = []
    for key, value in checkpoint["model"].items():
        if key.startswith(FAIRSEQ_ENCODER):
            encoder_state[key[len(FAIRSEQ_ENCODER):]] = value
        elif key.startswith(FAIRSEQ_HEAD):
            head[HEAD + key[len(FAIRSEQ_HEAD):]] = value
        else:
            foreign.append(key)
    if foreign:
        raise CheckpointError(f"{path}: unexpected keys in the fairseq CTC state dict: {', '.join(foreign)}")
    if set(head) != {HEAD + "weight", HEAD + "bias"}:
        raise CheckpointError(f"{path}: the CTC head w2v_encoder.proj.{{weight,bias}} is missing")
    renamed = state_dict_from_fairseq(encoder_state, path)
    state = {ENCODER + k: v for k, v in renamed.items() if not k.startswith(_PRETRAINING_HEAD)}
    state.update(head)

    vocab, vocab_from = None, None
    task_state = checkpoint.get("task_state")
    if isinstance(task_state, dict) and task_state.get("target_dictionary") is not None:
        vocab, vocab_from = _pickled_symbols(task_state["target_dictionary"]), "task_state"
    dict_file = path.parent / f"dict.{task_cfg.get('labels') or 'ltr'}.txt"
    if dict_file.is_file():
        file_vocab = read_fairseq_dictionary(dict_file)
        if vocab is None:
            vocab, vocab_from = file_vocab, dict_file.name
        elif file_vocab != vocab:
            logger.warning("%s differs from the dictionary inside %s; using the one inside", dict_file, path)
    if vocab is None:
        raise CheckpointError(f"{path}: no vocabulary: no target dictionary in task_state and no {dict_file.name} "
                              "beside the checkpoint")
    outputs = head[HEAD + "weight"].shape[0]
    if len(vocab) != outputs:
        raise CheckpointError(f"{path}: the vocabulary ({vocab_from}) has {len(vocab)} symbols, the head {outputs} "
                              "outputs")
    dictionary = task_state.get("target_dictionary") if isinstance(task_state, dict) else None
    bos = getattr(dictionary, "__dict__", {}).get("_state", {}).get("bos_index", 0) if dictionary is not None else 0
    try:
        cfg = CTCConfig(
            encoder=encoder_cfg,
            vocab_size=outputs,
            blank_index=int(bos),
            final_dropout=float(model_cfg.get("final_dropout") or 0.0),
            apply_mask=bool(model_cfg.get("apply_mask", False)),
            freeze_finetune_updates=int(model_cfg.get("freeze_finetune_updates") or 0),
            zero_infinity=bool(criterion_cfg.get("zero_infinity", False)),
            blank_weight=float(model_cfg.get("blank_weight") or 0.0),
            blank_mode=str(model_cfg.get("blank_mode") or "add"),
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    info: dict[str, Any] = {"format": "fairseq", "vocab_from": vocab_from}
    history = checkpoint.get("optimizer_history") or []
    if history and isinstance(history[-1], dict) and "num_updates" in history[-1]:
        info["num_updates"] = int(history[-1]["num_updates"])
    return cfg, state, vocab, info


def read_huggingface_ctc(path: Path) -> Read:
    """An HF ``Wav2Vec2ForCTC`` directory -> (CTCConfig, our state, vocab, info)."""
    encoder_cfg, hf_config, normalize_from = read_huggingface_config(path)
    config_file = path / CONFIG_NAME
    hf_state, files = read_weights(path)
    head = {k: v for k, v in hf_state.items() if k.startswith(HEAD)}
    if set(head) != {HEAD + "weight", HEAD + "bias"}:
        raise CheckpointError(f"{path}: no CTC head (lm_head.weight, lm_head.bias) in {', '.join(files)}")
    encoder_state = state_dict_from_huggingface({k: v for k, v in hf_state.items() if not k.startswith(HEAD)}, path)
    encoder_cfg, encoder_state = fit_feature_projection(encoder_cfg, encoder_state)
    info: dict[str, Any] = {"format": "huggingface", "weights": files, "normalize_from": normalize_from}
    if "mask_embedding" not in encoder_state:
        # HF builds masked_spec_embed only when masking is configured; fairseq's init for the unused one
        encoder_state["mask_embedding"] = torch.empty(encoder_cfg.encoder_embed_dim).uniform_()
        info["mask_embedding"] = "initialised (not in the checkpoint)"
    state = {ENCODER + k: v for k, v in encoder_state.items() if not k.startswith(_PRETRAINING_HEAD)}
    state.update(head)
    vocab_file = path / VOCAB_NAME
    outputs = head[HEAD + "weight"].shape[0]
    if not vocab_file.is_file():
        raise CheckpointError(
            f"{path}: no {VOCAB_NAME}: cannot tell which symbol each of the {outputs} CTC outputs is (copy the "
            f"tokenizer's {VOCAB_NAME} here; vocab=[...] would put a NEW head on this encoder instead)"
        )
    vocab = _read_vocab_file(vocab_file)
    if len(vocab) != outputs:
        raise CheckpointError(f"{vocab_file}: {len(vocab)} symbols for a head of {outputs} outputs")
    extras = hf_config.get(HF_EXTRA_KEY) or {}
    if not isinstance(extras, dict):
        raise CheckpointError(f"{config_file}: {HF_EXTRA_KEY} must be a JSON object")
    tokens = read_tokenizer_settings(path)
    pad = hf_config.get("pad_token_id")
    if pad is None and tokens["pad_token"] in vocab:
        pad = vocab.index(tokens["pad_token"])
    blank_name = vocab[int(pad)] if pad is not None and 0 <= int(pad) < len(vocab) else None
    if blank_name is not None and tokens["pad_token"] is not None and tokens["pad_token"] != blank_name:
        logger.warning("%s: pad_token_id %s (%r, the CTC blank) is not the tokenizer's pad_token %r, which HF's "
                       "pipeline drops from its text instead: transcripts will differ from the pipeline's",
                       path, pad, blank_name, tokens["pad_token"])
    if tokens["do_lower_case"]:
        logger.warning("%s: the tokenizer has do_lower_case=True: HF's pipeline lower-cases its transcripts, "
                       "ours keep the vocabulary's case", path)
    if tokens["clean_up_tokenization_spaces"]:
        logger.warning("%s: the tokenizer has clean_up_tokenization_spaces=True: HF's pipeline removes the space "
                       "before punctuation (' .' -> '.'), ours keep it", path)
    try:
        cfg = CTCConfig(
            encoder=encoder_cfg,
            vocab_size=outputs,
            blank_index=int(pad) if pad is not None else 0,
            final_dropout=float(hf_config.get("final_dropout", 0.1)),
            apply_mask=bool(hf_config.get("apply_spec_augment", True)),
            zero_infinity=bool(hf_config.get("ctc_zero_infinity", False)),
            ctc_loss_reduction=str(hf_config.get("ctc_loss_reduction", "sum")),
            text_style="huggingface",
            word_delimiter=tokens["word_delimiter_token"] or _TOKENIZER_DEFAULTS["word_delimiter_token"],
            unk_symbol=tokens["unk_token"] or FAIRSEQ_UNK,
            **{k: v for k, v in extras.items() if k in ("freeze_finetune_updates", "blank_weight", "blank_mode")},
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    if tokens["found"]:
        info["tokenizer_from"] = TOKENIZER_CONFIG_NAME
    return cfg, state, vocab, info


# transformers' Wav2Vec2CTCTokenizer defaults (what a folder without tokenizer_config.json gets)
_TOKENIZER_DEFAULTS: dict[str, Any] = {
    "unk_token": "<unk>", "pad_token": HF_DEFAULT_PAD, "bos_token": "<s>", "eos_token": "</s>",
    "word_delimiter_token": "|", "do_lower_case": False, "clean_up_tokenization_spaces": False,
}


def read_tokenizer_settings(path: Path) -> dict[str, Any]:
    """The CTC tokenizer settings of an HF folder (``tokenizer_config.json``, transformers' defaults where it is
    absent or silent): the special-token names (a plain string, or transformers 4.x's ``{"content": ...}``),
    ``word_delimiter_token``, ``do_lower_case``, ``clean_up_tokenization_spaces``; "found": whether the file exists."""
    settings = dict(_TOKENIZER_DEFAULTS)
    config_file = path / TOKENIZER_CONFIG_NAME
    settings["found"] = config_file.is_file()
    if not settings["found"]:
        return settings
    config = read_json_object(config_file)
    for key in _TOKENIZER_DEFAULTS:
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, dict) and key.endswith("_token"):
            value = value.get("content")
        if key.endswith("_token") and value is not None and not isinstance(value, str):
            raise CheckpointError(f"{config_file}: {key} must be a string, got {value!r}")
        settings[key] = value
    return settings


def read_native_ctc(path: Path) -> Read:
    """One of our CTC directories -> (CTCConfig, state, vocab, info)."""
    cfg = read_native_config(path / CONFIG_NAME, CTCConfig)
    vocab_file = path / VOCAB_NAME
    if not vocab_file.is_file():
        raise CheckpointError(f"{path}: missing {VOCAB_NAME}")
    vocab = _read_vocab_file(vocab_file)
    if len(vocab) != cfg.vocab_size:
        raise CheckpointError(f"{vocab_file}: {len(vocab)} symbols, config.json says vocab_size {cfg.vocab_size}")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_NAME}")
    return cfg, read_safetensors(weights), vocab, {"format": "native"}


def read_ctc(path: str | Path, map_location: str = "cpu") -> Read:
    """Any CTC checkpoint (or a Hugging Face Hub id) -> (CTCConfig, state dict in our key names, vocab, info); a
    checkpoint without a CTC head is a CheckpointError naming it."""
    path = resolve_checkpoint_path(path)
    fmt = detect_format(path)
    if fmt == "native_ctc":
        return read_native_ctc(path)
    if fmt == "huggingface":
        if not _is_hf_ctc(path):
            raise CheckpointError(f"{path}: a Hugging Face model without a CTC head (lm_head); pass vocab=[...] to "
                                  "put a new head on its encoder")
        return read_huggingface_ctc(path)
    if fmt == "native":
        raise CheckpointError(f"{path}: a pretrained model without a CTC head; pass vocab=[...] to put a new head "
                              "on its encoder")
    checkpoint = safe_torch_load(path, map_location)
    if not _is_fairseq_ctc(checkpoint):
        name = _fairseq_model_cfg(checkpoint).get("_name") or _fairseq_model_cfg(checkpoint).get("arch")
        raise CheckpointError(f"{path}: not a CTC model (model {name!r}, expected fairseq 'wav2vec_ctc'); pass "
                              "vocab=[...] to put a new head on its encoder")
    return read_fairseq_ctc(checkpoint, path)


# ---------------------------------------------------------------------------------------------- loading
def _split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    ctc_fields = {f.name for f in dataclasses.fields(CTCConfig)} - {"encoder", "vocab_size"}
    encoder_fields = {f.name for f in dataclasses.fields(Wav2Vec2Config)}
    unknown = sorted(set(settings) - ctc_fields - encoder_fields)
    if unknown:
        raise TypeError(f"unknown settings {unknown}: expected CTCConfig or Wav2Vec2Config fields")
    return ({k: v for k, v in settings.items() if k in ctc_fields},
            {k: v for k, v in settings.items() if k in encoder_fields})


def load_ctc(cls: type, path: str | Path, vocab: Sequence[str] | None, *, strict: bool = True,
             map_location: str = "cpu", settings: dict[str, Any] | None = None) -> nn.Module:
    """``Wav2Vec2ForCTC.from_pretrained``: see there."""
    ctc_settings, encoder_settings = _split_settings(settings or {})
    path = resolve_checkpoint_path(path)  # once here: the readers below get the local folder, no second Hub look-up
    if is_ctc_checkpoint(path):
        cfg, state, file_vocab, info = read_ctc(path, map_location)
        if vocab is not None:  # a new head on this encoder, for a vocabulary in fairseq's conventions
            state = {k: v for k, v in state.items() if not k.startswith(HEAD)}
            text_defaults = {f.name: f.default for f in dataclasses.fields(CTCConfig)
                             if f.name in ("text_style", "word_delimiter", "unk_symbol")}
            cfg = dataclasses.replace(cfg, vocab_size=len(vocab), blank_index=0, **text_defaults)
        else:
            vocab = file_vocab
    else:
        if vocab is None:
            raise CheckpointError(f"{path}: not a CTC model (no CTC head and no vocabulary); pass vocab=[...] to "
                                  "put a new head on its encoder")
        encoder_cfg, encoder_state, info = read_checkpoint(path, map_location)
        cfg = CTCConfig(encoder=finetuning_encoder_config(encoder_cfg), vocab_size=len(vocab))
        state = {ENCODER + k: v for k, v in encoder_state.items() if not k.startswith(_PRETRAINING_HEAD)}
        info = {**info, "num_updates": 0}  # the pretraining updates do not count as fine-tuning updates
    try:
        if encoder_settings:
            cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, **encoder_settings))
        if ctc_settings:
            cfg = dataclasses.replace(cfg, **ctc_settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
    new_head = HEAD + "weight" not in state
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    if strict and not new_head:
        with torch.device("meta"):  # adopt the checkpoint's tensors, no second copy
            model = cls(cfg, vocab)
        load_state_dict_checked(model, state, strict=True, source=path, assign=True)
    else:
        model = cls(cfg, vocab)
        if new_head:
            state.update({HEAD + k: v for k, v in model.lm_head.state_dict().items()})
        load_state_dict_checked(model, state, strict=strict, source=path)
    if info.get("num_updates"):
        model.set_num_updates(info["num_updates"])
    model.checkpoint_info = {**info, "new_head": new_head}
    return model.eval()


# ---------------------------------------------------------------------------------------------- writers
def _vocab_mapping(vocab: Sequence[str]) -> dict[str, int]:
    return {symbol: index for index, symbol in enumerate(vocab)}


def save_ctc_native(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a Wav2Vec2ForCTC as ``config.json`` + ``model.safetensors`` + ``vocab.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps({"model_type": MODEL_TYPE, **model.cfg.to_dict()}, indent=2) + "\n")
    (out_dir / VOCAB_NAME).write_text(json.dumps(_vocab_mapping(model.vocab), indent=2, ensure_ascii=False) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt", "model_type": MODEL_TYPE})
    return out_dir


def tokenizer_config_to_huggingface(cfg: Any, vocab: Sequence[str]) -> dict[str, Any]:
    """``tokenizer_config.json`` for HF's ``Wav2Vec2CTCTokenizer`` over ``vocab``: the blank's name is the
    pad_token (see the module docstring); bos/eos/unk are named where the vocabulary has them and they are not the
    blank (null otherwise, so that the tokenizer adds no symbol to the vocabulary). Spelled out rather than left to
    defaults: transformers 4.x defaulted ``clean_up_tokenization_spaces`` to True (' .' -> '.'), which would make
    its text differ from ours. Special tokens live here and nowhere else: transformers 5 writes no
    ``special_tokens_map.json``, and 4.x reads them from this file too."""
    blank = vocab[cfg.blank_index]

    def named(symbol: str) -> str | None:
        return symbol if symbol in vocab and symbol != blank else None

    return {
        "tokenizer_class": HF_TOKENIZER_CLASS,
        "processor_class": HF_PROCESSOR_CLASS,
        "pad_token": blank,
        "unk_token": named(cfg.unk_symbol),
        "bos_token": named("<s>"),
        "eos_token": named("</s>"),
        "word_delimiter_token": cfg.word_delimiter,
        "replace_word_delimiter_char": " ",
        "do_lower_case": False,
        "clean_up_tokenization_spaces": False,
    }


def config_to_huggingface_ctc(cfg: Any, vocab: Sequence[str]) -> dict[str, Any]:
    """CTCConfig -> HF ``config.json`` dict for ``Wav2Vec2ForCTC`` (the blank is ``pad_token_id``)."""
    out = config_to_huggingface(cfg.encoder)
    out.update({
        "architectures": [HF_ARCHITECTURE],
        "vocab_size": cfg.vocab_size,
        "pad_token_id": cfg.blank_index,
        "final_dropout": cfg.final_dropout,
        "apply_spec_augment": cfg.apply_mask,
        "ctc_loss_reduction": cfg.ctc_loss_reduction,
        "ctc_zero_infinity": cfg.zero_infinity,
        HF_EXTRA_KEY: {"freeze_finetune_updates": cfg.freeze_finetune_updates, "blank_weight": cfg.blank_weight,
                       "blank_mode": cfg.blank_mode},
    })
    for key, symbol in (("bos_token_id", "<s>"), ("eos_token_id", "</s>")):
        if symbol in vocab:
            out[key] = list(vocab).index(symbol)
    return out


def save_ctc_huggingface(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a Wav2Vec2ForCTC as an HF ``Wav2Vec2ForCTC`` directory that ``Wav2Vec2Processor`` / ``AutoProcessor``
    and the ASR ``pipeline`` of transformers 4.x and 5.x read: ``config.json``, ``model.safetensors``,
    ``preprocessor_config.json`` (the feature extractor; see ``preprocessor_to_huggingface``), ``vocab.json``
    (symbol -> our output index) and ``tokenizer_config.json`` (the blank is its pad_token)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    encoder_state = {k[len(ENCODER):]: v for k, v in state.items() if k.startswith(ENCODER)}
    hf_state = state_dict_to_huggingface(encoder_state, model.cfg.encoder)
    hf_state.update({k: v for k, v in state.items() if k.startswith(HEAD)})
    vocab = model.vocab  # fairseq's names kept (module docstring); tokenizer_config.json makes the blank the pad_token
    (out_dir / CONFIG_NAME).write_text(json.dumps(config_to_huggingface_ctc(model.cfg, vocab), indent=2) + "\n")
    (out_dir / PREPROCESSOR_NAME).write_text(
        json.dumps(preprocessor_to_huggingface(model.cfg.encoder), indent=2) + "\n"
    )
    (out_dir / VOCAB_NAME).write_text(json.dumps(_vocab_mapping(vocab), indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    (out_dir / TOKENIZER_CONFIG_NAME).write_text(
        json.dumps(tokenizer_config_to_huggingface(model.cfg, vocab), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(out_dir / SAFETENSORS_NAME),
              metadata={"format": "pt"})
    return out_dir
