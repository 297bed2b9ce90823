"""The demo's second step: CTC fine-tuning of the pretrained tiny model on the demo's transcribed speech.

:func:`finetune_and_report` fine-tunes with the engine running :class:`xlsr.tasks.ctc.CTCTask` for a time budget, with
settings that let a 0.4M-parameter model learn on a CPU within minutes (the encoder trains from the first update,
almost no masking, no LayerDrop, a high learning rate held after 100 warm-up updates), and prints the greedy WER
and CER on the valid set and on training utterances before and after, the learning curve, and two transcripts of
:func:`xlsr.transcribe.transcribe` with the saved model.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Sequence

from xlsr.ctc import Wav2Vec2ForCTC
from xlsr.demo.plots import PLOT_HINT, finetune_panels, read_metrics, save_curves
from xlsr.demo.train import learning_curve
from xlsr.finetune.config import compose_config
from xlsr.finetune.wer import error_counts, rate
from xlsr.manifest import read_manifest
from xlsr.tasks.ctc import CTCTask
from xlsr.training.trainer import Trainer
from xlsr.transcribe import transcribe

FINETUNE_PNG = "finetune_curve.png"

__all__ = ["FINETUNE_PNG", "finetune_overrides", "finetune_and_report", "greedy_errors"]


def finetune_overrides(data_dir: Path, init_from: Path, output_dir: Path, minutes: float) -> list[str]:
    """The demo's fine-tuning settings (hydra overrides of ``python -m xlsr.finetune``)."""
    return [
        f"model.init_from={init_from}",
        f"data.manifest={data_dir / 'train.tsv'}",
        f"data.valid_manifest={data_dir / 'valid.tsv'}",
        f"output_dir={output_dir}",
        f"max_time_minutes={minutes}",
        "optim.max_update=100000",  # the time budget ends the run long before
        "optim.phase_ratio=[0.001,0.999,0.0]",  # 100 warm-up updates, then the peak learning rate
        "optim.lr=0.005",
        "model.freeze_finetune_updates=0",  # the tiny encoder trains from the start
        "model.mask_prob=0.05",
        "model.mask_channel_prob=0.0",
        "model.encoder_layerdrop=0.0",
        "data.max_tokens=320000",  # 20 s of padded audio per update
        "data.unk=true",  # a valid letter missing from the training transcripts becomes <unk>
        "log_interval=10",
        "validate_interval_updates=100",
        "checkpoint.save_interval_updates=500",
        "checkpoint.resume=never",
        "tensorboard=false",
        # the trainer's tqdm bar shows pretraining's accuracy, which CTC records lack (KeyError): the validation
        # lines every 100 updates show the progress instead
        "progress_bar=false",
    ]


def _rows(data_dir: Path, split: str) -> list[tuple[str, str]]:
    """``(absolute audio path, transcript)`` of ``data_dir/{split}.tsv`` and ``.wrd``."""
    root, entries = read_manifest(data_dir / f"{split}.tsv")
    words = (data_dir / f"{split}.wrd").read_text(encoding="utf-8").splitlines()
    if len(words) != len(entries):
        raise ValueError(f"{data_dir / split}.wrd: {len(words)} lines for {len(entries)} manifest rows")
    return [(os.path.join(root, rel), text) for (rel, _), text in zip(entries, words)]


