"""The training engine, shared by every task: the loop (:mod:`.trainer`), the task interface (:mod:`.task`),
optimiser and schedules (:mod:`.optim`), training checkpoints (:mod:`.checkpointing`), FSDP (:mod:`.sharding`),
metrics logging (:mod:`.metrics`), the run lock (:mod:`.run_lock`) and the shared run config sections
(:mod:`.run_config`). It imports no task (:mod:`xlsr.tasks`)."""

from xlsr.training.task import Task, register_task
from xlsr.training.trainer import Trainer, run_command

__all__ = ["Task", "Trainer", "register_task", "run_command"]
