"""Fine-tuning data: manifest + transcripts -> whole, zero-padded utterances with padded letter targets for CTC.

fairseq's ``audio_finetuning`` task (``FileAudioDataset`` with ``pad=True`` wrapped in ``AddTargetDataset``), built
on :class:`xlsr.data.audio_dataset.AudioDataset` (reading, normalisation, bad files, corpus resampling) and batched by
its :class:`~xlsr.data.audio_dataset.LengthBatchSampler` (length buckets of at most ``max_tokens`` padded samples, DDP
ranks padded with empty batches, exact mid-epoch resume).

Utterances are never cropped. fairseq's fine-tuning recipes leave ``max_sample_size`` unset, so its collater does
not crop either; had it been set, fairseq would randomly crop the audio of a longer item and keep its whole
transcript. Here an item longer than ``max_sample_size`` or than ``max_tokens`` is dropped instead, with a warning
(fairseq stops with "exceeds max_tokens" in training). Sizes are the manifest's (the headers' when headers are
checked): keep manifests up to date, since a file longer than its manifest row is cut to the row's length.

Batches (:func:`collate_ctc`) are :class:`xlsr.data.batch.CTCBatch`: ``source`` (B, S) float32, ``padding_mask``
(B, S) bool (True = padding) or None when no item is padded, ``ids`` (B,) int64, ``target`` (B, L) int64 padded
with ``pad_index``, ``target_lengths`` (B,) int64.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xlsr.audio import AudioWarning
from xlsr.data.hf_dataset import (HFAudioDataset, build_hf_audio_dataset, column_strings, open_hf_split, row_names,
                                   split_name)
from xlsr.finetune.labels import dictionary_path, label_path, read_labels, text_transcripts
from xlsr.vocabulary import Dictionary
from xlsr.modules.feature_encoder import conv_output_length
from xlsr.data.audio_dataset import (AudioDataConfig, AudioDataset, batched_loader, check_data_source, collate,
                                     data_normalize,
                                     set_loader_epoch)
from xlsr.data.batch import CTCBatch

logger = logging.getLogger(__name__)

__all__ = [
    "FinetuneDataConfig",
    "LabelledAudioDataset",
    "check_finetune_data_config",
    "collate_ctc",
    "ctc_min_frames",
    "ctc_feasible",
    "FrameCounter",
    "frames_of",
    "build_finetune_dataloader",
    "hf_transcripts",
    "hf_split_transcripts",
    "set_loader_epoch",
]

_PATHS_SHOWN = 5  # paths named in one summary warning


@dataclass
class FinetuneDataConfig(AudioDataConfig):
    """Data options of CTC fine-tuning (fairseq ``task`` = audio_finetuning / ``dataset``): :class:`AudioDataConfig`
    with labels; defaults follow fairseq's ``examples/wav2vec/config/finetuning/base_100h.yaml``. The labels and
    ``dict.ltr.txt`` lie beside each manifest."""

    labels: str = "ltr"
    """Label file extension: ``ltr`` (letters) or ``wrd`` (words, turned into letters). fairseq ``task.labels``."""

    min_sample_size: int = 0
    """Shorter files are dropped. fairseq ``task.min_sample_size`` (0 in the recipes)."""

    max_sample_size: Optional[int] = None
    """Longer files are dropped (never cropped: see the module docstring); None = no limit but ``max_tokens``."""

    max_tokens: int = 3_200_000
    """Padded samples per batch (items * longest item). fairseq ``dataset.max_tokens`` (base_100h: 3.2M)."""

    unk: bool = False
    """Map transcript characters missing from the dictionary to its unknown symbol (``<unk>``, HF's ``[UNK]``;
    fairseq does, silently) instead of failing."""

    skip_empty: bool = False
    """Drop rows with an empty transcript (with a warning) instead of failing."""

    drop_infeasible: bool = False
    """Drop items too short for their transcript under CTC (see :func:`ctc_feasible`) instead of only counting
    them in a warning. fairseq keeps them (``zero_infinity`` makes their loss 0)."""

    text_column: str = "sentence"
    """With ``hf_dataset``: the column of transcripts (words, as a ``.wrd`` line or a transcript table's text:
    Common Voice's ``sentence``), turned into letters exactly as the manifest tool's ``--transcripts`` option does
    (Unicode NFC, whitespace collapsed, upper-cased unless ``text_keep_case``; then ``words_to_letters``)."""

    text_keep_case: bool = False
    """With ``text_column``: keep the transcripts' case (the manifest tool's ``--keep-case``)."""


def check_finetune_data_config(cfg) -> None:
    """Raise ValueError for out-of-range sizes or options."""
    check_data_source(cfg)
    if cfg.labels not in ("ltr", "wrd"):
        raise ValueError(f"data: labels must be 'ltr' or 'wrd', got {cfg.labels!r}")
    if cfg.max_tokens <= 0:
        raise ValueError("data: max_tokens must be > 0")
    if cfg.min_sample_size < 0:
        raise ValueError("data: min_sample_size must be >= 0")
    if cfg.max_sample_size is not None and cfg.max_sample_size < max(1, cfg.min_sample_size):
        raise ValueError(
            f"data: max_sample_size ({cfg.max_sample_size}) must be >= 1 and >= min_sample_size ({cfg.min_sample_size})"
        )
    if cfg.sampling_alpha <= 0:
        raise ValueError(f"data: sampling_alpha must be > 0, got {cfg.sampling_alpha}")
    if cfg.required_batch_size_multiple < 1:
        raise ValueError("data: required_batch_size_multiple must be >= 1")
    if cfg.sample_rate <= 0:
        raise ValueError("data: sample_rate must be > 0")


# ---------------------------------------------------------------------- CTC feasibility


def ctc_min_frames(target: Sequence[int] | torch.Tensor | np.ndarray) -> int:
    """Fewest frames CTC needs for ``target``: its length plus one blank between each pair of equal neighbours."""
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).reshape(-1)
    return int(len(t) + np.count_nonzero(t[1:] == t[:-1]))


def ctc_feasible(num_frames: int, target: Sequence[int] | torch.Tensor | np.ndarray) -> bool:
    """Whether ``num_frames`` output frames can emit ``target`` under CTC (else its loss is infinite: fairseq's
    ``zero_infinity`` turns it into 0)."""
    return int(num_frames) >= ctc_min_frames(target)


class FrameCounter:
    """Samples -> encoder frames for a conv stack ``[(dim, kernel, stride), ...]`` (``Wav2Vec2Config.conv_layers``),
    on integers or integer numpy arrays, for the ``num_frames`` argument of :class:`LabelledAudioDataset`
    (a class, not a closure, so that it pickles to DataLoader workers)."""

    def __init__(self, conv_layers: Sequence[Sequence[int]]):
        self.conv_layers = [tuple(int(v) for v in layer) for layer in conv_layers]

    def __call__(self, num_samples):
        return np.maximum(conv_output_length(np.asarray(num_samples, dtype=np.int64), self.conv_layers), 0)


frames_of = FrameCounter  # the old name


# ---------------------------------------------------------------------- dataset


class LabelledAudioDataset(Dataset):
    """Utterances of fairseq manifests with their letter transcripts, for CTC.

    Wraps an :class:`AudioDataset` (``audio``) built with the same options, without cropping; the transcript of
    each item is found by its manifest row (``AudioDataset.manifest_row_of``) in the label file beside its
    manifest (:func:`~xlsr.finetune.labels.read_labels`). Another source's rows (one corpus, e.g. a
    :class:`xlsr.data.hf_dataset.HFAudioDataset` built with ``pad=True`` and no ``max_sample_size``) are given as
    ``audio``, with ``transcripts``: ``(where, letter tokens or None)`` of each of its rows in row order (then
    ``manifests`` and the audio options are not used). Every transcript is encoded at construction, so an
    unknown character stops here naming the label file and line (or maps to ``<unk>`` with ``unk``).

    Items are left out (each reason counted in one warning naming the first few files, all kept in ``dropped``)
    when: longer than ``max_sample_size``; the transcript is empty and ``skip_empty``; and, given ``num_frames``
    (samples -> encoder frames, e.g. :class:`FrameCounter`), too short for one frame (empty files included: an
    utterance without frames has nothing to attend to), and with ``drop_infeasible`` too short for their
    transcript under CTC. With ``num_frames`` but not ``drop_infeasible``, those are only counted
    (``infeasible``) and warned about. Indices ``i`` are positions in the current epoch; ``__getitem__(i)`` returns ``{"id": i, "source":
    float32 (S,), "target": int64 (L,)}``, or None for an unreadable file when ``skip_bad``.
    """

    def __init__(
        self,
        manifests: str | Sequence[str],
        dictionary: Dictionary,
        *,
        labels: str = "ltr",
        sample_rate: int = 16000,
        min_sample_size: int = 0,
        max_sample_size: Optional[int] = None,
        normalize: bool = False,
        sampling_alpha: float = 1.0,
        skip_bad: bool = True,
        resample: bool = False,
        check_headers: bool = False,
        unk: bool = False,
        skip_empty: bool = False,
        num_frames: Optional[Callable[[np.ndarray], np.ndarray]] = None,
        drop_infeasible: bool = False,
        seed: int = 0,
        epoch: int = 0,
        audio: Optional[AudioDataset] = None,
        transcripts: Optional[Sequence[tuple[str, Optional[list[str]]]]] = None,
    ):
        if audio is not None:  # another source's rows (one corpus) and their transcripts
            if transcripts is None:
                raise ValueError("LabelledAudioDataset(audio=...) needs the transcripts of its rows")
            self.audio = audio
        else:
            self.audio = self._manifest_audio(
                manifests, sample_rate=sample_rate, min_sample_size=min_sample_size, normalize=normalize,
                sampling_alpha=sampling_alpha, skip_bad=skip_bad, resample=resample, check_headers=check_headers,
                seed=seed, epoch=epoch,
            )
        self.dictionary = dictionary
        self.pad_index = dictionary.pad_index
        self.labels = labels
        self.max_sample_size = max_sample_size
        self.num_frames = num_frames
        self.drop_infeasible = drop_infeasible
        self.dropped: list[tuple[str, str]] = []  # (path, reason) of items left out here (not by AudioDataset)

        # All transcripts, encoded, as one flat array: global row g = _row_offset[corpus] + manifest row.
        flat: list[int] = []
        offsets = [0]
        has_label: list[bool] = []
        min_frames: list[int] = []
        self._row_offset = np.zeros(len(self.audio.manifests), dtype=np.int64)
        for corpus_id, manifest in enumerate(self.audio.manifests):
            self._row_offset[corpus_id] = len(has_label)
            rows = transcripts if audio is not None else self._label_file(manifest, labels, skip_empty)
            for where, tokens in rows:
                ids = [] if tokens is None else dictionary.encode(tokens, where=where, unk=unk)
                flat.extend(ids)
                offsets.append(len(flat))
                has_label.append(tokens is not None)
                min_frames.append(ctc_min_frames(ids))
        self._targets = np.asarray(flat, dtype=np.int32)
        self._target_offsets = np.asarray(offsets, dtype=np.int64)
        self._has_label = np.asarray(has_label, dtype=bool)
        self._min_frames = np.asarray(min_frames, dtype=np.int64)

        self.infeasible: list[tuple[str, int, int]] = []  # (path, frames, frames needed), found at construction
        self._select(warn=True)

    @staticmethod
    def _manifest_audio(manifests, **options) -> AudioDataset:
        """The manifests' audio, as fine-tuning reads it: never cropped, padded."""
        return AudioDataset(manifests, max_sample_size=None, pad=True, **options)

    @staticmethod
    def _label_file(manifest: str, labels: str, skip_empty: bool) -> list[tuple[str, Optional[list[str]]]]:
        """(file:line, letter tokens) of every row of ``manifest`` from the label file beside it."""
        path = label_path(manifest, labels)
        return [(f"{path}:{number}", tokens)
                for number, tokens in enumerate(read_labels(manifest, labels, skip_empty=skip_empty), start=1)]

    # ----------------------------------------------------------------- selection

    def _rows(self) -> np.ndarray:
        positions = np.arange(len(self.audio), dtype=np.int64)
        return self._row_offset[self.audio.corpus_of(positions)] + self.audio.manifest_row_of(positions)

    def _select(self, warn: bool) -> None:
        rows = self._rows()
        sizes = np.asarray(self.audio.sizes, dtype=np.int64)
        keep = self._has_label[rows].copy()
        too_long = np.zeros(len(rows), dtype=bool)
        if self.max_sample_size is not None:
            too_long = sizes > self.max_sample_size
            keep &= ~too_long
        no_frame = np.zeros(len(rows), dtype=bool)
        infeasible = np.zeros(len(rows), dtype=bool)
        if self.num_frames is not None:
            frames = np.asarray(self.num_frames(sizes), dtype=np.int64)
            no_frame = keep & (frames < 1)
            keep &= ~no_frame
            infeasible = keep & (frames < self._min_frames[rows])
            if self.drop_infeasible:
                keep &= ~infeasible
        if warn:
            self._report(rows, sizes, too_long, no_frame, infeasible)
        self._keep = np.flatnonzero(keep)
        self._item_rows = rows[self._keep]
        self.sizes = sizes[self._keep]
        if len(self._keep) == 0:
            raise ValueError(f"{', '.join(self.audio.manifests)}: no item left with a usable transcript")

    def _report(
        self, rows: np.ndarray, sizes: np.ndarray, too_long: np.ndarray, no_frame: np.ndarray, infeasible: np.ndarray
    ) -> None:
        _, first = np.unique(rows, return_index=True)  # each file once, even if a corpus is upsampled
        unique = np.zeros(len(rows), dtype=bool)
        unique[first] = True
        empty = [self.audio.path(int(i)) for i in np.flatnonzero(unique & ~self._has_label[rows])]
        self.dropped.extend((p, "empty transcript") for p in empty)  # read_labels warned about them
        long_items = np.flatnonzero(unique & too_long)
        self._drop(
            [self.audio.path(int(i)) for i in long_items],
            f"longer than {self.max_sample_size} samples (max_sample_size or max_tokens; fine-tuning never crops)",
            [int(sizes[i]) for i in long_items],
        )
        short_items = np.flatnonzero(unique & no_frame)
        self._drop(
            [self.audio.path(int(i)) for i in short_items],
            "too short for one frame of the model's conv stack (empty or a few ms)",
            [int(sizes[i]) for i in short_items],
        )
        bad = np.flatnonzero(unique & infeasible)
        if len(bad):
            frames = np.asarray(self.num_frames(sizes[bad]), dtype=np.int64)
            self.infeasible = [
                (self.audio.path(int(i)), int(f), int(self._min_frames[rows[i]])) for i, f in zip(bad, frames)
            ]
            shown = "; ".join(f"{p} ({f} frames, needs {n})" for p, f, n in self.infeasible[:_PATHS_SHOWN])
            action = "dropped" if self.drop_infeasible else "kept (their CTC loss is infinite: use zero_infinity)"
            warnings.warn(
                f"{len(bad)} item(s) have fewer encoder frames than CTC needs for their transcript, {action}: "
                f"{shown}{' ...' if len(bad) > _PATHS_SHOWN else ''}",
                AudioWarning,
                stacklevel=4,
            )
            if self.drop_infeasible:
                self.dropped.extend(
                    (p, f"too short for its transcript ({f} frames, needs {n})") for p, f, n in self.infeasible
                )

    def _drop(self, paths: list[str], reason: str, sizes: Optional[list[int]] = None) -> None:
        if not paths:
            return
        details = [f"{p} ({s} samples)" for p, s in zip(paths, sizes)] if sizes else paths
        self.dropped.extend((p, reason) for p in paths)
        warnings.warn(
            f"{len(paths)} item(s) left out, {reason}: {'; '.join(details[:_PATHS_SHOWN])}"
            f"{' ...' if len(paths) > _PATHS_SHOWN else ''}",
            AudioWarning,
            stacklevel=5,
        )

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch`` (redraws corpus resampling, deterministic); ``sizes`` follow."""
        self.audio.set_epoch(epoch)
        self._select(warn=False)

    @property
    def epoch(self) -> int:
        return self.audio.epoch

    @property
    def num_skipped(self) -> int:
        """Items skipped so far because their file could not be loaded (all workers)."""
        return self.audio.num_skipped

    # ----------------------------------------------------------------- items

    def __len__(self) -> int:
        return len(self._keep)

    def key(self, i: int) -> str:
        """A stable key of item ``i``: its file's path."""
        return self.path(i)

    def path(self, i: int) -> str:
        """File path of item ``i`` of this epoch."""
        return self.audio.path(int(self._keep[i]))

    def target(self, i: int) -> torch.Tensor:
        """Encoded transcript (L,) int64 of item ``i`` of this epoch."""
        row = int(self._item_rows[i])
        start, end = self._target_offsets[row], self._target_offsets[row + 1]
        return torch.from_numpy(self._targets[start:end].astype(np.int64))

    def __getitem__(self, i: int) -> Optional[dict]:
        item = self.audio[int(self._keep[i])]
        if item is None:
            return None
        return {"id": i, "source": item["source"], "target": self.target(i)}

    def collater(self, samples: list[Optional[dict]]) -> Optional[CTCBatch]:
        """:func:`collate_ctc` with this dictionary's pad index."""
        return collate_ctc(samples, self.pad_index)


