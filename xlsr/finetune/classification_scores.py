"""Accuracy and macro-F1 of utterance labels (language ID, speaker, emotion).

Macro-F1 is the unweighted mean of the per-class F1 = 2 TP / (2 TP + FP + FN) over every class that occurs in the
references or the predictions (scikit-learn's ``f1_score(average="macro")`` over the same classes); a class with
no true positive has F1 0. Labels are compared after :func:`xlsr.text.normalize_unicode` and stripping.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from xlsr.text import normalize_unicode

__all__ = ["ClassificationScores", "classification_scores"]


@dataclass
class ClassificationScores:
    """``accuracy`` and ``macro_f1`` in [0, 1] (nan with no pairs); ``correct`` of ``total`` pairs; ``f1`` by class."""

    accuracy: float
    macro_f1: float
    correct: int
    total: int
    f1: dict[str, float]


def classification_scores(references: Sequence[str], predictions: Sequence[str]) -> ClassificationScores:
    """Scores of ``predictions`` against ``references`` (one label each, same order)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference(s) but {len(predictions)} prediction(s)")
    clean = lambda s: normalize_unicode(str(s)).strip()  # noqa: E731
    refs, hyps = [clean(r) for r in references], [clean(h) for h in predictions]
    true_pos = Counter(r for r, h in zip(refs, hyps) if r == h)
    ref_count, hyp_count = Counter(refs), Counter(hyps)
    classes = sorted(set(refs) | set(hyps))
    f1 = {c: 2 * true_pos[c] / (ref_count[c] + hyp_count[c]) for c in classes}
    correct, total = sum(true_pos.values()), len(refs)
    nan = float("nan")
    return ClassificationScores(accuracy=correct / total if total else nan,
                                macro_f1=sum(f1.values()) / len(f1) if f1 else nan,
                                correct=correct, total=total, f1=f1)
