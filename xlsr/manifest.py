"""Audio manifests in fairseq's format (``examples/wav2vec/wav2vec_manifest.py``).

A manifest is a text file whose first line is the absolute root folder, followed by one
``relative/path<TAB>num_samples`` line per file (``num_samples`` = frames, from the header).

Command line::

    python -m xlsr.manifest AUDIO_DIR --dest DIR --valid-percent 0.01 --ext flac,wav --seed 42

With ``--transcripts TABLE`` (lines ``relative/path<TAB>text``, paths relative to AUDIO_DIR) it also writes, for
CTC fine-tuning in fairseq's layout, ``train.wrd`` / ``train.ltr`` and ``valid.wrd`` / ``valid.ltr`` (one line per
manifest row, same order; see :mod:`xlsr.finetune.labels`) and ``dict.ltr.txt`` from the train transcripts.
Transcripts are normalised by :func:`xlsr.finetune.labels.normalize_transcript`: Unicode NFC, stripped, runs of
whitespace made one space, upper-cased (``--keep-case`` to keep the case); punctuation is kept. A byte-order mark at
the start of the table is ignored, and its paths match the audio files whatever their Unicode form (NFC or NFD). An
audio file without a transcript stops the tool listing every such file, before anything is written
(``--drop-missing-transcripts`` leaves them out of the manifests instead).

With ``--to-shar DIR`` the argument is a manifest instead, turned into Lhotse Shar shards (:func:`write_shar`)::

    python -m xlsr.manifest train.tsv --to-shar shar/train --shard-size 1000
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Optional, Sequence

from tqdm import tqdm

from xlsr.audio import AudioError, audio_info
from xlsr.files import write_text_atomic
from xlsr.text import normalize_unicode, read_text_lines
from xlsr.vocabulary import WORD_BOUNDARY, Dictionary, letters_to_words, normalize_transcript, words_to_letters

__all__ = [
    "ManifestError",
    "MissingTranscriptsError",
    "read_transcript_table",
    "ManifestSummary",
    "read_manifest",
    "write_manifest",
    "write_manifest_file",
    "find_audio_files",
    "write_shar",
    "LABEL_EXTENSIONS",
    "main",
]

DEFAULT_EXTENSIONS = ("flac", "wav", "ogg", "mp3")


class ManifestError(ValueError):
    """A malformed manifest; the message names the file and the line number."""


class MissingTranscriptsError(ValueError):
    """Audio files without a transcript; ``paths`` lists them all (the message the first 50)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        shown = "\n".join(f"  {p}" for p in self.paths[:50])
        more = f"\n  ... and {len(self.paths) - 50} more" if len(self.paths) > 50 else ""
        super().__init__(
            f"{len(self.paths)} audio file(s) have no transcript (add them to the table, or drop them with "
            f"--drop-missing-transcripts):\n{shown}{more}"
        )

    def __reduce__(self):
        return (type(self), (self.paths,))


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
    no_transcript: list[str] = field(default_factory=list)  # audio left out for want of a transcript
    unused_transcripts: int = 0  # transcripts of the table that match no file of the manifests
    dictionary_size: int = 0  # symbols of dict.ltr.txt, specials included
    valid_unknown_letters: list[str] = field(default_factory=list)  # letters of valid.ltr missing from dict.ltr.txt


def read_manifest(path: str | os.PathLike) -> tuple[str, list[tuple[str, int]]]:
    """Read a fairseq manifest (a byte-order mark before the root folder is ignored; paths are kept as written,
    since they must open the files, whatever their Unicode form on disk).

    Returns:
        ``(root, entries)`` where ``entries`` is a list of ``(relative_path, num_samples)``.

    Raises:
        FileNotFoundError: no such manifest.
        ManifestError: empty file, or a line that is not ``path<TAB>non-negative int``.
    """
    path = os.fspath(path)
    entries: list[tuple[str, int]] = []
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the root folder
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


