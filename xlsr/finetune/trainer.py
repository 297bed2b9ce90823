"""Old import path: ``FineTuner(FineTuneConfig)`` is the engine (:class:`xlsr.training.trainer.Trainer`) running
the CTC task (:mod:`xlsr.tasks.ctc`), registered for ``FineTuneConfig``."""

from xlsr.tasks.ctc import BLANK_PLATEAU_ADVICE, CTCLoss, CTCTask, CTCTotals, ctc_record
from xlsr.training.trainer import Trainer as FineTuner

__all__ = ["FineTuner", "CTCTask", "CTCLoss", "CTCTotals", "ctc_record", "BLANK_PLATEAU_ADVICE"]
