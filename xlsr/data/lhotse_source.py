"""Lhotse data: a CutSet manifest as a map-style source, and Lhotse Shar shards streamed.

* ``data.lhotse_cuts=cuts.jsonl.gz`` -> :class:`LhotseCutSource`, an :class:`~xlsr.data.source.UtteranceSource`
  batched like a manifest (:func:`~xlsr.data.audio_dataset.batched_loader`: length buckets, DDP ranks, exact resume).
* ``data.lhotse_shar=DIR`` -> :class:`SharBatchLoader`, a stream with the
  :class:`~xlsr.data.audio_dataset.BatchLoader` members the engine uses.

A cut's audio is read by Lhotse itself (``cut.load_audio()``): it honours the cut's ``start`` / ``duration`` and
channel, and reads every kind of audio source a CutSet can name (files, the in-memory bytes of a Shar tar, URLs),
which our soundfile reader does not; for a local FLAC/WAV it decodes with libsndfile, as ours. The samples then go
through :func:`xlsr.audio.prepare_waveform` (checks, downmix, soxr resampling to ``data.sample_rate`` with
``data.resample``), as a manifest's files do. Sizes are ``compute_num_samples(cut.duration, data.sample_rate)``
(``cut.num_samples`` at 16 kHz, the resampled length otherwise). Errors name the cut id.

Targets (CTC) are the cut's transcript: its supervisions' text joined by spaces (words), or the custom field
``data.lhotse_text_field`` of the cut (or of its first supervision), in ``data.labels`` form (``wrd`` or ``ltr``),
encoded by the same dictionary code as a manifest's label files (:mod:`xlsr.vocabulary`). Classification targets
are a custom field too (``data.label_column``, else ``data.labels``:
:class:`xlsr.finetune.classification_data.CutLabels`).

``lhotse`` is an optional dependency (``pip install 'xlsr[lhotse]'``), imported only here.
"""

from __future__ import annotations

import concurrent.futures
import glob
import logging
import os
import re
import threading
import warnings
from collections import deque
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from xlsr.audio import AudioError, AudioWarning, normalize_waveform, prepare_waveform
from xlsr.data.audio_dataset import (
    _CROP_IN_ITEM,
    MAX_FILES_WARNED,
    LengthBatchSampler,
    _item_rng,
    _random_crop,
    batched_loader,
    collate,
)
from xlsr.data.batch import AudioBatch
from xlsr.text import normalize_unicode
from xlsr.vocabulary import Dictionary, LabelError, letter_tokens, words_to_letters

logger = logging.getLogger(__name__)

__all__ = [
    "CUTS_SCHEME",
    "SHAR_SCHEME",
    "is_lhotse_source",
    "cut_num_samples",
    "cut_custom_field",
    "cut_transcript",
    "CutTranscripts",
    "CutItems",
    "LhotseCutSource",
    "SharBatchLoader",
    "shar_shards",
    "build_lhotse_loader",
    "lhotse_cut_metadata",
    "lhotse_transcripts",
    "pretraining_shar_loader",
]

CUTS_SCHEME = "lhotse-cuts:"
"""Prefix of a CutSet manifest in the data names a task's ``build_loader`` receives (:mod:`xlsr.data.source`)."""
SHAR_SCHEME = "lhotse-shar:"
"""Prefix of a Shar folder in those names."""

_SHARD_ORDER = 2  # stream of the Generator seeded with (seed, epoch, stream) that orders the shards


def is_lhotse_source(name: str) -> bool:
    """Whether a data name (:func:`xlsr.data.source.training_data`) is a Lhotse CutSet or Shar folder."""
    return name.startswith((CUTS_SCHEME, SHAR_SCHEME))


def _import_lhotse():
    try:
        import lhotse
    except ImportError as err:  # lhotse also needs urllib3, which its metadata does not pull in
        raise ImportError(f"Lhotse data needs the 'lhotse' package ({err}): pip install 'xlsr[lhotse]'") from err
    return lhotse


