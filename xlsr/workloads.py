"""The benchmark workloads, shared by ``python -m xlsr.doctor --bench`` and benchmarks/: the inputs of a
pretraining step (audio, span mask, negatives), the CTC fine-tuning setting (``ctc_config``, ``CTC_*``) and the
classification setting (``classification_config``, ``NUM_CLASSES``)."""

from __future__ import annotations

# the fine-tuning workload (kind "finetune"): CTC over a 32-symbol vocabulary (blank = 0), ~50 letters per
# utterance, frozen conv stack, light time masks and nothing random besides them (dropout and LayerDrop 0)
CTC_VOCAB = 32
CTC_LETTERS = (45, 56)  # target length per utterance drawn from [45, 56)
CTC_ENCODER_SETTINGS = dict(
    mask_prob=0.05, mask_length=10, mask_channel_prob=0.0, encoder_layerdrop=0.0, dropout=0.0, dropout_input=0.0,
    dropout_features=0.0, attention_dropout=0.0, activation_dropout=0.0, feature_grad_mult=0.0,
)


def ctc_config(cfg):
    """Our ``CTCConfig`` of the fine-tuning workload on the encoder ``cfg`` (HF's config is made from it)."""
    from xlsr.ctc import CTCConfig, finetuning_encoder_config

    encoder = finetuning_encoder_config(cfg, **CTC_ENCODER_SETTINGS)
    return CTCConfig(encoder=encoder, vocab_size=CTC_VOCAB, blank_index=0, final_dropout=0.0, apply_mask=True,
                     zero_infinity=True, ctc_loss_reduction="sum")


# the classification workload (kind "classify"): the CTC workload's encoder settings, HF's head (mean pooling, no
# activation, projector of 256) over 107 classes as VoxLingua107, cross entropy averaged over the batch (HF's loss)
NUM_CLASSES = 107


def classification_config(cfg):
    """Our ``ClassificationConfig`` of the classification workload on the encoder ``cfg``."""
    from xlsr.config import ClassificationConfig
    from xlsr.ctc import finetuning_encoder_config

    encoder = finetuning_encoder_config(cfg, **CTC_ENCODER_SETTINGS)
    return ClassificationConfig(encoder=encoder, num_labels=NUM_CLASSES, apply_mask=True)


def make_inputs(cfg, batch: int, samples: int, seed: int = 0, ctc: bool = False, classify: bool = False) -> dict:
    """Audio, a fixed span mask (cfg.mask_prob x cfg.mask_length) and HF-sampled negatives, shared by both; with
    ``ctc`` also random CTC targets (B, L) of labels 1..CTC_VOCAB-1, padded with the blank 0, and their lengths;
    with ``classify`` random class labels (B,) in 0..NUM_CLASSES-1."""
    import torch

    import xlsr
    from xlsr.modules.feature_encoder import conv_output_length

    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, samples, generator=gen)
    source = torch.nn.functional.layer_norm(source, (samples,))
    frames = conv_output_length(samples, cfg.conv_layers)
    mask = xlsr.compute_mask_indices(
        (batch, frames), None, cfg.mask_prob, cfg.mask_length, cfg.min_masks, generator=gen
    )
    try:
        from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices

        import numpy as np

        np.random.seed(seed)
        negatives = torch.from_numpy(_sample_negative_indices((batch, frames), cfg.num_negatives, mask.numpy()))
    except ImportError:  # no transformers: our own sampler (same distribution)
        negatives = xlsr.sample_negatives(mask, cfg.num_negatives, generator=gen)
    inputs = {"source": source, "mask": mask, "negatives": negatives.long()}
    if ctc:  # its own generator: the other inputs stay those of the pretraining workloads
        gen = torch.Generator().manual_seed(seed + 1)
        lengths = torch.randint(*CTC_LETTERS, (batch,), generator=gen)
        targets = torch.randint(1, CTC_VOCAB, (batch, int(lengths.max())), generator=gen)
        targets[torch.arange(targets.shape[1])[None, :] >= lengths[:, None]] = 0
        inputs.update(targets=targets, target_lengths=lengths)
    if classify:
        gen = torch.Generator().manual_seed(seed + 2)
        inputs["class_labels"] = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return inputs
