"""What the engine logs: sums over batches and ranks (:class:`Totals`, a task names their keys), and
``metrics.jsonl`` / TensorBoard (:class:`MetricsLog`). Each task's keys and their definitions are its own
(README.md, "Logged metrics")."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xlsr.files import write_text_atomic

logger = logging.getLogger("xlsr.training")


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


class MetricsLog:
    """Rank-0 JSONL log (``metrics.jsonl``) and optional TensorBoard.

    Each line is ``{"split": "train" | "valid" | "epoch", "update": N, "time": unix seconds, **record}``.

    Args:
        output_dir: the run's folder.
        enabled: whether this process writes (rank 0).
        tensorboard: also write TensorBoard events (when the package is installed).
        headline: ``(key, format)`` pairs of the values the valid and epoch log lines show (the task's).
    """

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, headline: tuple[tuple[str, str], ...] = ()):
        self.headline = tuple(headline)
        self.enabled = enabled
        self.output_dir = output_dir
        self.path = output_dir / "metrics.jsonl"
        self.tensorboard = tensorboard
        self.writer = None

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
            logger.info("valid @ %d: %s", num_updates, _summary(record, self.headline))
        elif split == "epoch":
            skipped = record.get("skipped_files", 0)
            logger.info("end of epoch %d%s at update %d (%d updates, %d batches, %.0f s of audio): %s%s",
                        record["epoch"], "" if record["complete"] else " (stopped)", num_updates, record["updates"],
                        record["num_batches"], record["audio_seconds"], _summary(record, self.headline),
                        f"; {skipped} unreadable files skipped" if skipped else "")

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


def _summary(record: dict[str, Any], headline: tuple[tuple[str, str], ...]) -> str:
    """The headline values (``(key, format)`` pairs) of a record that has them, for the log."""
    return ", ".join(text % record[key] for key, text in headline if key in record)
