"""Classification data: utterances with one class label each -> padded batches, from any training data source.

Beside ``train.tsv`` lies ``train.lang`` (``data.labels`` names the extension): line k is the class of row k of the
manifest (the k-th entry after the root line), whether or not the audio is later dropped. The classes are listed
in ``dict.lang.txt`` beside the training manifest, one ``label count`` line per class, the line order being the
class index (fairseq loads it with ``Dictionary.load(path, add_special_symbols=False)``: no special symbols).
When it is absent the training task builds it from the training labels, most frequent first (ties by name), as
fairseq's ``Dictionary.finalize`` orders symbols. Labels are read in Unicode NFC (:func:`xlsr.text.read_text_lines`),
surrounding whitespace stripped.

The other sources (:mod:`xlsr.data.source`) hold the label beside the audio, named by ``data.label_column`` (unset:
``data.labels``, so ``lang`` by default): a Hugging Face dataset's column (``data.hf_dataset``: the rows of an
:class:`~xlsr.data.hf_dataset.HFAudioDataset`, each row's label from its ``labels``), or a Lhotse cut's custom
field, else its first supervision's (``data.lhotse_cuts`` / ``data.lhotse_shar``; ``python -m xlsr.manifest ...
--to-shar`` writes ``train.lang`` as the field ``lang``). Their labels are cleaned as a label file's lines and
looked up in the same class list; a missing or empty label or one absent from the classes stops naming the
dataset, split and row, or the cut id. The dictionary built from the training labels follows the same order rule.

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

from xlsr.data.audio_dataset import (AudioDataConfig, AudioDataset, batched_loader, check_data_source, collate,
                                     data_normalize)
from xlsr.data.batch import ClassificationBatch
from xlsr.data.hf_dataset import build_hf_audio_dataset, column_strings, open_hf_split, row_names, split_name
from xlsr.data.lhotse_source import (CutItems, build_lhotse_loader, cut_custom_field, is_lhotse_source,
                                     lhotse_cut_metadata)
from xlsr.data.source import hf_split_of, is_hf_source
from xlsr.files import write_text_atomic
from xlsr.finetune.labels import label_path
from xlsr.manifest import read_manifest
from xlsr.text import normalize_unicode, read_text_lines
from xlsr.vocabulary import LabelError

__all__ = ["ClassificationDataConfig", "label_dictionary_path", "read_class_labels", "read_label_dictionary",
           "write_label_dictionary", "count_labels", "clean_class_labels", "label_field", "ClassIndex",
           "ClassifiedAudioDataset", "CutLabels", "hf_split_labels", "training_labels", "collate_classification",
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
    """Raise ValueError for out-of-range sizes or options, or training data named in none or several places."""
    check_data_source(cfg)
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


def clean_class_labels(values: Sequence[str], wheres: Sequence[str]) -> list[str]:
    """Labels as every source gives them to training: Unicode NFC, surrounding whitespace stripped.

    Args:
        values: the raw labels.
        wheres: where each came from (``file:line``, ``dataset:split[row]``, ``cut ID``), for the error.

    Raises:
        LabelError: an empty label (its ``where`` named).
    """
    cleaned = [normalize_unicode(value).strip() for value in values]
    for where, label in zip(wheres, cleaned, strict=True):
        if not label:
            raise LabelError(f"{where}: empty label")
    return cleaned


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
        lines = read_text_lines(path)
    except UnicodeDecodeError as err:
        raise LabelError(f"{path}: not UTF-8 text ({err})") from None
    num_rows = len(read_manifest(manifest_path)[1])
    if len(lines) != num_rows:
        raise ValueError(f"{path} has {len(lines)} line(s) but its manifest {manifest_path} has {num_rows} row(s); "
                         "the label file needs one label per manifest row, in the same order")
    return clean_class_labels(lines, [f"{path}:{number}" for number in range(1, len(lines) + 1)])


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


# ---------------------------------------------------------------------- labels of the other sources


def label_field(cfg) -> tuple[str, str]:
    """(name, config key) of the column (``data.hf_dataset``) or cut custom field (Lhotse) holding each utterance's
    label: ``cfg.label_column``, else ``cfg.labels`` (``lang``: the field ``--to-shar`` writes from ``train.lang``)."""
    if cfg.label_column:
        return cfg.label_column, "data.label_column"
    return cfg.labels, "data.label_column, unset: data.labels"


class ClassIndex:
    """Label -> class index in ``label_names`` (the dictionary's order); a label not there is a LabelError naming
    where it came from and ``dictionary_file`` (a file, or words such as "the labels of MODEL")."""

    def __init__(self, label_names: Sequence[str], dictionary_file: str = "the label dictionary"):
        self.label_names = list(label_names)
        self.dictionary_file = dictionary_file
        self._index = {name: i for i, name in enumerate(self.label_names)}

    def __call__(self, label: str, where: str) -> int:
        if label not in self._index:
            raise LabelError(f"{where}: label {label!r} is not in {self.dictionary_file} ({len(self._index)} classes: "
                             f"{', '.join(self.label_names[:10])}{' ...' if len(self._index) > 10 else ''})")
        return self._index[label]


def hf_split_labels(cfg, split: Optional[str]) -> list[str]:
    """Every row's label of ``split`` of ``cfg.hf_dataset`` (:func:`label_field`, cleaned as a label file's lines)
    without reading its audio (e.g. to build the dictionary).

    Raises:
        HFDatasetError: no such column (the columns there named), or a value that is not a string.
        LabelError: an empty label (dataset, split and row named).
    """
    dataset = open_hf_split(cfg.hf_dataset, split)
    name = f"{cfg.hf_dataset}:{split_name(dataset, split)}"
    column, key = label_field(cfg)
    values = column_strings(dataset, name, column, key)
    return clean_class_labels(values, row_names(name, len(values)))


class CutLabels:
    """A Lhotse cut -> ``[its class index]`` (:class:`~xlsr.data.lhotse_source.CutItems` ``targets``, a list as
    CTC's, so that the shared code treats both alike; ``collate_classification`` takes its one element).

    Args:
        classes: the class list (None: only :meth:`label` is used, e.g. to count the training labels).
        field: the custom field of the cut (else of its first supervision) holding the label.
        key: the config key that named ``field`` (in errors).
    """

    def __init__(self, classes: Optional[ClassIndex], field: str, key: str = "data.label_column"):
        self.classes = classes
        self.field = field
        self.key = key

    def label(self, cut) -> str:
        """The label of ``cut`` (NFC, stripped; LabelError naming the cut when missing or empty)."""
        return clean_class_labels([cut_custom_field(cut, self.field, self.key)], [f"cut {cut.id}"])[0]

    def __call__(self, cut) -> list[int]:
        return [self.classes(self.label(cut), f"cut {cut.id}")]


def training_labels(cfg, name: str) -> list[str]:
    """The label of every utterance of a data name (:func:`xlsr.data.source.training_data`), metadata only (no
    audio read): a manifest's label file(s) (comma-separated manifests: all of them), a dataset split's column or
    the cuts' custom field (:func:`label_field`). Dropped utterances (too short, unreadable) count too."""
    if is_hf_source(name):
        return hf_split_labels(cfg, hf_split_of(name))
    if is_lhotse_source(name):
        labels = CutLabels(None, *label_field(cfg))
        return [labels.label(cut) for cut in lhotse_cut_metadata(name)]
    return [label for manifest in name.split(",") if manifest.strip()
            for label in read_class_labels(manifest.strip(), cfg.labels)]


# ---------------------------------------------------------------------- dataset


class ClassifiedAudioDataset(Dataset):
    """Utterances with their class index (an :class:`~xlsr.data.source.UtteranceSource`): of fairseq manifests, or
    of another source's rows.

    Wraps an :class:`AudioDataset` (``audio``: reading, normalisation, bad files, corpus resampling, the random crop
    to ``max_sample_size``, seeded by ``(seed, epoch, item)``); each item's label is found by its manifest row (the
    label files beside the manifests). Another source's rows (one corpus, e.g. a
    :class:`xlsr.data.hf_dataset.HFAudioDataset` built with ``pad=True``) are given as ``audio`` with
    ``row_labels``: ``(where, label)`` of each of its rows in row order (then ``manifests`` and the audio options
    are not used). A label missing from ``label_names`` stops here naming its file and line (or its ``where``).
    ``__getitem__(i)`` returns ``{"id": i, "source": float32 (S,), "target": int}`` or None for an unreadable
    file when ``skip_bad``.
    """

    def __init__(self, manifests: str | Sequence[str] | None, label_names: Sequence[str], *, labels: str = "lang",
                 dictionary_file: str = "the label dictionary", audio: Optional[AudioDataset] = None,
                 row_labels: Optional[Sequence[tuple[str, str]]] = None, **audio_options):
        if audio is not None:  # another source's rows (one corpus) and their labels
            if row_labels is None or len(audio.manifests) != 1:
                raise ValueError("ClassifiedAudioDataset(audio=...) needs one corpus and the labels of its rows")
            self.audio = audio
        else:
            self.audio = AudioDataset(manifests, pad=True, **audio_options)
        self.label_names = list(label_names)
        classes = ClassIndex(self.label_names, dictionary_file)
        targets: list[int] = []
        self._row_offset = np.zeros(len(self.audio.manifests), dtype=np.int64)
        for corpus_id, manifest in enumerate(self.audio.manifests):
            self._row_offset[corpus_id] = len(targets)
            if audio is None:
                path = label_path(manifest, labels)
                rows = [(f"{path}:{number}", label)
                        for number, label in enumerate(read_class_labels(manifest, labels), start=1)]
            else:
                rows = row_labels
            targets.extend(classes(label, where) for where, label in rows)
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
                                shuffle: bool = True, dictionary_file: str = "the label dictionary"):
    """A loader of one rank's classification batches of the data name ``manifest`` (:mod:`xlsr.data.source`): a
    manifest path (comma-separated = several corpora), ``hf-split:SPLIT`` of ``cfg.hf_dataset``, ``lhotse-cuts:PATH``
    or ``lhotse-shar:DIR`` (labels: :func:`label_field`).

    ``shuffle`` (training): random crops to ``cfg.max_sample_size`` (or ``cfg.max_tokens`` when smaller, so that
    an item fits a batch) and corpus resampling; otherwise (validation) whole utterances in a fixed order (one
    longer than ``cfg.max_tokens`` is an error naming its size). ``normalize`` is the model's choice, unless
    ``cfg.normalize`` is set. The same rows in the same order give the same batches and crops from every source.

    Returns:
        a :class:`BatchLoader`, or for Shar a :class:`~xlsr.data.lhotse_source.SharBatchLoader`.
    """
    check_classification_data_config(cfg)
    max_size = (cfg.max_tokens if cfg.max_sample_size is None else min(cfg.max_sample_size, cfg.max_tokens)) \
        if shuffle else None
    normalize = data_normalize(cfg, normalize)
    if is_lhotse_source(manifest):
        items = CutItems(sample_rate=cfg.sample_rate, min_sample_size=cfg.min_sample_size, max_sample_size=max_size,
                         crop=True, normalize=normalize, resample=cfg.resample, skip_bad=cfg.skip_bad,
                         targets=CutLabels(ClassIndex(label_names, dictionary_file), *label_field(cfg)),
                         collater=collate_classification)
        return build_lhotse_loader(manifest, cfg, items, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                   shuffle=shuffle)
    audio = row_labels = None
    if is_hf_source(manifest):
        audio = build_hf_audio_dataset(cfg, hf_split_of(manifest), pad=True, max_sample_size=max_size,
                                       normalize=normalize, seed=seed, epoch=epoch)
        column, key = label_field(cfg)
        row_labels = list(zip(audio.row_names(),
                              clean_class_labels(audio.labels(column, key), audio.row_names()), strict=True))
    dataset = ClassifiedAudioDataset(
        None if audio is not None else manifest, label_names, labels=cfg.labels, dictionary_file=dictionary_file,
        audio=audio, row_labels=row_labels,
        sample_rate=cfg.sample_rate, min_sample_size=cfg.min_sample_size, max_sample_size=max_size,
        normalize=normalize, sampling_alpha=cfg.sampling_alpha if shuffle else 1.0, skip_bad=cfg.skip_bad,
        resample=cfg.resample, check_headers=not cfg.skip_bad or cfg.resample, seed=seed, epoch=epoch,
    )
    return batched_loader(dataset, cfg, seed=seed, epoch=epoch, rank=rank, world_size=world_size, start_batch=0,
                          shuffle=shuffle)
