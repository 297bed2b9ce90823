"""The pretraining task (fairseq's ``wav2vec2`` task + criterion): the model, the unlabelled data, the
contrastive loss with its diversity and feature penalties, the polynomial schedule, what is logged and the
codebook health checks. The engine (:mod:`xlsr.training`) runs it."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch.distributed.fsdp import register_fsdp_forward_method

from xlsr.config import Wav2Vec2Config
from xlsr.data.audio_dataset import build_dataloader, check_data_config
from xlsr.data.batch import AudioBatch
from xlsr.data.hf_dataset import build_hf_dataloader
from xlsr.data.lhotse_source import CutItems, build_lhotse_loader, is_lhotse_source
from xlsr.data.source import hf_split_of, is_hf_source
from xlsr.model import Wav2Vec2Model
from xlsr.modules.feature_encoder import receptive_field
from xlsr.pretrain.config import PretrainConfig
from xlsr.pretrain.loss import LossOutput, compute_loss
from xlsr.probe import LinearProbe, probe_layer
from xlsr.training.metrics import Totals
from xlsr.training.optim import polynomial_decay_lr
from xlsr.training.task import Task, register_task

logger = logging.getLogger("xlsr.pretrain")

LOG2 = math.log(2)


def build_model(cfg: PretrainConfig) -> Wav2Vec2Model:
    """A fresh model from the preset + overrides, or the weights of ``model.init_from`` (+ overrides)."""
    overrides = cfg.model.overrides()
    if cfg.model.init_from:
        pretrained = Wav2Vec2Model.from_pretrained(cfg.model.init_from)
        arch = dataclasses.replace(pretrained.cfg, **overrides)
        model = Wav2Vec2Model(arch)
        model.load_state_dict(pretrained.state_dict())
        logger.info("initialised from %s", cfg.model.init_from)
    else:
        model = Wav2Vec2Model(Wav2Vec2Config.from_preset(cfg.model.preset, **overrides))
    model.set_activation_checkpointing(cfg.model.activation_checkpointing)
    return model


class StepTotals(Totals):
    """Sums of what one update, an epoch, or a validation pass logs; reduced over micro-batches and ranks.

    ``add`` takes one micro-batch's loss (``loss.py`` has already weighted its terms) and model output;
    ``record`` turns the sums into the logged values.
    """

    KEYS = ("loss", "loss_0", "loss_1", "loss_2", "sample_size", "correct", "count", "code_perplexity",
            "prob_perplexity", "temp", "num_batches", "audio_seconds", "masked_frames", "valid_frames")

    def add(self, loss: LossOutput, out, audio_seconds: float) -> None:
        """One micro-batch: ``loss`` from ``compute_loss`` (summed over its masked frames), ``out`` the model's."""
        v = self.values
        v["loss"] += float(loss.total.detach())
        v["loss_0"] += float(loss.contrastive.detach())
        v["loss_1"] += float(loss.diversity_term.detach())
        v["loss_2"] += float(loss.features_penalty_term.detach())
        v["sample_size"] += loss.sample_size
        v["correct"] += loss.correct
        v["count"] += loss.count
        v["code_perplexity"] += float(out.code_perplexity)
        v["prob_perplexity"] += float(out.prob_perplexity.detach())
        v["temp"] += out.temperature
        v["num_batches"] += 1
        v["audio_seconds"] += audio_seconds
        v["masked_frames"] += float(out.mask_indices.sum())
        frames = out.mask_indices.numel()
        if out.padding_mask is not None:
            frames -= int(out.padding_mask.sum())
        v["valid_frames"] += frames


def stats_to_record(stats: dict[str, float]) -> dict[str, float]:
    """Summed statistics -> the original's logged values (losses in bits per masked frame)."""
    sample_size = max(stats["sample_size"], 1.0)
    batches = max(stats["num_batches"], 1.0)
    return {
        "loss": stats["loss"] / sample_size / LOG2,
        "loss_0": stats["loss_0"] / sample_size / LOG2,
        "loss_1": stats["loss_1"] / sample_size / LOG2,
        "loss_2": stats["loss_2"] / sample_size / LOG2,
        "accuracy": stats["correct"] / max(stats["count"], 1.0),
        "code_perplexity": stats["code_perplexity"] / batches,
        "prob_perplexity": stats["prob_perplexity"] / batches,
        "temp": stats["temp"] / batches,
        "sample_size": stats["sample_size"],
        "masked_fraction": stats["masked_frames"] / max(stats["valid_frames"], 1.0),
        "audio_seconds": stats["audio_seconds"],
        "num_batches": stats["num_batches"],
    }


