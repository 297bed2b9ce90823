"""Audio manifests in fairseq's format (``examples/wav2vec/wav2vec_manifest.py``).

A manifest is a text file whose first line is the absolute root folder, followed by one
``relative/path<TAB>num_samples`` line per file (``num_samples`` = frames, from the header).

Command line::

    python -m xlsr.manifest AUDIO_DIR --dest DIR --valid-percent 0.01 --ext flac,wav --seed 42
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

from tqdm import tqdm

from xlsr.audio import AudioError, audio_info
from xlsr.files import write_text_atomic

__all__ = [
    "ManifestError",
    "ManifestSummary",
    "read_manifest",
    "write_manifest",
    "write_manifest_file",
    "find_audio_files",
    "main",
]

DEFAULT_EXTENSIONS = ("flac", "wav", "ogg", "mp3")


class ManifestError(ValueError):
    """A malformed manifest; the message names the file and the line number."""


@dataclass
class ManifestSummary:
    """What :func:`write_manifest` wrote and what it left out."""

    root: str
    num_train: int = 0
    num_valid: int = 0
    train_samples: int = 0
    valid_samples: int = 0
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    sample_rates: collections.Counter = field(default_factory=collections.Counter)
    channels: collections.Counter = field(default_factory=collections.Counter)


def read_manifest(path: str | os.PathLike) -> tuple[str, list[tuple[str, int]]]:
    """Read a fairseq manifest.

    Returns:
        ``(root, entries)`` where ``entries`` is a list of ``(relative_path, num_samples)``.

    Raises:
        FileNotFoundError: no such manifest.
        ManifestError: empty file, or a line that is not ``path<TAB>non-negative int``.
    """
    path = os.fspath(path)
    entries: list[tuple[str, int]] = []
    with open(path, encoding="utf-8") as f:
        root_line = f.readline()
        root = root_line.rstrip("\r\n")
        if not root.strip():
            raise ManifestError(f"{path}:1: expected the root folder on the first line, found nothing")
        if "\t" in root:
            raise ManifestError(
                f"{path}:1: the first line must be the root folder, found a tab-separated entry {root!r}"
            )
        for line_number, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise ManifestError(
                    f"{path}:{line_number}: expected 'relative_path<TAB>num_samples', "
                    f"found {len(fields)} tab-separated field(s): {line!r}"
                )
            rel_path, size_text = fields
            try:
                num_samples = int(size_text)
            except ValueError:
                num_samples = -1
            if num_samples < 0 or not rel_path:
                raise ManifestError(
                    f"{path}:{line_number}: expected 'relative_path<TAB>num_samples' with a "
                    f"non-negative integer size, found {line!r}"
                )
            entries.append((rel_path, num_samples))
    return root, entries


def find_audio_files(
    root: str, extensions: Sequence[str] = DEFAULT_EXTENSIONS, path_must_contain: Optional[str] = None
) -> list[str]:
    """Absolute paths of audio files under ``root`` (recursive, follows folder links), sorted.

    Extensions are matched case-insensitively, without the dot.
    """
    suffixes = tuple("." + ext.lower().lstrip(".") for ext in extensions if ext.strip())
    found: list[str] = []
    visited: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:  # a link cycle: do not descend again
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders.sort()
        for name in files:
            if name.lower().endswith(suffixes):
                full = os.path.join(folder, name)
                if path_must_contain is None or path_must_contain in full:
                    found.append(full)
    found.sort()
    return found


def _read_headers(paths: Sequence[str], num_workers: int) -> Iterator[tuple[str, object]]:
    """Yield ``(path, (frames, rate, channels))`` or ``(path, AudioError)`` in input order."""

    def safe_info(path: str) -> object:
        try:
            return audio_info(path)
        except AudioError as err:
            return err

    if num_workers <= 1:
        for path in paths:
            yield path, safe_info(path)
        return
    chunk = 4096  # bounded number of pending futures, even for millions of files
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        for start in range(0, len(paths), chunk):
            part = paths[start : start + chunk]
            yield from zip(part, pool.map(safe_info, part))


def write_manifest(
    root: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    valid_percent: float = 0.01,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    seed: int = 42,
    path_must_contain: Optional[str] = None,
    num_workers: int = 8,
    progress: bool = True,
) -> ManifestSummary:
    """Write ``dest/train.tsv`` and ``dest/valid.tsv`` for the audio files under ``root``.

    Sizes come from file headers only. Each file goes to valid with probability
    ``valid_percent`` (a fraction in [0, 1], as in fairseq), drawn from ``random.Random(seed)``
    over the sorted file list, so the split is reproducible. Files whose header cannot be read,
    that hold 0 samples, or whose path holds a tab/newline are left out and listed in the
    returned summary. Both files are always written (valid.tsv may hold only the root line).
    """
    if not 0.0 <= valid_percent <= 1.0:
        raise ValueError(f"valid_percent must be a fraction in [0, 1], got {valid_percent}")
    root = os.path.realpath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a folder")
    dest = os.fspath(dest)
    os.makedirs(dest, exist_ok=True)

    paths = find_audio_files(root, extensions, path_must_contain)
    summary = ManifestSummary(root=root)
    rng = random.Random(seed)
    train_rows: list[tuple[str, int]] = []
    valid_rows: list[tuple[str, int]] = []

    headers = _read_headers(paths, num_workers)
    for path, header in tqdm(headers, total=len(paths), desc="reading headers", unit="file", disable=not progress):
        draw = rng.random()  # drawn for every file so the split does not depend on bad files
        rel_path = os.path.relpath(path, root)
        if isinstance(header, AudioError):
            summary.bad_files.append((path, header.reason))
            continue
        frames, rate, channels = header
        if frames <= 0:
            summary.bad_files.append((path, "empty (0 samples)"))
            continue
        if "\t" in rel_path or "\n" in rel_path or "\r" in rel_path:
            summary.bad_files.append((path, "path contains a tab or newline, which the manifest format cannot hold"))
            continue
        summary.sample_rates[rate] += 1
        summary.channels[channels] += 1
        if valid_percent > 0 and draw < valid_percent:
            valid_rows.append((rel_path, frames))
            summary.num_valid += 1
            summary.valid_samples += frames
        else:
            train_rows.append((rel_path, frames))
            summary.num_train += 1
            summary.train_samples += frames

    write_manifest_file(os.path.join(dest, "train.tsv"), root, train_rows)
    write_manifest_file(os.path.join(dest, "valid.tsv"), root, valid_rows)
    return summary


def write_manifest_file(path: str | os.PathLike, root: str, rows: Iterable[tuple[str, int]]) -> None:
    """Write one manifest: the ``root`` line, then ``relative_path<TAB>num_samples`` per row, in the given order.

    Written through :func:`xlsr.files.write_text_atomic`, so ``path`` is never left half-written.

    Raises:
        ValueError: a path holds a tab or newline (the format cannot hold it).
    """
    lines = [root]
    for rel_path, num_samples in rows:
        if "\t" in rel_path or "\n" in rel_path or "\r" in rel_path:
            raise ValueError(f"{rel_path!r}: a manifest path cannot hold a tab or newline")
        lines.append(f"{rel_path}\t{num_samples}")
    write_text_atomic(path, "\n".join(lines) + "\n")


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m xlsr.manifest",
        description="Write fairseq-style train.tsv / valid.tsv manifests for a folder of audio.",
    )
    parser.add_argument("root", metavar="AUDIO_DIR", help="folder searched recursively for audio files")
    parser.add_argument("--dest", default=".", help="output folder for train.tsv and valid.tsv")
    parser.add_argument("--valid-percent", type=float, default=0.01, help="fraction (0..1) of files put in valid.tsv")
    parser.add_argument("--ext", default=",".join(DEFAULT_EXTENSIONS), help="comma-separated extensions to include")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/valid split")
    parser.add_argument("--path-must-contain", default=None, help="keep only paths containing this text")
    parser.add_argument("--workers", type=int, default=8, help="threads reading headers")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    extensions = [ext.strip() for ext in args.ext.split(",") if ext.strip()]
    try:
        summary = write_manifest(
            args.root,
            args.dest,
            valid_percent=args.valid_percent,
            extensions=extensions,
            seed=args.seed,
            path_must_contain=args.path_must_contain,
            num_workers=args.workers,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    for path, reason in summary.bad_files:
        print(f"left out {path}: {reason}", file=sys.stderr)
    hours = (summary.train_samples + summary.valid_samples) / max(1, _majority(summary.sample_rates)) / 3600
    print(
        f"wrote {os.path.join(args.dest, 'train.tsv')} ({summary.num_train} files) and "
        f"{os.path.join(args.dest, 'valid.tsv')} ({summary.num_valid} files), about {hours:.2f} h; "
        f"left out {len(summary.bad_files)} unreadable file(s)"
    )
    if len(summary.sample_rates) > 1:
        print(f"warning: mixed sample rates (Hz: files): {dict(summary.sample_rates)}", file=sys.stderr)
    if summary.channels.keys() - {1}:
        print(f"warning: not all files are mono (channels: files): {dict(summary.channels)}", file=sys.stderr)
    if summary.num_train + summary.num_valid == 0:
        print(f"error: no readable audio with extensions {extensions} under {summary.root}", file=sys.stderr)
        return 1
    return 0


def _majority(counter: collections.Counter) -> int:
    return counter.most_common(1)[0][0] if counter else 16000


if __name__ == "__main__":
    sys.exit(main())
