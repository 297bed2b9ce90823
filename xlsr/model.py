"""wav2vec 2.0 / XLS-R, assembled from the modules in ``xlsr.modules``; read top to bottom.

waveform (B, S)
  -> feature_extractor (conv stack)              (B, C, T)   one frame per 20 ms
  -> feature_projection: LayerNorm(C) -> Linear  (B, T, C) "features" and (B, T, D)
  -> [pretraining] replace masked frames by mask_embedding
  -> encoder: positional conv + transformer      (B, T, D)
  -> [pretraining] final_proj(context at masked frames) vs project_q(quantizer(features at masked frames))
     and distractors: cosine logits (K, 1 + N)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xlsr.config import Wav2Vec2Config
from xlsr.modules.feature_encoder import FeatureEncoder, FeatureProjection, GradMultiply
from xlsr.modules.masking import compute_channel_mask, compute_mask_indices, sample_negatives
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
    """The wav2vec 2.0 / XLS-R model: encoder for feature extraction plus the pretraining head."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = FeatureEncoder(cfg.conv_layers, cfg.extractor_mode, cfg.conv_bias)
        self.feature_projection = FeatureProjection(cfg.conv_dim, cfg.encoder_embed_dim)
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
        self.quantizer = GumbelVectorQuantizer(
            cfg.conv_dim, cfg.latent_vars, cfg.latent_groups, cfg.codebook_dim, cfg.latent_temp
        )
        self.project_q = nn.Linear(cfg.codebook_dim, cfg.proj_dim)
        self.final_proj = nn.Linear(cfg.encoder_embed_dim, cfg.proj_dim)

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
        field, jump = 1, 1
        for _, kernel, stride in self.cfg.conv_layers:
            field += (kernel - 1) * jump
            jump *= stride
        return field

    # ------------------------------------------------------------------ feature extraction
    def extract_features(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None, layer: int | None = None
    ) -> FeatureOutput:
        """Run the model without masking. source (B, S) 16 kHz (normalised if ``cfg.normalize``).

        layer: stop after transformer layer ``layer`` (0-based); ``x`` is then that layer's output.
        """
        self._check_source(source, padding_mask)
        conv = self._conv_features(source)
        features, x = self.feature_projection(conv)
        frame_padding = self.frame_padding_mask(padding_mask, features.shape[1])
        features = self.dropout_features(features)
        x = self.dropout_input(x)
        x, layer_results = self.encoder(x, frame_padding, layer=layer)
        return FeatureOutput(x=x, layer_results=layer_results, padding_mask=frame_padding, features=features)

    # ------------------------------------------------------------------ pretraining forward
    def forward(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
        negative_indices: torch.Tensor | None = None,
        layer_keep: list[bool] | None = None,
    ) -> PretrainingOutput:
        """The contrastive pretraining forward.

        mask_indices (B, T) bool and negative_indices (B, T, N) int64 into the flattened B*T frames pin the
        randomness; when None they are sampled from the config (global torch RNG). layer_keep: LayerDrop
        decisions (the trainer passes the same ones on every rank).
        """
        cfg = self.cfg
        self._check_source(source, padding_mask)
        conv = self._conv_features(source)
        features_pen = conv.float().pow(2).mean()
        features, x = self.feature_projection(conv)
        batch, time, _ = features.shape
        frame_padding = self.frame_padding_mask(padding_mask, time)
        targets_in = self.dropout_features(features)
        x = self.dropout_input(x)

        if mask_indices is None:
            mask_indices = compute_mask_indices(
                (batch, time), frame_padding, cfg.mask_prob, cfg.mask_length, cfg.min_masks,
                cfg.require_same_masks, cfg.no_mask_overlap, cfg.mask_min_space,
            ).to(x.device)
        mask_indices = mask_indices.to(device=x.device, dtype=torch.bool)
        if mask_indices.shape != (batch, time):
            raise ValueError(f"mask_indices has shape {tuple(mask_indices.shape)}, expected {(batch, time)}")
        if not mask_indices.any():
            raise ValueError("no frame is masked: the contrastive task needs at least one masked frame")
        channel_mask = None  # (B, 1, D): channels zeroed in every frame, as fairseq's apply_mask
        if cfg.mask_channel_prob > 0:
            channel_mask = compute_channel_mask(
                batch, x.shape[-1], cfg.mask_channel_prob, cfg.mask_channel_length,
                cfg.no_mask_channel_overlap, cfg.mask_channel_min_space,
            ).to(x.device).unsqueeze(1)
        if channel_mask is not None and cfg.mask_channel_before:  # masked frames get the whole mask embedding
            x = x.masked_fill(channel_mask, 0.0)
        x = torch.where(mask_indices.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)
        if channel_mask is not None and not cfg.mask_channel_before:  # the mask embedding loses those channels too
            x = x.masked_fill(channel_mask, 0.0)

        x, _ = self.encoder(x, frame_padding, layer_keep=layer_keep)

        flat_mask = mask_indices.reshape(-1)
        quantized = self.quantizer(targets_in.reshape(batch * time, -1)[flat_mask])
        y = self.project_q(quantized.quantized)  # (K, F)

        if negative_indices is None:
            negative_indices = sample_negatives(
                mask_indices, cfg.num_negatives, frame_padding, cfg.cross_sample_negatives
            )
        negative_rows = self._negatives_among_masked(negative_indices, flat_mask, batch * time)  # (K, N) into y
        context = self.final_proj(x.reshape(batch * time, -1)[flat_mask])  # (K, F)
        if cfg.codebook_negatives > 0:
            negatives = y[negative_rows]  # (K, N, F)
            codebook_negs = self.project_q(self.quantizer.sample_codevectors(y.shape[0] * cfg.codebook_negatives))
            negatives = torch.cat([negatives, codebook_negs.view(y.shape[0], cfg.codebook_negatives, -1)], dim=1)
            logits = contrastive_logits(context, y, negatives, cfg.logit_temp)
        else:
            utterance = flat_mask.nonzero()[:, 0].div(time, rounding_mode="floor")  # (K,) batch row of each
            logits = indexed_contrastive_logits(context, y, negative_rows, cfg.logit_temp, utterance)
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

    @staticmethod
    def _negatives_among_masked(negative_indices: torch.Tensor, flat_mask: torch.Tensor, num_frames: int):
        """(B, T, N) indices into B*T -> (K, N) indices into the K masked frames (row-major order)."""
        negative_indices = negative_indices.to(flat_mask.device).reshape(num_frames, -1)[flat_mask]
        if negative_indices.numel() and (negative_indices.min() < 0 or negative_indices.max() >= num_frames):
            raise ValueError(f"negative_indices must lie in [0, {num_frames}) (flattened B*T frames)")
        if not flat_mask[negative_indices].all():
            raise ValueError("negative_indices of masked frames must point at masked frames")
        position_among_masked = flat_mask.long().cumsum(0) - 1
        return position_among_masked[negative_indices]

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
        self.quantizer.set_num_updates(num_updates)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str | Path, *, strict: bool = True, map_location: str = "cpu") -> "Wav2Vec2Model":
        """Load a fairseq ``.pt``, a Hugging Face directory, or our own directory (format detected)."""
        from xlsr.checkpoints import load_pretrained

        return load_pretrained(cls, path, strict=strict, map_location=map_location)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``out_dir``."""
        from xlsr.checkpoints.native import save_native

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


def _unit_rows(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / max(||x||, eps) over the last axis, with the gradient of ``F.cosine_similarity`` (clamp outside autograd)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clone()
    with torch.no_grad():
        norm.clamp_min_(eps)
    return x / norm


def _gathered_dots(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
    """out[k, j] = a[k] . b[index[k, j]] without gathering the (K, J, F) rows of b.

    When every index[k] stays in the group (utterance) of row k (``group`` (K,) sorted), the dot products of each
    group with itself come from one batched product (G, n, n), n = rows of the largest group; otherwise from
    a @ b.T in row chunks. Either way far fewer bytes than gathering J rows of F per row.
    """
    rows = a.shape[0]
    if group is not None and rows and bool((group[index] == group[:, None]).all()):
        counts = torch.bincount(group)
        starts = counts.cumsum(0) - counts
        position = torch.arange(rows, device=a.device) - starts[group]
        size = int(counts.max())
        if bool((counts == size).all()):
            a_blocks, b_blocks = a.view(len(counts), size, -1), b.view(len(counts), size, -1)
        else:
            a_blocks = a.new_zeros(len(counts), size, a.shape[1]).index_put((group, position), a)
            b_blocks = b.new_zeros(len(counts), size, b.shape[1]).index_put((group, position), b)
        dots = torch.bmm(a_blocks, b_blocks.transpose(1, 2))[group, position]  # (K, size)
        return dots.gather(1, index - starts[group][:, None])
    chunk = max(1, 2**22 // max(rows, 1))
    return torch.cat([(a[i : i + chunk] @ b.t()).gather(1, index[i : i + chunk]) for i in range(0, rows, chunk)])


def _equal_rows(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(K, N) bool: row index[k, n] of y equals row k exactly (``==`` on every entry), as the original's check.

    Rows are hashed (exact integer arithmetic on their bits) and only hash matches are compared entry by entry.
    """
    with torch.no_grad():
        values = y.detach().float() + 0.0  # -0.0 -> +0.0: equal under ==, so they must hash alike
        weights = torch.randint(1, 2**20, (values.shape[1],), generator=torch.Generator().manual_seed(0))
        hashes = (values.view(torch.int32).long() * weights.to(values.device)).sum(-1)  # |sum| < 2**61
        same = hashes[index] == hashes[:, None]
        if bool(same.any()):
            rows, cols = same.nonzero(as_tuple=True)
            same[rows, cols] = (y[rows] == y[index[rows, cols]]).all(-1)
        return same


def indexed_contrastive_logits(
    context: torch.Tensor,
    targets: torch.Tensor,
    negative_index: torch.Tensor,
    logit_temp: float,
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    """``contrastive_logits(context, targets, targets[negative_index], logit_temp)`` without gathering negatives.

    context, targets (K, F); negative_index (K, N) rows of ``targets``; group (K,) optional sorted utterance id of
    each row (negatives drawn within the utterance make the products block-diagonal). Cosines are dot products of
    rows normalised once (the original normalises every (frame, candidate) pair); float32, whatever autocast says.
    """
    with torch.autocast(context.device.type, enabled=False):
        unit_context = _unit_rows(context.float())
        unit_targets = _unit_rows(targets.float())
        own = torch.arange(context.shape[0], device=context.device)[:, None]
        index = torch.cat([own, negative_index.to(own.device)], dim=1)  # column 0 = the positive
        logits = _gathered_dots(unit_context, unit_targets, index, group) / logit_temp
    neg_is_pos = _equal_rows(targets, negative_index)
    if neg_is_pos.any():
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(neg_is_pos, float("-inf"))], dim=1)
    return logits
