"""Analytic FLOP model of wav2vec 2.0: model FLOPs (multiply-add = 2) of a forward pass and of a train step.

The same count serves every implementation, so GFLOP/s and MFU compare like with like: conv stack, feature
projection, positional conv, the transformer layers and, for training, the contrastive head on the masked frames;
a train step counts 3 x forward.
"""

from __future__ import annotations


def forward_flops(cfg, batch: int, samples: int, masked: int = 0, head: bool = False) -> float:
    """Model FLOPs of one forward (multiply-add = 2): conv stack, projection, positional conv, layers[, head]."""
    from xlsr.modules.feature_encoder import conv_output_length

    flops = 0.0
    length, in_dim = samples, 1
    for layer in cfg.conv_layers:
        dim, kernel, _ = layer
        length = conv_output_length(length, [layer])
        flops += 2.0 * in_dim * dim * kernel * length * batch
        in_dim = dim
    frames, d, f = length, cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
    flops += 2.0 * cfg.conv_dim * d * frames * batch  # feature projection
    flops += 2.0 * d * (d // cfg.conv_pos_groups) * cfg.conv_pos * frames * batch  # positional conv
    flops += cfg.encoder_layers * (8.0 * d * d + 4.0 * d * f) * frames * batch  # qkv, out, ffn
    flops += cfg.encoder_layers * 4.0 * d * frames * frames * batch  # scores and weighted sum
    if head:  # only the masked frames enter the contrastive head
        p, c = cfg.proj_dim, cfg.codebook_dim
        flops += 2.0 * cfg.conv_dim * cfg.num_codevectors * masked  # quantizer logits
        flops += 2.0 * c * p * masked + 2.0 * d * p * masked  # project_q, final_proj
        flops += 2.0 * (1 + cfg.num_negatives) * p * masked  # similarities
    return flops


def workload_flops(cfg, kind: str, batch: int, samples: int, masked: int) -> float:
    """Model FLOPs of one repetition: a forward for ``kind`` "infer", else a train step (3 x forward with head)."""
    if kind == "infer":
        return forward_flops(cfg, batch, samples)
    return 3.0 * forward_flops(cfg, batch, samples, masked, head=True)
