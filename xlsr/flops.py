"""Analytic FLOP model of wav2vec 2.0: model FLOPs (multiply-add = 2) of a forward pass and of a train step, and
the dense bf16 peaks of known accelerators (``PEAK_BF16_TFLOPS``, :func:`peak_bf16_tflops`) that MFU divides by.
Used by ``python -m xlsr.doctor --bench`` and by benchmarks/ (mfu.py, bench.py, strategies.py).

The same count serves every implementation, so GFLOP/s and MFU compare like with like: conv stack, feature
projection, positional conv, the transformer layers and, for training, the contrastive head on the masked frames;
a train step counts 3 x forward. A CTC fine-tuning (or classification) step (frozen conv stack) counts the conv stack once, the feature
projection twice (forward and weight gradient: its input needs none) and the rest, CTC head included, 3 times.
"""

from __future__ import annotations


def conv_stack_flops(cfg, batch: int, samples: int) -> tuple[float, int]:
    """Model FLOPs of the conv stack's forward, and the number of frames it makes."""
    from xlsr.modules.feature_encoder import conv_output_length

    flops = 0.0
    length, in_dim = samples, 1
    for layer in cfg.conv_layers:
        dim, kernel, _ = layer
        length = conv_output_length(length, [layer])
        flops += 2.0 * in_dim * dim * kernel * length * batch
        in_dim = dim
    return flops, length


def encoder_flops(cfg, batch: int, frames: int) -> float:
    """Model FLOPs of positional conv and transformer layers (forward) on ``frames`` frames per utterance."""
    d, f = cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
    flops = 2.0 * d * (d // cfg.conv_pos_groups) * cfg.conv_pos * frames * batch  # positional conv
    flops += cfg.encoder_layers * (8.0 * d * d + 4.0 * d * f) * frames * batch  # qkv, out, ffn
    flops += cfg.encoder_layers * 4.0 * d * frames * frames * batch  # scores and weighted sum
    return flops


def forward_flops(cfg, batch: int, samples: int, masked: int = 0, head: bool = False) -> float:
    """Model FLOPs of one forward (multiply-add = 2): conv stack, projection, positional conv, layers[, head]."""
    flops, frames = conv_stack_flops(cfg, batch, samples)
    d = cfg.encoder_embed_dim
    flops += 2.0 * cfg.conv_dim * d * frames * batch  # feature projection
    flops += encoder_flops(cfg, batch, frames)
    if head:  # only the masked frames enter the contrastive head
        p, c = cfg.proj_dim, cfg.codebook_dim
        flops += 2.0 * cfg.conv_dim * cfg.num_codevectors * masked  # quantizer logits
        flops += 2.0 * c * p * masked + 2.0 * d * p * masked  # project_q, final_proj
        flops += 2.0 * (1 + cfg.num_negatives) * p * masked  # similarities
    return flops


def finetune_flops(cfg, batch: int, samples: int, vocab: int) -> float:
    """Model FLOPs of a CTC fine-tuning step with a frozen conv stack: conv forward, projection forward + weight
    gradient, then 3 x (positional conv, layers, lm_head)."""
    conv, frames = conv_stack_flops(cfg, batch, samples)
    d = cfg.encoder_embed_dim
    projection = 2.0 * cfg.conv_dim * d * frames * batch
    head = 2.0 * d * vocab * frames * batch
    return conv + 2.0 * projection + 3.0 * (encoder_flops(cfg, batch, frames) + head)


def classify_flops(cfg, batch: int, samples: int, proj: int = 256, classes: int = 107) -> float:
    """Model FLOPs of a classification step with a frozen conv stack: as :func:`finetune_flops`, with HF's head
    (``projector`` d -> ``proj`` on every frame, the classifier on the pooled vector) instead of the lm_head."""
    conv, frames = conv_stack_flops(cfg, batch, samples)
    d = cfg.encoder_embed_dim
    projection = 2.0 * cfg.conv_dim * d * frames * batch
    head = 2.0 * d * proj * frames * batch + 2.0 * proj * classes * batch
    return conv + 2.0 * projection + 3.0 * (encoder_flops(cfg, batch, frames) + head)


def workload_flops(cfg, kind: str, batch: int, samples: int, masked: int, vocab: int = 32) -> float:
    """Model FLOPs of one repetition: a forward for ``kind`` "infer", a CTC fine-tuning step for "finetune", a
    classification step for "classify", else a train step (3 x forward with head)."""
    if kind == "infer":
        return forward_flops(cfg, batch, samples)
    if kind == "finetune":
        return finetune_flops(cfg, batch, samples, vocab)
    if kind == "classify":
        return classify_flops(cfg, batch, samples)
    return 3.0 * forward_flops(cfg, batch, samples, masked, head=True)


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by substring of torch.cuda.get_device_name(); the first
# matching entry wins, so a more specific name comes before a shorter one it contains ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
]


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of the device named ``device_name`` (``PEAK_BF16_TFLOPS``), None if unknown."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)
