"""wav2vec 2.0 / XLS-R fine-tuned for utterance classification (language ID, speaker, emotion); read top to bottom.

waveform (B, S)
  -> wav2vec2: the Wav2Vec2Model encoder                         (B, T, D)   one frame per 20 ms
     [use_weighted_layer_sum: softmax(layer_weights)-weighted sum of the first layer's input and every layer's
      output: transformers 5's ``hidden_states``, recorded at each layer's output, so in pre-LN (stable-layer-norm)
      models the final LayerNorm is in none of them (transformers 4.x applied it to the last one)]
  -> projector: Linear(D, classifier_proj_size) on every frame    (B, T, P)
  -> mean over the valid frames (a plain mean when nothing is padded)   (B, P)
  -> pooling_activation ("identity" = HF's head; fairseq's activation_fn, gelu, otherwise)
  -> classifier: Linear(P, num_labels)                             (B, num_labels)   "logits"

HF's ``Wav2Vec2ForSequenceClassification`` exactly (keys ``wav2vec2.*``, ``projector.*``, ``classifier.*``,
``layer_weights``); fairseq's ``wav2vec_classification`` with mean pooling is the same head with its activation.
The valid frames of each utterance are the first ``output_lengths(valid samples)``, as HF's
``_get_feature_vector_attention_mask`` and fairseq's encoder padding mask count them.
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

from xlsr.checkpoints.classification import (
    load_classification,
    save_classification_huggingface,
    save_classification_native,
)
from xlsr.config import ClassificationConfig
from xlsr.model import Wav2Vec2Model
from xlsr.text import normalize_unicode

__all__ = ["Wav2Vec2ForSequenceClassification", "ClassificationOutput", "ClassificationConfig", "masked_mean"]

_ACTIVATIONS = {"identity": lambda x: x, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}


@dataclass
class ClassificationOutput:
    """What ``Wav2Vec2ForSequenceClassification.forward`` returns."""

    logits: torch.Tensor  # (B, num_labels)
    pooled: torch.Tensor  # (B, classifier_proj_size) the pooled projector output, after pooling_activation
    padding_mask: torch.Tensor | None  # (B, T) bool, True = padded frame; None when nothing is padded


def masked_mean(x: torch.Tensor, frame_padding: torch.Tensor | None) -> torch.Tensor:
    """(B, T, C) -> (B, C): the mean over each utterance's valid frames (``frame_padding`` (B, T) True = padded);
    a plain mean over T without a mask."""
    if frame_padding is None:
        return x.mean(dim=1)
    valid = (~frame_padding).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * valid).sum(dim=1) / valid.sum(dim=1)


class Wav2Vec2ForSequenceClassification(nn.Module):
    """A wav2vec 2.0 / XLS-R encoder with HF's classification head (fairseq's ``Wav2VecClassification`` with mean
    pooling)."""

    def __init__(self, cfg: ClassificationConfig, labels: Sequence[str] | None = None):
        super().__init__()
        self.cfg = cfg
        labels = [normalize_unicode(str(s)) for s in labels] if labels is not None else \
            [f"LABEL_{i}" for i in range(cfg.num_labels)]
        if len(labels) != cfg.num_labels:
            raise ValueError(f"{len(labels)} labels for a head of {cfg.num_labels} outputs")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct; repeated: {sorted({s for s in labels if labels.count(s) > 1})}")
        self.labels: list[str] = labels
        self.wav2vec2 = Wav2Vec2Model(cfg.encoder, pretraining_head=False)
        num_hidden_states = cfg.encoder.encoder_layers + 1  # the first layer's input + every layer's output
        if cfg.use_weighted_layer_sum:
            self.layer_weights = nn.Parameter(torch.full((num_hidden_states,), 1.0 / num_hidden_states))
        self.projector = nn.Linear(cfg.encoder.encoder_embed_dim, cfg.classifier_proj_size)
        self.classifier = nn.Linear(cfg.classifier_proj_size, cfg.num_labels)
        self.num_updates = 0

    @property
    def label2id(self) -> dict[str, int]:
        return {label: index for index, label in enumerate(self.labels)}

    # ------------------------------------------------------------------ training schedule
    def set_num_updates(self, num_updates: int) -> None:
        """Record the optimizer update count (call once per update): decides ``encoder_frozen``."""
        self.num_updates = int(num_updates)

    @property
    def encoder_frozen(self) -> bool:
        """True while ``num_updates < cfg.freeze_finetune_updates``: the encoder then runs under no_grad."""
        return self.num_updates < self.cfg.freeze_finetune_updates

    # ------------------------------------------------------------------ forward
    def hidden_states(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                      layer_keep: list[bool] | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """transformers 5's ``hidden_states``: [the first layer's input, each layer's output], none of them after
        the final LayerNorm of pre-LN models. Returns (L + 1) x (B, T, D) and the frame padding mask (B, T) or None."""
        with torch.no_grad() if self.encoder_frozen else contextlib.nullcontext():
            return self.wav2vec2.hidden_states(source, padding_mask, masked=self.training and self.cfg.apply_mask,
                                               layer_keep=layer_keep)

    def _features(self, source: torch.Tensor, padding_mask: torch.Tensor | None, layer_keep: list[bool] | None):
        encoder = self.wav2vec2
        with torch.no_grad() if self.encoder_frozen else contextlib.nullcontext():
            if self.training and self.cfg.apply_mask:
                return encoder.extract_features_masked(source, padding_mask, layer_keep=layer_keep)
            return encoder.extract_features(source, padding_mask, layer_keep=layer_keep)

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                layer_keep: list[bool] | None = None) -> ClassificationOutput:
        """source (B, S) 16 kHz (normalised if ``cfg.encoder.normalize``); padding_mask (B, S) bool, True = pad
        (HF's ``attention_mask`` is its negation). Returns ``ClassificationOutput`` with logits (B, num_labels).

        layer_keep: the LayerDrop decisions, one per layer (the training engine draws them once per update);
        default: drawn by the encoder on each training forward. While ``encoder_frozen`` the encoder runs under
        no_grad (only the head trains)."""
        if self.cfg.use_weighted_layer_sum:
            states, frame_padding = self.hidden_states(source, padding_mask, layer_keep)
            weights = F.softmax(self.layer_weights, dim=-1)
            x = (torch.stack(states, dim=0) * weights.view(-1, 1, 1, 1)).sum(dim=0)
        else:
            feats = self._features(source, padding_mask, layer_keep)
            x, frame_padding = feats.x, feats.padding_mask
        pooled = _ACTIVATIONS[self.cfg.pooling_activation](masked_mean(self.projector(x), frame_padding))
        return ClassificationOutput(self.classifier(pooled), pooled, frame_padding)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        labels: Sequence[str] | None = None,
        *,
        strict: bool = True,
        map_location: str = "cpu",
        **settings: Any,
    ) -> "Wav2Vec2ForSequenceClassification":
        """Load a classifier: an HF ``Wav2Vec2ForSequenceClassification`` directory, a fairseq
        ``wav2vec_classification`` ``.pt`` (mean pooling) or ours; or a Hub id.

        With ``labels``: a new head (``projector`` + ``classifier``, PyTorch's default init) of ``len(labels)``
        outputs on the encoder of any checkpoint ``from_pretrained`` reads (pretrained, CTC or classification).
        ``settings``: ClassificationConfig fields (``classifier_proj_size``, ``use_weighted_layer_sum``,
        ``pooling_activation``, ...) or encoder fields (``mask_prob``, ...) that replace the loaded values.
        """
        return load_classification(cls, path, labels, strict=strict, map_location=map_location, settings=settings)

    def save_pretrained(self, out_dir: str | Path, *, huggingface: bool = False) -> Path:
        """Write our ``config.json`` (with HF's ``id2label`` / ``label2id``) + ``model.safetensors``; with
        ``huggingface=True`` an HF ``Wav2Vec2ForSequenceClassification`` folder instead (refused for a
        ``pooling_activation`` HF lacks)."""
        if huggingface:
            return save_classification_huggingface(self, out_dir)
        return save_classification_native(self, out_dir)