class CodebookHealth:
    """Warnings about the failure modes of broken ports, each once per run (on the process that logs)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._warned: set[str] = set()

    def check_health(self, num_updates: int, record: dict[str, Any], num_codevectors: int,
                     after_updates: int = 100) -> None:
        """Warn (once each) about codebook collapse and saturated accuracy, the failure modes of broken ports.

        Args:
            num_updates: the update the record belongs to; nothing is judged before ``after_updates``.
            record: a train record (``code_perplexity``, ``accuracy``).
            num_codevectors: codevectors per group x groups of the quantizer.
        """
        if not self.enabled or num_updates < after_updates:
            return
        if record["code_perplexity"] < max(2.0, 0.02 * num_codevectors) and "collapse" not in self._warned:
            self._warned.add("collapse")
            logger.warning("code perplexity %.2f of %d codevectors at update %d: the codebook may have collapsed "
                           "(check the diversity loss weight and the Gumbel temperature)",
                           record["code_perplexity"], num_codevectors, num_updates)
        if record["accuracy"] > 0.99 and "saturated" not in self._warned:
            self._warned.add("saturated")
            logger.warning("contrastive accuracy %.3f at update %d: the task is trivial (too few or identical "
                           "negatives, or collapsed targets)", record["accuracy"], num_updates)


@register_task(PretrainConfig)
class PretrainingTask(Task):
    """Self-supervised pretraining of a ``Wav2Vec2Model`` (the model is its own encoder)."""

    cfg: PretrainConfig
    BEST_METRICS = ("loss",)
    HEADLINE = (("loss", "loss %.3f bits"), ("accuracy", "accuracy %.3f"), ("code_perplexity", "code ppl %.1f"),
                ("probe_accuracy", "probe accuracy %.3f"))
    PROGRESS = (("loss", "loss", "{:.3f}"), ("accuracy", "acc", "{:.3f}"), ("code_perplexity", "ppl", "{:.1f}"))

    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg)
        self.health = CodebookHealth()
        self.probe: LinearProbe | None = None

    def bind(self, trainer) -> None:
        super().bind(trainer)
        self.health.enabled = trainer.is_main

    def build_model(self) -> Wav2Vec2Model:
        return build_model(self.cfg)

    def encoder(self, model: torch.nn.Module) -> Wav2Vec2Model:
        return model

    def find_unused_parameters(self, model: torch.nn.Module) -> bool:
        """LayerDrop skips the same layers on every rank (decisions drawn per update); their parameters go
        without a gradient, exactly as in one process."""
        return self.encoder(model).cfg.encoder_layerdrop > 0

    def build_loader(self, manifest: str, epoch: int, shuffle: bool = True):
        t = self.trainer
        if is_lhotse_source(manifest):  # a CutSet or Shar folder: cuts cropped and batched as a manifest's files
            data = self.cfg.data
            check_data_config(data)
            items = CutItems(sample_rate=data.sample_rate, min_sample_size=data.min_sample_size,
                             max_sample_size=data.max_sample_size, crop=True,
                             normalize=t.model_cfg.normalize if data.normalize is None else data.normalize,
                             resample=data.resample, skip_bad=data.skip_bad, pad=data.pad)
            return build_lhotse_loader(manifest, data, items, seed=self.cfg.seed, epoch=epoch, rank=t.rank,
                                       world_size=t.world_size, shuffle=shuffle)
        if is_hf_source(manifest):  # a split of data.hf_dataset: its rows cropped and batched as a manifest's files
            return build_hf_dataloader(
                self.cfg.data, hf_split_of(manifest), normalize=t.model_cfg.normalize, seed=self.cfg.seed,
                epoch=epoch, rank=t.rank, world_size=t.world_size, shuffle=shuffle,
            )
        return build_dataloader(
            self.cfg.data, manifest, normalize=t.model_cfg.normalize, seed=self.cfg.seed, epoch=epoch,
            rank=t.rank, world_size=t.world_size, shuffle=shuffle,
        )

    def forward_and_loss(self, model, batch: AudioBatch, layer_keep):
        out = model(batch.source, batch.padding_mask, layer_keep=layer_keep)
        return out, compute_loss(out, tuple(self.cfg.model.loss_weights))

    def new_totals(self) -> StepTotals:
        return StepTotals()

    def record(self, stats: dict[str, float]) -> dict[str, float]:
        return stats_to_record(stats)

    def learning_rate(self, num_updates: int) -> float:
        return polynomial_decay_lr(num_updates, self.cfg.optim)

    def check_health(self, record: dict[str, Any]) -> None:
        self.health.check_health(self.trainer.num_updates, record, self.trainer.model_cfg.num_codevectors)

    # ------------------------------------------------------------------ the linear probe (probe.*)
    def output_ready(self) -> None:
        """Read and check the probe set (``probe.manifest``), before the first update."""
        super().output_ready()
        if not self.cfg.probe.manifest:
            return
        t, probe = self.trainer, self.cfg.probe
        if not self.cfg.data.valid_manifest:
            raise ValueError("probe.manifest is set but data.valid_manifest is not: the probe runs at validation")
        model_cfg = t.model_cfg
        self.probe = LinearProbe(
            probe.manifest, probe.valid_manifest, labels=probe.labels,
            layer=probe_layer(probe.layer, model_cfg.encoder_layers), steps=probe.steps, lr=probe.lr,
            max_samples=int(probe.max_seconds * self.cfg.data.sample_rate),
            min_samples=receptive_field(model_cfg.conv_layers), sample_rate=self.cfg.data.sample_rate,
            normalize=model_cfg.normalize if self.cfg.data.normalize is None else self.cfg.data.normalize,
            seed=self.cfg.seed, skip_bad=self.cfg.data.skip_bad,
        )
        # FSDP: the probe calls extract_features, not forward; the root group's parameters must be gathered for it
        register_fsdp_forward_method(t.model, "extract_features")  # (nothing without FSDP)
        if t.is_main:
            logger.info("probe: layer %d of %d, %d train / %d held-out clips, %d classes", self.probe.layer,
                        model_cfg.encoder_layers, len(self.probe.train.labels), len(self.probe.valid.labels),
                        len(self.probe.classes))

    def validation_extras(self) -> dict[str, float]:
        """The probe's accuracies. Every rank computes them on the whole (small) probe set, the same forwards: under
        FSDP each layer's forward all-gathers its parameters with every rank, and under DDP the others would only
        wait for rank 0 at the next collective; the decisions taken from the record (``best_metric``) come from
        rank 0's numbers (broadcast)."""
        if self.probe is None:
            return {}
        t = self.trainer
        return self.probe.evaluate(t.model, self.cfg.data, t.device, t.autocast_dtype)
