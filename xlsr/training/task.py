"""What a task adds to the training engine: the model, the data, the loss, the logged values, the schedule.

A task is a :class:`Task` subclass registered for its config class (:func:`register_task`); the engine
(:class:`xlsr.training.trainer.Trainer`) builds it from the config and runs the loop, DDP / FSDP, mixed precision,
checkpoints and exact resume the same way for every task. The engine imports no task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

from torch import nn

from xlsr.data.batch import AudioBatch
from xlsr.model import Wav2Vec2Model
from xlsr.training.metrics import Totals

_TASKS: dict[type, type["Task"]] = {}


def register_task(config_class: type) -> Callable[[type["Task"]], type["Task"]]:
    """Class decorator: the task the engine builds for a config of ``config_class``."""

    def register(task_class: type[Task]) -> type[Task]:
        _TASKS[config_class] = task_class
        return task_class

    return register


def task_for(cfg: Any) -> "Task":
    """The registered task for ``cfg`` (by its class); ValueError when none is (its module not imported)."""
    for config_class in type(cfg).__mro__:
        if config_class in _TASKS:
            return _TASKS[config_class](cfg)
    raise ValueError(f"no task is registered for {type(cfg).__name__}: import its module (xlsr.tasks.*) first")


class Task(ABC):
    """One kind of training, run by the engine.

    The engine calls :meth:`bind` once it knows the rank, world size and device, then :meth:`build_model`,
    :meth:`build_loader` per split, and per batch :meth:`forward_and_loss`; sums of what it logs live in the
    task's :class:`~xlsr.training.metrics.Totals` and become a record in :meth:`record`.

    Args:
        cfg: the task's run config (a dataclass with the run fields and the task's own sections).
    """

    BEST_METRICS: tuple[str, ...] = ("loss",)
    """Values of the valid line that ``checkpoint.best_metric`` may name."""

    HEADLINE: tuple[tuple[str, str], ...] = (("loss", "loss %.3f bits"),)
    """``(key, format)`` pairs shown in the valid and epoch log lines."""

    PROGRESS: tuple[tuple[str, str, str], ...] = (("loss", "loss", "{:.3f}"),)
    """``(key, name, format)`` of the values the progress bar shows."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.trainer: Any = None  # the engine's Trainer, set by bind()

    def bind(self, trainer: Any) -> None:
        """Called by the engine before the model is built: ``trainer`` gives ``rank``, ``world_size``, ``device``,
        ``is_main``, ``num_updates``, ``model`` and ``model_cfg`` (the encoder's config, once built)."""
        self.trainer = trainer

    # ------------------------------------------------------------------ model
    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, with its initial weights (on rank 0 only under FSDP; the others build :meth:`model_recipe`)."""

    def model_recipe(self, model: nn.Module) -> tuple[type, tuple]:
        """(class, constructor arguments) that build ``model``'s architecture (FSDP: the other ranks build it on
        the meta device; the final ``model/`` is saved from it)."""
        return type(model), (model.cfg,)

    @abstractmethod
    def encoder(self, model: nn.Module) -> Wav2Vec2Model:
        """The ``Wav2Vec2Model`` inside ``model``: its layers are FSDP's units, LayerDrop draws from it."""

    def find_unused_parameters(self, model: nn.Module) -> bool:
        """Whether DDP must look for parameters without a gradient (LayerDrop, frozen parts)."""
        return True

    # ------------------------------------------------------------------ data and loss
    @abstractmethod
    def build_loader(self, manifest: str, epoch: int, shuffle: bool = True):
        """A loader of this rank's batches of ``manifest`` (``None`` for a rank without a batch), at the start
        of ``epoch``. ``manifest`` is a data name of :func:`xlsr.data.source.training_data`: a manifest path,
        ``hf-split:SPLIT``, ``lhotse-cuts:PATH`` or ``lhotse-shar:DIR``. The loader is a
        :class:`xlsr.data.audio_dataset.BatchLoader` (iterable, with ``total_batches``, ``num_skipped``,
        ``set_epoch``, ``position``, ``global_index`` and ``state_dict`` /
        ``load_state_dict``, by which the engine resumes), usually ``batched_loader`` over the task's
        :class:`~xlsr.data.source.UtteranceSource`."""

    @abstractmethod
    def forward_and_loss(self, model: nn.Module, batch: AudioBatch, layer_keep: list[bool] | None
                         ) -> tuple[Any, Any]:
        """(model output, loss) of one batch, already on the device (``batch.source`` (B, S), ``batch.padding_mask``
        (B, S) or None, the task's targets); ``layer_keep``: this update's LayerDrop decisions (None: validation).
        ``loss.total`` () is backpropagated and ``loss.sample_size`` normalises the gradient."""

    def dummy_batch(self, batch: AudioBatch) -> AudioBatch:
        """``batch`` (the first this rank trained, or seeded noise without targets) made valid for
        :meth:`forward_and_loss`: a rank without a batch runs it at zero weight to join the collectives."""
        return batch

    @abstractmethod
    def new_totals(self) -> Totals:
        """Empty sums of what a batch contributes (an update, an epoch, a validation pass)."""

    @abstractmethod
    def record(self, stats: dict[str, float]) -> dict[str, float]:
        """Sums over all ranks -> the logged values."""

    @abstractmethod
    def learning_rate(self, num_updates: int) -> float:
        """The learning rate of update ``num_updates`` (1 for the first)."""

    def check_health(self, record: dict[str, Any]) -> None:
        """Warnings about a train record (every rank calls it; log on ``trainer.is_main``)."""

    # ------------------------------------------------------------------ validation
    def start_validation(self) -> None:
        """Before a validation pass."""

    def validation_batch_done(self, batch: AudioBatch, out: Any) -> None:
        """After each validation batch with data (e.g. decode and count errors)."""

    def validation_extras(self) -> dict[str, float]:
        """More values for the valid line; called once per validation, on every rank."""
        return {}

    def output_ready(self) -> None:
        """Once the run's folder is set up (every rank): write what the task keeps beside the run."""
