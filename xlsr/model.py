"""wav2vec 2.0 / XLS-R, assembled from the modules in ``xlsr.modules``; read top to bottom.

waveform (B, S)
  -> feature_extractor (conv stack)              (B, C, T)   one frame per 20 ms
  -> feature_projection: LayerNorm(C) -> Linear  (B, T, C) "features" and (B, T, D)
  -> [pretraining] _mask: masked frames -> mask_embedding, masked channels -> 0 (modules/masking.py)
  -> encoder: positional conv + transformer      (B, T, D)
  -> [pretraining] _contrast: final_proj(context at masked frames) vs project_q(quantizer(features at masked
     frames)) and distractors: cosine logits (K, 1 + N)

Fast paths (xlsr/kernels/, one flag each, README "Fast paths"): the CPU conv stack
(``feature_extractor.channels_last``), the logits without gathered negatives (``indexed_logits``), the
memory-saving half-precision GELU (``FeedForward.memory_saving_gelu``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xlsr.checkpoints import load_pretrained
from xlsr.checkpoints.native import save_native
from xlsr.config import Wav2Vec2Config
from xlsr.kernels.contrastive import indexed_contrastive_logits
from xlsr.modules.feature_encoder import FeatureEncoder, FeatureProjection, GradMultiply, receptive_field
from xlsr.modules.masking import (
    apply_masks,
    compute_channel_mask,
    compute_mask_indices,
    negatives_among_masked,
    sample_negatives,
)
from xlsr.modules.quantizer import GumbelVectorQuantizer
from xlsr.modules.transformer import TransformerEncoder


@dataclass
class FeatureOutput:
    """What ``extract_features`` returns (fairseq's ``extract_features`` dict, batch first)."""

    x: torch.Tensor  # (B, T, D) encoder output (after the final LayerNorm in pre-LN models, unless ``layer`` is set)
    layer_results: list[torch.Tensor]  # L x (B, T, D), output of each layer that ran
    padding_mask: torch.Tensor | None  # (B, T) bool, True = padded frame; None when nothing is padded
    features: torch.Tensor  # (B, T, C) layer-normed conv features (the quantizer's input)


@dataclass
class PretrainingOutput:
    """What the pretraining forward returns; ``xlsr.pretrain.compute_loss`` turns it into the loss."""

    logits: torch.Tensor  # (K, 1 + N) fp32 cosine / logit_temp; column 0 = positive; K = masked frames (row-major)
    mask_indices: torch.Tensor  # (B, T) bool
    padding_mask: torch.Tensor | None  # (B, T) bool or None
    prob_perplexity: torch.Tensor  # () soft perplexity of the quantizer over the masked frames
    code_perplexity: torch.Tensor  # () hard perplexity over the masked frames
    num_vars: int  # G * V
    temperature: float  # current Gumbel temperature
    features_pen: torch.Tensor  # () mean squared conv feature (all frames, padding included), fp32


class Wav2Vec2Model(nn.Module):
    """The wav2vec 2.0 / XLS-R model: encoder for feature extraction plus the pretraining head.

    Args:
        cfg: the architecture.
        pretraining_head: build the quantizer, ``project_q`` and ``final_proj`` (pretraining needs them; a
            downstream head on the encoder does not: they are then None and not in the state dict).
    """

    def __init__(self, cfg: Wav2Vec2Config, *, pretraining_head: bool = True):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = FeatureEncoder(cfg.conv_layers, cfg.extractor_mode, cfg.conv_bias)
        self.feature_projection = FeatureProjection(cfg.conv_dim, cfg.encoder_embed_dim, cfg.keep_feature_projection)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.dropout_features = nn.Dropout(cfg.dropout_features)
        self.mask_embedding = nn.Parameter(torch.empty(cfg.encoder_embed_dim).uniform_())
        self.encoder = TransformerEncoder(
            embed_dim=cfg.encoder_embed_dim,
            ffn_dim=cfg.encoder_ffn_embed_dim,
            num_layers=cfg.encoder_layers,
            num_heads=cfg.encoder_attention_heads,
            conv_pos=cfg.conv_pos,
            conv_pos_groups=cfg.conv_pos_groups,
            dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout,
            activation_dropout=cfg.activation_dropout,
            layerdrop=cfg.encoder_layerdrop,
            layer_norm_first=cfg.layer_norm_first,
        )
        self.quantizer: GumbelVectorQuantizer | None = None
        self.project_q: nn.Linear | None = None
        self.final_proj: nn.Linear | None = None
        if pretraining_head:
            self.quantizer = GumbelVectorQuantizer(
                cfg.conv_dim, cfg.latent_vars, cfg.latent_groups, cfg.codebook_dim, cfg.latent_temp
            )
            self.project_q = nn.Linear(cfg.codebook_dim, cfg.proj_dim)
            self.final_proj = nn.Linear(cfg.encoder_embed_dim, cfg.proj_dim)
        # fast path for the logits (xlsr/kernels/contrastive.py, the same numbers); False = contrastive_logits below
        self.indexed_logits = True

    # ------------------------------------------------------------------ shared front end
    def _conv_features(self, source: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B, T, C) with the original's feature_grad_mult (0 = frozen conv stack)."""
        mult = self.cfg.feature_grad_mult
        if mult <= 0:
            with torch.no_grad():
                return self.feature_extractor.forward_frames(source)
        features = self.feature_extractor.forward_frames(source)
        if mult != 1.0 and features.requires_grad:
            features = GradMultiply.apply(features, mult)
        return features

    def frame_padding_mask(self, padding_mask: torch.Tensor | None, num_frames: int) -> torch.Tensor | None:
        """Sample-level (B, S) padding mask -> frame-level (B, T), or None when nothing is padded."""
        if padding_mask is None or not padding_mask.any():
            return None
        input_lengths = (~padding_mask.bool()).sum(-1)
        output_lengths = self.feature_extractor.output_lengths(input_lengths)
        frames = torch.arange(num_frames, device=padding_mask.device)
        return frames[None, :] >= output_lengths[:, None]

    def _check_source(self, source: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        if source.dim() != 2:
            raise ValueError(
                f"source must be (batch, samples) float audio, got shape {tuple(source.shape)}"
                + (" (add a batch dimension with source[None])" if source.dim() == 1 else "")
            )
        if not source.is_floating_point():
            raise ValueError(f"source must be floating point audio, got dtype {source.dtype}")
        if padding_mask is not None and padding_mask.shape != source.shape:
            raise ValueError(
                f"padding_mask shape {tuple(padding_mask.shape)} does not match source shape {tuple(source.shape)}"
            )
        if source.shape[1] < self.receptive_field:
            raise ValueError(f"audio of {source.shape[1]} samples is shorter than one frame ({self.receptive_field})")

    @property
    def receptive_field(self) -> int:
        """Number of samples that make the first output frame."""
        return receptive_field(self.cfg.conv_layers)

    # ------------------------------------------------------------------ feature extraction
    def extract_features(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        layer: int | None = None,
        layer_keep: list[bool] | None = None,
    ) -> FeatureOutput:
        """Run the model without masking. source (B, S) 16 kHz (normalised if ``cfg.normalize``).

        layer: stop after transformer layer ``layer`` (0-based); ``x`` is then that layer's output.
        layer_keep: LayerDrop decisions (default: drawn by the encoder when training).
        """
        self._check_source(source, padding_mask)
        conv = self._conv_features(source)
        features, x = self.feature_projection(conv)
        frame_padding = self.frame_padding_mask(padding_mask, features.shape[1])
        features = self.dropout_features(features)
        x = self.dropout_input(x)
        x, layer_results = self.encoder(x, frame_padding, layer=layer, layer_keep=layer_keep)
        return FeatureOutput(x=x, layer_results=layer_results, padding_mask=frame_padding, features=features)

    def extract_features_masked(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
        layer_keep: list[bool] | None = None,
    ) -> FeatureOutput:
        """``extract_features`` with the fine-tuning masks (fairseq's ``extract_features(..., mask=True)``).

        Time spans (``cfg.mask_prob`` > 0, or the given ``mask_indices`` (B, T) bool) become ``mask_embedding``,
        channel spans (``cfg.mask_channel_prob`` > 0) become 0; with neither, the same as ``extract_features``.
        A batch in which no frame is drawn for masking (e.g. only utterances of a frame or two) goes on unmasked in
        time, as fairseq's fine-tuning encoder does; only the contrastive task needs masked frames.
        layer_keep: LayerDrop decisions (default: drawn by the encoder when training).
        """
        self._check_source(source, padding_mask)
        features, x = self.feature_projection(self._conv_features(source))
        frame_padding = self.frame_padding_mask(padding_mask, features.shape[1])
        features = self.dropout_features(features)
        x = self.dropout_input(x)
        if mask_indices is not None or self.cfg.mask_prob > 0 or self.cfg.mask_channel_prob > 0:
            x, _ = self._mask(x, frame_padding, mask_indices, require_masked=False)
        x, layer_results = self.encoder(x, frame_padding, layer_keep=layer_keep)
        return FeatureOutput(x=x, layer_results=layer_results, padding_mask=frame_padding, features=features)

    def hidden_states(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        *,
        last: int | None = None,
        masked: bool = False,
        layer_keep: list[bool] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """transformers 5's ``output_hidden_states``: [the first layer's input, each layer's output], so that
        ``states[L]`` is the output of transformer layer L (1-based) and ``states[0]`` the input of the first (after
        the positional conv, and the LayerNorm of post-LN models); none after the final LayerNorm of pre-LN models.

        Args:
            last: compute only ``states[0..last]`` (the layers after it are not run); None: all.
            masked: through ``extract_features_masked`` (fine-tuning's masks), not ``extract_features``.
            layer_keep: LayerDrop decisions, one per layer (a skipped layer is an error: every state is needed).

        Returns:
            (last + 1) x (B, T, D) (L + 1 without ``last``) and the frame padding mask (B, T) or None.
        """
        num_layers = self.cfg.encoder_layers
        if last is not None and not 0 <= last <= num_layers:
            raise ValueError(f"hidden state {last} of a {num_layers}-layer model: choose 0..{num_layers}")
        captured: list[torch.Tensor] = []
        # the transformer's input dropout is the last step before its first layer: its output is hidden state 0
        hook = self.encoder.dropout.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            if masked:
                feats = self.extract_features_masked(source, padding_mask, layer_keep=layer_keep)
            else:  # stop after layer ``last`` (0-based index last - 1; state 0 runs the first layer, no earlier stop)
                stop = None if last is None or last == num_layers else max(last - 1, 0)
                feats = self.extract_features(source, padding_mask, layer=stop, layer_keep=layer_keep)
        finally:
            hook.remove()
        wanted = num_layers if last is None else last
        if len(feats.layer_results) < wanted or (masked and len(feats.layer_results) != num_layers):
            raise RuntimeError("hidden states need every layer's output: LayerDrop skipped a layer")
        return [captured[0], *feats.layer_results][: wanted + 1], feats.padding_mask

    # ------------------------------------------------------------------ pretraining forward
    def forward(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
        negative_indices: torch.Tensor | None = None,
        layer_keep: list[bool] | None = None,
    ) -> PretrainingOutput:
        """The contrastive pretraining forward: front end -> mask -> encoder -> contrast.

        source (B, S); padding_mask (B, S) bool, True = pad. mask_indices (B, T) bool and negative_indices (B, T, N)
        int64 into the flattened B*T frames pin the randomness; when None they are sampled from the config (global
        torch RNG). layer_keep: LayerDrop decisions (the trainer passes the same ones on every rank).
        """
        self._check_source(source, padding_mask)
        conv = self._conv_features(source)  # (B, T, C)
        features_pen = conv.float().pow(2).mean()
        features, x = self.feature_projection(conv)  # (B, T, C) normed, (B, T, D)
        frame_padding = self.frame_padding_mask(padding_mask, features.shape[1])
        targets_in = self.dropout_features(features)  # what the quantizer turns into targets
        x = self.dropout_input(x)
        x, mask_indices = self._mask(x, frame_padding, mask_indices)
        x, _ = self.encoder(x, frame_padding, layer_keep=layer_keep)
        return self._contrast(x, targets_in, mask_indices, frame_padding, negative_indices, features_pen)

    def _mask(
        self,
        x: torch.Tensor,
        frame_padding: torch.Tensor | None,
        mask_indices: torch.Tensor | None,
        require_masked: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (unless given) and apply the time and channel masks: x (B, T, D) -> (masked x, (B, T) bool).

        ``require_masked``: no masked frame is a ValueError (the contrastive task); else the batch goes on with
        only its channel mask (fine-tuning). ``cfg.mask_prob`` = 0 draws no time mask."""
        cfg = self.cfg
        batch, time, dim = x.shape
        if mask_indices is None:
            mask_indices = compute_mask_indices(
                (batch, time), frame_padding, cfg.mask_prob, cfg.mask_length, cfg.min_masks,
                cfg.require_same_masks, cfg.no_mask_overlap, cfg.mask_min_space,
            )
        mask_indices = mask_indices.to(device=x.device, dtype=torch.bool)
        if mask_indices.shape != (batch, time):
            raise ValueError(f"mask_indices has shape {tuple(mask_indices.shape)}, expected {(batch, time)}")
        if require_masked and not mask_indices.any():
            raise ValueError("no frame is masked: the contrastive task needs at least one masked frame")
        channel_mask = None
        if cfg.mask_channel_prob > 0:
            channel_mask = compute_channel_mask(
                batch, dim, cfg.mask_channel_prob, cfg.mask_channel_length, cfg.no_mask_channel_overlap,
                cfg.mask_channel_min_space,
            )
        x = apply_masks(x, mask_indices, self.mask_embedding, channel_mask, cfg.mask_channel_before)
        return x, mask_indices

    def _contrast(
        self,
        x: torch.Tensor,
        targets_in: torch.Tensor,
        mask_indices: torch.Tensor,
        frame_padding: torch.Tensor | None,
        negative_indices: torch.Tensor | None,
        features_pen: torch.Tensor,
    ) -> PretrainingOutput:
        """Quantize the masked frames' features into targets, draw distractors, score them against the context."""
        cfg = self.cfg
        batch, time, _ = x.shape
        flat_mask = mask_indices.reshape(-1)
        quantized = self.quantizer(targets_in.reshape(batch * time, -1)[flat_mask])
        targets = self.project_q(quantized.quantized)  # (K, F), K = masked frames, row-major
        context = self.final_proj(x.reshape(batch * time, -1)[flat_mask])  # (K, F)
        if negative_indices is None:
            negative_indices = sample_negatives(
                mask_indices, cfg.num_negatives, frame_padding, cfg.cross_sample_negatives
            )
        negative_rows = negatives_among_masked(negative_indices, flat_mask)  # (K, N) rows of targets
        if self.indexed_logits and cfg.codebook_negatives == 0:  # fast path: xlsr/kernels/contrastive.py
            utterance = flat_mask.nonzero()[:, 0].div(time, rounding_mode="floor")  # (K,) batch row of each
            logits = indexed_contrastive_logits(context, targets, negative_rows, cfg.logit_temp, utterance)
        else:
            negatives = targets[negative_rows]  # (K, N, F)
            if cfg.codebook_negatives > 0:
                sampled = self.quantizer.sample_codevectors(targets.shape[0] * cfg.codebook_negatives)
                sampled = self.project_q(sampled).view(targets.shape[0], cfg.codebook_negatives, -1)
                negatives = torch.cat([negatives, sampled], dim=1)
            logits = contrastive_logits(context, targets, negatives, cfg.logit_temp)
        return PretrainingOutput(
            logits=logits,
            mask_indices=mask_indices,
            padding_mask=frame_padding,
            prob_perplexity=quantized.prob_perplexity,
            code_perplexity=quantized.code_perplexity,
            num_vars=quantized.num_vars,
            temperature=quantized.temperature,
            features_pen=features_pen,
        )

    def compile_encoder(self, **compile_kwargs) -> "Wav2Vec2Model":
        """``torch.compile`` every transformer layer in place (``nn.Module.compile``); returns ``self``.

        All layers share one compiled graph (same code and shapes), state-dict keys stay as they are, and
        activation checkpointing and LayerDrop work as before. ``compile_kwargs`` go to ``torch.compile``
        (e.g. ``mode="max-autotune"``, ``backend="aot_eager"``, ``dynamic=True`` for varying lengths).
        The first call per input shape compiles (slow on a small CPU); later calls reuse the graph.
        """
        for layer in self.encoder.layers:
            layer.compile(**compile_kwargs)
        return self

    def set_activation_checkpointing(self, enabled: bool = True) -> "Wav2Vec2Model":
        """Keep less for backward and recompute it there: the conv stack keeps only its input audio, each
        transformer layer only its input. Same outputs and gradients; about 1/3 more compute in the recomputed parts.
        """
        self.feature_extractor.gradient_checkpointing = enabled
        self.encoder.gradient_checkpointing = enabled
        return self

    def set_num_updates(self, num_updates: int) -> None:
        """Advance the Gumbel temperature schedule (call once per optimizer update)."""
        if self.quantizer is not None:
            self.quantizer.set_num_updates(num_updates)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path, *, strict: bool = True, map_location: str = "cpu") -> "Wav2Vec2Model":
        """Load a fairseq ``.pt``, a Hugging Face directory, or our own directory (format detected); or a Hugging
        Face Hub id (``"facebook/wav2vec2-xls-r-300m"``: a string that is no existing path), through
        ``huggingface_hub``'s cache (downloaded where the network allows)."""
        return load_pretrained(cls, path, strict=strict, map_location=map_location)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``out_dir``."""
        return save_native(self, out_dir)


def contrastive_logits(
    context: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, logit_temp: float
) -> torch.Tensor:
    """Cosine similarity of each context vector with [positive; negatives] / logit_temp, in fp32.

    context, positives (K, F); negatives (K, N, F) -> (K, 1 + N). A negative identical to its positive
    gets -inf (it would be a second correct answer).
    """
    candidates = torch.cat([positives.unsqueeze(1), negatives], dim=1).float()
    logits = F.cosine_similarity(context.float().unsqueeze(1), candidates, dim=-1) / logit_temp
    neg_is_pos = (positives.unsqueeze(1) == negatives).all(-1)
    if neg_is_pos.any():
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(neg_is_pos, float("-inf"))], dim=1)
    return logits
