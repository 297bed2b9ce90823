"""What the inference command lines share (``xlsr.transcribe``, ``xlsr.classify``, ``xlsr.features``).

- Input: audio arguments then a fairseq manifest's rows (:func:`manifest_paths`); each file's length from its
  header, files sorted by length and batched up to a number of padded samples (:func:`length_sorted_batches`),
  read with the checks of training (:func:`iter_audio_batches`), zero padded (:func:`pad_batch`).
- Output: JSON lines flushed after every batch; ``--resume`` keeps the finished lines of an earlier run
  (:func:`read_finished_lines`, :func:`open_results`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

import torch
from tqdm import tqdm

from xlsr.audio import AudioError, audio_info, load_audio, normalize_waveform
from xlsr.files import write_text_atomic
from xlsr.manifest import read_manifest
from xlsr.modules.feature_encoder import receptive_field
from xlsr.text import read_text_file

logger = logging.getLogger("xlsr.inference")

__all__ = ["InputError", "AudioBatch", "manifest_paths", "length_sorted_batches", "pad_batch", "iter_audio_batches",
           "read_finished_lines", "open_results"]


class InputError(Exception):
    """A bad manifest, label or output file: one line on standard error, exit status 2."""


def add_input_arguments(parser: argparse.ArgumentParser, model_help: str, *, output_help: str | None = None,
                        resume_help: str | None = None) -> None:
    """The arguments every inference tool takes: ``model``, ``audio...``, ``--manifest``, ``--batch-seconds``,
    ``--device``, ``--no-progress``; with ``output_help`` also ``--output``, with ``resume_help`` ``--resume``."""
    parser.add_argument("model", help=model_help)
    parser.add_argument("audio", nargs="*", help="audio files")
    parser.add_argument("--manifest", help="a fairseq manifest (train.tsv layout) of more files")
    parser.add_argument("--batch-seconds", type=float, default=60.0, help="padded audio per batch (default 60)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if output_help is not None:
        parser.add_argument("--output", help=output_help)
    if resume_help is not None:
        parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_input_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` (exit 2, one line) for the inputs :func:`add_input_arguments` added: no audio at all,
    ``--score`` without ``--manifest`` or with files, ``--resume`` without ``--output``, ``--batch-seconds`` <= 0."""
    if not args.audio and not args.manifest:
        parser.error("no audio: give files and/or --manifest")
    if getattr(args, "score", False) and (args.manifest is None or args.audio):
        parser.error("--score scores the files of --manifest against its labels: give --manifest and no audio files")
    if getattr(args, "resume", False) and args.output is None:
        parser.error("--resume needs --output (the file to continue)")
    if args.batch_seconds <= 0:
        parser.error(f"--batch-seconds must be positive, got {args.batch_seconds}")


def manifest_paths(manifest: str) -> list[str]:
    """The audio paths of a fairseq manifest's rows (root folder joined), in row order."""
    root, entries = read_manifest(manifest)
    return [os.path.join(root, rel) for rel, _ in entries]


