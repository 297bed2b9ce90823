"""The main demo: build a small multilingual corpus of real speech, pretrain the tiny model on CPU, fine-tune it.

``python -m xlsr.demo [--minutes 10] [--finetune-minutes 4] [--no-finetune] [--lid-minutes 2] [--no-lid]
[--output-dir runs/demo]
[extra hydra overrides of pretraining ...]``

1. pretraining: the tiny model for ``--minutes`` on all of the corpus; prints the learning curve;
2. CTC fine-tuning for ``--finetune-minutes`` on the speech whose words are known (the espeak-ng sentences and
   Asterisk's English number, calendar and letter prompts); prints the greedy WER / CER before and after and two
   transcripts. Both learning curves also go to PNGs in the output dir when matplotlib is installed.
3. language ID (``--lid-minutes`` for each of two runs; ``--no-lid`` skips it) over the corpus's real-speech
   languages on held-out files, from the pretrained model and from a random initialisation with the same budget:
   both accuracies side by side and the confusion matrix PNGs (:mod:`xlsr.demo.lid`).

Speech: Asterisk's 16 kHz voice prompts in English, Spanish, French, Italian and Russian (Debian packages,
CC-BY(-SA) 3.0, see ATTRIBUTION.txt in the corpus folder) plus espeak-ng speech in eight more languages, built
once into ``~/.cache/xlsr/demo_corpus`` (``$XLSR_CACHE``) — nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from xlsr.demo.asr import build_asr_data
from xlsr.demo.corpus import build_demo_corpus
from xlsr.demo.finetune import finetune_and_report
from xlsr.demo.lid import lid_and_report
from xlsr.demo.train import train_and_report

logger = logging.getLogger("xlsr.demo")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build the corpus, pretrain, fine-tune and report; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m xlsr.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="pretraining time budget (default 10)")
    parser.add_argument("--finetune-minutes", type=float, default=4.0,
                        help="CTC fine-tuning time budget (default 4)")
    parser.add_argument("--no-finetune", action="store_true", help="skip CTC fine-tuning")
    parser.add_argument("--lid-minutes", type=float, default=2.0,
                        help="language-ID time budget of each of its two runs (default 2)")
    parser.add_argument("--no-lid", action="store_true", help="skip language ID")
    parser.add_argument("--output-dir", default="runs/demo", help="where checkpoints and metrics go")
    parser.add_argument("--cache-dir", default=None, help="corpus cache (default ~/.cache/xlsr/demo_corpus)")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get missing speech packages")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides of pretraining, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or (not args.no_finetune and args.finetune_minutes <= 0):
        parser.error("--minutes and --finetune-minutes must be > 0 (--no-finetune skips fine-tuning)")
    if not args.no_lid and args.lid_minutes <= 0:
        parser.error("--lid-minutes must be > 0 (--no-lid skips language ID)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    corpus = build_demo_corpus(Path(args.cache_dir) if args.cache_dir else None, install=not args.no_install)
    logger.info("corpus ready in %s", corpus)
    data_dir = None if args.no_finetune else build_asr_data(corpus)[0]  # before pretraining: fail early
    pretrained = train_and_report(corpus, args.output_dir, args.minutes, args.overrides)
    if data_dir is not None:
        finetune_and_report(data_dir, pretrained, Path(args.output_dir) / "finetune", args.finetune_minutes)
    if not args.no_lid:
        lid_and_report(corpus, pretrained, Path(args.output_dir) / "lid", args.lid_minutes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
