"""The main demo: build a small multilingual corpus of real speech, pretrain the tiny model on CPU, report.

``python -m xlsr.demo [--minutes 10] [--output-dir runs/demo] [extra hydra overrides ...]``

Speech: Asterisk's 16 kHz voice prompts in English, Spanish, French, Italian and Russian (Debian packages,
CC-BY(-SA) 3.0, see ATTRIBUTION.txt in the corpus folder) plus espeak-ng speech in eight more languages, built
once into ``~/.cache/xlsr/demo_corpus`` (``$XLSR_CACHE``) — nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from xlsr.demo.corpus import build_demo_corpus
from xlsr.demo.train import train_and_report

logger = logging.getLogger("xlsr.demo")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build the corpus, train and report; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m xlsr.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget (default 10)")
    parser.add_argument("--output-dir", default="runs/demo", help="where checkpoints and metrics go")
    parser.add_argument("--cache-dir", default=None, help="corpus cache (default ~/.cache/xlsr/demo_corpus)")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get missing speech packages")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    corpus = build_demo_corpus(Path(args.cache_dir) if args.cache_dir else None, install=not args.no_install)
    logger.info("corpus ready in %s", corpus)
    train_and_report(corpus, args.output_dir, args.minutes, args.overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
