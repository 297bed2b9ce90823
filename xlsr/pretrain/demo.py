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
import statistics
from pathlib import Path

from xlsr.pretrain.config import compose_config
from xlsr.pretrain.demo_corpus import build_demo_corpus

logger = logging.getLogger("xlsr.pretrain.demo")


def summarize(metrics_file: Path, window: int = 10) -> dict[str, float]:
    """Mean loss / code perplexity / accuracy over the first and the last ``window`` logged train updates."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    first, last = train[:window], train[-window:]

    def mean(rows, key):
        return statistics.fmean(r[key] for r in rows)

    return {
        "updates": train[-1]["update"],
        "loss_first": mean(first, "loss"),
        "loss_last": mean(last, "loss"),
        "code_ppl_first": mean(first, "code_perplexity"),
        "code_ppl_last": mean(last, "code_perplexity"),
        "accuracy_first": mean(first, "accuracy"),
        "accuracy_last": mean(last, "accuracy"),
    }


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
    summary = summarize(trainer.output_dir / "metrics.jsonl")
    out = trainer.output_dir.resolve()
    print()
    print(f"pretrained the tiny model for {summary['updates']} updates on {corpus}")
    print(f"  loss (bits)      first 10 logs {summary['loss_first']:.3f}  ->  last 10 logs {summary['loss_last']:.3f}")
    print(f"  code perplexity  first 10 logs {summary['code_ppl_first']:.1f}  ->  last 10 logs {summary['code_ppl_last']:.1f}")
    print(f"  accuracy         first 10 logs {summary['accuracy_first']:.3f}  ->  last 10 logs {summary['accuracy_last']:.3f}")
    print(f"  checkpoints: {out / cfg.checkpoint.dir}")
    print(f"  final model (Wav2Vec2Model.from_pretrained): {out / 'model'}")
    print(f"  metrics (JSONL, one line per logged update): {out / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
