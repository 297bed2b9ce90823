"""``python -m xlsr.classify MODEL AUDIO... [--manifest M [--score [--labels lang]]] [--top-k K]
[--crop-seconds S] [--batch-seconds S] [--device D] [--output out.jsonl [--resume]]``

Utterance classification (language ID, speaker, emotion) with any checkpoint
``Wav2Vec2ForSequenceClassification.from_pretrained`` reads (a Hugging Face folder, fairseq
``wav2vec_classification`` .pt, ours). Files are read, sorted by length and batched as ``xlsr.transcribe`` does
(``xlsr.inference``).

Long files: a file longer than ``--crop-seconds`` (default 10; 0 = whole files) is scored on consecutive crops of
exactly that length, the last one ending at the file's end (it overlaps the one before unless the length divides
evenly), cut from the file's model input (normalised over the whole file where the model normalises, as fairseq's
dataset does before its crops); its logits are the mean of the crops' logits, and its probabilities the softmax
of that mean. fairseq's ``--infer-xtimes X --infer-max-sample-size N`` (``examples/wav2vec/gen_audio_embedding.py``)
takes X random crops of N samples and stores every crop's logits (averaged downstream); ``examples/mms/lid/infer.py``
scores one random crop. These crops are deterministic and cover the whole file.

Output: one JSON line per file, ``{"index": i, "path": ..., "label": best label, "score": its probability,
"top_k": [{"label": ..., "score": ...}, ...] (best first), "crops": n}``, to ``--output`` (flushed after every batch,
``--resume`` as in ``xlsr.transcribe``); without ``--output`` a table (index, path, label, score, top-k) goes to
standard output. A file that cannot be used is ``{"index": i, "path": ..., "error": "<path>: <reason>"}`` (a table
row with ``error``), logged, and makes the exit status 1 (2 for a bad command line, model, manifest or label file).

``--score`` (with ``--manifest``): the references are the label file beside the manifest (``test.tsv`` ->
``test.lang``, or another extension with ``--labels``; one label per row, fairseq's ``audio_classification``
layout); each line also holds its ``reference``, and the accuracy and macro-F1
(``xlsr.finetune.classification_scores``) over the files classified are printed at the end (to standard error when
the results go to standard output)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from xlsr.classification import Wav2Vec2ForSequenceClassification
from xlsr.finetune.classification_scores import classification_scores
from xlsr.finetune.labels import label_path
from xlsr.inference import (
    InputError,
    add_input_arguments,
    check_input_arguments,
    json_line,
    write_results,
    iter_audio_batches,
    length_sorted_batches,
    manifest_paths,
    open_results,
    pad_batch,
    read_finished_lines,
)
from xlsr.text import normalize_unicode, read_text_lines

logger = logging.getLogger("xlsr.classify")


@dataclass
class Prediction:
    """One file's result: ``top_k`` (label, probability) pairs, best first, and the number of ``crops`` it was
    scored on; or ``error`` (a message naming the file) when it could not be used.

    ``index``: the file's position in the list given to :func:`iter_predictions`; ``logits``: (num_labels,) the mean
    of its crops' logits; ``exception``: the error raised.
    """

    index: int
    path: str
    top_k: list[tuple[str, float]] | None = None
    crops: int = 0
    logits: torch.Tensor | None = field(default=None, repr=False, compare=False)
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str | None:
        return None if self.top_k is None else self.top_k[0][0]


def crop_starts(num_samples: int, crop_samples: int | None) -> list[int]:
    """First sample of each crop of a file of ``num_samples``: 0, c, 2c, ... with the last crop ending at the end of
    the file (c = ``crop_samples``); ``[0]`` (the whole file) when it is not longer than c or c is None."""
    if crop_samples is None or num_samples <= crop_samples:
        return [0]
    starts = list(range(0, num_samples - crop_samples, crop_samples))
    return starts + [num_samples - crop_samples]


@torch.inference_mode()
def iter_predictions(model: Wav2Vec2ForSequenceClassification, paths: Sequence[str], *, top_k: int = 1,
                     crop_seconds: float | None = 10.0, batch_seconds: float = 60.0, device: str = "cpu",
                     progress: bool = True) -> Iterator[list[Prediction]]:
    """Classify the audio files ``paths``, yielding each batch's results as soon as they are scored.

    Args:
        crop_seconds: files longer than this are scored on :func:`crop_starts` crops whose logits are averaged;
            None: whole files.
        batch_seconds: padded audio per forward, of files (``xlsr.inference.iter_audio_batches``) and of crops.

    Yields:
        Lists of :class:`Prediction` in input order within each list (first those whose header cannot be read,
        then one list per batch, longest audio first); every path appears exactly once.
    """
    rate = model.cfg.encoder.sample_rate
    batch_samples = int(batch_seconds * rate)
    crop_samples = None if crop_seconds is None else int(round(crop_seconds * rate))
    top_k = min(top_k, len(model.labels))
    model = model.to(device).eval()
    for batch in iter_audio_batches(paths, model.cfg.encoder, batch_samples=batch_samples, progress=progress,
                                    desc="classify"):
        results = [Prediction(index, paths[index], error=str(err), exception=err) for index, err in batch.failed]
        if batch.waveforms:
            pieces, owners = [], []  # every crop of every file in the batch, and the file (row) it is from
            for row, wav in enumerate(batch.waveforms):
                for start in crop_starts(wav.shape[0], crop_samples):
                    pieces.append(wav[start: start + (crop_samples or wav.shape[0])])
                    owners.append(row)
            owners_t = torch.tensor(owners)
            logit_sum = torch.zeros(len(batch.waveforms), len(model.labels), dtype=torch.float64)
            for chunk in length_sorted_batches([p.shape[0] for p in pieces], batch_samples):
                source, padding_mask = pad_batch([pieces[i] for i in chunk])
                logits = model(source.to(device), None if padding_mask is None else padding_mask.to(device)).logits
                logit_sum.index_add_(0, owners_t[chunk], logits.double().cpu())
            crops = torch.bincount(owners_t, minlength=len(batch.waveforms))
            mean_logits = (logit_sum / crops[:, None]).float()
            probs, best = mean_logits.softmax(-1).topk(top_k, dim=-1)
            for row, index in enumerate(batch.indices):
                pairs = [(model.labels[j], p) for j, p in zip(best[row].tolist(), probs[row].tolist())]
                results.append(Prediction(index, paths[index], top_k=pairs, crops=int(crops[row]),
                                          logits=mean_logits[row]))
        results.sort(key=lambda item: item.index)
        yield results


# ---------------------------------------------------------------------------------------------- command line
def _references(manifest: str, labels: str, num_rows: int) -> list[str]:
    """The label of each manifest row, from the file beside it (``test.tsv`` -> ``test.{labels}``)."""
    path = label_path(manifest, labels)
    try:
        rows = [line.strip() for line in read_text_lines(path)]
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err})") from None
    if len(rows) != num_rows:
        raise InputError(f"{path}: {len(rows)} labels for the {num_rows} rows of {manifest}")
    empty = [number for number, label in enumerate(rows, start=1) if not label]
    if empty:
        raise InputError(f"{path}:{empty[0]}: empty label ({len(empty)} empty line(s))")
    return rows


def _table_row(record: dict) -> str:
    if "error" in record:
        return f"{record['index']}\t{record['path']}\terror\t{record['error']}\n"
    top = " ".join(f"{item['label']}:{item['score']:.4f}" for item in record["top_k"])
    return f"{record['index']}\t{record['path']}\t{record['label']}\t{record['score']:.4f}\t{top}\n"


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xlsr.classify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser, "classification checkpoint (Hugging Face folder, fairseq .pt, or ours)",
                        output_help="JSON lines file (default: a table on standard output)",
                        resume_help="keep the results already in --output and classify only the other files")
    parser.add_argument("--top-k", type=int, default=5, help="labels (with probabilities) per file (default 5)")
    parser.add_argument("--crop-seconds", type=float, default=10.0,
                        help="score longer files on crops of this length, logits averaged (default 10; 0 = off)")
    parser.add_argument("--score", action="store_true",
                        help="accuracy and macro-F1 against the labels beside --manifest (test.tsv -> test.lang)")
    parser.add_argument("--labels", default="lang", help="extension of the label file of --score (default lang)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    check_input_arguments(parser, args)
    if args.top_k < 1:
        parser.error(f"--top-k must be positive, got {args.top_k}")
    if args.crop_seconds < 0:
        parser.error("--crop-seconds must be >= 0 (0 = whole files)")
    try:
        paths = list(args.audio) + (manifest_paths(args.manifest) if args.manifest else [])
        references = _references(args.manifest, args.labels, len(paths)) if args.score else None
        resuming = args.resume and os.path.isfile(args.output)
        done = read_finished_lines(args.output, "label", "classify") if resuming else {}
    except (InputError, OSError, ValueError) as err:  # ManifestError: a ValueError naming file and line
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: {args.manifest}: no files in the manifest", file=sys.stderr)
        return 2
    try:
        model = Wav2Vec2ForSequenceClassification.from_pretrained(args.model)
    except (OSError, ValueError) as err:  # no such checkpoint, not a classifier: errors that name it
        print(f"error: cannot load the model {args.model}: {err}", file=sys.stderr)
        return 2
    if references is not None:
        unknown = sorted(set(references) - set(model.labels))
        if unknown:
            logger.warning("labels the model does not have (always counted wrong): %s", ", ".join(unknown[:10]))

    predicted: dict[int, str] = {}  # input index -> label, of this run and the resumed one
    todo = []
    for index, path in enumerate(paths):
        if path in done:
            predicted[index] = normalize_unicode(done[path]["label"])
        else:
            todo.append(index)
    if args.resume:
        logger.info("%s: %d of %d files already classified, %d to go", args.output, len(predicted), len(paths),
                    len(todo))

    def fill(index: int, item, record: dict) -> None:
        predicted[index] = item.label
        record.update(label=item.label, score=item.top_k[0][1], crops=item.crops,
                      top_k=[{"label": label, "score": score} for label, score in item.top_k])

    with open_results(args.output, args.resume, done) as stream:
        if args.output is None:
            stream.write("index\tpath\tlabel\tscore\ttop_k\n")
        batches = iter_predictions(model, [paths[i] for i in todo], top_k=args.top_k,
                                   crop_seconds=args.crop_seconds or None, batch_seconds=args.batch_seconds,
                                   device=args.device, progress=not args.no_progress)
        failed = write_results(stream, batches, todo, fill, references=references,
                               format_line=json_line if args.output else _table_row, log=logger)
    if args.output:
        logger.info("wrote %d results to %s", len(todo) - failed, args.output)
    if failed:
        logger.error("%d of %d files could not be classified (their error lines name them)", failed, len(todo))
    if references is not None:
        scored = sorted(predicted)
        scores = classification_scores([references[i] for i in scored], [predicted[i] for i in scored])
        note = f" (not scored: {failed} failed)" if failed else ""
        print(f"scored {scores.total} files against {label_path(args.manifest, args.labels)}{note}: accuracy "
              f"{100 * scores.accuracy:.2f} % ({scores.correct} / {scores.total}), macro-F1 "
              f"{100 * scores.macro_f1:.2f} % over {len(scores.f1)} classes",
              file=sys.stdout if args.output else sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
