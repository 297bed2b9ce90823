"""Training data from a Hugging Face ``datasets`` split: audio stored in the dataset (bytes) or named by it (paths).

:class:`HFAudioDataset` is an :class:`~xlsr.data.audio_dataset.AudioDataset` whose stored rows are the rows of a
``datasets.Dataset`` instead of a manifest's files: only reading one row is its own (the audio column's raw
``{"bytes", "path"}`` struct, decoded with soundfile through :func:`xlsr.audio.load_audio_bytes`, never with
``datasets``' ``Audio`` decoding, which needs torchcodec); sizes, corpus handling, cropping, batching and bad rows are
the manifest path's code. The same rows in the same order therefore give the same items, sizes, crops and batches as
a manifest of the same files (``tests/test_hf_dataset.py``).

Where the dataset is (:func:`open_hf_split`): a folder written by ``Dataset.save_to_disk`` or
``DatasetDict.save_to_disk``; one ``.parquet`` or ``.arrow`` file; or a folder of ``.parquet`` files (the Hub's layout,
``data/train-00000-of-00002.parquet``: the split's files are those whose name starts with it or that lie in a folder
named after it). Items are named ``{dataset}:{split}[{row}]`` (``row``: the row in the split).

``datasets`` is an optional dependency (``pip install 'xlsr[hf-datasets]'``), imported only here.
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Optional

import numpy as np

from xlsr.audio import AudioError, audio_bytes_info, audio_info, load_audio, load_audio_bytes
from xlsr.data.audio_dataset import (AudioDataset, BatchLoader, batched_loader, check_data_config,
                                     data_normalize)

logger = logging.getLogger(__name__)

__all__ = ["HFAudioDataset", "HFDatasetError", "open_hf_split", "check_column", "build_hf_audio_dataset", "column_strings",
           "row_names", "split_name",            "build_hf_dataloader"]


class HFDatasetError(ValueError):
    """A dataset, split or column that cannot be used (the message names it and what exists)."""


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError("data.hf_dataset needs the 'datasets' package: pip install 'xlsr[hf-datasets]'") from err
    return datasets


def _split_files(folder: str, split: str) -> list[str]:
    """The ``.parquet`` files of ``split`` under ``folder``: named ``{split}-*`` / ``{split}.parquet`` or in a folder
    named ``split``."""
    files = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    return [f for f in files if os.path.basename(f).split("-")[0].split(".")[0] == split
            or split in os.path.relpath(f, folder).split(os.sep)[:-1]]


def open_hf_split(path: str, split: Optional[str]):
    """The ``datasets.Dataset`` of ``split`` at ``path`` (see the module docstring for what ``path`` may be).

    ``split`` picks a split of a ``DatasetDict`` (or the parquet files of a folder); None takes the only one. A
    single ``Dataset`` (one file, or ``Dataset.save_to_disk``) is taken whatever ``split`` says.

    Raises:
        FileNotFoundError: nothing at ``path``.
        HFDatasetError: no such split (the splits there named), or a folder holding no dataset.
    """
    datasets = _import_datasets()
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.hf_dataset={path}: no such file or folder")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
            loaded = datasets.load_from_disk(path)
        else:
            files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
            if not files:
                raise HFDatasetError(f"{path}: neither a folder written by save_to_disk nor one holding .parquet files")
            chosen = _split_files(path, split) if split else files
            if not chosen:
                raise HFDatasetError(f"{path}: no .parquet file of split {split!r} (named {split}-*.parquet or in a "
                                     f"folder {split}/) among {len(files)} files")
            return datasets.Dataset.from_parquet(chosen, split=split or "train")
    elif path.endswith(".parquet"):
        return datasets.Dataset.from_parquet(path, split=split or "train")
    elif path.endswith(".arrow"):
        return datasets.Dataset.from_file(path)
    else:
        raise HFDatasetError(f"{path}: expected a folder (save_to_disk, or .parquet files), a .parquet or an .arrow "
                             "file")
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded.keys())
        if split is None:
            if len(names) != 1:
                raise HFDatasetError(f"{path} holds the splits {names}: choose one (data.hf_split)")
            split = names[0]
        if split not in loaded:
            raise HFDatasetError(f"{path} has no split {split!r}; its splits: {names}")
        return loaded[split]
    return loaded


def split_name(dataset, split: Optional[str]) -> str:
    """The name of the split ``open_hf_split(path, split)`` gave (``train`` when nothing names it)."""
    return split or (str(dataset.split) if getattr(dataset, "split", None) else "train")


def check_column(dataset, column: str, where: str, key: str) -> None:
    """Raise :class:`HFDatasetError` naming ``column`` (set by config key ``key``) and the columns that exist."""
    if column not in dataset.column_names:
        raise HFDatasetError(f"{where}: no column {column!r} ({key}); its columns: {dataset.column_names}")


def column_strings(dataset, name: str, column: str, key: str) -> list[str]:
    """Every row's value of the string ``column`` of ``dataset`` (named ``name`` in errors, the column set by config
    key ``key``), in row order.

    Raises:
        HFDatasetError: no such column (the columns there named), or a row whose value is not a string.
    """
    check_column(dataset, column, name, key)
    values = dataset[column]
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise HFDatasetError(f"{name}[{row}]: {column!r} ({key}) is {value!r}, not a string")
    return list(values)


def row_names(name: str, num_rows: int) -> list[str]:
    """``{name}[{row}]`` of every row (``name``: ``{dataset}:{split}``)."""
    return [f"{name}[{row}]" for row in range(num_rows)]


class HFAudioDataset(AudioDataset):
    """The rows of a Hugging Face dataset split as an :class:`AudioDataset` (one corpus).

    Sizes are the rows' lengths in samples at ``sample_rate``: from ``length_column`` when given (trusted as a
    manifest's sizes are, checked against the headers when ``check_headers``), else read from every row's header
    (``soundfile.info`` on the bytes, no decoding; a progress bar for large splits), which also finds undecodable
    rows up front: dropped with a warning naming them (``skip_bad``) or refused in one
    :class:`~xlsr.data.audio_dataset.BadFilesError` listing them all. Rows shorter than ``min_sample_size`` are
    dropped as the manifest path drops short files.

    Args:
        path: the dataset (:func:`open_hf_split`).
        split: the split of a ``DatasetDict`` (None: its only one).
        audio_column: the audio column: ``datasets.Audio`` (or its ``{"bytes", "path"}`` struct) or a string of
            paths. Paths that are relative are taken from the dataset's folder.
        length_column: a column of lengths in samples at ``sample_rate`` (None: read the headers).
        The other arguments are :class:`AudioDataset`'s.
    """

    def __init__(
        self,
        path: str,
        *,
        split: Optional[str] = None,
        audio_column: str = "audio",
        length_column: Optional[str] = None,
        sample_rate: int = 16000,
        min_sample_size: int = 0,
        max_sample_size: Optional[int] = None,
        pad: bool = False,
        normalize: bool = False,
        skip_bad: bool = True,
        resample: bool = False,
        check_headers: bool = False,
        seed: int = 0,
        epoch: int = 0,
    ):
        dataset = open_hf_split(path, split)
        self.split = split_name(dataset, split)
        self.name = f"{path}:{self.split}"
        self._folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        self._set_options(
            [self.name], sample_rate=sample_rate, min_sample_size=min_sample_size, max_sample_size=max_sample_size,
            pad=pad, normalize=normalize, sampling_alpha=1.0, skip_bad=skip_bad, resample=resample, seed=seed,
            epoch=epoch,
        )
        check_column(dataset, audio_column, self.name, "data.audio_column")
        self.dataset = dataset  # every column: transcripts and labels are read from it
        self.audio_column = audio_column
        self._audio = self._raw_audio_column(dataset, audio_column)
        num_rows = len(dataset)
        if num_rows == 0:
            raise HFDatasetError(f"{self.name}: no rows")
        rows = np.arange(num_rows, dtype=np.int64)
        if length_column is None:
            sizes = np.zeros(num_rows, dtype=np.int64)  # validate() reads them from the headers
            check_headers = True
        else:
            check_column(dataset, length_column, self.name, "data.length_column")
            sizes = np.asarray(dataset[length_column], dtype=np.int64)
            if not (resample and check_headers):  # else: sizes come from the headers at their rates
                short = np.flatnonzero(sizes < min_sample_size)
                self._drop_with_warnings([(self._name_of_row(int(r)), f"too short ({int(sizes[r])} samples < "
                                           f"min_sample_size {min_sample_size})") for r in short])
                rows = np.flatnonzero(sizes >= min_sample_size)
                if len(rows) == 0:
                    raise ValueError(f"{self.name}: no usable audio ({num_rows} rows, all too short)")
                sizes = sizes[rows]
        self._set_rows(sizes, np.zeros(len(rows), dtype=np.int32), rows, check_headers)
        logger.info("%s: %d of %d rows kept", self.name, len(self._num_samples), num_rows)

    @staticmethod
    def _raw_audio_column(dataset, column: str):
        """The audio column alone, undecoded: ``datasets.Audio`` cast to ``decode=False`` (a ``{"bytes", "path"}``
        dict per row, as stored), a plain struct or string column as it is."""
        datasets = _import_datasets()
        audio = dataset.select_columns([column])
        feature = audio.features[column]
        if isinstance(feature, datasets.Audio):
            audio = audio.cast_column(column, datasets.Audio(decode=False))
        return audio

    # ----------------------------------------------------------------- reading one row

    def _name_of_row(self, row: int) -> str:
        return f"{self.name}[{row}]"

    def _stored_name(self, j: int) -> str:
        """``{dataset}:{split}[{row}]`` of stored row ``j``."""
        return self._name_of_row(int(self._row[j]))

    def _stored_value(self, j: int) -> tuple[Optional[bytes], Optional[str]]:
        """(bytes, path) of stored row ``j`` (one of them None)."""
        value = self._audio[int(self._row[j])][self.audio_column]
        if isinstance(value, str):
            return None, value
        if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
            return value.get("bytes"), value.get("path")
        raise AudioError(self._stored_name(j), f"no audio in column {self.audio_column!r} (found {value!r:.80})")

    def _file_of(self, j: int, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self._folder, path)

    def _read_header(self, j: int) -> tuple[int, int, int]:
        data, path = self._stored_value(j)
        if data is not None:
            return audio_bytes_info(data, self._stored_name(j))
        try:
            return audio_info(self._file_of(j, path))
        except AudioError as err:
            raise AudioError(self._stored_name(j), str(err)) from None

    def _read_audio(self, j: int) -> np.ndarray:
        data, path = self._stored_value(j)
        if data is not None:
            return load_audio_bytes(data, self._stored_name(j), self.sample_rate, resample=self.resample)
        try:
            return load_audio(self._file_of(j, path), self.sample_rate, resample=self.resample)
        except AudioError as err:
            raise AudioError(self._stored_name(j), str(err)) from None

    def _keep_stored(self, keep: np.ndarray) -> None:
        pass  # a row's name and audio follow from its dataset row (``_row``), which validate() subsets

    # ----------------------------------------------------------------- other columns

    def column_strings(self, column: str, key: str) -> list[str]:
        """Every row's value of ``column`` (a string column, e.g. transcripts or labels), in dataset row order;
        ``key`` is the config key that named the column (in the error when it is missing).

        Raises:
            HFDatasetError: no such column (the columns there named), or a row whose value is not a string.
        """
        return column_strings(self.dataset, self.name, column, key)

    def labels(self, column: str, key: str = "data.label_column") -> list[str]:
        """The class label of every dataset row, as stored (``data.label_column``; for classification, which
        cleans them: :func:`xlsr.finetune.classification_data.clean_class_labels`); ``key``: the config key that
        named ``column``."""
        return self.column_strings(column, key)

    def row_names(self) -> list[str]:
        """``{dataset}:{split}[{row}]`` of every dataset row, in order (where a transcript came from)."""
        return row_names(self.name, len(self.dataset))


def build_hf_audio_dataset(cfg, split: Optional[str], *, pad: bool, max_sample_size: Optional[int],
                           normalize: bool, seed: int, epoch: int) -> HFAudioDataset:
    """The :class:`HFAudioDataset` of ``split`` of ``cfg.hf_dataset`` with the data options of ``cfg`` (an
    :class:`~xlsr.data.audio_dataset.AudioDataConfig`), as ``build_dataloader`` builds the manifest's."""
    return HFAudioDataset(
        cfg.hf_dataset,
        split=split,
        audio_column=cfg.audio_column,
        length_column=cfg.length_column,
        sample_rate=cfg.sample_rate,
        min_sample_size=cfg.min_sample_size,
        max_sample_size=max_sample_size,
        pad=pad,
        normalize=normalize,
        skip_bad=cfg.skip_bad,
        resample=cfg.resample,
        check_headers=not cfg.skip_bad or cfg.resample,
        seed=seed,
        epoch=epoch,
    )


def build_hf_dataloader(cfg, split: Optional[str], *, normalize: bool, seed: int, epoch: int, rank: int = 0,
                        world_size: int = 1, start_batch: int = 0, shuffle: bool = True) -> BatchLoader:
    """:func:`xlsr.data.audio_dataset.build_dataloader` (pretraining: cropped, batched by samples) over ``split``
    of ``cfg.hf_dataset`` instead of a manifest; the same options, the same batches for the same rows."""
    check_data_config(cfg)
    dataset = build_hf_audio_dataset(cfg, split, pad=cfg.pad, max_sample_size=cfg.max_sample_size,
                                     normalize=data_normalize(cfg, normalize), seed=seed, epoch=epoch)
    return batched_loader(dataset, cfg, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                          start_batch=start_batch, shuffle=shuffle)
