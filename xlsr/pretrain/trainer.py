"""Old import path: the engine (:mod:`xlsr.training.trainer`) with the pretraining task registered, so that
``Trainer(PretrainConfig)`` trains it (:mod:`xlsr.tasks.pretraining`)."""

from xlsr.tasks.pretraining import PretrainingTask, build_model
from xlsr.training.trainer import Trainer, run_command

__all__ = ["Trainer", "PretrainingTask", "build_model", "run_command"]
