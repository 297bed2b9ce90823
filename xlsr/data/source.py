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
  the dataset's rows instead of a manifest's files, through ``batched_loader``);
* a Lhotse CutSet manifest: :class:`xlsr.data.lhotse_source.LhotseCutSource` (map-style, through
  ``batched_loader``);
* Lhotse Shar shards are a stream, not map-style: :class:`xlsr.data.lhotse_source.SharBatchLoader` has the
  :class:`~xlsr.data.audio_dataset.BatchLoader` members (``total_batches``, ``num_skipped``, ``set_epoch``,
  ``position``, ``global_index``, ``state_dict`` / ``load_state_dict``) and is returned instead.

Which data a run trains on is named by one string (:func:`training_data`, :func:`validation_data`): a manifest
path, ``hf-split:NAME`` (a split of ``data.hf_dataset``), ``lhotse-cuts:PATH`` or ``lhotse-shar:DIR``; the engine
hands it to ``Task.build_loader``.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

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


HF_SCHEME = "hf-split:"
"""Prefix of a data name that is a split of ``data.hf_dataset`` (empty after it: the dataset's only split)."""


def _named(cfg: Any, keys: tuple[tuple[str, str], ...], hf_split_key: str) -> list[str]:
    named = [f"{prefix}{value}" for key, prefix in keys if (value := getattr(cfg, key, None))]
    if getattr(cfg, "hf_dataset", None) and (hf_split_key == "hf_split" or getattr(cfg, hf_split_key, None)):
        named.append(f"{HF_SCHEME}{getattr(cfg, hf_split_key) or ''}")
    return named


_TRAIN_KEYS = (("manifest", ""), ("lhotse_cuts", "lhotse-cuts:"), ("lhotse_shar", "lhotse-shar:"))
_VALID_KEYS = (("valid_manifest", ""), ("valid_lhotse_cuts", "lhotse-cuts:"), ("valid_lhotse_shar", "lhotse-shar:"))


def training_data(cfg: Any) -> str:
    """The name of the training data that the engine hands to ``Task.build_loader``: ``data.manifest``,
    ``hf-split:SPLIT`` (``data.hf_dataset``, ``data.hf_split``), ``lhotse-cuts:PATH`` (``data.lhotse_cuts``) or
    ``lhotse-shar:DIR`` (``data.lhotse_shar``).

    Args:
        cfg: the run's data config (:class:`~xlsr.data.audio_dataset.AudioDataConfig`).

    Raises:
        ValueError: none or several of them set.
    """
    named = _named(cfg, _TRAIN_KEYS, "hf_split")
    if len(named) != 1:
        keys = ", ".join([f"data.{key}" for key, _ in _TRAIN_KEYS] + ["data.hf_dataset"])
        raise ValueError(f"data: set exactly one of {keys} (got {named or 'none'})")
    return named[0]


def validation_data(cfg: Any) -> Optional[str]:
    """The name of the validation data (as :func:`training_data`; ``hf-split:`` + ``data.hf_valid_split``), or
    None for no validation."""
    named = _named(cfg, _VALID_KEYS, "hf_valid_split")
    if len(named) > 1:
        keys = ", ".join([f"data.{k}" for k, _ in _VALID_KEYS] + ["data.hf_valid_split"])
        raise ValueError(f"data: set at most one of {keys} (got {named})")
    return named[0] if named else None


def hf_split_of(name: str) -> Optional[str]:
    """The split named by ``hf-split:SPLIT`` (None for the dataset's only split); None for other data names."""
    return (name[len(HF_SCHEME):] or None) if name.startswith(HF_SCHEME) else None


def is_hf_source(name: str) -> bool:
    """Whether a data name (:func:`training_data`) is a split of ``data.hf_dataset``."""
    return name.startswith(HF_SCHEME)
