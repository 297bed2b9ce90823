"""The pretraining loop: one process on a CPU up to many GPUs and nodes with ``torchrun`` (DDP).

Randomness is tied to the data, not to the process layout: before each micro-batch the RNGs are seeded from
(seed, epoch, global batch index), so masks, negatives and dropout of a batch are the same whether it runs on rank 1
of 2 or as the second micro-batch of one process, and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from xlsr.checkpoints.native import TRAINING_CHECKPOINT_MARK
from xlsr.checkpoints.safe_pickle import safe_torch_load
from xlsr.config import Wav2Vec2Config
from xlsr.model import Wav2Vec2Model
from xlsr.pretrain import checkpointing
from xlsr.pretrain.config import PretrainConfig
from xlsr.pretrain.data import build_dataloader, set_loader_epoch
from xlsr.pretrain.loss import compute_loss
from xlsr.pretrain.step_in_backward import StepInBackward, attach_step_in_backward, step_in_backward_conflicts

logger = logging.getLogger("xlsr.pretrain")

LOG2 = math.log(2)
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def polynomial_decay_lr(num_updates: int, cfg) -> float:
    """fairseq's polynomial_decay: linear warm-up from 0, then (1 - progress)^power down to end_lr."""
    if cfg.warmup_updates > 0 and num_updates <= cfg.warmup_updates:
        return cfg.lr * num_updates / cfg.warmup_updates
    if num_updates >= cfg.max_update:
        return cfg.end_lr
    remaining = 1 - (num_updates - cfg.warmup_updates) / (cfg.max_update - cfg.warmup_updates)
    return (cfg.lr - cfg.end_lr) * remaining**cfg.power + cfg.end_lr


def _batch_seed(seed: int, epoch: int, batch_index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + batch_index) % (2**63 - 1)


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