def collate_ctc(samples: list[Optional[dict]], pad_index: int) -> Optional[CTCBatch]:
    """Zero-pad sources to the longest (never crop) and pad targets with ``pad_index``; None items are dropped.

    Returns:
        a :class:`CTCBatch` (``ids`` (B,), ``source`` (B, S), ``padding_mask`` (B, S) with True = padding or None
        when no item is padded, ``target`` (B, L), ``target_lengths`` (B,)), or None when no item is left.
    """
    samples = [s for s in samples if s is not None and s.get("source") is not None]
    batch = collate(samples, pad=True)
    if batch is None:
        return None
    padding_mask = batch.padding_mask if batch.padding_mask is not None and bool(batch.padding_mask.any()) else None
    targets = [torch.as_tensor(s["target"], dtype=torch.long) for s in samples]
    lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    target = torch.full((len(targets), int(lengths.max())), pad_index, dtype=torch.long)
    for row, t in enumerate(targets):
        target[row, : len(t)] = t
    return CTCBatch(source=batch.source, padding_mask=padding_mask, ids=batch.ids, target=target,
                    target_lengths=lengths)


# ---------------------------------------------------------------------- loader


def hf_transcripts(audio: HFAudioDataset, cfg) -> list[tuple[str, Optional[list[str]]]]:
    """``(row name, letter tokens or None)`` of every row of a Hugging Face dataset split, from its column
    ``cfg.text_column`` (:func:`~xlsr.finetune.labels.text_transcripts`, as the manifest tool's)."""
    texts = audio.column_strings(cfg.text_column, "data.text_column")
    return text_transcripts(texts, audio.row_names(), keep_case=cfg.text_keep_case, skip_empty=cfg.skip_empty)


