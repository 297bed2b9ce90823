"""The classification fine-tuning task (fairseq's ``audio_classification`` task + cross-entropy), run by the engine
(:mod:`xlsr.training`: the loop, DDP / FSDP, mixed precision, checkpoints, exact resume, logging).

The task: the model (``Wav2Vec2ForSequenceClassification`` from any checkpoint: a new head for the classes, or a
classification model's own head and labels), the labelled data (:mod:`xlsr.finetune.classification_data`), the
loss (cross-entropy summed over the batch, normalised by the number of utterances, optionally class-weighted),
the tri-stage schedule, and validation (loss, accuracy, macro-F1, per-class accuracy and the confusion matrix,
summed over the ranks; ``confusion_matrix.png`` in output_dir when matplotlib is installed).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from xlsr.checkpoints.classification import is_classification_checkpoint
from xlsr.checkpoints.hub import resolve_checkpoint_path
from xlsr.classification import ClassificationOutput, Wav2Vec2ForSequenceClassification
from xlsr.data.batch import AudioBatch, ClassificationBatch
from xlsr.data.audio_dataset import check_data_source
from xlsr.data.lhotse_source import is_lhotse_source
from xlsr.data.source import is_hf_source, training_data
from xlsr.finetune.classification_data import (
    build_classification_loader,
    count_labels,
    dictionary_order,
    label_dictionary_path,
    label_field,
    read_label_dictionary,
    training_labels,
    write_label_dictionary,
)
from xlsr.finetune.classification_scores import confusion_metrics
from xlsr.finetune.config import ClassificationFineTuneConfig
from xlsr.model import Wav2Vec2Model
from xlsr.training.metrics import Totals
from xlsr.training.optim import tri_stage_lr
from xlsr.training.task import Task, register_task

logger = logging.getLogger("xlsr.finetune")

LOG2 = math.log(2)
CONFUSION_PNG = "confusion_matrix.png"


@dataclass
class ClassificationLoss:
    """One batch's cross-entropy as the trainer needs it."""

    total: torch.Tensor  # () summed over the batch (nats), class-weighted in training with class_weighting
    sample_size: int  # utterances
    correct: int  # utterances whose top class is the reference


class ClassificationTotals(Totals):
    """Sums of what one update, an epoch or a validation pass logs."""

    KEYS = ("loss", "sample_size", "correct", "num_batches", "audio_seconds")

    def add(self, loss: ClassificationLoss, out, audio_seconds: float) -> None:
        v = self.values
        v["loss"] += float(loss.total.detach())
        v["sample_size"] += loss.sample_size
        v["correct"] += loss.correct
        v["num_batches"] += 1
        v["audio_seconds"] += audio_seconds


def classification_record(stats: dict[str, float]) -> dict[str, float]:
    """Summed statistics -> logged values: ``loss`` in bits per utterance (fairseq's cross-entropy ``loss``),
    ``accuracy`` the fraction of utterances whose top class is right (fairseq's ``accuracy``)."""
    return {
        "loss": stats["loss"] / max(stats["sample_size"], 1.0) / LOG2,
        "accuracy": stats["correct"] / max(stats["sample_size"], 1.0),
        "sample_size": stats["sample_size"],
        "num_batches": stats["num_batches"],
        "audio_seconds": stats["audio_seconds"],
    }


def format_confusion(confusion: np.ndarray, labels: list[str]) -> str:
    """The confusion matrix as a small text table (rows: reference, columns: predicted)."""
    width = max(5, *(len(label) for label in labels), len(str(int(np.max(confusion, initial=0)))))
    header = " " * width + " " + " ".join(f"{label:>{width}}" for label in labels)
    rows = [f"{label:>{width}} " + " ".join(f"{int(n):>{width}}" for n in row) for label, row in zip(labels, confusion)]
    return "\n".join([header, *rows])


def save_confusion_png(path: Path, confusion: np.ndarray, labels: list[str], title: str) -> Path | None:
    """Draw the confusion matrix (rows: reference, columns: predicted, each cell its count) into the PNG ``path``;
    None when matplotlib is not installed (the ``plot`` extra)."""
    try:
        from matplotlib.figure import Figure  # optional dependency (xlsr[plot]); no pyplot: no global state
    except ImportError:
        return None
    from xlsr.files import write_atomic

    size = 1.6 + 0.45 * len(labels)
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    peak = max(int(np.max(confusion, initial=0)), 1)
    if len(labels) <= 30:
        for (row, column), count in np.ndenumerate(confusion):
            ax.text(column, row, str(int(count)), ha="center", va="center", fontsize="small",
                    color="white" if count > peak / 2 else "black")
    fig.colorbar(image, ax=ax)
    write_atomic(Path(path), lambda handle: fig.savefig(handle, format="png", dpi=110))
    return Path(path)