def cut_num_samples(cut, sample_rate: int) -> int:
    """Samples of ``cut`` at ``sample_rate`` (its own ``num_samples`` when the rates agree)."""
    from lhotse.utils import compute_num_samples

    return int(compute_num_samples(cut.duration, sample_rate))


def cut_custom_field(cut, name: str, key: str) -> str:
    """The custom field ``name`` of ``cut``, else of its first supervision, as a string in Unicode NFC.

    Args:
        key: the config key that named the field (in the error).

    Raises:
        LabelError: the field is on neither (the cut id and ``key`` named).
    """
    for holder in (cut, *cut.supervisions[:1]):
        custom = getattr(holder, "custom", None) or {}
        if name in custom:
            return normalize_unicode(str(custom[name]))
    raise LabelError(f"cut {cut.id}: no custom field {name!r} ({key}) on it or its supervision")


def cut_transcript(cut, text_field: Optional[str] = None) -> str:
    """The transcript of ``cut`` in Unicode NFC: its supervisions' text joined by spaces (``text_field`` None), or
    the custom field ``text_field`` of the cut, else of its first supervision ("" when there is none).

    Raises:
        LabelError: ``text_field`` is missing from the cut and its supervisions (the cut id named).
    """
    if text_field is None:
        return normalize_unicode(" ".join(s.text for s in cut.supervisions if s.text))
    return cut_custom_field(cut, text_field, "data.lhotse_text_field")


class CutTranscripts:
    """A cut -> its letter tokens and their indices in ``dictionary`` (CTC targets).

    Args:
        dictionary: the targets' :class:`~xlsr.vocabulary.Dictionary`.
        text_field: None = the supervisions' text (words); else a custom field (:func:`cut_transcript`) in
            ``labels`` form.
        labels: ``wrd`` (words, turned into letters by :func:`~xlsr.vocabulary.words_to_letters`) or ``ltr``
            (``H E L L O |``); the supervisions' text is always words.
        unk: map characters missing from the dictionary to its unknown symbol instead of failing.
    """

    def __init__(self, dictionary: Optional[Dictionary], *, text_field: Optional[str] = None, labels: str = "wrd",
                 unk: bool = False):
        if labels not in ("ltr", "wrd"):
            raise ValueError(f"labels must be 'ltr' or 'wrd', got {labels!r}")
        self.dictionary = dictionary
        self.text_field = text_field
        self.labels = "wrd" if text_field is None else labels
        self.unk = unk

    def tokens(self, cut) -> list[str]:
        """Letter tokens of ``cut``'s transcript ([] for an empty one)."""
        text = cut_transcript(cut, self.text_field)
        if self.labels == "wrd":
            try:
                text = words_to_letters(text)
            except ValueError as err:
                raise LabelError(f"cut {cut.id}: {err}") from None
        return letter_tokens(text)

    def __call__(self, cut) -> list[int]:
        """Dictionary indices of ``cut``'s transcript (LabelError naming the cut for an unknown character)."""
        return self.dictionary.encode(self.tokens(cut), where=f"cut {cut.id}", unk=self.unk)