def length_sorted_batches(lengths: Sequence[int], max_samples: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches of similar length, each with (items x longest) <= max_samples (at least
    one item per batch), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_samples:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def pad_batch(waveforms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad (S_i,) waveforms with zeros: (B, S) and the (B, S) padding mask (True = pad; None if none)."""
    longest = max(w.shape[0] for w in waveforms)
    source = torch.zeros(len(waveforms), longest)
    padding_mask = torch.zeros(len(waveforms), longest, dtype=torch.bool)
    for row, wav in enumerate(waveforms):
        source[row, : wav.shape[0]] = wav
        padding_mask[row, wav.shape[0] :] = True
    return source, (padding_mask if padding_mask.any() else None)


@dataclass
class AudioBatch:
    """One batch of :func:`iter_audio_batches`.

    ``indices``: positions (in the given ``paths``) of the files read, ascending; ``waveforms``: their (S_i,)
    float32 model inputs (normalised where the model normalises); ``failed``: (position, error naming the file)
    of the files that could not be used.
    """

    indices: list[int] = field(default_factory=list)
    waveforms: list[torch.Tensor] = field(default_factory=list)
    failed: list[tuple[int, BaseException]] = field(default_factory=list)


def _windows(lengths: dict[int, int], window_samples: int | None) -> list[list[int]]:
    """The readable positions in runs of consecutive files of at most ``window_samples`` (one run when None)."""
    if window_samples is None:
        return [list(lengths)]
    runs: list[list[int]] = [[]]
    total = 0
    for index, length in lengths.items():
        if runs[-1] and total + length > window_samples:
            runs.append([])
            total = 0
        runs[-1].append(index)
        total += length
    return runs


def iter_audio_batches(paths: Sequence[str], encoder_cfg, *, batch_samples: int, window_samples: int | None = None,
                       progress: bool = True, desc: str = "") -> Iterator[AudioBatch]:
    """Read the audio files ``paths`` for a model of ``encoder_cfg`` (a ``Wav2Vec2Config``) in batches of similar
    length (``length_sorted_batches`` of the header lengths, at most ``batch_samples`` padded samples).

    Files are read as training reads them (other sample rates resampled where ``soxr`` is installed); a file that
    cannot be used (:class:`~xlsr.audio.AudioError`, ``soxr`` missing, fewer samples than one frame needs) is in
    some batch's ``failed``: every position appears exactly once. The first batch holds the files whose header
    cannot be read (and nothing else) when there are any.

    Args:
        window_samples: None: all files sorted by length (longest batch first). Otherwise the files are taken in
            runs of consecutive files of at most this many samples, each run sorted and batched and done before
            the next, so that a caller that writes in input order holds at most about one run of results.
        progress: a tqdm bar over the files, advanced when the caller asks for the next batch.
    """
    rate = encoder_cfg.sample_rate
    min_samples = receptive_field(encoder_cfg.conv_layers)
    lengths: dict[int, int] = {}
    unreadable = AudioBatch()
    for index, path in enumerate(paths):
        try:
            frames, file_rate, _ = audio_info(path)
        except AudioError as err:
            unreadable.failed.append((index, err))
            continue
        lengths[index] = int(round(frames * rate / file_rate))
    bar = tqdm(total=len(paths), unit="file", desc=desc) if progress else None
    if unreadable.failed:
        yield unreadable
        if bar is not None:
            bar.update(len(unreadable.failed))
    for window in _windows(lengths, window_samples):
        for batch in length_sorted_batches([lengths[i] for i in window], batch_samples):
            result = AudioBatch()
            for index in sorted(window[b] for b in batch):
                try:
                    wav = torch.from_numpy(load_audio(paths[index], rate, resample=True))
                    if wav.shape[0] < min_samples:
                        raise AudioError(paths[index], f"too short: {wav.shape[0]} samples at {rate} Hz, the model "
                                                       f"needs at least {min_samples} for one frame")
                except (AudioError, ImportError) as err:  # ImportError: soxr, named with the file and the fix
                    result.failed.append((index, err))
                    continue
                result.indices.append(index)
                result.waveforms.append(normalize_waveform(wav) if encoder_cfg.normalize else wav)
            yield result
            if bar is not None:
                bar.update(len(result.indices) + len(result.failed))
    if bar is not None:
        bar.close()


def read_finished_lines(path: str, result_key: str, tool: str) -> dict[str, dict]:
    """The finished lines of an earlier run's JSON lines output ``path`` (those whose ``result_key`` is a string),
    by audio path; error lines are left out, to be tried again. A last line torn by a kill is dropped with a
    warning; any other line that is not ``tool``'s is an :class:`InputError`."""
    try:
        text = read_text_file(path)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err}); not a {tool} output to resume") from None
    lines = text.split("\n")
    done: dict[str, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            valid = isinstance(record, dict) and isinstance(record.get("path"), str) and (
                isinstance(record.get(result_key), str) or "error" in record)
        except json.JSONDecodeError:
            valid = False
        if not valid:
            if number == len(lines):  # no newline after it: cut short by a kill
                logger.warning("%s:%d: dropped a torn last line (%d characters)", path, number, len(line))
                continue
            raise InputError(f"{path}:{number}: not a {tool} output line: {line[:80]!r}")
        if result_key in record:
            done[record["path"]] = record
    return done


@contextlib.contextmanager
def open_results(output: str | None, resume: bool, kept: dict[str, dict]) -> Iterator[TextIO]:
    """The stream the JSON lines go to: standard output without ``output``; else ``output`` truncated, or with
    ``resume`` rewritten with the ``kept`` lines only (no error lines, no torn line) and opened for appending.
    Closed on exit (standard output is left open)."""
    if output is None:
        yield sys.stdout
        return
    if resume:
        write_text_atomic(output, "".join(json_line(record) for record in kept.values()))
    else:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "a" if resume else "w", encoding="utf-8") as stream:
        yield stream


def json_line(record: dict) -> str:
    """One JSON line of a result (non-ASCII kept as is)."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_results(stream: TextIO, batches: Iterable[Sequence[Any]], todo: Sequence[int],
                  fill: Callable[[int, Any, dict], None], *, references: Sequence | None = None,
                  format_line: Callable[[dict], str] = json_line, log: logging.Logger = logger) -> int:
    """Write a record per result as each batch of results arrives (flushed per batch, so a stopped run keeps them).

    Args:
        batches: lists of results with ``index`` (into ``todo``), ``path`` and ``error`` (None when it worked).
        todo: the input index of each result's ``index``.
        fill: ``fill(input_index, result, record)`` adds a successful result's fields to its record.
        references: per input index, added as ``"reference"`` when given.
        log: the tool's logger, which logs each error.

    Returns:
        How many results were errors (each logged and written as an ``error`` record).
    """
    failed = 0
    for results in batches:
        lines = []
        for item in results:
            index = todo[item.index]
            record: dict = {"index": index, "path": item.path}
            if item.error is not None:
                failed += 1
                log.error("%s", item.error)
                record["error"] = item.error
            else:
                fill(index, item, record)
            if references is not None:
                record["reference"] = references[index]
            lines.append(format_line(record))
        stream.write("".join(lines))
        stream.flush()
    return failed
