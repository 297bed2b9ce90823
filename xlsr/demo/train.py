"""The demo's pretraining step: pretrain the tiny model on the demo corpus for a time budget, print its learning curve
(and draw it, :mod:`xlsr.demo.plots`)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Sequence

from xlsr.demo.plots import PLOT_HINT, pretrain_panels, save_curves
from xlsr.pretrain.config import compose_config
from xlsr.tasks.pretraining import PretrainingTask
from xlsr.training.trainer import Trainer

PRETRAIN_PNG = "pretrain_curve.png"


def learning_curve(metrics_file: Path, points: int = 8,
                   keys: Sequence[str] = ("loss", "code_perplexity", "accuracy")) -> list[dict[str, float]]:
    """The logged train updates split into ``points`` consecutive windows, each averaged over ``keys``."""
    train = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    size = max(1, -(-len(train) // points))  # ceil: at most ``points`` windows, none of the updates left out
    windows = [train[i : i + size] for i in range(0, len(train), size)]
    return [
        {"updates": f"{w[0]['update']}-{w[-1]['update']}", **{key: statistics.fmean(r[key] for r in w) for key in keys}}
        for w in windows
    ]


def train_and_report(corpus: Path, output_dir: str, minutes: float, overrides: Sequence[str] = ()) -> Path:
    """Pretrain the tiny model on ``corpus/{train,valid}.tsv`` for ``minutes``, then print the learning curve and
    draw it into ``output_dir/pretrain_curve.png`` (with matplotlib). Returns the final model's folder.

    ``overrides`` are extra hydra overrides, applied after the demo's own settings.
    """
    cfg = compose_config(
        [
            "model=tiny",
            f"data.manifest={corpus / 'train.tsv'}",
            f"data.valid_manifest={corpus / 'valid.tsv'}",
            f"output_dir={output_dir}",
            f"max_time_minutes={minutes}",
            "optim.max_update=100000",  # the time budget ends the run; the schedule decays over a long horizon
            "optim.warmup_updates=100",
            "optim.lr=0.005",
            "data.max_tokens=160000",  # 10 s of audio per update: more updates in the time budget
            "log_interval=10",
            "validate_interval_updates=250",
            "max_valid_batches=10",
            "checkpoint.save_interval_updates=250",
            "checkpoint.resume=never",
            *overrides,
        ]
    )
    trainer = Trainer(cfg, PretrainingTask(cfg))
    trainer.train()
    curve = learning_curve(trainer.output_dir / "metrics.jsonl")
    out = trainer.output_dir.resolve()
    print()
    print(f"pretrained the tiny model for {trainer.num_updates} updates on {corpus}")
    print(f"chance level: loss {math.log2(1 + trainer.model_cfg.num_negatives):.3f} bits, "
          f"accuracy {1 / (1 + trainer.model_cfg.num_negatives):.3f}")
    print(f"{'updates':>12}  {'loss (bits)':>11}  {'code ppl':>8}  {'accuracy':>8}")
    for row in curve:
        print(f"{row['updates']:>12}  {row['loss']:>11.3f}  {row['code_perplexity']:>8.1f}  {row['accuracy']:>8.3f}")
    print(f"  checkpoints: {out / cfg.checkpoint.dir}")
    print(f"  final model (Wav2Vec2Model.from_pretrained): {out / 'model'}")
    print(f"  metrics (JSONL, one line per logged update): {out / 'metrics.jsonl'}")
    png = save_curves(out / PRETRAIN_PNG, f"pretraining the tiny model ({trainer.num_updates} updates)",
                      pretrain_panels(out / "metrics.jsonl"))
    print(f"  learning curve: {png}" if png else f"  learning curve PNG: {PLOT_HINT}")
    return out / "model"