def read_transcript_table(path: str | os.PathLike, *, keep_case: bool = False) -> dict[str, str]:
    """Read a transcript table: one ``relative/path<TAB>text`` a line (blank lines skipped), paths relative to the
    audio folder; texts normalised with :func:`xlsr.finetune.labels.normalize_transcript`. A byte-order mark at the
    start is ignored; paths and texts are read in Unicode NFC (:func:`xlsr.text.read_text_lines`).

    Returns:
        ``{normalised relative path: text}``.

    Raises:
        ManifestError: a line without a tab, an empty path or transcript, a transcript holding ``|``, a path given
            twice (file and line named), text that is not UTF-8.
    """
    path = os.fspath(path)
    table: dict[str, str] = {}
    first_line: dict[str, int] = {}
    try:
        lines = read_text_lines(path)  # no byte-order mark, NFC: paths and texts
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rel_path, tab, text = line.partition("\t")
        if not tab or not rel_path.strip():
            raise ManifestError(f"{path}:{number}: expected 'relative_path<TAB>transcript', found {line!r}")
        key = _path_key(rel_path.strip())
        text = normalize_transcript(text, keep_case=keep_case)
        if not text:
            raise ManifestError(f"{path}:{number}: empty transcript for {rel_path!r}")
        if WORD_BOUNDARY in text:
            raise ManifestError(f"{path}:{number}: the transcript holds {WORD_BOUNDARY!r}, the word-boundary letter")
        if key in table:
            raise ManifestError(f"{path}:{number}: {rel_path!r} already has a transcript on line {first_line[key]}")
        table[key] = text
        first_line[key] = number
    return table