class Trainer:
    """Builds everything from a ``PretrainConfig`` and runs ``train()``."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.rank, self.world_size, local_rank = self._init_distributed()
        self.is_main = self.rank == 0
        self.device = self._pick_device(local_rank)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / cfg.checkpoint.dir
        if self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.structured(cfg), self.output_dir / "config.yaml")

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(self.device)
        self.model_cfg = self.model.cfg
        # DDP needs a gradient for every parameter: layers skipped by LayerDrop get an exact zero one
        self.model.encoder.zero_grad_for_dropped_layers = self.world_size > 1
        if cfg.model.compile:
            self.model.compile_encoder(dynamic=True)  # batch lengths vary: one graph for all of them
        self.ddp_model = (
            DistributedDataParallel(self.model, device_ids=[local_rank] if self.device.type == "cuda" else None)
            if self.world_size > 1
            else None
        )
        self.forward_model = self.ddp_model if self.ddp_model is not None else self.model
        if cfg.precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {cfg.precision!r}")
        self.optimizer = self._build_optimizer()
        self.step_in_backward = self._attach_step_in_backward()
        self.autocast_dtype = _DTYPES[cfg.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")

        self.num_updates = 0
        self.epoch = 1
        self.batches_done_in_epoch = 0  # per rank
        self.layerdrop_generator = torch.Generator()
        self.metrics = MetricsLog(self.output_dir, enabled=self.is_main, tensorboard=cfg.tensorboard)
        self._maybe_resume()
        self.model.set_num_updates(self.num_updates)

        self.train_loader = build_dataloader(
            cfg.data, cfg.data.manifest, normalize=self.model_cfg.normalize, seed=cfg.seed, epoch=self.epoch,
            rank=self.rank, world_size=self.world_size, start_batch=self.batches_done_in_epoch,
        )
        self.valid_loader = None
        if cfg.data.valid_manifest:
            self.valid_loader = build_dataloader(
                cfg.data, cfg.data.valid_manifest, normalize=self.model_cfg.normalize, seed=cfg.seed, epoch=1,
                rank=self.rank, world_size=self.world_size, shuffle=False,
            )

    # ------------------------------------------------------------------ setup
    def _init_distributed(self) -> tuple[int, int, int]:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return 0, 1, 0
        backend = self.cfg.distributed.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and self.cfg.device != "cpu" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(minutes=self.cfg.distributed.timeout_minutes))
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))

    def _pick_device(self, local_rank: int) -> torch.device:
        choice = self.cfg.device
        if choice == "auto":
            choice = "cuda" if torch.cuda.is_available() else "cpu"
        if choice == "cuda":
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        return torch.device(choice)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        kwargs: dict[str, Any] = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        if self.device.type == "cuda":
            kwargs["fused"] = True
        return torch.optim.AdamW(self.model.parameters(), **kwargs)

    def _attach_step_in_backward(self) -> StepInBackward | None:
        if not self.cfg.optim.step_in_backward:
            return None
        o = self.cfg.optim
        conflicts = step_in_backward_conflicts(self.world_size, o.update_freq, o.clip_norm, self.cfg.precision)
        if conflicts:
            raise ValueError("optim.step_in_backward=true cannot be combined with " + "; ".join(conflicts))
        return attach_step_in_backward(self.optimizer, self.model.parameters(), self.device)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            TRAINING_CHECKPOINT_MARK: 1,
            "model": self.model.state_dict(),
            "model_config": self.model_cfg.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "num_updates": self.num_updates,
            "epoch": self.epoch,
            "batches_done_in_epoch": self.batches_done_in_epoch,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True),
        }

    def save_checkpoint(self) -> Path | None:
        path = None
        if self.is_main:
            path = checkpointing.save_atomic(
                self.state_dict(), checkpointing.checkpoint_path(self.checkpoint_dir, self.num_updates)
            )
            checkpointing.prune(self.checkpoint_dir, self.cfg.checkpoint.keep_last)
            logger.info("saved %s", path)
        if self.world_size > 1:
            dist.barrier()
        return path

    def _maybe_resume(self) -> None:
        choice = self.cfg.checkpoint.resume
        if choice == "never":
            return
        if choice == "auto":
            found = checkpointing.list_checkpoints(self.checkpoint_dir)
            if not found:
                return
            path = found[-1]
        else:
            path = Path(choice)
        state = safe_torch_load(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.num_updates = state["num_updates"]
        self.epoch = state["epoch"]
        self.batches_done_in_epoch = state["batches_done_in_epoch"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.is_main:
            logger.info("resumed from %s at update %d (epoch %d, batch %d)", path, self.num_updates, self.epoch,
                        self.batches_done_in_epoch)

    # ------------------------------------------------------------------ training
    def _update_groups(self) -> Iterator[list[tuple[int, dict | None]]]:
        """Micro-batches of one update: ``update_freq`` (global batch index, batch) pairs, to the end of the epoch."""
        group: list[tuple[int, dict | None]] = []
        for batch in self.train_loader:
            global_index = self.batches_done_in_epoch * self.world_size + self.rank
            self.batches_done_in_epoch += 1
            group.append((global_index, batch))
            if len(group) == self.cfg.optim.update_freq:
                yield group
                group = []
        if group:
            yield group

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        start_time = time.monotonic()
        progress = None
        if self.is_main and cfg.progress_bar:
            from tqdm import tqdm

            total = cfg.stop_at_update or (None if cfg.max_time_minutes else cfg.optim.max_update)
            progress = tqdm(total=total, initial=self.num_updates, unit="upd", dynamic_ncols=True)
        last = {}
        stop = self.num_updates >= cfg.optim.max_update or 0 < cfg.stop_at_update <= self.num_updates
        while not stop:
            for group in self._update_groups():
                last = self.train_step(group)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}",
                                         ppl=f"{last['code_perplexity']:.1f}", aps=f"{last['audio_sec_per_sec']:.0f}")
                if self.num_updates % cfg.log_interval == 0 or self.num_updates == 1:
                    self.metrics.log("train", self.num_updates, last)
                if cfg.validate_interval_updates and self.num_updates % cfg.validate_interval_updates == 0:
                    self.validate()
                if self.num_updates % cfg.checkpoint.save_interval_updates == 0:
                    self.save_checkpoint()
                out_of_time = cfg.max_time_minutes > 0 and time.monotonic() - start_time > 60 * cfg.max_time_minutes
                stop_here = cfg.stop_at_update > 0 and self.num_updates >= cfg.stop_at_update
                if self.num_updates >= cfg.optim.max_update or out_of_time or stop_here:
                    stop = True
                    break
            else:  # epoch finished
                self._end_epoch()
                if cfg.max_epoch and self.epoch > cfg.max_epoch:
                    stop = True
        if progress is not None:
            progress.close()
        if self.num_updates % cfg.checkpoint.save_interval_updates != 0 or not last:
            self.save_checkpoint()
        if self.is_main:
            self.model.save_pretrained(self.output_dir / "model")
        self.metrics.close()
        return last

    def _end_epoch(self) -> None:
        skipped = self.train_loader.dataset.num_skipped
        if self.is_main:
            logger.info("end of epoch %d (%d updates)%s", self.epoch, self.num_updates,
                        f"; {skipped} unreadable files skipped" if skipped else "")
        if self.valid_loader is not None and not self.cfg.validate_interval_updates:
            self.validate()
        self.epoch += 1
        self.batches_done_in_epoch = 0
        set_loader_epoch(self.train_loader, self.epoch)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _layer_keep(self, micro_step: int) -> list[bool]:
        """LayerDrop decisions shared by every rank (seeded by update and micro-step), so DDP sees one graph."""
        self.layerdrop_generator.manual_seed(_batch_seed(self.cfg.seed + 7, self.num_updates, micro_step))
        return self.model.encoder.sample_layer_keep(self.layerdrop_generator)

    def train_step(self, group: list[tuple[int, dict | None]]) -> dict[str, float]:
        """One optimizer update over ``update_freq`` micro-batches (gradients summed, then normalised)."""
        cfg = self.cfg
        self.model.train()
        step_start = time.monotonic()
        totals = _Totals(self.cfg.model.loss_weights)
        fallback = next((b for _, b in group if b is not None), None)
        lr = polynomial_decay_lr(self.num_updates + 1, cfg.optim)
        for group_ in self.optimizer.param_groups:
            group_["lr"] = lr
        for micro_step, (global_index, batch) in enumerate(group):
            weight = 1.0
            if batch is None:  # every file of this batch was unreadable: keep DDP in step with a zero-weight pass
                if fallback is None:
                    continue
                batch, weight = fallback, 0.0
            torch.manual_seed(_batch_seed(cfg.seed, self.epoch, global_index))
            last_micro = micro_step == len(group) - 1
            sync = contextlib.nullcontext() if (self.ddp_model is None or last_micro) else self.ddp_model.no_sync()
            source = batch["source"].to(self.device, non_blocking=True)
            padding_mask = batch["padding_mask"]
            if padding_mask is not None:
                padding_mask = padding_mask.to(self.device, non_blocking=True)
            with sync:
                with self._autocast():
                    out = self.forward_model(source, padding_mask, layer_keep=self._layer_keep(micro_step))
                    loss = compute_loss(out, tuple(cfg.model.loss_weights))
                if self.step_in_backward is not None:  # one micro-batch, one process: its sample size is final
                    self.step_in_backward.grad_scale = self._gradient_scale(loss.sample_size)
                self.scaler.scale(loss.total * weight).backward()
            totals.add(loss, out, weight, audio_seconds=source.shape[0] * source.shape[1] / self.model_cfg.sample_rate)

        stats = totals.all_reduce(self.world_size, self.device)
        if self.step_in_backward is not None:  # the backward pass has already updated every parameter
            grad_norm = self.step_in_backward.pop_grad_norm()
            scale_before, overflow = 1.0, False
        else:
            grad_norm, scale_before, overflow = self._optimizer_step(stats["sample_size"])
        if overflow:
            logger.warning("fp16 gradient overflow at update %d: step skipped, loss scale -> %g",
                           self.num_updates + 1, self.scaler.get_scale())
        else:
            self.num_updates += 1
            self.model.set_num_updates(self.num_updates)

        elapsed = time.monotonic() - step_start
        record = stats_to_record(stats)
        record.update(
            lr=lr, grad_norm=grad_norm, loss_scale=scale_before, epoch=self.epoch,
            audio_sec_per_sec=stats["audio_seconds"] / max(elapsed, 1e-9), overflow=bool(overflow),
        )
        self.metrics.check_health(self.num_updates, record, self.model_cfg.num_codevectors)
        return record

    def _gradient_scale(self, sample_size: float) -> float:
        """DDP averaged the gradients over ranks; this makes them the sum over all masked frames / their number."""
        return self.world_size / max(sample_size, 1.0)

    def _optimizer_step(self, sample_size: float) -> tuple[float, float, bool]:
        """Normalise the summed gradients, clip, step, zero. Returns (grad norm, loss scale before, overflow)."""
        self.scaler.unscale_(self.optimizer)
        scale = self._gradient_scale(sample_size)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        clip_norm = self.cfg.optim.clip_norm
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip_norm or float("inf")))
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        overflow = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        return grad_norm, scale_before, overflow

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss on valid.tsv in eval mode (masking still applied, as the original), fixed RNG per batch."""
        if self.valid_loader is None:
            return {}
        self.model.eval()
        totals = _Totals(self.cfg.model.loss_weights)
        for index, batch in enumerate(self.valid_loader):
            if self.cfg.max_valid_batches and index >= self.cfg.max_valid_batches:
                break
            if batch is None:
                continue
            torch.manual_seed(_batch_seed(self.cfg.seed, 0, index * self.world_size + self.rank))
            source = batch["source"].to(self.device)
            padding_mask = batch["padding_mask"].to(self.device) if batch["padding_mask"] is not None else None
            with self._autocast():
                out = self.model(source, padding_mask)
                loss = compute_loss(out, tuple(self.cfg.model.loss_weights))
            totals.add(loss, out, 1.0, audio_seconds=source.numel() / self.model_cfg.sample_rate)
        stats = totals.all_reduce(self.world_size, self.device)
        record = stats_to_record(stats)
        self.metrics.log("valid", self.num_updates, record)
        self.model.train()
        return record


