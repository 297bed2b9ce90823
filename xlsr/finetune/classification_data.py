"""Classification data in fairseq's ``audio_classification`` layout: manifest + one label per row -> padded batches.

Beside ``train.tsv`` lies ``train.lang`` (``data.labels`` names the extension): line k is the class of row k of the
manifest (the k-th entry after the root line), whether or not the audio is later dropped. The classes are listed
in ``dict.lang.txt`` beside the training manifest, one ``label count`` line per class, the line order being the
class index (fairseq loads it with ``Dictionary.load(path, add_special_symbols=False)``: no special symbols).
When it is absent the training task builds it from the training labels, most frequent first (ties by name), as
fairseq's ``Dictionary.finalize`` orders symbols. Labels are read in Unicode NFC (:func:`xlsr.text.read_text_lines`),
surrounding whitespace stripped.

Training crops every utterance longer than ``max_sample_size`` to a random window (offset drawn from
``(seed, epoch, item)``, so a resumed run sees the same crops); validation scores whole utterances. Batches
(:func:`collate_classification`) are :class:`xlsr.data.batch.ClassificationBatch`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from xlsr.data.audio_dataset import AudioDataConfig, AudioDataset, BatchLoader, batched_loader, collate
from xlsr.data.batch import ClassificationBatch
from xlsr.files import write_text_atomic
from xlsr.finetune.labels import label_path
from xlsr.manifest import read_manifest
from xlsr.text import read_text_lines
from xlsr.vocabulary import LabelError

__all__ = ["ClassificationDataConfig", "label_dictionary_path", "read_class_labels", "read_label_dictionary",
           "write_label_dictionary", "count_labels", "ClassifiedAudioDataset", "collate_classification",
           "build_classification_loader"]


@dataclass
class ClassificationDataConfig(AudioDataConfig):
    """Data options of classification training (fairseq ``task`` = audio_classification): :class:`AudioDataConfig`
    with the label extension and the training crop."""

    labels: str = "lang"
    """Label file extension: ``train.lang`` beside ``train.tsv``, ``dict.lang.txt`` for the classes. fairseq
    ``task.labels``."""

    max_sample_size: Optional[int] = 160000
    """Training utterances longer than this many samples are cropped to a random window of it (10 s at 16 kHz, as
    fairseq's XLS-R language-ID run), or of ``max_tokens`` when that is smaller (None: of ``max_tokens``);
    validation always scores whole utterances. fairseq ``task.max_sample_size``."""

    max_tokens: int = 1_280_000
    """Padded samples per batch (items * longest item, after the crop). fairseq ``dataset.max_tokens``."""


def check_classification_data_config(cfg: ClassificationDataConfig) -> None:
    """Raise ValueError for out-of-range sizes or options."""
    if not cfg.labels or os.sep in cfg.labels or cfg.labels.startswith("."):
        raise ValueError(f"data.labels must be a file extension such as 'lang', got {cfg.labels!r}")
    if cfg.max_tokens <= 0:
        raise ValueError("data.max_tokens must be > 0")
    if cfg.max_sample_size is not None and cfg.max_sample_size < max(1, cfg.min_sample_size):
        raise ValueError(f"data.max_sample_size ({cfg.max_sample_size}) must be >= 1 and >= min_sample_size "
                         f"({cfg.min_sample_size})")
    if cfg.sampling_alpha <= 0 or cfg.sample_rate <= 0 or cfg.required_batch_size_multiple < 1:
        raise ValueError("data: sampling_alpha and sample_rate must be > 0, required_batch_size_multiple >= 1")


# ---------------------------------------------------------------------- label files


def label_dictionary_path(manifest_path: str | os.PathLike, labels: str = "lang") -> str:
    """The class list beside a manifest: ``dir/train.tsv`` -> ``dir/dict.lang.txt`` (fairseq's
    ``dict.{labels}.txt`` in ``task.data``)."""
    return os.path.join(os.path.dirname(os.fspath(manifest_path)), f"dict.{labels}.txt")


def read_class_labels(manifest_path: str | os.PathLike, labels: str = "lang") -> list[str]:
    """The class label of every row of a manifest, from ``{split}.{labels}`` beside it (NFC, stripped).

    Raises:
        FileNotFoundError: no label file (its path named).
        ValueError: the label file and the manifest have different line counts (both named).
        LabelError: an empty label, or text that is not UTF-8 (file and line named).
    """
    manifest_path = os.fspath(manifest_path)
    path = label_path(manifest_path, labels)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such label file (one {labels} label per row of {manifest_path}; "
                                f"data.labels names the extension)")
    try:
        lines = [line.strip() for line in read_text_lines(path)]
    except UnicodeDecodeError as err:
        raise LabelError(f"{path}: not UTF-8 text ({err})") from None
    num_rows = len(read_manifest(manifest_path)[1])
    if len(lines) != num_rows:
        raise ValueError(f"{path} has {len(lines)} line(s) but its manifest {manifest_path} has {num_rows} row(s); "
                         "the label file needs one label per manifest row, in the same order")
    for number, label in enumerate(lines, start=1):
        if not label:
            raise LabelError(f"{path}:{number}: empty label")
    return lines


def read_label_dictionary(path: str | os.PathLike) -> list[str]:
    """The class names of a ``dict.lang.txt`` in index order (fairseq's ``label count`` lines; the count may be
    left out). Raises LabelError for a repeated label or an unreadable line (file and line named)."""
    path = os.fspath(path)
    names: list[str] = []
    for number, line in enumerate(read_text_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("-").isdigit()):
            raise LabelError(f"{path}:{number}: expected 'label count', got {line.strip()!r}")
        if fields[0] in names:
            raise LabelError(f"{path}:{number}: label {fields[0]!r} is listed twice")
        names.append(fields[0])
    if not names:
        raise LabelError(f"{path}: no label")
    return names


def count_labels(labels: Sequence[str]) -> Counter:
    """How often each label occurs."""
    return Counter(labels)


def dictionary_order(counts: Counter) -> list[str]:
    """Class names for a new ``dict.lang.txt``: most frequent first, ties by name (fairseq's ``finalize`` order)."""
    return sorted(counts, key=lambda name: (-counts[name], name))


def write_label_dictionary(path: str | os.PathLike, names: Sequence[str], counts: Counter) -> None:
    """Write ``dict.lang.txt``: one ``label count`` line per class in index order (counts of the training labels)."""
    write_text_atomic(path, "".join(f"{name} {counts.get(name, 0)}\n" for name in names))


# ---------------------------------------------------------------------- dataset


class ClassifiedAudioDataset(Dataset):
    """Utterances of fairseq manifests with their class index (an :class:`~xlsr.data.source.UtteranceSource`).

    Wraps an :class:`AudioDataset` (``audio``: reading, normalisation, bad files, corpus resampling, the random crop
    to ``max_sample_size``, seeded by ``(seed, epoch, item)``); each item's label is found by its manifest row. A
    label missing from ``label_names`` stops here naming the label file and line. ``__getitem__(i)`` returns
    ``{"id": i, "source": float32 (S,), "target": int}`` or None for an unreadable file when ``skip_bad``.
    """

    def __init__(self, manifests: str | Sequence[str], label_names: Sequence[str], *, labels: str = "lang",
                 dictionary_file: str = "the label dictionary", **audio_options):
        self.audio = AudioDataset(manifests, pad=True, **audio_options)
        self.label_names = list(label_names)
        index = {name: i for i, name in enumerate(self.label_names)}
        targets: list[int] = []
        self._row_offset = np.zeros(len(self.audio.manifests), dtype=np.int64)
        for corpus_id, manifest in enumerate(self.audio.manifests):
            self._row_offset[corpus_id] = len(targets)
            path = label_path(manifest, labels)
            for number, label in enumerate(read_class_labels(manifest, labels), start=1):
                if label not in index:
                    raise LabelError(f"{path}:{number}: label {label!r} is not in {dictionary_file} "
                                     f"({len(index)} classes: {', '.join(self.label_names[:10])}"
                                     f"{' ...' if len(index) > 10 else ''})")
                targets.append(index[label])
        self._targets = np.asarray(targets, dtype=np.int64)

    @property
    def sizes(self) -> np.ndarray:
        """(N,) samples of each item of the current epoch (after the crop)."""
        return self.audio.sizes

    def target(self, i: int) -> int:
        """Class index of item ``i`` of this epoch."""
        row = self._row_offset[self.audio.corpus_of([i])[0]] + self.audio.manifest_row_of([i])[0]
        return int(self._targets[row])

    def targets(self) -> np.ndarray:
        """(N,) class index of every item of this epoch."""
        positions = np.arange(len(self.audio), dtype=np.int64)
        return self._targets[self._row_offset[self.audio.corpus_of(positions)] + self.audio.manifest_row_of(positions)]

    def __len__(self) -> int:
        return len(self.audio)

    def key(self, i: int) -> str:
        return self.audio.key(i)

    def set_epoch(self, epoch: int) -> None:
        self.audio.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.audio.epoch

    @property
    def num_skipped(self) -> int:
        return self.audio.num_skipped

    def __getitem__(self, i: int) -> Optional[dict]:
        item = self.audio[i]
        if item is None:
            return None
        return {"id": i, "source": item["source"], "target": self.target(i)}

    def collater(self, samples: list[Optional[dict]]) -> Optional[ClassificationBatch]:
        return collate_classification(samples)


def collate_classification(samples: list[Optional[dict]]) -> Optional[ClassificationBatch]:
    """Zero-pad sources to the longest item; None items are dropped.

    Returns:
        a :class:`ClassificationBatch` (``source`` (B, S), ``padding_mask`` (B, S) True = padding or None when no
        item is padded, ``ids`` (B,), ``target`` (B,) int64), or None when no item is left.
    """
    samples = [s for s in samples if s is not None and s.get("source") is not None]
    batch = collate(samples, pad=True)
    if batch is None:
        return None
    padding_mask = batch.padding_mask if bool(batch.padding_mask.any()) else None
    target = torch.tensor([int(s["target"]) for s in samples], dtype=torch.long)
    return ClassificationBatch(source=batch.source, padding_mask=padding_mask, ids=batch.ids, target=target)


def build_classification_loader(cfg: ClassificationDataConfig, manifest: str, label_names: Sequence[str], *,
                                normalize: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                                shuffle: bool = True, dictionary_file: str = "the label dictionary") -> BatchLoader:
    """A loader of one rank's classification batches of ``manifest`` (comma-separated = several corpora).

    ``shuffle`` (training): random crops to ``cfg.max_sample_size`` (or ``cfg.max_tokens`` when smaller, so that
    an item fits a batch) and corpus resampling; otherwise (validation) whole utterances in a fixed order (one
    longer than ``cfg.max_tokens`` is an error naming its size). ``normalize`` is the model's choice, unless ``cfg.normalize`` is set."""
    check_classification_data_config(cfg)
    dataset = ClassifiedAudioDataset(
        manifest, label_names, labels=cfg.labels, dictionary_file=dictionary_file,
        sample_rate=cfg.sample_rate, min_sample_size=cfg.min_sample_size,
        max_sample_size=(cfg.max_tokens if cfg.max_sample_size is None else min(cfg.max_sample_size, cfg.max_tokens))
        if shuffle else None,
        normalize=normalize if cfg.normalize is None else cfg.normalize,
        sampling_alpha=cfg.sampling_alpha if shuffle else 1.0, skip_bad=cfg.skip_bad, resample=cfg.resample,
        check_headers=not cfg.skip_bad or cfg.resample, seed=seed, epoch=epoch,
    )
    return batched_loader(dataset, cfg, seed=seed, epoch=epoch, rank=rank, world_size=world_size, start_batch=0,
                          shuffle=shuffle)