class CutItems:
    """How a cut becomes a training item, shared by the map-style source and the Shar stream.

    Args:
        sample_rate: the model's rate; other rates are resampled with ``resample``, else the cut is unreadable.
        min_sample_size: shorter cuts are left out.
        max_sample_size: longer cuts are cropped to it (``crop``, pretraining) or left out (fine-tuning never crops);
            None = no limit.
        crop: see ``max_sample_size``.
        normalize: zero-mean unit-variance per utterance (before cropping, as fairseq).
        skip_bad: an unreadable cut is skipped (None, counted) instead of raising.
        targets: cut -> target indices (CTC: :class:`CutTranscripts`; classification: ``[class index]``,
            :class:`~xlsr.finetune.classification_data.CutLabels`), None for pretraining.
        collater: loaded items -> batch for fine-tuning (``collate_ctc`` with the pad index, or
            ``collate_classification``); None = pretraining's
            :func:`~xlsr.data.audio_dataset.collate` with ``pad``.
        pad: pretraining's collate: zero-pad to the longest (True) or crop to the shortest.
    """

    def __init__(self, *, sample_rate: int = 16000, min_sample_size: int = 0, max_sample_size: Optional[int] = None,
                 crop: bool = True, normalize: bool = False, resample: bool = False, skip_bad: bool = True,
                 targets: Optional[Callable[[Any], list[int]]] = None,
                 collater: Optional[Callable[[list], Any]] = None, pad: bool = False):
        self.sample_rate = sample_rate
        self.min_sample_size = min_sample_size
        self.max_sample_size = max_sample_size
        self.crop = crop
        self.normalize = normalize
        self.resample = resample
        self.skip_bad = skip_bad
        self.targets = targets
        self.collater = collater
        self.pad = pad

    def planned_size(self, cut) -> tuple[int, Optional[str]]:
        """(samples the batching plans with, None) or (-1, why the cut is left out)."""
        size = cut_num_samples(cut, self.sample_rate)
        if size < max(1, self.min_sample_size):
            return -1, f"too short ({size} samples < min_sample_size {self.min_sample_size})"
        if self.max_sample_size is not None and size > self.max_sample_size:
            if not self.crop:
                return -1, f"longer than {self.max_sample_size} samples (fine-tuning never crops)"
            size = self.max_sample_size
        return size, None

    def audio(self, cut) -> torch.Tensor:
        """The waveform (S,) float32 of ``cut`` at ``sample_rate`` (AudioError naming the cut when unreadable)."""
        where = f"cut {cut.id}"
        try:
            samples = cut.load_audio()  # (C, S) at the recording's rate, the cut's slice
        except Exception as err:  # lhotse raises many kinds (missing file, decoder errors, bad offsets)
            raise AudioError(where, f"cannot load audio ({type(err).__name__}: {str(err).strip()[:300]})") from err
        samples = np.asarray(samples, dtype=np.float32).reshape(-1, samples.shape[-1]).T  # (S, C)
        rate = int(cut.sampling_rate)
        return torch.from_numpy(prepare_waveform(samples, rate, where, self.sample_rate, self.resample))

    def load(self, cut, item_id: int, size: int, *, seed: int, epoch: int, target: Optional[list[int]] = None,
             on_skip: Optional[Callable[[AudioError], None]] = None) -> Optional[dict]:
        """Item ``{"id", "source" (S,) with S <= size[, "target" (L,)]}`` of ``cut``, or None when unreadable and
        ``skip_bad`` (``on_skip`` called with the error)."""
        try:
            wav = self.audio(cut)
        except AudioError as err:
            if not self.skip_bad:
                raise
            if on_skip is not None:
                on_skip(err)
            return None
        if self.normalize:
            wav = normalize_waveform(wav)
        if self.crop:
            wav = _random_crop(wav, size, _item_rng(seed, epoch, item_id, _CROP_IN_ITEM))
        item = {"id": item_id, "source": wav}
        if self.targets is not None:
            if target is None:
                target = self.targets(cut)
            item["target"] = torch.as_tensor(target, dtype=torch.long)
        return item

    def collate(self, samples: list[Optional[dict]], *, seed: int, epoch: int) -> Optional[AudioBatch]:
        """Loaded items -> one batch (None when none is left)."""
        if self.collater is not None:
            return self.collater(samples)
        return collate(samples, self.pad, seed=seed, epoch=epoch)


