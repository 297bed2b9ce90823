"""The main demo: build a small multilingual corpus of real speech, pretrain the tiny model on CPU, report.

``python -m xlsr.pretrain.demo [--minutes 10] [--output-dir runs/demo] [extra hydra overrides ...]``

Speech: Asterisk's 16 kHz voice prompts in English, Spanish, French, Italian and Russian (Debian packages,
CC-BY(-SA) 3.0, see ATTRIBUTION.txt in the corpus folder) plus espeak-ng speech in eight more languages, built
once into ``~/.cache/xlsr/demo_corpus`` (``$XLSR_CACHE``) — nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from pathlib import Path

from xlsr.pretrain.config import compose_config
from xlsr.pretrain.demo_corpus import build_demo_corpus

logger = logging.getLogger("xlsr.pretrain.demo")


def learning_curve(metrics_file: Path, points: int = 8) -> list[dict[str, float]]:
    """The logged train updates split into ``points`` consecutive windows, each averaged."""
    train = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]
    size = max(1, len(train) // points)
    windows = [train[i : i + size] for i in range(0, len(train), size)][:points]
    return [
        {
            "updates": f"{w[0]['update']}-{w[-1]['update']}",
            **{key: statistics.fmean(r[key] for r in w) for key in ("loss", "code_perplexity", "accuracy")},
        }
        for w in windows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget (default 10)")
    parser.add_argument("--output-dir", default="runs/demo", help="where checkpoints and metrics go")
    parser.add_argument("--cache-dir", default=None, help="corpus cache (default ~/.cache/xlsr/demo_corpus)")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get missing speech packages")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    corpus = build_demo_corpus(Path(args.cache_dir) if args.cache_dir else None, install=not args.no_install)
    logger.info("corpus ready in %s", corpus)
    cfg = compose_config(
        [
            "model=tiny",
            f"data.manifest={corpus / 'train.tsv'}",
            f"data.valid_manifest={corpus / 'valid.tsv'}",
            f"output_dir={args.output_dir}",
            f"max_time_minutes={args.minutes}",
            "optim.max_update=100000",  # the time budget ends the run; the schedule decays over a long horizon
            "optim.warmup_updates=100",
            "optim.lr=0.005",
            "data.max_tokens=160000",  # 10 s of audio per update: more updates in the time budget
            "log_interval=10",
            "validate_interval_updates=250",
            "max_valid_batches=10",
            "checkpoint.save_interval_updates=250",
            "checkpoint.resume=never",
            *args.overrides,
        ]
    )
    from xlsr.pretrain.trainer import Trainer

    trainer = Trainer(cfg)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
