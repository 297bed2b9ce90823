"""``python -m xlsr.transcribe MODEL AUDIO... [--manifest M [--score [--labels ltr|wrd]]] [--batch-seconds S]
[--device D] [--output out.jsonl [--resume]] [--lm LM [--lm-alpha A] [--lm-beta B] [--beam-width W]]``

CTC transcription with a fine-tuned model (any checkpoint ``Wav2Vec2ForCTC.from_pretrained`` reads: fairseq
``wav2vec_ctc`` .pt, a Hugging Face ``Wav2Vec2ForCTC`` folder, ours). Files are read with the same checks as
training (other sample rates are resampled where ``soxr`` is installed), sorted by length and batched up to
``--batch-seconds`` of padded audio.

Output: one JSON line per file, ``{"index": i, "path": ..., "text": ...}`` (``index``: the file's position in the
input, audio arguments first, then the manifest's rows), to ``--output`` or standard output. Lines are written in
the order the files are done (longest batch first; within a batch, in input order) and flushed after every batch,
so a run that is stopped or killed keeps every transcript finished before it: only the batch in progress is lost
(sort by ``index`` for the input order). ``--resume`` keeps the transcripts already in ``--output`` (a line torn by
a kill is dropped), transcribes only the other files (failed ones again) and appends them.

A file that cannot be used (missing, undecodable, empty, NaN samples, another sample rate without ``soxr``, or too
short for one frame of the model: under 400 samples for the usual conv stack) is written as
``{"index": i, "path": ..., "error": "<path>: <reason>"}`` and logged; the other files go on, and the exit status
is 1 when any failed (2 for a bad command line, model, LM, manifest or label file; 0 when all were transcribed).

``--score`` (with ``--manifest``): the references are the label file beside the manifest, read as fine-tuning
reads it (``test.tsv`` -> ``test.ltr``, or ``test.wrd`` with ``--labels wrd``); each line also holds its
``reference`` (null for an empty one), and the corpus WER and CER (percent, ``xlsr.finetune.wer``: the definition of
fine-tuning's validation) are printed at the end over the files transcribed (failed ones and empty references are
counted, not scored), to standard output, or to standard error when the transcripts go to standard output.
fairseq's ``examples/speech_recognition/infer.py`` prints the WER only, from its own edit distance.

Decoding is greedy by default (fairseq's ``viterbi`` decoder). With ``--lm`` (a KenLM n-gram model, ARPA or
binary, spelt like the model's vocabulary) it is a beam search of ``--beam-width`` hypotheses scoring acoustic
log-prob + ``--lm-alpha`` x LM log-prob + ``--lm-beta`` x words (pyctcdecode + kenlm: ``pip install "xlsr[lm]"``;
``xlsr.lm_decode``). The beam search runs on the CPU, one utterance at a time."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from xlsr.ctc import Wav2Vec2ForCTC
from xlsr.finetune.labels import label_path, read_labels
from xlsr.finetune.wer import error_counts
from xlsr.inference import (
    InputError,
    add_input_arguments,
    check_input_arguments,
    write_results,
    iter_audio_batches,
    manifest_paths,
    open_results,
    pad_batch,
    read_finished_lines,
)
from xlsr.lm_decode import LMDecoder
from xlsr.vocabulary import letters_to_words

logger = logging.getLogger("xlsr.transcribe")


@dataclass
class Transcript:
    """One file's result: its ``text``, or ``error`` (a message naming the file) when it could not be used.

    ``index``: the file's position in the list given to :func:`iter_transcripts`; ``exception``: the error raised.
    """

    index: int
    path: str
    text: str | None = None
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)


def _failed(index: int, path: str, err: BaseException) -> Transcript:
    return Transcript(index, path, error=str(err), exception=err)


@torch.inference_mode()
def iter_transcripts(model, paths: Sequence[str], *, batch_seconds: float = 60.0, device: str = "cpu",
                     progress: bool = True, decoder: LMDecoder | None = None) -> Iterator[list[Transcript]]:
    """Transcribe the audio files ``paths`` with a ``Wav2Vec2ForCTC``, yielding each batch's results as soon as
    they are decoded (greedy, or the ``decoder``'s LM beam search built for ``model.vocab``).

    Yields:
        Lists of :class:`Transcript`, in input order within each list: first those whose header cannot be read,
        then one list per batch (longest audio first). A file that cannot be used (:class:`~xlsr.audio.AudioError`,
        ``soxr`` missing for another sample rate, fewer samples than one frame needs) has ``error`` set; every
        path appears exactly once.
    """
    model = model.to(device).eval()
    batch_samples = int(batch_seconds * model.cfg.encoder.sample_rate)
    for batch in iter_audio_batches(paths, model.cfg.encoder, batch_samples=batch_samples, progress=progress,
                                    desc="transcribe"):
        results = [_failed(index, paths[index], err) for index, err in batch.failed]
        if batch.waveforms:
            source, padding_mask = pad_batch(batch.waveforms)
            out = model(source.to(device), None if padding_mask is None else padding_mask.to(device))
            texts = model.decode(out) if decoder is None else decoder.decode(out.log_probs, out.lengths)
            results += [Transcript(index, paths[index], text=text) for index, text in zip(batch.indices, texts)]
        results.sort(key=lambda item: item.index)
        yield results


def transcribe(model, paths: Sequence[str], *, batch_seconds: float = 60.0, device: str = "cpu",
               progress: bool = True, decoder: LMDecoder | None = None) -> list[str]:
    """Transcripts of the audio files ``paths`` (in that order): :func:`iter_transcripts` collected.

    Raises:
        AudioError: the first file that cannot be used (ImportError: another sample rate without ``soxr``).
    """
    texts: list[str] = [""] * len(paths)
    for results in iter_transcripts(model, paths, batch_seconds=batch_seconds, device=device, progress=progress,
                                    decoder=decoder):
        for item in results:
            if item.exception is not None:
                raise item.exception
            texts[item.index] = item.text
    return texts


# ---------------------------------------------------------------------------------------------- command line
def _references(manifest: str, labels: str, num_rows: int) -> list[str | None]:
    """The reference words of each manifest row (None for an empty transcript), as fine-tuning's validation
    makes them: the label file's letters -> words."""
    with warnings.catch_warnings(record=True) as caught:  # (empty transcripts: counted in the score line)
        warnings.simplefilter("always")
        rows = read_labels(manifest, labels, num_rows, skip_empty=True)
    for warning in caught:
        logger.warning("%s", warning.message)
    return [None if tokens is None else letters_to_words(" ".join(tokens)) for tokens in rows]


def _score_line(pairs: list[tuple[str, str]], failed: int, unreferenced: int, labels_path: str) -> str:
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    word_edits, words = error_counts(refs, hyps, unit="word")
    char_edits, chars = error_counts(refs, hyps, unit="char")
    percent = lambda e, n: f"{100.0 * e / n:.2f} %" if n else "nan"  # noqa: E731
    notes = [f"{failed} failed" if failed else "", f"{unreferenced} with an empty reference" if unreferenced else ""]
    notes = "; ".join(note for note in notes if note)
    return (f"scored {len(pairs)} utterances against {labels_path}" + (f" (not scored: {notes})" if notes else "")
            + f": WER {percent(word_edits, words)} ({word_edits} errors / {words} words), "
            f"CER {percent(char_edits, chars)} ({char_edits} errors / {chars} characters)")


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xlsr.transcribe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser, "fine-tuned checkpoint (fairseq .pt, Hugging Face folder, or ours)",
                        output_help="JSON lines file (default: standard output)",
                        resume_help="keep the transcripts already in --output and transcribe only the other files")
    parser.add_argument("--score", action="store_true",
                        help="WER/CER against the labels beside --manifest (test.tsv -> test.ltr / test.wrd)")
    parser.add_argument("--labels", choices=("ltr", "wrd"), default="ltr",
                        help="label file of --score: letters (.ltr, default) or words (.wrd)")
    parser.add_argument("--lm", help="KenLM n-gram model (ARPA or binary) for beam search (default: greedy)")
    parser.add_argument("--lm-alpha", type=float, default=0.5, help="LM weight (default 0.5)")
    parser.add_argument("--lm-beta", type=float, default=1.0, help="word insertion bonus (default 1.0)")
    parser.add_argument("--beam-width", type=int, default=100, help="beam search hypotheses (default 100)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    check_input_arguments(parser, args)
    if args.beam_width < 1:
        parser.error(f"--beam-width must be positive, got {args.beam_width}")
    try:
        paths = list(args.audio) + (manifest_paths(args.manifest) if args.manifest else [])
        references = _references(args.manifest, args.labels, len(paths)) if args.score else None
        resuming = args.resume and os.path.isfile(args.output)
        done = read_finished_lines(args.output, "text", "transcribe") if resuming else {}
    except (InputError, OSError, ValueError) as err:  # ManifestError, LabelError: ValueErrors naming file and line
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: {args.manifest}: no files in the manifest", file=sys.stderr)
        return 2
    if args.lm is not None and not os.path.isfile(args.lm):
        print(f"error: no such LM file: {args.lm}", file=sys.stderr)
        return 2

    try:
        model = Wav2Vec2ForCTC.from_pretrained(args.model)
    except (OSError, ValueError) as err:  # no such checkpoint, not a CTC model: errors that name it
        print(f"error: cannot load the model {args.model}: {err}", file=sys.stderr)
        return 2
    decoder = None
    if args.lm is not None:
        logging.getLogger("pyctcdecode").setLevel(logging.WARNING)  # not its alphabet / ARPA-is-slow notes
        try:
            decoder = LMDecoder(model.vocab, args.lm, blank_index=model.blank_index, alpha=args.lm_alpha,
                                beta=args.lm_beta, beam_width=args.beam_width)
        except ImportError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except OSError as err:  # kenlm: not an ARPA / binary LM
            print(f"error: cannot read the LM {args.lm}: {err}", file=sys.stderr)
            return 2

    texts: dict[int, str] = {}  # input index -> transcript, of this run and the resumed one
    todo = []
    for index, path in enumerate(paths):
        if path in done:
            texts[index] = done[path]["text"]
        else:
            todo.append(index)
    if args.resume:
        logger.info("%s: %d of %d files already transcribed, %d to go", args.output, len(texts), len(paths), len(todo))

    def fill(index: int, item, record: dict) -> None:
        texts[index] = record["text"] = item.text

    with open_results(args.output, args.resume, done) as stream:
        batches = iter_transcripts(model, [paths[i] for i in todo], batch_seconds=args.batch_seconds,
                                   device=args.device, progress=not args.no_progress, decoder=decoder)
        failed = write_results(stream, batches, todo, fill, references=references, log=logger)
    if args.output:
        logger.info("wrote %d transcripts to %s", len(todo) - failed, args.output)
    if failed:
        logger.error("%d of %d files could not be transcribed (their error lines name them)", failed, len(todo))
    if references is not None:
        pairs = [(references[i], texts[i]) for i in sorted(texts) if references[i] is not None]
        unreferenced = sum(1 for i in texts if references[i] is None)
        summary = _score_line(pairs, failed, unreferenced, label_path(args.manifest, args.labels))
        print(summary, file=sys.stdout if args.output else sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
