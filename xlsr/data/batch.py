"""Typed batches, built by the data layer's collaters and read by the engine and the tasks by attribute.

:class:`AudioBatch` is what every task trains on (pretraining needs nothing more: its masks and negatives are drawn
by the model); a task with targets adds them in a subclass (:class:`CTCBatch`, :class:`ClassificationBatch`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import torch

BatchT = TypeVar("BatchT", bound="AudioBatch")


@dataclass
class AudioBatch:
    """A batch of waveforms.

    Args:
        source: (B, S) float32 waveforms, zero-padded (or cropped) to one length.
        padding_mask: (B, S) bool, True = padding; None when no item is padded.
        ids: (B,) int64 keys of the items in their dataset (stable for an epoch: what crops are seeded by).
    """

    source: torch.Tensor
    padding_mask: torch.Tensor | None
    ids: torch.Tensor

    @property
    def num_samples(self) -> int:
        """Utterances in the batch (B)."""
        return int(self.source.shape[0])

    def audio_seconds(self, sample_rate: int) -> float:
        """Seconds of audio in the batch at ``sample_rate``, padding not counted."""
        samples = self.source.numel() - (int(self.padding_mask.sum()) if self.padding_mask is not None else 0)
        return samples / sample_rate

    def to(self: BatchT, device: torch.device | str, non_blocking: bool = False) -> BatchT:
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self: BatchT) -> BatchT:
        """A copy in pinned memory (the DataLoader's ``pin_memory=True`` calls it)."""
        return self._map(lambda t: t.pin_memory())

    def _map(self: BatchT, fn) -> BatchT:
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True)
class CTCBatch(AudioBatch):
    """A batch of waveforms and their transcripts as symbol indices.

    Args:
        target: (B, L) int64 symbol indices, padded with the dictionary's pad index.
        target_lengths: (B,) int64 symbols of each target.
    """

    target: torch.Tensor
    target_lengths: torch.Tensor


@dataclass(kw_only=True)
class ClassificationBatch(AudioBatch):
    """A batch of waveforms and their classes.

    Args:
        target: (B,) int64 class indices.
    """

    target: torch.Tensor
