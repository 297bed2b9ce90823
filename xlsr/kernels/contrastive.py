"""Contrastive logits without gathering the negatives: equals ``xlsr.model.contrastive_logits`` on
``targets[negative_index]`` (``tests/test_fast_paths.py``: values within 1e-5, the same -inf entries, gradients).

Switch: ``Wav2Vec2Model.indexed_logits`` (default True; False runs the readable ``contrastive_logits``).

Why: the readable path gathers (K, 1 + N, F) candidate rows (100 negatives per masked frame) and normalises every
(frame, candidate) pair. Here rows are normalised once and the cosines come from one batched product per
utterance (negatives are drawn within the utterance) and a gather; "negative equals positive" is found by exact
row hashes plus an entry-wise check of the hash matches.
"""

from __future__ import annotations

import torch


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