def hf_split_transcripts(cfg, split: Optional[str]) -> list[tuple[str, Optional[list[str]]]]:
    """:func:`hf_transcripts` of ``split`` of ``cfg.hf_dataset`` without reading its audio (e.g. to build the
    dictionary)."""
    dataset = open_hf_split(cfg.hf_dataset, split)
    name = f"{cfg.hf_dataset}:{split_name(dataset, split)}"
    texts = column_strings(dataset, name, cfg.text_column, "data.text_column")
    return text_transcripts(texts, row_names(name, len(texts)), keep_case=cfg.text_keep_case,
                            skip_empty=cfg.skip_empty)


def build_finetune_dataloader(
    cfg: FinetuneDataConfig,
    manifest: str,
    dictionary: Dictionary | str | os.PathLike | None = None,
    *,
    normalize: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    shuffle: bool = True,
    num_frames: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> DataLoader:
    """DataLoader of CTC batches over ``manifest`` (comma-separated = several corpora) for one rank.

    As :func:`xlsr.data.audio_dataset.build_dataloader`: length-bucketed batches of at most ``cfg.max_tokens`` padded
    samples, all ranks building the same list and rank r taking batches r, r + K, ..., a rank left without one in
    the last round getting an empty batch (collated to None: a zero-weight pass); ``start_batch`` resumes an epoch;
    :func:`set_loader_epoch` moves to later epochs. With ``cfg.hf_dataset``, ``manifest`` is the name of its split
    and the transcripts are its ``cfg.text_column`` (:func:`hf_transcripts`). ``dictionary``: a
    :class:`Dictionary`, a path, or None for ``dict.ltr.txt`` beside the (first) manifest. ``normalize`` is the model's choice, overridden by
    ``cfg.normalize`` when set. ``num_frames`` (samples -> encoder frames, :class:`FrameCounter`) enables the CTC
    feasibility check (``cfg.drop_infeasible``). Items longer than ``cfg.max_tokens`` are dropped with a warning.
    """
    check_finetune_data_config(cfg)
    if dictionary is None:
        if cfg.hf_dataset:
            raise ValueError("build_finetune_dataloader: give the dictionary with data.hf_dataset")
        dictionary = dictionary_path(manifest.split(",")[0].strip(), cfg.labels)
    if not isinstance(dictionary, Dictionary):
        dictionary = Dictionary.load(dictionary)
    max_size = cfg.max_tokens if cfg.max_sample_size is None else min(cfg.max_sample_size, cfg.max_tokens)
    audio = transcripts = None
    if cfg.hf_dataset:  # ``manifest`` names the split
        audio = build_hf_audio_dataset(cfg, manifest, pad=True, max_sample_size=None,
                                       normalize=data_normalize(cfg, normalize), seed=seed, epoch=epoch)
        transcripts = hf_transcripts(audio, cfg)
    dataset = LabelledAudioDataset(
        manifest,
        dictionary,
        labels=cfg.labels,
        sample_rate=cfg.sample_rate,
        min_sample_size=cfg.min_sample_size,
        max_sample_size=max_size,
        normalize=data_normalize(cfg, normalize),
        sampling_alpha=cfg.sampling_alpha if shuffle else 1.0,
        skip_bad=cfg.skip_bad,
        resample=cfg.resample,
        check_headers=not cfg.skip_bad or cfg.resample,
        unk=cfg.unk,
        skip_empty=cfg.skip_empty,
        num_frames=num_frames,
        drop_infeasible=cfg.drop_infeasible,
        seed=seed,
        epoch=epoch,
        audio=audio,
        transcripts=transcripts,
    )
    return batched_loader(dataset, cfg, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                          start_batch=start_batch, shuffle=shuffle)
