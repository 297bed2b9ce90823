"""``python -m xlsr.pretrain [group=option ...] [key=value ...]``: pretrain wav2vec 2.0 / XLS-R.

Single process: ``python -m xlsr.pretrain model=tiny data.manifest=/data/train.tsv``.
Several GPUs / nodes: ``torchrun --nproc_per_node=8 -m xlsr.pretrain model=xlsr-300m data.manifest=...``.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from xlsr.pretrain.config import CONF_DIR, PretrainConfig, register_configs
from xlsr.tasks.pretraining import PretrainingTask  # noqa: F401 (registers the task of PretrainConfig)
from xlsr.training.trainer import Trainer, run_command

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    config: PretrainConfig = OmegaConf.to_object(cfg)
    run_command(Trainer, config, logging.getLogger("xlsr.pretrain"))


if __name__ == "__main__":
    main()
