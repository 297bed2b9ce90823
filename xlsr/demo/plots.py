"""Learning-curve PNGs of the demo, drawn with matplotlib when it is installed (``pip install 'xlsr[plot]'``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

from xlsr.files import write_atomic

PLOT_HINT = "pip install -e '.[plot]' (matplotlib) to get the learning curves as PNGs as well"

# One panel: (y-axis label, [(legend label, x values, y values, marker style), ...]).
Panel = tuple[str, Sequence[tuple[str, Sequence[float], Sequence[float], str]]]


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def read_metrics(metrics_file: Path, split: str) -> list[dict]:
    """The ``split`` lines ("train", "valid", "epoch") of a ``metrics.jsonl``."""
    lines = Path(metrics_file).read_text().splitlines()
    return [r for r in map(json.loads, filter(str.strip, lines)) if r["split"] == split]


def save_curves(path: Path, title: str, panels: Sequence[Panel]) -> Path | None:
    """Draw the panels side by side against the update number into the PNG ``path``; None without matplotlib."""
    if not have_matplotlib():
        return None
    from matplotlib.figure import Figure  # optional dependency (xlsr[plot]); no pyplot: no global state or display

    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    fig.suptitle(title)
    for ax, (ylabel, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, xs, ys, style in series:
            ax.plot(list(xs), list(ys), style, label=label, markersize=4)
        ax.set_xlabel("update")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
    path = Path(path)
    write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    return path


def pretrain_panels(metrics_file: Path) -> list[Panel]:
    """Pretraining: contrastive loss, accuracy and code perplexity of the logged train updates (and valid)."""
    train, valid = read_metrics(metrics_file, "train"), read_metrics(metrics_file, "valid")
    panels = []
    for key, label in (("loss", "loss (bits)"), ("accuracy", "accuracy"), ("code_perplexity", "code perplexity")):
        series = [("train", [r["update"] for r in train], [r[key] for r in train], "-")]
        if valid and key in valid[0]:
            series.append(("valid", [r["update"] for r in valid], [r[key] for r in valid], "o-"))
        panels.append((label, series))
    return panels


def finetune_panels(metrics_file: Path) -> list[Panel]:
    """Fine-tuning: CTC loss per letter (train and valid) and the valid set's greedy WER and CER."""
    train, valid = read_metrics(metrics_file, "train"), read_metrics(metrics_file, "valid")
    loss = [("train", [r["update"] for r in train], [r["nll_loss"] for r in train], "-"),
            ("valid", [r["update"] for r in valid], [r["nll_loss"] for r in valid], "o-")]
    scored = [r for r in valid if "wer" in r]
    errors = [("WER", [r["update"] for r in scored], [r["wer"] for r in scored], "o-"),
              ("CER", [r["update"] for r in scored], [r["cer"] for r in scored], "s-")]
    return [("CTC loss (bits per letter)", loss), ("valid error rate (%)", errors)]
