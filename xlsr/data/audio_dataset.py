"""Pretraining data: manifests -> cropped waveforms -> length-bucketed batches.

Modelled on fairseq's ``FileAudioDataset`` + ``ordered_indices`` / ``batch_by_size``, with
three differences that matter for long runs:

* every random choice (crop offsets, batch order, corpus resampling) comes from a numpy
  Generator seeded by ``(seed, epoch, ...)``, so batches and crops do not depend on the number
  of DataLoader workers, and a run resumed mid-epoch (``start_batch``) sees exactly the batches
  it would have seen;
* DDP sharding is done on whole batches and loses none: when the batch count is not a multiple of the
  number of ranks, the ranks left without a batch in the last round get an empty one (``[]``, collated to
  None), which the trainer runs as a zero-weight pass, as fairseq's dummy batch;
* bad files are reported by path, and either skipped (``skip_bad``) or refused up front.

Batches (:func:`collate`) are :class:`xlsr.data.batch.AudioBatch`: ``source`` (B, S) float32, ``padding_mask``
(B, S) bool (True = padding) or None, ``ids`` (B,) int64.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from xlsr.audio import AudioError, AudioWarning, audio_info, load_audio, normalize_waveform
from xlsr.data.batch import AudioBatch
from xlsr.data.source import UtteranceSource, training_data, validation_data
from xlsr.manifest import read_manifest

logger = logging.getLogger(__name__)

__all__ = [
    "DataConfig",
    "BadFilesError",
    "AudioDataset",
    "collate",
    "LengthBatchSampler",
    "build_dataloader",
    "set_loader_epoch",
    "check_data_config",
    "check_data_source",
]

# Per-file warnings at construction are capped per reason (a corpus can hold thousands of
# too-short clips); the full list is always in ``AudioDataset.dropped``.
MAX_FILES_WARNED = 100
# Header checks of at least this many files show a progress bar.
HEADER_PROGRESS_MIN = 10_000

# Streams of the per-item Generator seeded with (seed, epoch, index, stream).
_CROP_IN_ITEM = 0
_CROP_IN_BATCH = 1


@dataclass
class AudioDataConfig:
    """The data options every task has (a hydra structured config: simple types only); a task's data section
    subclasses it, adding its own fields and redeclaring a field only for its recipe's default.

    fairseq keeps most of these in ``task`` or ``dataset``; its name is given per field.
    """

    manifest: Optional[str] = None
    """train.tsv path (from ``python -m xlsr.manifest``); several comma-separated paths = several corpora.
    Unset when the training data is given otherwise (``hf_dataset``, ``lhotse_cuts``, ``lhotse_shar``): exactly
    one must be set. fairseq: ``task.data`` (a folder holding train.tsv)."""

    valid_manifest: Optional[str] = None
    """valid.tsv path for validation; None = no validation. (fairseq: ``dataset.valid_subset`` in ``task.data``.)"""

    lhotse_cuts: Optional[str] = None
    """Train on a Lhotse CutSet manifest (``cuts.jsonl.gz``, e.g. from ``lhotse prepare ...``) instead of
    ``manifest``: each cut an utterance (its start / duration honoured), batched as a manifest. Needs
    ``pip install 'xlsr[lhotse]'``. See docs/data-lhotse.md."""

    valid_lhotse_cuts: Optional[str] = None
    """A CutSet manifest for validation (instead of ``valid_manifest``)."""

    lhotse_shar: Optional[str] = None
    """Train on Lhotse Shar shards streamed from this folder (``cuts.NNNNNN.jsonl.gz`` + ``recording.NNNNNN.tar``,
    e.g. from the manifest tool's ``--to-shar``) instead of ``manifest``: shards dealt to ranks, read
    sequentially, position in the checkpoint (:class:`xlsr.data.lhotse_source.SharBatchLoader`)."""

    valid_lhotse_shar: Optional[str] = None
    """A Shar folder for validation (instead of ``valid_manifest``)."""

    lhotse_shuffle_buffer: int = 1000
    """Shar streaming: cuts of a shard bucketed and shuffled together (a window; held in memory compressed)."""

    lhotse_text_field: Optional[str] = None
    """Fine-tuning on Lhotse data: None = the transcript is the supervisions' text joined (words); else the cut's
    (or its first supervision's) custom field of this name, in ``labels`` form (``ltr`` or ``wrd``)."""

    sampling_alpha: float = 1.0
    """With several corpora, each epoch resamples corpus i to probability ∝ (hours_i / hours)^alpha; 1.0 = natural
    (training only). XLS-R used 0.5 (done offline in its manifests; no fairseq field)."""

    sample_rate: int = 16000
    """Sample rate (Hz) the audio must have (or is resampled to, with ``resample``). fairseq ``task.sample_rate``."""

    min_sample_size: int = 0
    """Shorter files are dropped. fairseq ``task.min_sample_size``."""

    max_tokens: int = 1_200_000
    """Samples per batch (items * longest item after cropping). fairseq ``dataset.max_tokens``."""

    normalize: Optional[bool] = None
    """Zero-mean unit-variance normalisation of each utterance (before cropping); None: what the model asks for
    (``Wav2Vec2Config.normalize``). XLS-R: True. fairseq ``task.normalize``."""

    num_workers: int = 2
    """DataLoader worker processes per rank. XLS-R: 6. fairseq ``dataset.num_workers``."""

    skip_bad: bool = True
    """True: skip unreadable files; False: check headers first, then fail listing them."""

    resample: bool = False
    """Resample other sample rates with soxr instead of failing."""

    required_batch_size_multiple: int = 1
    """Batch sizes are rounded down to a multiple of this where possible. XLS-R: 8 (fairseq's default).
    fairseq ``dataset.required_batch_size_multiple``."""

    hf_dataset: Optional[str] = None
    """Train on a Hugging Face ``datasets`` dataset instead of manifests (needs ``pip install 'xlsr[hf-datasets]'``):
    a folder written by ``save_to_disk``, a ``.parquet`` / ``.arrow`` file, or a folder of ``.parquet`` files
    (``xlsr.data.hf_dataset.open_hf_split``). Its rows in order train exactly as a manifest of the same files would
    (the same sizes, batches and crops); audio is decoded with soundfile, never by ``datasets``."""

    hf_split: Optional[str] = "train"
    """With ``hf_dataset``: the training split (of a ``DatasetDict``; or the parquet files named after it). None:
    the only split there is."""

    hf_valid_split: Optional[str] = None
    """With ``hf_dataset``: the validation split (e.g. ``validation``); None = no validation."""

    audio_column: str = "audio"
    """With ``hf_dataset``: the audio column: ``datasets.Audio`` (bytes embedded, or paths; read undecoded) or a
    string column of paths (relative ones from the dataset's folder)."""

    length_column: Optional[str] = None
    """With ``hf_dataset``: a column holding each row's length in samples at ``sample_rate`` (used as a manifest's
    sizes); None = read every row's header at start (no decoding)."""

    label_column: Optional[str] = None
    """Classification on other data than manifests: where each utterance's class label is, with ``hf_dataset`` the
    column (strings), with ``lhotse_cuts`` / ``lhotse_shar`` the cut's custom field (else its first supervision's).
    None: the name in ``labels`` (``lang``, the field ``--to-shar`` writes from ``train.lang``). Pretraining and CTC
    ignore it (CTC's Lhotse transcript field is ``lhotse_text_field``)."""


@dataclass
class DataConfig(AudioDataConfig):
    """Data options of pretraining: :class:`AudioDataConfig` with cropping and padding.
    "XLS-R" values are those of the released ``xlsr2_300m.pt`` cfg (per GPU, 128 GPUs)."""

    max_sample_size: int = 320000
    """Longer files are randomly cropped to this many samples (20 s at 16 kHz). XLS-R: 320000.
    fairseq ``task.max_sample_size``."""

    min_sample_size: int = 32000
    """Shorter files are dropped (2 s at 16 kHz). XLS-R: 32000. fairseq ``task.min_sample_size``."""

    max_tokens: int = 1_200_000
    """Samples per batch (items * longest cropped item). XLS-R: 1.2M (75 s) per GPU. fairseq ``dataset.max_tokens``."""

    pad: bool = False
    """False: crop a batch to its shortest item; True: zero-pad to the longest (with a padding mask). XLS-R: False.
    fairseq ``task.enable_padding``."""


def check_data_source(cfg: AudioDataConfig) -> None:
    """Raise ValueError unless the training data come from exactly one place (``manifest``, ``hf_dataset``,
    ``lhotse_cuts`` or ``lhotse_shar``) and the validation data from at most one."""
    training_data(cfg)
    validation_data(cfg)
    if cfg.hf_dataset and cfg.valid_manifest:
        raise ValueError("data: data.valid_manifest with data.hf_dataset; validate on a split of the dataset "
                         "(data.hf_valid_split)")


def check_data_config(cfg: DataConfig) -> None:
    """Raise ValueError for inconsistent sizes or out-of-range options."""
    check_data_source(cfg)
    if cfg.min_sample_size < 0 or cfg.max_sample_size <= 0:
        raise ValueError("data: min_sample_size must be >= 0 and max_sample_size > 0")
    if cfg.min_sample_size > cfg.max_sample_size:
        raise ValueError(f"data: min_sample_size ({cfg.min_sample_size}) > max_sample_size ({cfg.max_sample_size})")
    if cfg.max_sample_size > cfg.max_tokens:
        raise ValueError(
            f"data: max_sample_size ({cfg.max_sample_size}) > max_tokens ({cfg.max_tokens}); "
            "a single cropped item would not fit in a batch"
        )
    if cfg.sampling_alpha <= 0:
        raise ValueError(f"data: sampling_alpha must be > 0, got {cfg.sampling_alpha}")
    if cfg.required_batch_size_multiple < 1:
        raise ValueError("data: required_batch_size_multiple must be >= 1")
    if cfg.sample_rate <= 0:
        raise ValueError("data: sample_rate must be > 0")


class BadFilesError(AudioError):
    """Several unusable files; ``bad_files`` lists ``(path, reason)``."""

    def __init__(self, where: str, bad_files: Sequence[tuple[str, str]]):
        self.bad_files = list(bad_files)
        lines = "\n".join(f"  {path}: {reason}" for path, reason in self.bad_files)
        super().__init__(where, f"{len(self.bad_files)} bad audio file(s):\n{lines}")

    def __reduce__(self):
        return (type(self), (self.path, self.bad_files))


class _StringTable:
    """Many strings as one UTF-8 byte array + offsets: cheap to pickle to workers, and no
    per-object refcounts that copy-on-write would duplicate in forked workers."""

    def __init__(self, strings: Sequence[str]):
        encoded = [s.encode("utf-8") for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._blob[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8")

    def subset(self, keep: np.ndarray) -> "_StringTable":
        return _StringTable([self[int(i)] for i in keep])


def _item_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, stream])


def _random_crop(wav: torch.Tensor, length: int, rng: np.random.Generator) -> torch.Tensor:
    """A random window of ``length`` samples of ``wav`` (S,), copied so it owns its memory."""
    excess = wav.shape[0] - length
    if excess <= 0:
        return wav
    offset = int(rng.integers(0, excess + 1))
    return wav[offset : offset + length].clone()


class AudioDataset(Dataset):
    """Waveforms listed in one or more fairseq manifests (one manifest = one corpus).

    Items shorter than ``min_sample_size`` and missing files are dropped at construction
    (each named in an :class:`AudioWarning`, all kept in ``dropped``); with ``skip_bad=False``
    missing files raise a :class:`BadFilesError` instead. ``validate()`` (run at construction
    when ``check_headers``) reads every header and drops (``skip_bad``) or refuses, in one
    :class:`BadFilesError` listing them all, the bad files (missing ones included).

    With several corpora and ``sampling_alpha != 1``, each epoch resamples every corpus to
    its share ∝ (n_i / N)^alpha, n_i being its total audio duration (as in XLS-R): a corpus
    upsampled by 2.4 appears twice plus a random 40 % of it once more, one downsampled by 0.3
    contributes a random 30 %. Indices ``i`` are positions in the current epoch.

    ``__getitem__(i)`` returns ``{"id": i, "source": float32 (S,)}`` with S <= sizes[i], or
    None for an unreadable file when ``skip_bad`` (counted in ``num_skipped``).
    """

    def __init__(
        self,
        manifests: str | Sequence[str],
        *,
        sample_rate: int = 16000,
        min_sample_size: int = 0,
        max_sample_size: Optional[int] = None,
        pad: bool = False,
        normalize: bool = False,
        sampling_alpha: float = 1.0,
        skip_bad: bool = True,
        resample: bool = False,
        check_headers: bool = False,
        seed: int = 0,
        epoch: int = 0,
    ):
        if isinstance(manifests, str):
            manifests = [m.strip() for m in manifests.split(",") if m.strip()]
        if not manifests:
            raise ValueError("AudioDataset needs at least one manifest")
        self._set_options(
            manifests, sample_rate=sample_rate, min_sample_size=min_sample_size, max_sample_size=max_sample_size,
            pad=pad, normalize=normalize, sampling_alpha=sampling_alpha, skip_bad=skip_bad, resample=resample,
            seed=seed, epoch=epoch,
        )

        paths: list[str] = []
        sizes: list[int] = []
        corpus: list[int] = []
        rows: list[int] = []  # line of each kept file among its manifest's entries (0 = first after the root)
        for corpus_id, manifest in enumerate(self.manifests):
            root, entries = read_manifest(manifest)
            too_short: list[tuple[str, str]] = []
            missing: list[tuple[str, str]] = []
            kept = 0
            for row, (rel_path, num_samples) in enumerate(entries):
                path = os.path.join(root, rel_path)
                if num_samples < min_sample_size and not (resample and check_headers):  # else: at the header's rate
                    too_short.append((path, f"too short ({num_samples} samples < min_sample_size {min_sample_size})"))
                elif not os.path.exists(path) and (skip_bad or not check_headers):
                    missing.append((path, "file not found"))
                else:  # (a missing file kept here is reported by validate() with the others)
                    paths.append(path)
                    sizes.append(num_samples)
                    corpus.append(corpus_id)
                    rows.append(row)
                    kept += 1
            if missing and not skip_bad:
                raise BadFilesError(manifest, missing)
            self._drop_with_warnings(too_short)
            self._drop_with_warnings(missing)
            logger.info(
                "%s: %d files kept, %d too short (< %d samples) dropped, %d missing dropped",
                manifest,
                kept,
                len(too_short),
                min_sample_size,
                len(missing),
            )
            if kept == 0:
                raise ValueError(
                    f"{manifest}: no usable audio ({len(entries)} entries, {len(too_short)} too short, "
                    f"{len(missing)} missing)"
                )

        self._paths = _StringTable(paths)
        self._set_rows(sizes, corpus, rows, check_headers)

    def _set_options(self, corpora: Sequence[str], *, sample_rate: int, min_sample_size: int,
                     max_sample_size: Optional[int], pad: bool, normalize: bool, sampling_alpha: float,
                     skip_bad: bool, resample: bool, seed: int, epoch: int) -> None:
        """The options every source of this class keeps (see the constructor); ``corpora`` names the corpora
        (``manifests``: manifest paths, or another source's names)."""
        self.manifests = list(corpora)
        self.sample_rate = sample_rate
        self.min_sample_size = min_sample_size
        self.max_sample_size = max_sample_size if max_sample_size is not None else np.iinfo(np.int64).max
        self.pad = pad
        self.normalize = normalize
        self.sampling_alpha = sampling_alpha
        self.skip_bad = skip_bad
        self.resample = resample
        self.seed = seed
        self.epoch = epoch
        self.dropped: list[tuple[str, str]] = []  # (path, reason) of every file left out
        self._warned_bad: set[str] = set()
        # Shared between DataLoader workers so the main process sees their skips.
        self._skip_counter = torch.zeros(1, dtype=torch.int64).share_memory_()

    def _set_rows(self, sizes: Sequence[int], corpus: Sequence[int], rows: Sequence[int],
                  check_headers: bool) -> None:
        """The stored items: their sizes in samples, corpus numbers and rows in their corpus (each item's stored
        row ``j`` is its position in these lists); then ``validate()`` when ``check_headers``, else the epoch."""
        self._num_samples = np.asarray(sizes, dtype=np.int64)  # header length of each file
        self._corpus = np.asarray(corpus, dtype=np.int32)
        self._row = np.asarray(rows, dtype=np.int64)
        if check_headers:
            self.validate()  # also calls set_epoch
        else:
            self.set_epoch(self.epoch)

    # ----------------------------------------------------------------- epoch state

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch``: redraws corpus resampling and crop offsets (deterministic)."""
        self.epoch = epoch
        self._index = self._epoch_index(epoch)
        self.sizes = np.minimum(self._num_samples[self._index], self.max_sample_size)

    def corpus_ratios(self) -> np.ndarray:
        """Per corpus, how many times it is repeated per epoch (1.0 = natural share)."""
        num_corpora = len(self.manifests)
        durations = np.bincount(self._corpus, weights=self._num_samples, minlength=num_corpora)
        if num_corpora == 1 or self.sampling_alpha == 1.0:
            return np.ones(num_corpora)
        share = durations / durations.sum()
        target = share**self.sampling_alpha
        target /= target.sum()
        return target / share

    def _epoch_index(self, epoch: int) -> np.ndarray:
        ratios = self.corpus_ratios()
        if np.all(ratios == 1.0):
            return np.arange(len(self._num_samples), dtype=np.int64)
        parts = []
        for corpus_id, ratio in enumerate(ratios):
            members = np.flatnonzero(self._corpus == corpus_id)
            whole_copies = int(math.floor(ratio))
            extra = int(round((ratio - whole_copies) * len(members)))
            rng = np.random.default_rng([self.seed, epoch, corpus_id, 2])
            parts.extend([members] * whole_copies)
            parts.append(np.sort(rng.choice(members, size=extra, replace=False)))
        return np.concatenate(parts).astype(np.int64)

    def corpus_of(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Corpus number (position in ``manifests``) of dataset indices of this epoch."""
        return self._corpus[self._index[np.asarray(indices, dtype=np.int64)]]

    def manifest_row_of(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Row of dataset indices of this epoch in their corpus's manifest (0 = the first entry after the root
        line), counting dropped entries too: the line number of their transcript in a label file beside it."""
        return self._row[self._index[np.asarray(indices, dtype=np.int64)]]

    def key(self, i: int) -> str:
        """A stable key of item ``i``: its file's path (several items of one file when a corpus is upsampled)."""
        return self.path(i)

    def path(self, i: int) -> str:
        """File path of item ``i`` of this epoch."""
        return self._stored_name(int(self._index[i]))

    # ----------------------------------------------------------------- reading one stored row
    # What a source other than a manifest overrides (with ``_set_options`` / ``_set_rows`` in its constructor):
    # everything else (sizes, corpus resampling, cropping, batching, bad rows) is this class's.

    def _stored_name(self, j: int) -> str:
        """Stored row ``j``'s name in messages and keys: here its file's path."""
        return self._paths[j]

    def _read_header(self, j: int) -> tuple[int, int, int]:
        """``(num_samples, sample_rate, channels)`` of stored row ``j`` (:func:`xlsr.audio.audio_info`)."""
        return audio_info(self._paths[j])

    def _read_audio(self, j: int) -> np.ndarray:
        """Stored row ``j`` decoded: float32 (S,) at ``sample_rate`` (:func:`xlsr.audio.load_audio`)."""
        return load_audio(self._paths[j], self.sample_rate, resample=self.resample)

    def _keep_stored(self, keep: np.ndarray) -> None:
        """Keep only the stored rows ``keep`` (the per-row tables a subclass holds besides sizes, corpus, row)."""
        self._paths = self._paths.subset(keep)

    # ----------------------------------------------------------------- checks

    def validate(self, num_threads: int = 16) -> list[tuple[str, str]]:
        """Read every header; drop (``skip_bad``) or refuse (``BadFilesError``) bad files.

        A file is bad if its header cannot be read, it has 0 samples, or its sample rate
        differs from ``sample_rate`` while ``resample`` is off. Sizes are refreshed from the
        headers (converted to ``sample_rate`` when resampling); files that become shorter than
        ``min_sample_size`` are dropped as too short. Returns the bad ``(path, reason)`` list.
        """
        num_files = len(self._num_samples)
        paths = [self._stored_name(j) for j in range(num_files)]

        def check(j: int) -> tuple[Optional[int], Optional[str]]:
            try:
                frames, rate, _ = self._read_header(j)
            except AudioError as err:
                return None, err.reason
            if frames <= 0:
                return None, "empty (0 samples)"
            if rate != self.sample_rate:
                if not self.resample:
                    return None, f"sample rate is {rate} Hz, expected {self.sample_rate} Hz"
                frames = int(round(frames * self.sample_rate / rate))
            return frames, None

        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            results = list(tqdm(pool.map(check, range(num_files)), total=num_files, desc="reading headers",
                                unit="file", disable=num_files < HEADER_PROGRESS_MIN, leave=False))

        bad = [(path, reason) for path, (_, reason) in zip(paths, results) if reason is not None]
        if bad and not self.skip_bad:
            raise BadFilesError(", ".join(self.manifests), bad)
        new_sizes = np.array([-1 if frames is None else frames for frames, _ in results], dtype=np.int64)
        too_short = [
            (path, f"too short ({n} samples < min_sample_size {self.min_sample_size})")
            for path, n in zip(paths, new_sizes)
            if 0 <= n < self.min_sample_size
        ]
        self._drop_with_warnings(bad)
        self._drop_with_warnings(too_short)
        keep = np.flatnonzero(new_sizes >= self.min_sample_size)
        if len(keep) == 0:
            raise ValueError(f"{', '.join(self.manifests)}: no usable audio left after checking headers")
        if len(keep) < num_files:
            self._keep_stored(keep)
            self._corpus = self._corpus[keep]
            self._row = self._row[keep]
        self._num_samples = new_sizes[keep]
        self.set_epoch(self.epoch)
        return bad

    def _drop_with_warnings(self, dropped: list[tuple[str, str]]) -> None:
        self.dropped.extend(dropped)
        for path, reason in dropped[:MAX_FILES_WARNED]:
            warnings.warn(f"{path}: {reason}; left out", AudioWarning, stacklevel=3)
        if len(dropped) > MAX_FILES_WARNED:
            warnings.warn(
                f"... and {len(dropped) - MAX_FILES_WARNED} more files left out (all listed in AudioDataset.dropped)",
                AudioWarning,
                stacklevel=3,
            )

    @property
    def num_skipped(self) -> int:
        """Items skipped so far because their file could not be loaded (all workers)."""
        return int(self._skip_counter.item())

    # ----------------------------------------------------------------- items

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Optional[dict]:
        j = int(self._index[i])
        try:
            wav = torch.from_numpy(self._read_audio(j))
        except AudioError as err:
            if not self.skip_bad:
                raise
            self._skip_counter += 1
            path = self._stored_name(j)
            if path not in self._warned_bad:
                self._warned_bad.add(path)
                warnings.warn(f"{err}; skipped", AudioWarning, stacklevel=2)
            return None
        if self.normalize:  # over the whole utterance, before cropping, as fairseq
            wav = normalize_waveform(wav)
        # Crop to the size batching planned with, so a stale manifest cannot overfill a batch (the generator, slow
        # to seed, only when there is something to crop).
        if wav.shape[0] > int(self.sizes[i]):
            wav = _random_crop(wav, int(self.sizes[i]), _item_rng(self.seed, self.epoch, i, _CROP_IN_ITEM))
        return {"id": i, "source": wav}

    def collater(self, samples: list[Optional[dict]]) -> Optional[AudioBatch]:
        """:func:`collate` with this dataset's ``pad``, seed and epoch."""
        return collate(samples, self.pad, seed=self.seed, epoch=self.epoch)


def collate(samples: list[Optional[dict]], pad: bool, *, seed: int = 0, epoch: int = 0) -> Optional[AudioBatch]:
    """Stack items into a batch; None items (skipped files) are dropped.

    ``pad=False`` randomly crops every item to the shortest one (offset seeded by
    ``(seed, epoch, id)``); ``pad=True`` zero-pads to the longest.

    Returns:
        an :class:`AudioBatch` (``ids`` (B,), ``source`` (B, S), ``padding_mask`` (B, S) with True = padding, or
        None when ``pad=False``), or None when no item is left.
    """
    samples = [s for s in samples if s is not None and s.get("source") is not None]
    if not samples:
        return None
    lengths = [s["source"].shape[0] for s in samples]
    target = max(lengths) if pad else min(lengths)
    source = torch.zeros(len(samples), target, dtype=torch.float32)
    padding_mask = torch.zeros(len(samples), target, dtype=torch.bool) if pad else None
    for row, (sample, length) in enumerate(zip(samples, lengths)):
        wav = sample["source"]
        if length > target:
            wav = _random_crop(wav, target, _item_rng(seed, epoch, int(sample["id"]), _CROP_IN_BATCH))
        source[row, : wav.shape[0]] = wav
        if padding_mask is not None:
            padding_mask[row, length:] = True
    ids = torch.tensor([int(s["id"]) for s in samples], dtype=torch.long)
    return AudioBatch(source=source, padding_mask=padding_mask, ids=ids)


class LengthBatchSampler(Sampler[list[int]]):
    """Batches of similar-length items with ``len(batch) * max(sizes[batch]) <= max_tokens``.

    As fairseq's ``ordered_indices`` + ``batch_by_size``: items are sorted by size (longest
    first, ties in random order when shuffling), cut greedily into batches (sizes rounded down
    to ``required_batch_size_multiple`` where possible), then the batch order is shuffled.
    Everything is drawn from ``(seed, epoch)``, so all ranks build the same batch list; rank r
    takes ``batches[r::num_replicas]``, and the list is padded with empty batches (``[]``) to a
    multiple of ``num_replicas``, so every rank has as many steps and no batch is lost.

    Iteration yields this rank's batches from position ``start`` (set in the constructor or
    ``set_epoch``, or passed to ``__iter__``) to resume an epoch exactly. ``skip_global`` (``set_epoch``) drops the
    epoch's first batches before sharding: those an earlier run with another number of ranks trained.
    """

    def __init__(
        self,
        sizes: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
        required_batch_size_multiple: int = 1,
        start: int = 0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if required_batch_size_multiple < 1:
            raise ValueError("required_batch_size_multiple must be >= 1")
        self.max_tokens = int(max_tokens)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.required_batch_size_multiple = required_batch_size_multiple
        self.set_epoch(epoch, sizes, start=start)

    def set_epoch(
        self, epoch: int, sizes: Optional[Sequence[int] | np.ndarray] = None, start: int = 0, skip_global: int = 0
    ) -> None:
        """Select ``epoch`` (and the dataset's sizes for it, if they changed); iterate from ``start``, after the
        epoch's first ``skip_global`` batches (global, before sharding)."""
        self.epoch = epoch
        self.skip_global = skip_global
        if sizes is not None:
            self.sizes = np.asarray(sizes, dtype=np.int64)
            too_long = np.flatnonzero(self.sizes > self.max_tokens)
            if len(too_long):
                raise ValueError(
                    f"item {int(too_long[0])} has {int(self.sizes[too_long[0]])} samples, more than "
                    f"max_tokens={self.max_tokens}; crop items (max_sample_size) or raise max_tokens"
                )
        self._rank_batches = self._build_rank_batches()
        if not 0 <= start <= len(self._rank_batches):
            raise ValueError(f"start={start} is outside this epoch's {len(self._rank_batches)} batches")
        self.start = start

    def global_batches(self) -> list[list[int]]:
        """All batches of the epoch, in iteration order, before sharding across ranks."""
        order = self._ordered_indices()
        batches = self._batch_by_size(order)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, 1])
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _ordered_indices(self) -> np.ndarray:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, 0])
            tie_break = rng.permutation(len(self.sizes))
            return np.lexsort((tie_break, self.sizes))[::-1]
        return np.argsort(self.sizes, kind="stable")[::-1]

    def _batch_by_size(self, order: np.ndarray) -> list[list[int]]:
        multiple = self.required_batch_size_multiple
        batches: list[list[int]] = []
        batch: list[int] = []
        batch_max = 0
        sizes = self.sizes.tolist()  # plain ints: much faster to index in this loop
        for idx in order.tolist():
            size = sizes[idx]
            longest = max(batch_max, size)
            if batch and (len(batch) + 1) * longest > self.max_tokens:
                keep = max(multiple * (len(batch) // multiple), len(batch) % multiple)
                batches.append(batch[:keep])
                batch = batch[keep:]
                batch_max = max((sizes[j] for j in batch), default=0)
                longest = max(batch_max, size)
            batch.append(idx)
            batch_max = longest
        if batch:
            batches.append(batch)
        return batches

    def _build_rank_batches(self) -> list[list[int]]:
        batches = self.global_batches()
        if not 0 <= self.skip_global <= len(batches):
            raise ValueError(f"skip_global={self.skip_global} is outside this epoch's {len(batches)} batches")
        batches = batches[self.skip_global :]
        rounds = -(-len(batches) // self.num_replicas)  # ceil: the last round may be short of batches
        batches = batches + [[] for _ in range(rounds * self.num_replicas - len(batches))]
        return batches[self.rank :: self.num_replicas]

    @property
    def total_batches(self) -> int:
        """Batches of this rank in the epoch after ``skip_global`` (ignoring ``start``), empty padding batches
        included."""
        return len(self._rank_batches)

    def __len__(self) -> int:
        return len(self._rank_batches) - self.start

    def global_index(self, position: int) -> int:
        """The epoch's global batch index (before sharding) of this rank's batch ``position``."""
        return self.skip_global + position * self.num_replicas + self.rank

    def state_dict(self) -> dict[str, int]:
        """Where iteration starts: ``epoch``, ``batches_done_in_epoch`` (this rank's ``start``), ``epoch_offset``
        (``skip_global``) and ``num_replicas`` (the names a training checkpoint keeps them under)."""
        return {"epoch": self.epoch, "batches_done_in_epoch": self.start, "epoch_offset": self.skip_global,
                "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, int], sizes: Optional[Sequence[int] | np.ndarray] = None) -> None:
        """Continue from ``state`` (:meth:`state_dict`; ``epoch_offset`` and ``num_replicas`` may be missing, as in
        checkpoints written before they existed). Written by another number of ranks, the epoch continues at its
        first global batch not yet done, every rank from there (every round before the position was complete)."""
        done, offset = int(state["batches_done_in_epoch"]), int(state.get("epoch_offset", 0))
        saved_replicas = int(state.get("num_replicas", self.num_replicas))
        if saved_replicas != self.num_replicas:
            done, offset = 0, offset + done * saved_replicas
        self.set_epoch(int(state["epoch"]), sizes, start=done, skip_global=offset)

    def __iter__(self, start: Optional[int] = None) -> Iterator[list[int]]:
        start = self.start if start is None else start
        for batch in self._rank_batches[start:]:
            yield list(batch)


def data_normalize(cfg: AudioDataConfig, model_normalize: bool) -> bool:
    """Whether to normalise utterances: the model's choice unless ``cfg.normalize`` overrides it (with a warning)."""
    if cfg.normalize is None:
        return model_normalize
    if cfg.normalize != model_normalize:
        logger.warning("data.normalize=%s overrides the model's normalize=%s; the model was built for the latter",
                       cfg.normalize, model_normalize)
    return cfg.normalize


def build_dataloader(
    cfg: DataConfig,
    manifest: str,
    *,
    normalize: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    shuffle: bool = True,
) -> DataLoader:
    """DataLoader over ``manifest`` (comma-separated = several corpora) for one rank.

    ``normalize`` is the model's choice, overridden by ``cfg.normalize`` when set. Corpus
    resampling (``cfg.sampling_alpha``) applies only when ``shuffle`` (training). With
    ``cfg.skip_bad=False`` every header is checked first and bad files raise one
    :class:`BadFilesError`, and with ``cfg.resample`` too (item sizes at ``cfg.sample_rate`` come from the
    headers). Batches are None when every file of a batch failed to load, and for a rank's empty padding batch.
    Use :func:`set_loader_epoch` for later epochs; ``loader.dataset.num_skipped`` counts skips.
    """
    check_data_config(cfg)
    dataset = AudioDataset(
        manifest,
        sample_rate=cfg.sample_rate,
        min_sample_size=cfg.min_sample_size,
        max_sample_size=cfg.max_sample_size,
        pad=cfg.pad,
        normalize=data_normalize(cfg, normalize),
        sampling_alpha=cfg.sampling_alpha if shuffle else 1.0,
        skip_bad=cfg.skip_bad,
        resample=cfg.resample,
        # resampling changes item sizes: they must come from the headers' rates, not the manifest's counts
        check_headers=not cfg.skip_bad or cfg.resample,
        seed=seed,
        epoch=epoch,
    )
    return batched_loader(dataset, cfg, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                          start_batch=start_batch, shuffle=shuffle)


class BatchLoader(DataLoader):
    """A DataLoader of length-bucketed batches (a :class:`LengthBatchSampler` over an
    :class:`~xlsr.data.source.UtteranceSource`): what the training engine asks a loader, without reaching into it:
    its counts (``total_batches``, ``num_skipped``), its position (``position``, ``global_index``) and, for exact
    resume, ``state_dict()`` / ``load_state_dict()``.

    Iterating yields this rank's batches (None for a rank without one in the last round, or for a batch of
    unreadable files only). The position counts the batches handed out, not those the workers have prefetched.
    """

    _handed_out = 0  # batches of the current iteration handed to the caller

    def __iter__(self):
        self._handed_out = 0
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    @property
    def position(self) -> int:
        """This rank's batches of the epoch handed out (after ``epoch_offset``), padding batches included."""
        return self.batch_sampler.start + self._handed_out

    def global_index(self, position: int) -> int:
        """The epoch's global batch index (before sharding) of this rank's batch ``position``: what seeds it."""
        return self.batch_sampler.global_index(position)

    def state_dict(self) -> dict[str, int]:
        """The position to resume from (:meth:`LengthBatchSampler.state_dict` at :attr:`position`)."""
        return {**self.batch_sampler.state_dict(), "batches_done_in_epoch": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (:meth:`state_dict`, or a training checkpoint's keys)."""
        self.dataset.set_epoch(int(state["epoch"]))
        self._handed_out = 0
        self.batch_sampler.load_state_dict(state, self.dataset.sizes)

    @property
    def total_batches(self) -> int:
        """This rank's batches in the current epoch, the ones already done included."""
        return self.batch_sampler.total_batches

    @property
    def num_skipped(self) -> int:
        """Unreadable files skipped so far."""
        return self.dataset.num_skipped

    def set_epoch(self, epoch: int, start_batch: int = 0, skip_global: int = 0) -> None:
        """Move to ``epoch``, iterating from this rank's batch ``start_batch`` after the epoch's first
        ``skip_global`` batches of all ranks (``LengthBatchSampler.set_epoch``)."""
        self.dataset.set_epoch(epoch)
        self._handed_out = 0
        self.batch_sampler.set_epoch(epoch, self.dataset.sizes, start=start_batch, skip_global=skip_global)


def batched_loader(dataset: UtteranceSource, cfg, *, seed: int, epoch: int, rank: int, world_size: int,
                   start_batch: int, shuffle: bool) -> BatchLoader:
    """A DataLoader over ``dataset`` (any :class:`~xlsr.data.source.UtteranceSource`) in this rank's length-bucketed batches of at
    most ``cfg.max_tokens`` samples (``LengthBatchSampler``), from batch ``start_batch``."""
    sampler = LengthBatchSampler(
        dataset.sizes,
        cfg.max_tokens,
        num_replicas=world_size,
        rank=rank,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        required_batch_size_multiple=cfg.required_batch_size_multiple,
        start=start_batch,
    )
    return BatchLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=dataset.collater,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def set_loader_epoch(loader: BatchLoader, epoch: int, start_batch: int = 0, skip_global: int = 0) -> None:
    """``loader.set_epoch(...)`` (:meth:`BatchLoader.set_epoch`)."""
    loader.set_epoch(epoch, start_batch, skip_global)