class _Totals:
    """Sums of what one update (or a validation pass) logs, reduced over micro-batches and ranks."""

    KEYS = ("loss", "loss_0", "loss_1", "loss_2", "sample_size", "correct", "count", "code_perplexity",
            "prob_perplexity", "temp", "num_batches", "audio_seconds", "masked_frames", "valid_frames")

    def __init__(self, loss_weights=(0.1, 0.0)):
        self.loss_weights = tuple(loss_weights) + (0.0,) * (2 - len(loss_weights))
        self.values = dict.fromkeys(self.KEYS, 0.0)

    def add(self, loss, out, weight: float, audio_seconds: float) -> None:
        v = self.values
        v["loss"] += weight * float(loss.total.detach())
        v["loss_0"] += weight * float(loss.contrastive.detach())
        v["loss_1"] += weight * self.loss_weights[0] * float(loss.diversity.detach()) * loss.sample_size
        v["loss_2"] += weight * self.loss_weights[1] * float(loss.features_penalty.detach()) * loss.sample_size
        v["sample_size"] += weight * loss.sample_size
        v["correct"] += weight * loss.correct
        v["count"] += weight * loss.count
        v["code_perplexity"] += weight * float(out.code_perplexity)
        v["prob_perplexity"] += weight * float(out.prob_perplexity.detach())
        v["temp"] += weight * out.temperature
        v["num_batches"] += weight
        v["audio_seconds"] += weight * audio_seconds
        v["masked_frames"] += weight * float(out.mask_indices.sum())
        frames = out.mask_indices.numel()
        if out.padding_mask is not None:
            frames -= int(out.padding_mask.sum())
        v["valid_frames"] += weight * frames

    def all_reduce(self, world_size: int, device: torch.device) -> dict[str, float]:
        if world_size == 1:
            return dict(self.values)
        tensor = torch.tensor([self.values[k] for k in self.KEYS], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return dict(zip(self.KEYS, tensor.tolist()))


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
    }


class MetricsLog:
    """Rank-0 JSONL log (``metrics.jsonl``), optional TensorBoard, and warnings about known failure modes."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        self._warned: set[str] = set()
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                pass

    def log(self, split: str, num_updates: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = {"split": split, "update": num_updates, "time": time.time(), **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, num_updates)
        if split == "valid":
            logger.info("valid @ %d: loss %.3f bits, accuracy %.3f, code ppl %.1f", num_updates, record["loss"],
                        record["accuracy"], record["code_perplexity"])

    def check_health(self, num_updates: int, record: dict[str, Any], num_codevectors: int) -> None:
        """Warn (once each) about codebook collapse and saturated accuracy, the failure modes of broken ports."""
        if not self.enabled or num_updates < 100:
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