def _spread(rows: Sequence, count: int) -> list:
    """``count`` rows spread evenly over ``rows`` (all of them when there are fewer)."""
    if len(rows) <= count:
        return list(rows)
    return [rows[(k * len(rows)) // count] for k in range(count)]


def greedy_errors(model, rows: Sequence[tuple[str, str]], device: str = "cpu") -> dict[str, float]:
    """Greedy ``wer`` and ``cer`` (%) of a ``Wav2Vec2ForCTC`` on ``(path, reference)`` rows, via
    :func:`xlsr.transcribe.transcribe`; also their ``hypotheses``."""
    was_training = model.training
    hypotheses = transcribe(model, [path for path, _ in rows], device=device, progress=False)
    model.train(was_training)
    references = [ref for _, ref in rows]
    return {
        "wer": 100.0 * rate([error_counts(references, hypotheses, unit="word")]),
        "cer": 100.0 * rate([error_counts(references, hypotheses, unit="char")]),
        "hypotheses": hypotheses,
    }


def _pick_examples(rows: Sequence[tuple[str, str]], count: int = 2) -> list[tuple[str, str]]:
    """A few valid rows: one of each source first (Asterisk prompt, espeak-ng sentence), then in order."""
    picked = []
    for marker in (f"{os.sep}asr{os.sep}", f"{os.sep}tts_"):
        first = next((r for r in rows if marker in r[0] and r not in picked), None)
        if first is not None:
            picked.append(first)
    picked += [r for r in rows if r not in picked]
    return picked[:count]


def finetune_and_report(data_dir: Path, init_from: Path, output_dir: Path, minutes: float,
                        overrides: Sequence[str] = (), *, train_eval_utterances: int = 40,
                        png_dir: Path | None = None) -> dict:
    """Fine-tune ``init_from`` (a pretrained model folder) for CTC on ``data_dir/{train,valid}.tsv`` (with
    ``.ltr`` / ``.wrd`` and ``dict.ltr.txt`` beside them) for ``minutes``, writing into ``output_dir``, and print
    the report. ``overrides`` are extra hydra overrides after the demo's settings; the learning-curve PNG goes to
    ``png_dir`` (default: ``output_dir``'s parent).

    Returns ``{"updates", "minutes", "before", "after", "png", "model", "examples"}``: ``before`` / ``after`` hold
    ``valid`` (``trainer.validate()``: ``loss``, ``nll_loss``, ``wer``, ``cer``) and ``train`` (greedy ``wer`` /
    ``cer`` on up to ``train_eval_utterances`` training utterances); ``examples`` are
    ``(path, reference, hypothesis)`` of two valid files transcribed with the saved model.
    """
    data_dir, output_dir = Path(data_dir).resolve(), Path(output_dir)
    if minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    cfg = compose_config([*finetune_overrides(data_dir, Path(init_from).resolve(), output_dir, minutes), *overrides])
    train_rows = _spread(_rows(data_dir, "train"), train_eval_utterances)
    valid_rows = _rows(data_dir, "valid")
    if not valid_rows:
        raise ValueError(f"{data_dir / 'valid.tsv'} lists no utterance: the report needs a valid set")

    trainer = Trainer(cfg, CTCTask(cfg))
    device = str(trainer.device)
    before = {"valid": trainer.validate(), "train": greedy_errors(trainer.model, train_rows, device)}
    start = time.monotonic()
    trainer.train()
    elapsed = (time.monotonic() - start) / 60
    out = trainer.output_dir.resolve()
    valid_records = read_metrics(out / "metrics.jsonl", "valid")
    last_valid = valid_records[-1] if valid_records and valid_records[-1]["update"] == trainer.num_updates else None
    after = {"valid": last_valid or trainer.validate(), "train": greedy_errors(trainer.model, train_rows, device)}

    model = Wav2Vec2ForCTC.from_pretrained(out / "model")
    examples = _pick_examples(valid_rows)
    hypotheses = transcribe(model, [path for path, _ in examples], device=device, progress=False)
    examples = [(path, ref, hyp) for (path, ref), hyp in zip(examples, hypotheses)]

    hours = sum(n for _, n in read_manifest(data_dir / "train.tsv")[1]) / trainer.model_cfg.sample_rate / 3600
    print()
    print(f"fine-tuned the pretrained model for CTC for {trainer.num_updates} updates ({elapsed:.1f} min) on "
          f"{len(_rows(data_dir, 'train'))} transcribed utterances ({hours:.2f} h, {len(trainer.task.dictionary)} "
          f"output symbols), {data_dir}")
    print(f"{'updates':>12}  {'CTC loss (bits/letter)':>22}")
    for row in learning_curve(out / "metrics.jsonl", keys=("nll_loss",)):
        print(f"{row['updates']:>12}  {row['nll_loss']:>22.3f}")
    print(f"greedy decoding, error rates in %      {'WER':>7}  {'CER':>7}")
    for when, result in (("before", before), ("after", after)):
        print(f"  valid ({len(valid_rows):>3} utterances), {when:<7}     "
              f"{_pct(result['valid'].get('wer')):>7}  {_pct(result['valid'].get('cer')):>7}")
        print(f"  train ({len(train_rows):>3} utterances), {when:<7}     "
              f"{_pct(result['train']['wer']):>7}  {_pct(result['train']['cer']):>7}")
    print("two valid files, transcribed by xlsr.transcribe with the fine-tuned model:")
    for path, ref, hyp in examples:
        print(f"  {path}\n    reference:  {ref}\n    hypothesis: {hyp if hyp else '(empty)'}")
    print(f"  fine-tuned model (Wav2Vec2ForCTC.from_pretrained, python -m xlsr.transcribe): {out / 'model'}")
    print(f"  metrics (JSONL): {out / 'metrics.jsonl'}")
    png_dir = Path(png_dir) if png_dir is not None else out.parent
    png = save_curves(png_dir / FINETUNE_PNG, f"CTC fine-tuning ({trainer.num_updates} updates)",
                      finetune_panels(out / "metrics.jsonl"))
    print(f"  learning curve: {png}" if png else f"  learning curve PNG: {PLOT_HINT}")
    for result in (before, after):
        result["train"].pop("hypotheses", None)
    return {"updates": trainer.num_updates, "minutes": elapsed, "before": before, "after": after, "png": png,
            "model": out / "model", "examples": examples}


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.1f}"
