"""The wav2vec 2.0 pretraining criterion: contrastive (InfoNCE) + diversity (+ feature penalty)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xlsr.model import PretrainingOutput


@dataclass
class LossOutput:
    """Loss terms as fairseq's ``Wav2vecCriterion`` computes them (sums over masked frames, not means)."""

    total: torch.Tensor  # () contrastive + w0 * diversity * sample_size + w1 * features_penalty * sample_size
    contrastive: torch.Tensor  # () cross-entropy summed over masked frames ("loss_0")
    diversity: torch.Tensor  # () (num_vars - prob_perplexity) / num_vars, unweighted
    features_penalty: torch.Tensor  # () mean squared conv feature, unweighted
    diversity_term: torch.Tensor  # () w0 * diversity * sample_size: the part of ``total`` fairseq logs as loss_1
    features_penalty_term: torch.Tensor  # () w1 * features_penalty * sample_size: logged as loss_2
    sample_size: int  # number of masked frames
    correct: int  # positives ranked first (ties where every logit is equal don't count)
    count: int  # rows scored


def compute_loss(out: PretrainingOutput, loss_weights: tuple[float, float] = (0.1, 10.0)) -> LossOutput:
    """Turn the pretraining forward's output into the original's criterion value.

    XLS-R and wav2vec 2.0 large use loss_weights (0.1, 0.0); base uses (0.1, 10.0). Gradients of ``total`` are to
    be normalised by ``sample_size`` (summed over ranks), as the original trainer does.
    """
    logits = out.logits.float()
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    contrastive = F.cross_entropy(logits, targets, reduction="sum")
    sample_size = int(out.mask_indices.sum())
    diversity = (out.num_vars - out.prob_perplexity.float()) / out.num_vars
    features_pen = out.features_pen.float()
    total = contrastive
    diversity_term = features_penalty_term = torch.zeros((), device=logits.device)
    if loss_weights[0] != 0:
        diversity_term = loss_weights[0] * diversity * sample_size
        total = total + diversity_term
    if len(loss_weights) > 1 and loss_weights[1] != 0:
        features_penalty_term = loss_weights[1] * features_pen * sample_size
        total = total + features_penalty_term
    with torch.no_grad():
        if logits.numel():
            is_max = logits.argmax(-1) == 0
            is_min = logits.argmin(-1) == 0
            correct = int(is_max.sum() - (is_max & is_min).sum())
        else:
            correct = 0
    return LossOutput(
        total=total,
        contrastive=contrastive,
        diversity=diversity,
        features_penalty=features_pen,
        diversity_term=diversity_term,
        features_penalty_term=features_penalty_term,
        sample_size=sample_size,
        correct=correct,
        count=logits.shape[0],
    )
