"""Masks and negatives of the contrastive task, with the original's distributions: sampling the time and channel
masks (``compute_mask_indices``, ``compute_channel_mask``), applying them (``apply_masks``), drawing distractors
(``sample_negatives``) and mapping them onto the masked frames (``negatives_among_masked``).

All randomness comes from an optional ``torch.Generator`` (CPU), so a trainer can pin and checkpoint it.
"""

from __future__ import annotations

import torch


def _rand(generator: torch.Generator | None) -> float:
    return torch.rand((), generator=generator).item()


def _choice(n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k distinct integers from range(n) (``np.random.choice(n, k, replace=False)``)."""
    return torch.randperm(n, generator=generator)[:k]


def _num_spans(mask_prob: float, length: int, mask_length: int, min_masks: int, generator) -> int:
    """Probabilistic rounding of mask_prob * length / mask_length, at least min_masks."""
    return max(min_masks, int(mask_prob * length / float(mask_length) + _rand(generator)))


def _overlapping_spans(size: int, num_spans: int, mask_length: int, generator) -> torch.Tensor:
    """Span starts drawn without replacement; spans may overlap; clipped to ``size``."""
    min_len = mask_length
    if size - min_len <= num_spans:
        min_len = size - num_spans - 1
    starts = _choice(size - min_len, num_spans, generator)
    frames = (starts[:, None] + torch.arange(mask_length)[None, :]).flatten()
    return torch.unique(frames[frames < size])


def _non_overlapping_spans(size: int, num_spans: int, mask_length: int, min_space: int, generator) -> torch.Tensor:
    """Spans placed one by one into the free parts, at least ``min_space`` frames apart (fairseq's no_overlap)."""
    frames: list[int] = []
    parts = [(0, size)]
    for _ in range(num_spans):
        lens = torch.tensor([e - s if e - s >= mask_length + min_space else 0 for s, e in parts], dtype=torch.float64)
        if lens.sum() == 0:
            break
        chosen = torch.multinomial(lens / lens.sum(), 1, generator=generator).item()
        s, e = parts.pop(chosen)
        start = s + int(torch.randint(0, e - mask_length - s, (), generator=generator))
        frames.extend(range(start, start + mask_length))
        if start - s - min_space >= mask_length:
            parts.append((s, start - min_space + 1))
        if e - start - mask_length - min_space > mask_length:
            parts.append((start + mask_length + min_space, e))
    return torch.tensor(sorted(set(frames)), dtype=torch.long)


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask: torch.Tensor | None = None,
    mask_prob: float = 0.65,
    mask_length: int = 10,
    min_masks: int = 2,
    require_same_masks: bool = True,
    no_overlap: bool = False,
    min_space: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample span masks as fairseq's ``compute_mask_indices`` (static span lengths).

    shape (B, T); padding_mask (B, T) bool, True = padded frame (right padding).
    Each row gets ``int(mask_prob * T_valid / mask_length + U[0,1))`` (>= min_masks) spans of ``mask_length``
    frames with distinct random starts; spans may overlap (so ~49 % of frames are masked at 0.65 x 10) and never
    reach padding. With ``require_same_masks`` every row is randomly thinned to the batch's smallest count.
    Returns (B, T) bool, True = masked.
    """
    batch, time = shape
    mask = torch.zeros(batch, time, dtype=torch.bool)
    if mask_prob <= 0 or time == 0:
        return mask
    if padding_mask is not None:
        valid_lengths = (~padding_mask.bool()).sum(-1).cpu().tolist()
    else:
        valid_lengths = [time] * batch
        shared_num_spans = _num_spans(mask_prob, time, mask_length, min_masks, generator)

    rows = []
    for size in valid_lengths:
        if padding_mask is not None:
            num_spans = _num_spans(mask_prob, size, mask_length, min_masks, generator)
        else:
            num_spans = shared_num_spans
        if no_overlap:
            rows.append(_non_overlapping_spans(size, num_spans, mask_length, min_space, generator))
        else:
            rows.append(_overlapping_spans(size, num_spans, mask_length, generator))

    target = min(len(r) for r in rows)
    for i, frames in enumerate(rows):
        if require_same_masks and len(frames) > target:
            frames = frames[_choice(len(frames), target, generator)]
        mask[i, frames] = True
    return mask


def compute_channel_mask(
    batch: int,
    channels: int,
    mask_prob: float,
    mask_length: int,
    no_overlap: bool = False,
    min_space: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Feature-channel mask for fine-tuning (B, C) bool, sampled like time spans over the channel axis."""
    return compute_mask_indices(
        (batch, channels), None, mask_prob, mask_length, min_masks=0, no_overlap=no_overlap, min_space=min_space,
        generator=generator,
    )


def sample_negatives(
    mask_indices: torch.Tensor,
    num_negatives: int,
    padding_mask: torch.Tensor | None = None,
    cross_sample_negatives: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Distractor indices for every masked frame, into the flattened (B*T) sequence.

    mask_indices (B, T) bool; padding_mask (B, T) bool (True = pad; padded frames are never used).
    For each masked frame: ``num_negatives`` indices drawn uniformly (with replacement) from the OTHER masked frames
    of the same utterance, then ``cross_sample_negatives`` from the other masked frames of the whole batch.
    Returns (B, T, num_negatives + cross_sample_negatives) int64; rows at unmasked frames hold 0 and are ignored.
    A row with a single masked frame has no other frame to draw from: its negatives point at the frame itself,
    which the model turns into -inf logits (no signal, no crash).
    """
    masked = mask_indices.bool().cpu()
    if padding_mask is not None:
        masked = masked & ~padding_mask.bool().cpu()
    batch, time = masked.shape
    total = num_negatives + cross_sample_negatives
    out = torch.zeros(batch, time, total, dtype=torch.long)
    flat_positions = torch.arange(batch * time).view(batch, time)

    def draw_others(pool: torch.Tensor, own: torch.Tensor, count: int) -> torch.Tensor:
        """For each own-position index i in ``own`` draw ``count`` members of ``pool`` other than pool[i]."""
        size = pool.numel()
        if size < 2:
            return pool[own].unsqueeze(-1).expand(-1, count)
        draws = torch.randint(0, size - 1, (own.numel(), count), generator=generator)
        draws = draws + (draws >= own.unsqueeze(-1)).long()
        return pool[draws]

    if num_negatives > 0:
        for b in range(batch):
            pool = flat_positions[b][masked[b]]
            if pool.numel():
                out[b, masked[b], :num_negatives] = draw_others(pool, torch.arange(pool.numel()), num_negatives)
    if cross_sample_negatives > 0:
        pool = flat_positions[masked]
        own = torch.arange(pool.numel())
        out.view(-1, total)[pool, num_negatives:] = draw_others(pool, own, cross_sample_negatives)
    return out.to(mask_indices.device)


def apply_masks(
    x: torch.Tensor,
    time_mask: torch.Tensor,
    mask_embedding: torch.Tensor,
    channel_mask: torch.Tensor | None = None,
    channel_before: bool = False,
) -> torch.Tensor:
    """Masked copy of x (B, T, D), as fairseq's ``apply_mask``: frames where ``time_mask`` (B, T) is True become
    ``mask_embedding`` (D,); channels where ``channel_mask`` (B, D) is True become 0 in every frame of that row.

    channel_before: zero the channels first, so masked frames hold the whole mask embedding; otherwise (fairseq's
    default) after, so the mask embedding loses those channels too.
    """
    channels = channel_mask.to(x.device).unsqueeze(1) if channel_mask is not None else None  # (B, 1, D)
    if channels is not None and channel_before:
        x = x.masked_fill(channels, 0.0)
    x = torch.where(time_mask.unsqueeze(-1), mask_embedding.to(x.dtype), x)
    if channels is not None and not channel_before:
        x = x.masked_fill(channels, 0.0)
    return x


def negatives_among_masked(negative_indices: torch.Tensor, flat_mask: torch.Tensor) -> torch.Tensor:
    """Distractor indices into the B*T frames (B, T, N) -> rows among the K masked frames (K, N), row-major order.

    Only the rows of masked frames are read; they must point at masked frames (ValueError otherwise).
    """
    num_frames = flat_mask.numel()
    negative_indices = negative_indices.to(flat_mask.device).reshape(num_frames, -1)[flat_mask]
    if negative_indices.numel() and (negative_indices.min() < 0 or negative_indices.max() >= num_frames):
        raise ValueError(f"negative_indices must lie in [0, {num_frames}) (flattened B*T frames)")
    if not flat_mask[negative_indices].all():
        raise ValueError("negative_indices of masked frames must point at masked frames")
    position_among_masked = flat_mask.long().cumsum(0) - 1
    return position_among_masked[negative_indices]
