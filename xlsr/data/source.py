"""Where training data comes from: a source of utterances, the one interface the batching needs.

A source is map-style: item ``i`` (``0 <= i < len(source)``) of the current epoch has a size in samples
(``sizes[i]``, what length-bucketing packs by), loads as ``{"id": i, "source": float32 (S,), ...}`` (or None when
it could not be read, counted in ``num_skipped``) and has a stable ``key(i)`` (its file, for messages and checks).
Its ``collater`` turns loaded items into a typed batch (:mod:`xlsr.data.batch`). Implementations:
:class:`xlsr.data.audio_dataset.AudioDataset` (a manifest's files, pretraining),
:class:`xlsr.data.hf_dataset.HFAudioDataset` (a Hugging Face dataset's rows, through the same code) and
:class:`xlsr.finetune.data.LabelledAudioDataset` (either with transcripts, CTC).

:func:`xlsr.data.audio_dataset.batched_loader` puts any source behind a
:class:`~xlsr.data.audio_dataset.BatchLoader` (length-bucketed batches, DDP sharding, exact resume by
``state_dict`` / ``load_state_dict``), which is all the engine sees. Other sources plug in here:

* a Hugging Face ``datasets`` split: :class:`xlsr.data.hf_dataset.HFAudioDataset` (an ``AudioDataset`` reading
  the dataset's rows instead of a manifest's files), chosen by the tasks when ``data.hf_dataset`` is set;
* a Lhotse stream (a lazy ``CutSet``) is not map-style: it brings its own bucketing sampler; wrap it in a loader
  with the :class:`~xlsr.data.audio_dataset.BatchLoader` members (``total_batches``, ``num_skipped``,
  ``set_epoch``, ``position``, ``global_index``, ``state_dict`` / ``load_state_dict``) and return that instead.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import numpy as np

from xlsr.data.batch import AudioBatch


@runtime_checkable
class UtteranceSource(Protocol):
    """A map-style source of utterances for :func:`~xlsr.data.audio_dataset.batched_loader`.

    Attributes:
        sizes: (N,) int64 samples of each item of the current epoch.
    """

    sizes: np.ndarray

    def __len__(self) -> int:
        """Items in the current epoch (N)."""

    def __getitem__(self, i: int) -> Optional[dict]:
        """Item ``i``: ``{"id": i, "source": float32 (S,), ...}`` with S <= ``sizes[i]``, or None if unreadable."""

    def key(self, i: int) -> str:
        """A stable key of item ``i`` (e.g. its file's path)."""

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch`` (items, their order and ``sizes`` may change with it, drawn from the seed)."""

    @property
    def num_skipped(self) -> int:
        """Unreadable items skipped so far."""

    def collater(self, samples: list[Optional[dict]]) -> Optional[AudioBatch]:
        """Loaded items -> one batch (None when none is left)."""


def data_splits(data_cfg) -> tuple[Optional[str], Optional[str]]:
    """What the engine passes to ``Task.build_loader`` for training and for validation (None: no validation): the
    manifests (``data.manifest``, ``data.valid_manifest``), or with ``data.hf_dataset`` the split names
    (``data.hf_split``, ``data.hf_valid_split``)."""
    if getattr(data_cfg, "hf_dataset", None):
        return data_cfg.hf_split, data_cfg.hf_valid_split
    return data_cfg.manifest, data_cfg.valid_manifest
