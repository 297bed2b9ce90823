"""wav2vec 2.0 / XLS-R fine-tuned for speech recognition with CTC (fairseq's ``wav2vec_ctc``); read top to bottom.

waveform (B, S)
  -> wav2vec2: the Wav2Vec2Model encoder (conv stack, projection, [training] fine-tuning masks, transformer)
                                                 (B, T, D)   one frame per 20 ms
  -> final_dropout -> lm_head: Linear(D, V)      (B, T, V)   "logits"
  -> padded frames forced to the blank, log_softmax in float32 (fairseq's ``get_logits`` + ``get_normalized_probs``)
                                                 (B, T, V)   "log_probs"

``ctc_loss`` is fairseq's CTC criterion, ``decode`` its greedy (viterbi) decoding with the "letter" post-processing.
The encoder's pretraining head (quantizer, project_q, final_proj) is removed, as fairseq's
``remove_pretraining_modules`` does; state-dict keys are ``wav2vec2.*`` (the encoder's own keys) and ``lm_head.*``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xlsr.config import Wav2Vec2Config
from xlsr.model import Wav2Vec2Model
from xlsr.text import normalize_unicode

logger = logging.getLogger(__name__)

# fairseq's Wav2VecEncoder overrides these encoder settings of the pretrained model with the fine-tuning config's
# (``arg_overrides``; fairseq name -> ours). Their defaults in fairseq's Wav2Vec2AsrConfig:
FINETUNING_OVERRIDES: dict[str, tuple[str, Any]] = {
    "dropout": ("dropout", 0.0),
    "activation_dropout": ("activation_dropout", 0.0),
    "dropout_input": ("dropout_input", 0.0),
    "attention_dropout": ("attention_dropout", 0.0),
    "mask_length": ("mask_length", 10),
    "mask_prob": ("mask_prob", 0.5),
    "require_same_masks": ("require_same_masks", True),
    "no_mask_overlap": ("no_mask_overlap", False),
    "mask_channel_length": ("mask_channel_length", 10),
    "mask_channel_prob": ("mask_channel_prob", 0.0),
    "mask_channel_before": ("mask_channel_before", False),
    "no_mask_channel_overlap": ("no_mask_channel_overlap", False),
    "layerdrop": ("encoder_layerdrop", 0.0),
    "feature_grad_mult": ("feature_grad_mult", 0.0),
}
# symbols fairseq's ``Dictionary.string`` leaves out of the text (its bos and eos); the blank is removed before
WORD_BOUNDARY = "|"
DROPPED_SYMBOLS = ("<s>", "</s>")
TEXT_STYLES = ("fairseq", "huggingface")  # CTCConfig.text_style: see there


def finetuning_encoder_config(pretrained: Wav2Vec2Config, **settings: Any) -> Wav2Vec2Config:
    """The encoder config fine-tuning uses: ``pretrained`` with fairseq's fine-tuning defaults for the settings its
    Wav2VecEncoder overrides (no dropout, LayerDrop 0, frozen conv stack, mask_prob 0.5 x 10, no channel masks),
    then ``settings`` (any Wav2Vec2Config field, our names)."""
    values = {ours: default for ours, default in FINETUNING_OVERRIDES.values()}
    values.update(settings)
    return dataclasses.replace(pretrained, **values)


@dataclass
class CTCConfig:
    """Everything that defines a Wav2Vec2ForCTC besides its vocabulary (fairseq: ``cfg.model`` of a ``wav2vec_ctc``
    checkpoint, its ``w2v_args`` and the CTC criterion's settings; Hugging Face: ``Wav2Vec2ForCTC``'s config)."""

    encoder: Wav2Vec2Config = field(default_factory=Wav2Vec2Config)
    """The encoder, with the fine-tuning values of its dropout, LayerDrop, masking and ``feature_grad_mult``
    (fairseq: ``w2v_args.model`` after the Wav2VecEncoder overrides; HF: ``hidden_dropout``, ``mask_time_prob``...)."""

    vocab_size: int = 32
    """Number of output classes V (fairseq: ``len(target_dictionary)``; HF ``vocab_size``)."""

    blank_index: int = 0
    """Output index of the CTC blank (fairseq: ``<s>`` = 0; HF: ``pad_token_id``)."""

    final_dropout: float = 0.0
    """Dropout on the encoder output before ``lm_head`` (fairseq and HF ``final_dropout``)."""

    apply_mask: bool = False
    """Apply the encoder's time / channel masks in training (fairseq ``apply_mask``; HF ``apply_spec_augment``)."""

    freeze_finetune_updates: int = 0
    """For this many updates only the head trains: the encoder runs under no_grad (fairseq
    ``freeze_finetune_updates``; advance with ``set_num_updates``)."""

    zero_infinity: bool = False
    """Zero infinite CTC losses (targets longer than the input) and their gradients (fairseq criterion
    ``zero_infinity``; HF ``ctc_zero_infinity``)."""

    ctc_loss_reduction: str = "sum"
    """"sum": summed over the batch (fairseq's criterion); "mean": HF's ``ctc_loss_reduction="mean"`` (each
    utterance's loss divided by its target length, then averaged)."""

    blank_weight: float = 0.0
    """Added to (``blank_mode="add"``) or written into (``"set"``) the blank logit before normalisation (fairseq
    ``blank_weight``; 0 = off)."""

    blank_mode: str = "add"
    """How ``blank_weight`` applies: "add" or "set" (fairseq ``blank_mode``)."""

    text_style: str = "fairseq"
    """How ``decode`` turns the best path (repeats collapsed, blanks removed) into text. "fairseq": its
    ``Dictionary.string`` + "letter" post-processing (``<s>`` and ``</s>`` dropped, ``word_delimiter`` -> space).
    "huggingface": ``Wav2Vec2CTCTokenizer.decode`` as transformers' ASR pipeline calls it for CTC models
    (``skip_special_tokens=False``): only the blank (its ``pad_token``) is dropped, every other symbol, ``<s>``,
    ``</s>`` and ``<unk>`` included, is text, ``word_delimiter`` -> space. Hugging Face folders are read with
    "huggingface", so that our transcripts of them are the pipeline's."""

    word_delimiter: str = WORD_BOUNDARY
    """The symbol written as a space between words (fairseq: ``|``; HF: the tokenizer's ``word_delimiter_token``)."""

    unk_symbol: str = "<unk>"
    """The symbol that stands for letters outside the vocabulary (fairseq: ``<unk>``; HF: the tokenizer's
    ``unk_token``, e.g. ``[UNK]``). ``Wav2Vec2ForCTC.unk_symbol`` is None when the vocabulary lacks it."""

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = Wav2Vec2Config.from_dict(self.encoder)
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if not 0 <= self.blank_index < self.vocab_size:
            raise ValueError(f"blank_index {self.blank_index} is outside the vocabulary of {self.vocab_size}")
        if self.ctc_loss_reduction not in ("sum", "mean"):
            raise ValueError(f"ctc_loss_reduction must be 'sum' or 'mean', got {self.ctc_loss_reduction!r}")
        if self.blank_mode not in ("add", "set"):
            raise ValueError(f"blank_mode must be 'add' or 'set', got {self.blank_mode!r}")
        if self.text_style not in TEXT_STYLES:
            raise ValueError(f"text_style must be one of {TEXT_STYLES}, got {self.text_style!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["encoder"] = self.encoder.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CTCConfig":
        """From plain data (our ``config.json``); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown CTCConfig fields: {unknown}")
        return cls(**values)


@dataclass
class CTCOutput:
    """What ``Wav2Vec2ForCTC.forward`` returns."""

    logits: torch.Tensor  # (B, T, V) lm_head output (fairseq's encoder_out, batch first), in the model's dtype
    log_probs: torch.Tensor  # (B, T, V) float32: padded frames forced to the blank, then log_softmax
    lengths: torch.Tensor  # (B,) int64 number of valid frames
    padding_mask: torch.Tensor | None  # (B, T) bool, True = padded frame; None when nothing is padded


class Wav2Vec2ForCTC(nn.Module):
    """A wav2vec 2.0 / XLS-R encoder with a linear CTC head (fairseq's ``Wav2VecCtc``, HF's ``Wav2Vec2ForCTC``)."""

    def __init__(self, cfg: CTCConfig, vocab: Sequence[str] | None = None):
        super().__init__()
        self.cfg = cfg
        vocab = [str(s) for s in vocab] if vocab is not None else [f"<{i}>" for i in range(cfg.vocab_size)]
        if len(vocab) != cfg.vocab_size:
            raise ValueError(f"vocabulary of {len(vocab)} symbols for a head of {cfg.vocab_size} outputs")
        if len(set(vocab)) != len(vocab):
            repeated = sorted({s for s in vocab if vocab.count(s) > 1})
            raise ValueError(f"vocabulary symbols must be distinct; repeated: {repeated}")
        self.vocab: list[str] = nfc_vocab(vocab)
        self.wav2vec2 = Wav2Vec2Model(cfg.encoder)
        # the pretraining head is not used (fairseq's remove_pretraining_modules)
        self.wav2vec2.quantizer = None
        self.wav2vec2.project_q = None
        self.wav2vec2.final_proj = None
        self.final_dropout = nn.Dropout(cfg.final_dropout)
        self.lm_head = nn.Linear(cfg.encoder.encoder_embed_dim, cfg.vocab_size)
        nn.init.xavier_uniform_(self.lm_head.weight)  # fairseq's Linear()
        nn.init.zeros_(self.lm_head.bias)
        self.num_updates = 0

    @property
    def blank_index(self) -> int:
        return self.cfg.blank_index

    @property
    def unk_symbol(self) -> str | None:
        """The vocabulary's symbol for unknown letters (``cfg.unk_symbol``), None when the vocabulary has none."""
        return self.cfg.unk_symbol if self.cfg.unk_symbol in self.vocab else None

    # ------------------------------------------------------------------ training schedule
    def set_num_updates(self, num_updates: int) -> None:
        """Record the optimizer update count (call once per update): decides ``encoder_frozen``."""
        self.num_updates = int(num_updates)

    @property
    def encoder_frozen(self) -> bool:
        """True while ``num_updates < cfg.freeze_finetune_updates``: the encoder then runs under no_grad."""
        return self.num_updates < self.cfg.freeze_finetune_updates

    # ------------------------------------------------------------------ forward
    def forward(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None, layer_keep: list[bool] | None = None
    ) -> CTCOutput:
        """source (B, S) 16 kHz (normalised if ``cfg.encoder.normalize``); padding_mask (B, S) bool, True = pad.

        In training the encoder applies LayerDrop and, with ``cfg.apply_mask``, its time and channel masks
        (fairseq: ``mask=self.apply_mask and self.training``); while ``encoder_frozen`` it runs under no_grad.
        layer_keep: the LayerDrop decisions, one per layer (the trainer draws them once per update); default:
        drawn by the encoder on each training forward.
        """
        encoder = self.wav2vec2
        with torch.no_grad() if self.encoder_frozen else contextlib.nullcontext():
            if self.training and self.cfg.apply_mask:
                feats = encoder.extract_features_masked(source, padding_mask, layer_keep=layer_keep)
            else:
                feats = encoder.extract_features(source, padding_mask, layer_keep=layer_keep)
        logits = self.lm_head(self.final_dropout(feats.x))  # (B, T, V)
        batch, time, _ = logits.shape
        frame_padding = feats.padding_mask
        if frame_padding is None:
            lengths = torch.full((batch,), time, dtype=torch.long, device=logits.device)
        else:
            lengths = (~frame_padding).sum(-1)
        return CTCOutput(logits, self.normalize(logits, frame_padding), lengths, frame_padding)

    def normalize(self, logits: torch.Tensor, frame_padding: torch.Tensor | None) -> torch.Tensor:
        """(B, T, V) logits -> float32 log-probabilities as fairseq's ``get_normalized_probs``: blank weight, then
        every padded frame forced to the blank (logits 0 at the blank, -inf elsewhere), then log_softmax."""
        x = logits
        if self.cfg.blank_weight != 0:
            x = x.clone()
            if self.cfg.blank_mode == "add":
                x[..., self.blank_index] += self.cfg.blank_weight
            else:
                x[..., self.blank_index] = self.cfg.blank_weight
        if frame_padding is not None:
            forced = torch.full((x.shape[-1],), float("-inf"), dtype=x.dtype, device=x.device)
            forced[self.blank_index] = 0.0
            x = torch.where(frame_padding.unsqueeze(-1), forced, x)
        return F.log_softmax(x.float(), dim=-1)

    # ------------------------------------------------------------------ loss and decoding
    def ctc_loss(self, out: CTCOutput, targets: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
        """fairseq's CTC criterion: ``F.ctc_loss`` on ``out.log_probs`` over the valid frames, summed over the batch
        (``cfg.ctc_loss_reduction``), blank and zero_infinity from the config. targets: (B, L) label indices padded
        past each ``target_lengths`` (B,), or all targets concatenated (sum(target_lengths),)."""
        with torch.backends.cudnn.flags(enabled=False):
            return F.ctc_loss(
                out.log_probs.transpose(0, 1),  # (T, B, V)
                targets.to(out.log_probs.device),
                out.lengths,
                target_lengths.to(out.log_probs.device),
                blank=self.blank_index,
                reduction=self.cfg.ctc_loss_reduction,
                zero_infinity=self.cfg.zero_infinity,
            )

    def greedy_units(self, out: CTCOutput | torch.Tensor, lengths: torch.Tensor | None = None) -> list[list[int]]:
        """Best path per utterance: argmax per valid frame, repeats collapsed, blanks dropped (fairseq's viterbi).
        ``out``: a CTCOutput (its log_probs and lengths) or emissions (B, T, V) with optional ``lengths`` (B,)."""
        if isinstance(out, CTCOutput):
            emissions, lengths = out.log_probs, out.lengths
        else:
            emissions = out
        return ctc_greedy_units(emissions, lengths, self.blank_index)

    def decode(self, out: CTCOutput | torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
        """Greedy transcripts: ``greedy_units`` turned into text as ``cfg.text_style`` says: fairseq's
        ``Dictionary.string`` (drops ``<s>``, ``</s>``) + ``post_process(..., "letter")`` (symbols joined, ``|`` ->
        space, stripped), or HF's CTC tokenizer (nothing dropped but the blank; ``|`` -> space, stripped)."""
        to_text = letters_to_text if self.cfg.text_style == "fairseq" else tokens_to_text
        return [to_text([self.vocab[i] for i in units], self.cfg.word_delimiter)
                for units in self.greedy_units(out, lengths)]

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        vocab: Sequence[str] | None = None,
        *,
        strict: bool = True,
        map_location: str = "cpu",
        **settings: Any,
    ) -> "Wav2Vec2ForCTC":
        """Load a CTC model: a fairseq ``wav2vec_ctc`` ``.pt``, an HF ``Wav2Vec2ForCTC`` directory, or ours; or a
        Hugging Face Hub id (``"owner/name"``, not an existing path), through ``huggingface_hub``'s cache.

        With ``vocab``: a new head of ``len(vocab)`` outputs (xavier-uniform weight, zero bias) on the encoder
        of any checkpoint ``from_pretrained`` reads (pretrained or CTC). For a pretrained encoder, the fine-tuning
        defaults of ``finetuning_encoder_config`` apply. ``settings``: CTCConfig fields (``final_dropout``,
        ``apply_mask``, ``blank_index``, ...) or encoder fields (``mask_prob``, ``encoder_layerdrop``, ...)
        that replace the loaded values.
        """
        from xlsr.checkpoints.ctc import load_ctc

        return load_ctc(cls, path, vocab, strict=strict, map_location=map_location, settings=settings)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + ``vocab.json`` (symbol -> output index) into ``out_dir``."""
        from xlsr.checkpoints.ctc import save_ctc_native

        return save_ctc_native(self, out_dir)


# ---------------------------------------------------------------------------------------------- decoding
def ctc_greedy_units(emissions: torch.Tensor, lengths: torch.Tensor | None, blank: int) -> list[list[int]]:
    """(B, T, V) scores -> per utterance the argmax over its first ``lengths[b]`` frames, consecutive repeats
    collapsed, ``blank`` removed."""
    best = emissions.argmax(-1).cpu()  # (B, T)
    if lengths is None:
        lengths = torch.full((best.shape[0],), best.shape[1], dtype=torch.long)
    result = []
    for row, length in zip(best, lengths.tolist()):
        units = torch.unique_consecutive(row[: int(length)])
        result.append([u for u in units.tolist() if u != blank])
    return result


def letters_to_text(symbols: Sequence[str], word_delimiter: str = WORD_BOUNDARY) -> str:
    """Letter units -> text, exactly fairseq's ``Dictionary.string`` then ``post_process(..., "letter")``:
    ``<s>`` and ``</s>`` dropped, symbols joined with spaces, all spaces removed, ``|`` -> space, stripped; then
    Unicode NFC (a letter and a combining mark emitted as two units become one character, as in the labels)."""
    pieces = " ".join(s for s in symbols if s not in DROPPED_SYMBOLS)
    return normalize_unicode(pieces.replace(" ", "").replace(word_delimiter, " ").strip())


def nfc_vocab(vocab: Sequence[str]) -> list[str]:
    """``vocab`` with every symbol in Unicode NFC (:func:`xlsr.text.normalize_unicode`), so that labels, which are
    NFC, find their letters; unchanged (with a warning) when two symbols would become one (e.g. ``;`` and the
    Greek question mark U+037E), since the head has an output for each."""
    normalized = [normalize_unicode(symbol) for symbol in vocab]
    if len(set(normalized)) < len(normalized):
        seen: dict[str, str] = {}
        merged = sorted({f"{seen[n]!r} / {s!r}" for s, n in zip(vocab, normalized) if seen.setdefault(n, s) != s})
        logger.warning("the vocabulary is not put in Unicode NFC: symbols %s are one symbol in NFC", ", ".join(merged))
        return list(vocab)
    return normalized


def tokens_to_text(symbols: Sequence[str], word_delimiter: str = WORD_BOUNDARY) -> str:
    """Units (repeats collapsed, blanks removed) -> text, exactly transformers' ``Wav2Vec2CTCTokenizer.decode``
    as its ASR pipeline calls it (``skip_special_tokens=False``, no lower-casing, no clean-up of spaces): the word
    delimiter -> space, every other symbol as it is, joined, stripped; then Unicode NFC, as :func:`letters_to_text`."""
    return normalize_unicode("".join(" " if s == word_delimiter else s for s in symbols).strip())


def vocab_from_mapping(mapping: dict[str, Any]) -> list[str]:
    """A ``vocab.json`` mapping {symbol: index} -> symbols in index order (indices must be 0..V-1, distinct)."""
    by_index: dict[int, str] = {}
    for symbol, index in mapping.items():
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"index of {symbol!r} is {index!r}, not an integer")
        if index in by_index:
            raise ValueError(f"symbols {by_index[index]!r} and {symbol!r} share index {index}")
        by_index[index] = symbol
    if sorted(by_index) != list(range(len(by_index))):
        missing = sorted(set(range(max(by_index, default=-1) + 1)) - set(by_index))
        raise ValueError(f"indices must be 0..{len(by_index) - 1} without gaps (missing {missing[:10]})")
    return [by_index[i] for i in range(len(by_index))]