class _SkipCounter:
    """Unreadable cuts: counted (shared with DataLoader workers) and each warned about once per process."""

    def __init__(self):
        self.count = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._warned = 0
        self._lock = threading.Lock()

    def __call__(self, err: AudioError) -> None:
        with self._lock:
            self.count += 1
            self._warned += 1
            if self._warned <= MAX_FILES_WARNED:
                warnings.warn(f"{err}; skipped", AudioWarning, stacklevel=3)

    def __getstate__(self):
        return {"count": self.count}

    def __setstate__(self, state):
        self.count, self._warned, self._lock = state["count"], 0, threading.Lock()


def _left_out(where: str, dropped: list[tuple[str, str]]) -> None:
    """One warning per reason for cuts left out at planning, naming the first few."""
    by_reason: dict[str, list[str]] = {}
    for cut_id, reason in dropped:
        by_reason.setdefault(re.sub(r"\(\d+ samples", "(N samples", reason), []).append(cut_id)
    for reason, ids in by_reason.items():
        shown = ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
        warnings.warn(f"{where}: {len(ids)} cut(s) left out, {reason}: {shown}", AudioWarning, stacklevel=3)


# ---------------------------------------------------------------------- CutSet manifest (map-style)


class LhotseCutSource(torch.utils.data.Dataset):
    """The cuts of a CutSet manifest (``cuts.jsonl.gz``) as an :class:`~xlsr.data.source.UtteranceSource`.

    Cuts left out by :meth:`CutItems.planned_size` (too short, too long for fine-tuning) or with an empty transcript
    (CTC) are warned about and kept in ``dropped``; every transcript is encoded here, so an unknown character stops
    at construction naming the cut. Item ``i`` is the i-th kept cut, in the manifest's order; ``key(i)`` its id.
    """

    def __init__(self, path: str, items: CutItems, *, seed: int = 0, epoch: int = 0, skip_empty: bool = False):
        lhotse = _import_lhotse()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.lhotse_cuts={path}: no such file")
        try:
            cuts = lhotse.CutSet.from_file(path)
        except Exception as err:
            raise ValueError(f"{path}: not a readable Lhotse CutSet manifest ({type(err).__name__}: {err})") from err
        self.path = path
        self.items = items
        self.seed = seed
        self.epoch = epoch
        self.dropped: list[tuple[str, str]] = []  # (cut id, reason) of every cut left out
        self._skips = _SkipCounter()
        self._cuts: list = []
        self._targets: list[Optional[list[int]]] = []
        sizes: list[int] = []
        seen: set[str] = set()
        for cut in cuts:
            if cut.id in seen:
                raise ValueError(f"{path}: cut id {cut.id} appears twice (ids are the keys of items)")
            seen.add(cut.id)
            size, reason = items.planned_size(cut)
            target = None
            if reason is None and items.targets is not None:
                target = items.targets(cut)
                if not target:
                    if not skip_empty:
                        raise LabelError(f"{path}: cut {cut.id}: empty transcript (data.skip_empty=true leaves it out)")
                    reason = "empty transcript"
            if reason is not None:
                self.dropped.append((cut.id, reason))
                continue
            self._cuts.append(cut)
            self._targets.append(target)
            sizes.append(size)
        _left_out(path, self.dropped)
        if not self._cuts:
            raise ValueError(f"{path}: no usable cut ({len(seen)} cuts, {len(self.dropped)} left out)")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        logger.info("%s: %d cuts kept, %d left out", path, len(self._cuts), len(self.dropped))

    def __len__(self) -> int:
        return len(self._cuts)

    def key(self, i: int) -> str:
        """The id of cut ``i``."""
        return self._cuts[i].id

    def cut(self, i: int):
        """Cut ``i`` (a Lhotse ``Cut``)."""
        return self._cuts[i]

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch`` (the cuts and sizes stay; crops are drawn from it)."""
        self.epoch = epoch

    @property
    def num_skipped(self) -> int:
        """Unreadable cuts skipped so far (all workers)."""
        return int(self._skips.count.item())

    def __getitem__(self, i: int) -> Optional[dict]:
        return self.items.load(self._cuts[i], i, int(self.sizes[i]), seed=self.seed, epoch=self.epoch,
                               target=self._targets[i], on_skip=self._skips)

    def collater(self, samples: list[Optional[dict]]) -> Optional[AudioBatch]:
        """Loaded items -> one batch (:meth:`CutItems.collate`)."""
        return self.items.collate(samples, seed=self.seed, epoch=self.epoch)


# ---------------------------------------------------------------------- Shar stream


def shar_shards(shar_dir: str) -> list[tuple[str, str]]:
    """``(cuts.NNNNNN.jsonl.gz, recording.NNNNNN.tar)`` of every shard of a Shar folder, by shard number.

    Raises:
        FileNotFoundError: no folder, no cut manifests, or a shard without its recording tar (both named).
    """
    if not os.path.isdir(shar_dir):
        raise FileNotFoundError(f"data.lhotse_shar={shar_dir}: no such folder")
    shards = []
    for cuts in sorted(glob.glob(os.path.join(shar_dir, "cuts.*.jsonl*"))):
        number = os.path.basename(cuts).split(".")[1]
        recording = os.path.join(shar_dir, f"recording.{number}.tar")
        if not os.path.isfile(recording):
            raise FileNotFoundError(f"{shar_dir}: shard {number} has {os.path.basename(cuts)} but no "
                                    f"recording.{number}.tar")
        shards.append((cuts, recording))
    if not shards:
        raise FileNotFoundError(f"{shar_dir}: no Lhotse Shar shards (cuts.NNNNNN.jsonl.gz + recording.NNNNNN.tar)")
    return shards


def _max_over_ranks(value: int, world_size: int) -> int:
    """The largest ``value`` of all ranks (one all-reduce; ``value`` itself in one process)."""
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class SharBatchLoader:
    """Batches of this rank streamed from a Lhotse Shar folder, with the members of
    :class:`~xlsr.data.audio_dataset.BatchLoader` the engine uses.

    An epoch is planned from the cut manifests alone (no audio): the shards are ordered by a permutation drawn
    from ``(seed, epoch)`` (file order without ``shuffle``) and shard ``order[k]`` goes to rank ``k % world_size``
    (training needs a shard per rank; for validation, without ``shuffle``, a rank may have none);
    each of this rank's shards is cut, in its stored order, into windows of ``buffer_size`` usable cuts, and each
    window into length-bucketed batches of at most ``max_tokens`` samples in random order
    (:meth:`LengthBatchSampler.global_batches` seeded by ``(seed, epoch, shard, window)``). The ranks then agree
    (one all-reduce of the batch counts) on the epoch's length, the ranks with fewer batches getting empty ones
    (None: the engine's zero-weight pass), so every rank has a batch, real or empty, at every step.

    Iterating reads this rank's shards' tars in order, holding at most a window of cuts (their compressed bytes)
    in memory, and decodes each batch in a pool of ``num_workers`` threads (``0``: in the caller), ``prefetch``
    batches ahead. Batches, crops and ids (``shard * 2**32 + index in shard``) depend only on the seed, epoch,
    rank and world size, not on ``num_workers``.

    Resume: the position (batches handed out) is the state; resuming re-plans the epoch from the (cached)
    manifests and re-reads the current window's shard from its start up to the position (bytes, no decoding), so a
    run stopped at update N and resumed equals the run straight through. Resumed on another number of ranks, the
    shards are dealt differently: the epoch restarts (with a warning).
    """

    def __init__(self, shar_dir: str, items: CutItems, *, max_tokens: int, seed: int = 0, epoch: int = 1,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, buffer_size: int = 1000,
                 required_batch_size_multiple: int = 1, num_workers: int = 0, prefetch: int = 2,
                 skip_empty: bool = False):
        _import_lhotse()
        if buffer_size < 1:
            raise ValueError(f"data.lhotse_shuffle_buffer must be >= 1, got {buffer_size}")
        self.shar_dir = shar_dir
        self.shards = shar_shards(shar_dir)
        if shuffle and len(self.shards) < world_size:  # validation: a rank without a shard runs empty batches
            raise ValueError(f"{shar_dir}: {len(self.shards)} shard(s) for {world_size} ranks; every rank needs one "
                             "to train (write smaller shards: --shard-size)")
        self.items = items
        self.max_tokens = int(max_tokens)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.buffer_size = buffer_size
        self.required_batch_size_multiple = required_batch_size_multiple
        self.num_workers = num_workers
        self.prefetch = max(1, prefetch)
        self.skip_empty = skip_empty
        self._skips = _SkipCounter()
        self._sizes: dict[int, np.ndarray] = {}  # shard -> planned size of each of its cuts (-1: left out)
        self._handed_out = 0
        self.set_epoch(epoch)

    # ----------------------------------------------------------------- planning

    def _shard_sizes(self, shard: int) -> np.ndarray:
        """Planned sizes of every cut of ``shard`` in stored order (-1: left out), read once from its manifest."""
        if shard not in self._sizes:
            from lhotse import CutSet

            path = self.shards[shard][0]
            sizes, dropped = [], []
            for cut in CutSet.from_jsonl_lazy(path):
                size, reason = self.items.planned_size(cut)
                if reason is None and self.items.targets is not None and not self.items.targets(cut):
                    if not self.skip_empty:
                        raise LabelError(f"{path}: cut {cut.id}: empty transcript (data.skip_empty=true leaves it "
                                         "out)")
                    reason = "empty transcript"
                if reason is not None:
                    dropped.append((cut.id, reason))
                sizes.append(size if reason is None else -1)
            _left_out(path, dropped)
            self._sizes[shard] = np.asarray(sizes, dtype=np.int64)
        return self._sizes[shard]

    def rank_shards(self, epoch: int) -> list[int]:
        """The shards this rank reads in ``epoch``, in reading order."""
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, _SHARD_ORDER]).permutation(len(self.shards))
        return [int(s) for s in order[self.rank :: self.world_size]]

    def _plan(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of ``epoch`` as lists of (shard, index in shard), before padding."""
        batches: list[list[tuple[int, int]]] = []
        for shard in self.rank_shards(epoch):
            sizes = self._shard_sizes(shard)
            usable = np.flatnonzero(sizes >= 0)
            for window, start in enumerate(range(0, len(usable), self.buffer_size)):
                members = usable[start : start + self.buffer_size]
                window_seed = int(np.random.default_rng([self.seed, epoch, shard, window]).integers(2**62))
                sampler = LengthBatchSampler(sizes[members], self.max_tokens, seed=window_seed, epoch=0,
                                             shuffle=self.shuffle,
                                             required_batch_size_multiple=self.required_batch_size_multiple)
                batches.extend([[(shard, int(members[j])) for j in batch] for batch in sampler.global_batches()])
        return batches

    def set_epoch(self, epoch: int, start_batch: int = 0, skip_global: int = 0) -> None:
        """Plan ``epoch`` and iterate from this rank's batch ``start_batch`` (``skip_global`` is not used: the
        batches of a stream are per rank)."""
        self.epoch = epoch
        plan = self._plan(epoch)
        total = _max_over_ranks(len(plan), self.world_size)
        self._batches = plan + [[] for _ in range(total - len(plan))]
        if not 0 <= start_batch <= len(self._batches):
            raise ValueError(f"start_batch={start_batch} is outside this epoch's {len(self._batches)} batches")
        self.start = start_batch
        self._handed_out = 0

    # ----------------------------------------------------------------- the engine's interface

    @property
    def total_batches(self) -> int:
        """This rank's batches in the current epoch (the same on every rank), empty ones included."""
        return len(self._batches)

    def __len__(self) -> int:
        return len(self._batches) - self.start

    @property
    def position(self) -> int:
        """This rank's batches of the epoch handed out."""
        return self.start + self._handed_out

    def global_index(self, position: int) -> int:
        """A distinct index of this rank's batch ``position`` among all ranks' (what seeds its forward pass)."""
        return position * self.world_size + self.rank

    @property
    def num_skipped(self) -> int:
        """Unreadable cuts skipped so far."""
        return int(self._skips.count.item())

    def state_dict(self) -> dict[str, int]:
        """``epoch``, ``batches_done_in_epoch`` (the position), ``epoch_offset`` (0) and ``num_replicas``."""
        return {"epoch": self.epoch, "batches_done_in_epoch": self.position, "epoch_offset": 0,
                "num_replicas": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (:meth:`state_dict`, or a training checkpoint's keys)."""
        done = int(state["batches_done_in_epoch"])
        if int(state.get("num_replicas", self.world_size)) != self.world_size or int(state.get("epoch_offset", 0)):
            if self.rank == 0:
                logger.warning("%s: the position was saved with %s rank(s), this run has %d: the shards are dealt "
                               "differently, so epoch %d restarts", self.shar_dir, state.get("num_replicas"),
                               self.world_size, int(state["epoch"]))
            done = 0
        self.set_epoch(int(state["epoch"]), start_batch=done)

    # ----------------------------------------------------------------- reading

    def _cuts_of_batches(self, batches: list[list[tuple[int, int]]]) -> Iterator[list]:
        """The cuts (with their audio bytes) of each batch, reading each shard's tar once, in order."""
        from lhotse import CutSet

        needed: dict[int, set[int]] = {}
        for batch in batches:
            for shard, index in batch:
                needed.setdefault(shard, set()).add(index)
        held: dict[tuple[int, int], Any] = {}
        reader: Optional[Iterator] = None
        reader_shard, next_index = -1, 0
        for batch in batches:
            for shard, index in batch:
                if (shard, index) in held:
                    continue
                if shard != reader_shard:
                    cuts_path, recording_path = self.shards[shard]
                    reader = iter(CutSet.from_shar(fields={"cuts": [cuts_path], "recording": [recording_path]}))
                    reader_shard, next_index = shard, 0
                    held = {key: cut for key, cut in held.items() if key[0] == shard}
                while next_index <= index:
                    try:
                        cut = next(reader)
                    except StopIteration:
                        raise ValueError(f"{self.shards[shard][1]}: ends before cut {index} of its manifest") from None
                    if next_index in needed[shard]:
                        held[(shard, next_index)] = cut
                    next_index += 1
            yield [held.pop(key) for key in batch]

    def _load_batch(self, batch: list[tuple[int, int]], cuts: list, epoch: int) -> Optional[AudioBatch]:
        samples = []
        for (shard, index), cut in zip(batch, cuts):
            size = int(self._shard_sizes(shard)[index])
            samples.append(self.items.load(cut, (shard << 32) + index, size, seed=self.seed, epoch=epoch,
                                           on_skip=self._skips))
        return self.items.collate(samples, seed=self.seed, epoch=epoch)

    def __iter__(self) -> Iterator[Optional[AudioBatch]]:
        """This rank's batches from the position on (None for an empty batch or one of unreadable cuts only)."""
        self._handed_out = 0
        batches, epoch = self._batches[self.start :], self.epoch
        real = [b for b in batches if b]
        cuts = self._cuts_of_batches(real)
        if self.num_workers <= 0:
            for batch in batches:
                result = self._load_batch(batch, next(cuts), epoch) if batch else None
                self._handed_out += 1
                yield result
            return
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            pending: deque = deque()
            upcoming = iter(batches)

            def submit() -> None:
                batch = next(upcoming, None)
                if batch is None:
                    return
                pending.append(pool.submit(self._load_batch, batch, next(cuts), epoch) if batch else None)

            for _ in range(self.prefetch + self.num_workers):
                submit()
            while pending:
                future = pending.popleft()
                submit()
                result = None if future is None else future.result()
                self._handed_out += 1
                yield result


# ---------------------------------------------------------------------- what the tasks call


def build_lhotse_loader(name: str, cfg, items: CutItems, *, seed: int, epoch: int, rank: int, world_size: int,
                        shuffle: bool, skip_empty: bool = False):
    """The loader of a Lhotse data name (``lhotse-cuts:PATH`` or ``lhotse-shar:DIR``) for one rank.

    Args:
        cfg: the task's data config (``max_tokens``, ``num_workers``, ``required_batch_size_multiple``,
            ``lhotse_shuffle_buffer``).
        items: how a cut becomes an item (:class:`CutItems`).

    Returns:
        a :class:`~xlsr.data.audio_dataset.BatchLoader` over a :class:`LhotseCutSource`, or a
        :class:`SharBatchLoader`.
    """
    if name.startswith(CUTS_SCHEME):
        source = LhotseCutSource(name[len(CUTS_SCHEME):], items, seed=seed, epoch=epoch, skip_empty=skip_empty)
        return batched_loader(source, cfg, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                              start_batch=0, shuffle=shuffle)
    if name.startswith(SHAR_SCHEME):
        return SharBatchLoader(name[len(SHAR_SCHEME):], items, max_tokens=cfg.max_tokens, seed=seed, epoch=epoch,
                               rank=rank, world_size=world_size, shuffle=shuffle,
                               buffer_size=cfg.lhotse_shuffle_buffer,
                               required_batch_size_multiple=cfg.required_batch_size_multiple,
                               num_workers=cfg.num_workers, skip_empty=skip_empty)
    raise ValueError(f"not a Lhotse data name: {name!r}")


def lhotse_cut_metadata(name: str) -> Iterator:
    """Every cut of a Lhotse data name (``lhotse-cuts:PATH`` or ``lhotse-shar:DIR``: its shards in order) from
    the cut manifests alone: no audio is read (e.g. to build a dictionary)."""
    lhotse = _import_lhotse()
    if name.startswith(CUTS_SCHEME):
        paths = [name[len(CUTS_SCHEME):]]
        if not os.path.isfile(paths[0]):
            raise FileNotFoundError(f"data.lhotse_cuts={paths[0]}: no such file")
    elif name.startswith(SHAR_SCHEME):
        paths = [cuts for cuts, _ in shar_shards(name[len(SHAR_SCHEME):])]
    else:
        raise ValueError(f"not a Lhotse data name: {name!r}")
    for path in paths:
        yield from lhotse.CutSet.from_jsonl_lazy(path)


def lhotse_transcripts(name: str, transcripts: CutTranscripts) -> list[list[str]]:
    """Letter tokens of every non-empty transcript of a Lhotse data name (metadata only: no audio is read), e.g.
    to build a dictionary."""
    return [tokens for cut in lhotse_cut_metadata(name) if (tokens := transcripts.tokens(cut))]


def pretraining_shar_loader(shar_dir: str, *, max_tokens: int = 1_200_000, max_sample_size: int = 320_000,
                            min_sample_size: int = 32_000, sample_rate: int = 16000, resample: bool = False,
                            normalize: bool = True, pad: bool = False, num_workers: int = 2, buffer_size: int = 1000,
                            seed: int = 1, epoch: int = 1, rank: int = 0, world_size: int = 1) -> SharBatchLoader:
    """A :class:`SharBatchLoader` of pretraining batches, as ``data.lhotse_shar`` builds it, without a config (for
    benchmarks: decode + resample + crop + batch). Defaults are XLS-R's data settings."""
    items = CutItems(sample_rate=sample_rate, min_sample_size=min_sample_size, max_sample_size=max_sample_size,
                     crop=True, normalize=normalize, resample=resample, pad=pad)
    return SharBatchLoader(shar_dir, items, max_tokens=max_tokens, seed=seed, epoch=epoch, rank=rank,
                           world_size=world_size, buffer_size=buffer_size, num_workers=num_workers)
