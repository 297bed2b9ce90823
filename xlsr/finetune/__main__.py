"""``python -m xlsr.finetune model.init_from=CKPT data.manifest=train.tsv [key=value ...]``: CTC fine-tuning.

Labels beside each manifest (``train.ltr`` or ``train.wrd``, fairseq's layout), ``dict.ltr.txt`` beside the training
manifest (built from its transcripts when absent). Several GPUs / nodes: ``torchrun ... -m xlsr.finetune ...``.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from xlsr.finetune.config import FineTuneConfig, register_configs
from xlsr.tasks.ctc import CTCTask  # noqa: F401 (registers the task of FineTuneConfig)
from xlsr.training.run_config import CONF_DIR
from xlsr.training.trainer import Trainer, run_command

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="finetune", version_base=None)
def main(cfg: DictConfig) -> None:
    config: FineTuneConfig = OmegaConf.to_object(cfg)
    run_command(Trainer, config, logging.getLogger("xlsr.finetune"))


if __name__ == "__main__":
    main()