@register_task(ClassificationFineTuneConfig)
class ClassificationTask(Task):
    """Fine-tuning of a ``Wav2Vec2ForSequenceClassification`` on labelled utterances (its encoder: ``wav2vec2``)."""

    cfg: ClassificationFineTuneConfig
    BEST_METRICS = ("accuracy", "macro_f1", "loss")
    HEADLINE = (("loss", "loss %.3f bits"), ("accuracy", "accuracy %.3f"), ("macro_f1", "macro-F1 %.3f"))
    PROGRESS = (("loss", "loss", "{:.3f}"), ("accuracy", "acc", "{:.2f}"))

    def __init__(self, cfg: ClassificationFineTuneConfig):
        super().__init__(cfg)
        if cfg.model.final_dropout:
            raise ValueError("model.final_dropout: the classification head has no dropout before its output "
                             "(leave it 0)")
        self.labels, self.train_counts = self._label_names(cfg)
        self.class_weights = self._class_weights()
        self._confusion = np.zeros((len(self.labels), len(self.labels)), dtype=np.int64)

    # ------------------------------------------------------------------ labels
    def _label_names(self, cfg: ClassificationFineTuneConfig) -> tuple[list[str], Any]:
        """The classes in index order (the same on every rank), the first of: ``cfg.label_dictionary``; the labels
        of a classification ``model.init_from``; ``dict.{labels}.txt`` beside the (first) training manifest; the
        training labels, most frequent first (a dataset split's or the cuts' labels for ``data.hf_dataset`` and
        Lhotse data, which have no dictionary beside them). Also returns the training labels' counts."""
        check_data_source(cfg.data)
        train_data = training_data(cfg.data)
        other_source = is_hf_source(train_data) or is_lhotse_source(train_data)
        first_manifest = train_data.split(",")[0].strip()
        if not other_source and not Path(first_manifest).is_file():  # named before the checkpoint is looked at
            raise FileNotFoundError(f"data.manifest={first_manifest}: no such file")
        counts = count_labels(training_labels(cfg.data, train_data))
        beside = None if other_source else label_dictionary_path(first_manifest, cfg.data.labels)
        self._continue = is_classification_checkpoint(resolve_checkpoint_path(cfg.model.init_from))
        self.dictionary_file = cfg.label_dictionary or beside
        if cfg.label_dictionary:
            if not Path(cfg.label_dictionary).is_file():
                raise FileNotFoundError(f"label_dictionary={cfg.label_dictionary}: no such file")
            return read_label_dictionary(cfg.label_dictionary), counts
        if self._continue:
            labels = Wav2Vec2ForSequenceClassification.from_pretrained(cfg.model.init_from).labels
            self.dictionary_file = f"the labels of {cfg.model.init_from}"
            if beside and Path(beside).is_file() and read_label_dictionary(beside) != labels:
                logger.warning("%s differs from the labels of the classification model %s (%d classes): training "
                               "on the model's labels", beside, cfg.model.init_from, len(labels))
            return labels, counts
        if beside and Path(beside).is_file():
            return read_label_dictionary(beside), counts
        where = train_data
        if other_source:  # the dataset's path too, and the column or field
            where = (f"{cfg.data.hf_dataset} ({train_data})" if cfg.data.hf_dataset else train_data) + \
                f", {label_field(cfg.data)[0]!r}"
        logger.info("%s: building the %d classes from the labels of %s", f"no {beside}" if beside else "no dictionary",
                    len(counts), where)
        self.dictionary_file = f"the classes of {where}"
        return dictionary_order(counts), counts

    def _class_weights(self) -> torch.Tensor | None:
        """``class_weighting=balanced``: N / (C * n_c) per class (1 for a class without training utterances)."""
        if self.cfg.class_weighting == "none":
            return None
        counts = np.asarray([self.train_counts.get(label, 0) for label in self.labels], dtype=np.float64)
        weights = np.where(counts > 0, counts.sum() / (len(self.labels) * np.maximum(counts, 1)), 1.0)
        return torch.tensor(weights, dtype=torch.float32)

    def output_ready(self) -> None:
        if self.trainer.is_main:
            write_label_dictionary(self.trainer.output_dir / f"dict.{self.cfg.data.labels}.txt", self.labels,
                                   self.train_counts)

    # ------------------------------------------------------------------ model
    def build_model(self) -> Wav2Vec2ForSequenceClassification:
        m = self.cfg.model
        settings = dict(
            mask_prob=m.mask_prob, mask_length=m.mask_length, mask_channel_prob=m.mask_channel_prob,
            mask_channel_length=m.mask_channel_length, encoder_layerdrop=m.encoder_layerdrop, dropout=m.dropout,
            attention_dropout=m.attention_dropout, activation_dropout=m.activation_dropout,
            feature_grad_mult=m.feature_grad_mult, freeze_finetune_updates=m.freeze_finetune_updates,
            apply_mask=True, pooling_activation=m.pooling_activation,
        )
        if self._continue:
            model = Wav2Vec2ForSequenceClassification.from_pretrained(m.init_from, **settings)
            if model.labels != self.labels:
                raise ValueError(f"{m.init_from}: its labels ({len(model.labels)} classes) differ from "
                                 f"label_dictionary={self.cfg.label_dictionary} ({len(self.labels)}); leave "
                                 "label_dictionary unset to train on the model's own labels, or give "
                                 "model.init_from a pretrained model")
            logger.info("continuing from the classification model %s (%d classes)", m.init_from, len(self.labels))
        else:
            model = Wav2Vec2ForSequenceClassification.from_pretrained(
                m.init_from, labels=self.labels, classifier_proj_size=m.classifier_proj_size,
                use_weighted_layer_sum=m.use_weighted_layer_sum, **settings)
            logger.info("initialised the encoder from %s; new head for %d classes", m.init_from, len(self.labels))
        model.wav2vec2.set_activation_checkpointing(m.activation_checkpointing)
        return model

    def model_recipe(self, model: Wav2Vec2ForSequenceClassification) -> tuple[type, tuple]:
        return type(model), (model.cfg, model.labels)

    def encoder(self, model: Wav2Vec2ForSequenceClassification) -> Wav2Vec2Model:
        return model.wav2vec2

    # ------------------------------------------------------------------ data and loss
    def build_loader(self, manifest: str, epoch: int, shuffle: bool = True):
        t = self.trainer
        return build_classification_loader(
            self.cfg.data, manifest, self.labels, normalize=t.model_cfg.normalize, seed=self.cfg.seed, epoch=epoch,
            rank=t.rank, world_size=t.world_size, shuffle=shuffle, dictionary_file=self.dictionary_file,
        )

    def forward_and_loss(self, model, batch: ClassificationBatch, layer_keep
                         ) -> tuple[ClassificationOutput, ClassificationLoss]:
        out: ClassificationOutput = model(batch.source, batch.padding_mask, layer_keep=layer_keep)
        logits = out.logits.float()
        weight = None
        if self.class_weights is not None and model.training:  # the training loss only
            weight = self.class_weights.to(logits.device)
        total = F.cross_entropy(logits, batch.target, weight=weight, reduction="sum")
        with torch.no_grad():
            correct = int((logits.argmax(-1) == batch.target).sum())
        return out, ClassificationLoss(total, int(batch.target.shape[0]), correct)

    def dummy_batch(self, batch: AudioBatch) -> ClassificationBatch:
        if isinstance(batch, ClassificationBatch):
            return batch
        return ClassificationBatch(source=batch.source[:1], padding_mask=None, ids=batch.ids[:1],
                                   target=torch.zeros(1, dtype=torch.long))

    def new_totals(self) -> ClassificationTotals:
        return ClassificationTotals()

    def record(self, stats: dict[str, float]) -> dict[str, float]:
        return classification_record(stats)

    def learning_rate(self, num_updates: int) -> float:
        return tri_stage_lr(num_updates - 1, self.cfg.optim)  # fairseq: update n runs with the LR set after n - 1

    # ------------------------------------------------------------------ validation: the confusion matrix
    def start_validation(self) -> None:
        self._confusion = np.zeros((len(self.labels), len(self.labels)), dtype=np.int64)

    def validation_batch_done(self, batch: ClassificationBatch, out: ClassificationOutput) -> None:
        predicted = out.logits.argmax(-1).cpu().numpy()
        np.add.at(self._confusion, (batch.target.cpu().numpy(), predicted), 1)

    def validation_extras(self) -> dict[str, Any]:
        t = self.trainer
        confusion = self._confusion
        if t.world_size > 1:  # every rank's counts, summed
            summed = torch.tensor(confusion, dtype=torch.float64, device=t.device)
            dist.all_reduce(summed)
            confusion = summed.cpu().numpy().round().astype(np.int64)
        metrics = confusion_metrics(confusion, self.labels)
        extras = {key: metrics[key] for key in ("macro_f1", "per_class_accuracy", "confusion_matrix")}
        if t.is_main and confusion.sum():
            per_class = ", ".join(f"{label} {'-' if value is None else f'{value:.2f}'}"
                                  for label, value in metrics["per_class_accuracy"].items())
            logger.info("valid @ %d: macro-F1 %.3f; accuracy per class: %s\n%s", t.num_updates, metrics["macro_f1"],
                        per_class, format_confusion(confusion, self.labels))
            save_confusion_png(t.output_dir / CONFUSION_PNG, confusion, self.labels,
                               f"validation at update {t.num_updates}: accuracy {metrics['accuracy']:.3f}")
        return extras
