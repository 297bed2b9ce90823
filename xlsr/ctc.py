"""wav2vec 2.0 / XLS-R fine-tuned for speech recognition with CTC (fairseq's ``wav2vec_ctc``); read top to bottom.

waveform (B, S)
  -> wav2vec2: the Wav2Vec2Model encoder (conv stack, projection, [training] fine-tuning masks, transformer)
                                                 (B, T, D)   one frame per 20 ms
  -> final_dropout -> lm_head: Linear(D, V)      (B, T, V)   "logits"
  -> padded frames forced to the blank, log_softmax in float32 (fairseq's ``get_logits`` + ``get_normalized_probs``)
                                                 (B, T, V)   "log_probs"

``ctc_loss`` is fairseq's CTC criterion, ``decode`` its greedy (viterbi) decoding with the "letter" post-processing.
The encoder is built without the pretraining head (quantizer, project_q, final_proj), as fairseq's
``remove_pretraining_modules`` leaves it; state-dict keys are ``wav2vec2.*`` (the encoder's own keys) and ``lm_head.*``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xlsr.checkpoints.ctc import load_ctc, save_ctc_native
from xlsr.config import (  # re-exported: the CTC model's config, once defined here
    FINETUNING_OVERRIDES,
    TEXT_STYLES,
    CTCConfig,
    Wav2Vec2Config,
    finetuning_encoder_config,
)
from xlsr.model import Wav2Vec2Model
from xlsr.vocabulary import (  # re-exported: decoding helpers once defined here
    DROPPED_SYMBOLS,
    WORD_BOUNDARY,
    letters_to_text,
    nfc_vocab,
    tokens_to_text,
    vocab_from_mapping,
)
__all__ = [
    "Wav2Vec2ForCTC",
    "CTCOutput",
    "CTCConfig",
    "ctc_greedy_units",
    # re-exported from xlsr.config and xlsr.vocabulary
    "FINETUNING_OVERRIDES",
    "TEXT_STYLES",
    "Wav2Vec2Config",
    "finetuning_encoder_config",
    "DROPPED_SYMBOLS",
    "WORD_BOUNDARY",
    "letters_to_text",
    "nfc_vocab",
    "tokens_to_text",
    "vocab_from_mapping",
]


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
        self.wav2vec2 = Wav2Vec2Model(cfg.encoder, pretraining_head=False)  # (fairseq's remove_pretraining_modules)
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
        return load_ctc(cls, path, vocab, strict=strict, map_location=map_location, settings=settings)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` + ``vocab.json`` (symbol -> output index) into ``out_dir``."""
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
