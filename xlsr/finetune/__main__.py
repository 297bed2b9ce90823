"""``python -m xlsr.finetune [task=ctc|classification] model.init_from=CKPT data.manifest=train.tsv [key=value ...]``.

``task=ctc`` (the default): CTC fine-tuning; labels beside each manifest (``train.ltr`` or ``train.wrd``, fairseq's
layout), ``dict.ltr.txt`` beside the training manifest (built from its transcripts when absent).
``task=classification``: utterance classification (language ID, ...); ``train.lang`` beside ``train.tsv``
(``data.labels``), ``dict.lang.txt`` beside it (built when absent); see docs/classification.md.
The ``task=`` override picks the config (``xlsr/conf/finetune.yaml`` or ``finetune_classification.yaml``) before
hydra reads the rest. Several GPUs / nodes: ``torchrun ... -m xlsr.finetune ...``.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from xlsr.finetune.config import TASKS, register_configs, task_of
from xlsr.tasks.classification import ClassificationTask  # noqa: F401 (registers the task of its config)
from xlsr.tasks.ctc import CTCTask  # noqa: F401 (registers the task of FineTuneConfig)
from xlsr.training.run_config import CONF_DIR
from xlsr.training.trainer import Trainer, run_command

register_configs()


def _run(cfg: DictConfig) -> None:
    config = OmegaConf.to_object(cfg)
    run_command(Trainer, config, logging.getLogger("xlsr.finetune"))


def main() -> None:
    """Pick the task's config from a ``task=`` argument, then let hydra parse the command line."""
    try:
        task = task_of(sys.argv[1:])
    except ValueError as err:
        print(f"xlsr.finetune: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    hydra.main(config_path=str(CONF_DIR), config_name=TASKS[task][0], version_base=None)(_run)()


if __name__ == "__main__":
    main()
