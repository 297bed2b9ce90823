"""What pretraining logs: per-update totals, the logged record, ``metrics.jsonl`` / TensorBoard, health warnings.

Definitions of every logged key are in README.md ("Logged metrics"); losses are in bits per masked frame, as
fairseq logs them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xlsr.files import write_text_atomic
from xlsr.pretrain.loss import LossOutput

logger = logging.getLogger("xlsr.pretrain")

LOG2 = math.log(2)


class Totals:
    """Sums over micro-batches, updates or a validation pass, reduced over ranks; subclasses name ``KEYS`` and
    say in ``add`` what one batch contributes."""

    KEYS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.values = dict.fromkeys(self.KEYS, 0.0)

    def merge(self, other: dict[str, float]) -> None:
        """Add already reduced sums (e.g. one update's, into the epoch's)."""
        for key in self.KEYS:
            self.values[key] += other[key]

    def all_reduce(self, world_size: int, device: torch.device) -> dict[str, float]:
        """The sums over all ranks (a copy; one collective call when ``world_size > 1``)."""
        if world_size == 1:
            return dict(self.values)
        tensor = torch.tensor([self.values[k] for k in self.KEYS], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return dict(zip(self.KEYS, tensor.tolist()))


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


class MetricsLog:
    """Rank-0 JSONL log (``metrics.jsonl``), optional TensorBoard, and warnings about known failure modes.

    Each line is ``{"split": "train" | "valid" | "epoch", "update": N, "time": unix seconds, **record}``.
    """

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        self.tensorboard = tensorboard
        self.writer = None
        self._warned: set[str] = set()

    def open(self) -> None:
        """Start TensorBoard output (after the run directory is settled), when asked for and installed."""
        if not (self.enabled and self.tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency (xlsr[tensorboard])
        except ImportError:
            logger.warning("tensorboard=true but the tensorboard package is not installed: metrics.jsonl only")
            return
        self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    def drop_after(self, num_updates: int) -> None:
        """Forget lines logged after update ``num_updates`` (a resumed run logs them again, identically).

        A line that is not a JSON record with an ``update`` (the half-written last line of a run killed while
        writing it) is dropped with a warning, never an error; the file is then rewritten as valid JSONL."""
        if not self.enabled or not self.path.is_file():
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        kept, unreadable = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            update = _update_of(line)
            if update is None:
                unreadable.append(number)
            elif update <= num_updates:
                kept.append(line)
        if unreadable == [len(lines)]:
            logger.warning("%s: its last line was cut short (a run stopped while writing it): dropped %r",
                           self.path, lines[-1][:80])
        elif unreadable:
            shown = ", ".join(map(str, unreadable[:10])) + (" ..." if len(unreadable) > 10 else "")
            logger.warning("%s: dropped %d line(s) that are not JSON records (lines %s)", self.path, len(unreadable),
                           shown)
        if len(kept) < len(lines) or not text.endswith("\n"):  # (a record without its line end: appends glue on)
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, split: str, num_updates: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = {"split": split, "update": num_updates, "time": time.time(), **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{split}/{key}", value, num_updates)
        if split == "valid":
            logger.info("valid @ %d: %s", num_updates, _summary(record))
        elif split == "epoch":
            skipped = record.get("skipped_files", 0)
            logger.info("end of epoch %d%s at update %d (%d updates, %d batches, %.0f s of audio): %s%s",
                        record["epoch"], "" if record["complete"] else " (stopped)", num_updates, record["updates"],
                        record["num_batches"], record["audio_seconds"], _summary(record),
                        f"; {skipped} unreadable files skipped" if skipped else "")

    def check_health(self, num_updates: int, record: dict[str, Any], num_codevectors: int,
                     after_updates: int = 100) -> None:
        """Warn (once each) about codebook collapse and saturated accuracy, the failure modes of broken ports."""
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _update_of(line: str) -> int | None:
    """The ``update`` of one metrics.jsonl line; None when the line is not a JSON record with an integer update."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    update = record.get("update") if isinstance(record, dict) else None
    return update if isinstance(update, int) and not isinstance(update, bool) else None


_SUMMARY = (("loss", "loss %.3f bits"), ("accuracy", "accuracy %.3f"), ("code_perplexity", "code ppl %.1f"),
            ("wer", "WER %.2f %%"), ("cer", "CER %.2f %%"))


def _summary(record: dict[str, Any]) -> str:
    """The headline values of a record that has them, for the log."""
    return ", ".join(text % record[key] for key, text in _SUMMARY if key in record)