def _path_key(rel_path: str) -> str:
    """How a relative path is matched between the transcript table and the audio folder: normalised
    (``os.path.normpath``) and in NFC, so that a table in NFD finds files named in NFC, and the other way round
    (the manifest keeps the name as it is on disk, which is what opens the file)."""
    return os.path.normpath(normalize_unicode(rel_path))


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
    transcripts: Optional[Mapping[str, str]] = None,
    drop_missing_transcripts: bool = False,
) -> ManifestSummary:
    """Write ``dest/train.tsv`` and ``dest/valid.tsv`` for the audio files under ``root``.

    With ``transcripts`` (``{path relative to root: text}``, e.g. from :func:`read_transcript_table`) also
    ``{train,valid}.wrd`` and ``.ltr`` in manifest row order and ``dict.ltr.txt`` from the train transcripts
    (fairseq's fine-tuning layout). A readable file without a transcript raises :class:`MissingTranscriptsError`
    before anything is written, or with ``drop_missing_transcripts`` is left out (``summary.no_transcript``);
    files are drawn into valid as without transcripts, so the split of the others does not change.

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
    if transcripts is not None:
        transcripts = {
            _path_key(os.path.relpath(key, root) if os.path.isabs(key) else key): " ".join(
                normalize_unicode(text).split()
            )
            for key, text in transcripts.items()
        }
        used: set[str] = set()
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
        if transcripts is not None:
            key = _path_key(rel_path)
            if key not in transcripts:
                summary.no_transcript.append(path)
                continue
            if not transcripts[key]:
                raise ValueError(f"{path}: empty transcript")
            used.add(key)
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

    if transcripts is not None:
        if summary.no_transcript and not drop_missing_transcripts:
            raise MissingTranscriptsError(summary.no_transcript)
        summary.unused_transcripts = len(transcripts) - len(used)
        _write_transcripts(dest, transcripts, train_rows, valid_rows, summary)
    write_manifest_file(os.path.join(dest, "train.tsv"), root, train_rows)
    write_manifest_file(os.path.join(dest, "valid.tsv"), root, valid_rows)
    return summary


def _write_transcripts(
    dest: str,
    transcripts: Mapping[str, str],
    train_rows: Sequence[tuple[str, int]],
    valid_rows: Sequence[tuple[str, int]],
    summary: ManifestSummary,
) -> None:
    """``{train,valid}.{wrd,ltr}`` in row order and ``dict.ltr.txt`` of the train letters."""
    letters: dict[str, list[str]] = {}
    for split, rows in (("train", train_rows), ("valid", valid_rows)):
        words = [transcripts[_path_key(rel_path)] for rel_path, _ in rows]
        letters[split] = [words_to_letters(text) for text in words]
        write_text_atomic(os.path.join(dest, f"{split}.wrd"), "".join(line + "\n" for line in words))
        write_text_atomic(os.path.join(dest, f"{split}.ltr"), "".join(line + "\n" for line in letters[split]))
    dictionary = Dictionary.from_transcripts(letters["train"])
    dictionary.save(os.path.join(dest, "dict.ltr.txt"))
    summary.dictionary_size = len(dictionary)
    valid_letters = {sym for line in letters["valid"] for sym in line.split()}
    summary.valid_unknown_letters = sorted(valid_letters - set(dictionary.symbols))


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


LABEL_EXTENSIONS = ("wrd", "ltr", "lang")
"""Label files beside a manifest (``train.wrd`` ...) that :func:`write_shar` stores with each cut."""


def write_shar(manifest: str | os.PathLike, out_dir: str | os.PathLike, *, shard_size: int = 1000,
               audio_format: str = "flac", progress: bool = True) -> dict[str, list[str]]:
    """Write a manifest's audio (and the label files beside it) as Lhotse Shar shards, readable by
    ``lhotse.CutSet.from_shar(in_dir=out_dir)`` and ``data.lhotse_shar=out_dir``.

    Each manifest row becomes one cut (id: its path relative to the root, one supervision over the whole
    recording), in manifest order, ``shard_size`` cuts per shard: ``cuts.NNNNNN.jsonl.gz`` and
    ``recording.NNNNNN.tar`` (audio re-encoded as ``audio_format``; FLAC is lossless). Label files beside the
    manifest (``train.wrd``, ``train.ltr``, ``train.lang``; one line per row) become custom fields of the cut
    (``wrd``, ``ltr``, ``lang``); the supervision's text is the ``.wrd`` line (else the ``.ltr`` line as words),
    its language the ``.lang`` line.

    Returns:
        ``{"cuts": [paths], "recording": [paths]}`` written.

    Raises:
        AudioError: an unreadable audio file (its path and manifest line named).
        ManifestError: a label file whose line count differs from the manifest's.
    """
    try:
        from lhotse import Recording, SupervisionSegment
        from lhotse.shar import SharWriter
    except ImportError as err:
        raise ImportError(f"--to-shar needs the 'lhotse' package ({err}): pip install 'xlsr[lhotse]'") from err
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    manifest = os.fspath(manifest)
    root, entries = read_manifest(manifest)
    stem = os.path.splitext(manifest)[0]
    labels: dict[str, list[str]] = {}
    for ext in LABEL_EXTENSIONS:
        path = f"{stem}.{ext}"
        if os.path.isfile(path):
            lines = read_text_lines(path)
            if len(lines) != len(entries):
                raise ManifestError(f"{path} has {len(lines)} line(s) but {manifest} has {len(entries)} row(s)")
            labels[ext] = [line.strip() for line in lines]
    os.makedirs(out_dir, exist_ok=True)
    with SharWriter(os.fspath(out_dir), fields={"recording": audio_format}, shard_size=shard_size) as writer:
        rows = tqdm(enumerate(entries), total=len(entries), desc="writing shar", unit="cut", disable=not progress)
        for row, (rel_path, _) in rows:
            path = os.path.join(root, rel_path)
            where = f"{path} ({manifest} line {row + 2})"
            if not os.path.isfile(path):
                raise AudioError(where, "file not found")
            try:
                recording = Recording.from_file(path, recording_id=rel_path)
            except Exception as err:  # lhotse's backends raise many kinds
                raise AudioError(where, f"cannot read ({type(err).__name__}: {str(err).strip()[:300]})") from err
            cut = recording.to_cut()
            custom = {ext: lines[row] for ext, lines in labels.items()}
            if custom:
                text = custom.get("wrd") or (letters_to_words(custom["ltr"]) if "ltr" in custom else None)
                cut.supervisions = [SupervisionSegment(id=rel_path, recording_id=rel_path, start=0.0,
                                                       duration=recording.duration, channel=recording.channel_ids[0],
                                                       text=text, language=custom.get("lang"))]
                cut.custom = custom
            try:
                writer.write(cut)
            except Exception as err:  # decoding for the tar happens here
                raise AudioError(where, f"cannot decode ({type(err).__name__}: {str(err).strip()[:300]})") from err
    return writer.output_paths


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m xlsr.manifest",
        description="Write fairseq-style train.tsv / valid.tsv manifests for a folder of audio.",
    )
    parser.add_argument("root", metavar="AUDIO_DIR",
                        help="folder searched recursively for audio files (with --to-shar: a manifest, train.tsv)")
    parser.add_argument("--dest", default=".", help="output folder for train.tsv and valid.tsv")
    parser.add_argument("--valid-percent", type=float, default=0.01, help="fraction (0..1) of files put in valid.tsv")
    parser.add_argument("--ext", default=",".join(DEFAULT_EXTENSIONS), help="comma-separated extensions to include")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/valid split")
    parser.add_argument("--path-must-contain", default=None, help="keep only paths containing this text")
    parser.add_argument("--workers", type=int, default=8, help="threads reading headers")
    parser.add_argument(
        "--transcripts",
        metavar="TABLE",
        default=None,
        help="relative/path<TAB>text table: also write train/valid .wrd and .ltr, and dict.ltr.txt (CTC fine-tuning)",
    )
    parser.add_argument("--keep-case", action="store_true", help="with --transcripts: do not upper-case the text")
    parser.add_argument(
        "--drop-missing-transcripts",
        action="store_true",
        help="with --transcripts: leave audio without a transcript out of the manifests instead of failing",
    )
    parser.add_argument("--to-shar", metavar="DIR", default=None,
                        help="turn the manifest AUDIO_DIR names (and its .wrd/.ltr/.lang files) into Lhotse Shar "
                             "shards in DIR, instead of writing manifests")
    parser.add_argument("--shard-size", type=int, default=1000, help="with --to-shar: cuts per shard")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    if args.to_shar is not None:
        return _to_shar_main(args)
    extensions = [ext.strip() for ext in args.ext.split(",") if ext.strip()]
    try:
        transcripts = None
        if args.transcripts is not None:
            transcripts = read_transcript_table(args.transcripts, keep_case=args.keep_case)
        elif args.keep_case or args.drop_missing_transcripts:
            raise ValueError("--keep-case and --drop-missing-transcripts need --transcripts")
        summary = write_manifest(
            args.root,
            args.dest,
            valid_percent=args.valid_percent,
            extensions=extensions,
            seed=args.seed,
            path_must_contain=args.path_must_contain,
            num_workers=args.workers,
            transcripts=transcripts,
            drop_missing_transcripts=args.drop_missing_transcripts,
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
    if transcripts is not None:
        for path in summary.no_transcript:
            print(f"left out {path}: no transcript", file=sys.stderr)
        print(
            f"wrote train/valid .wrd and .ltr and {os.path.join(args.dest, 'dict.ltr.txt')} "
            f"({summary.dictionary_size} symbols with the 4 specials); left out {len(summary.no_transcript)} file(s) "
            f"without a transcript"
        )
        if summary.unused_transcripts:
            print(f"warning: {summary.unused_transcripts} transcript(s) match no manifest file", file=sys.stderr)
        if summary.valid_unknown_letters:
            print(
                f"warning: valid.ltr holds letters missing from dict.ltr.txt (train): "
                f"{' '.join(summary.valid_unknown_letters)}",
                file=sys.stderr,
            )
    if len(summary.sample_rates) > 1:
        print(f"warning: mixed sample rates (Hz: files): {dict(summary.sample_rates)}", file=sys.stderr)
    if summary.channels.keys() - {1}:
        print(f"warning: not all files are mono (channels: files): {dict(summary.channels)}", file=sys.stderr)
    if summary.num_train + summary.num_valid == 0:
        print(f"error: no readable audio with extensions {extensions} under {summary.root}", file=sys.stderr)
        return 1
    return 0


def _to_shar_main(args: argparse.Namespace) -> int:
    """``--to-shar``: the manifest ``args.root`` -> Shar shards in ``args.to_shar``."""
    try:
        written = write_shar(args.root, args.to_shar, shard_size=args.shard_size)
    except (ValueError, FileNotFoundError, ImportError) as err:  # AudioError and ManifestError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written['cuts'])} shard(s) to {args.to_shar} (cuts.NNNNNN.jsonl.gz + recording.NNNNNN.tar)")
    return 0


def _majority(counter: collections.Counter) -> int:
    return counter.most_common(1)[0][0] if counter else 16000


if __name__ == "__main__":
    sys.exit(main())
