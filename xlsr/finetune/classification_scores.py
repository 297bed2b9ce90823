"""Accuracy and macro-F1 of utterance labels (language ID, speaker, emotion).

Macro-F1 is the unweighted mean of the per-class F1 = 2 TP / (2 TP + FP + FN) over every class that occurs in the
references or the predictions (scikit-learn's ``f1_score(average="macro")`` over the same classes); a class with
no true positive has F1 0. Labels are compared after :func:`xlsr.text.normalize_unicode` and stripping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from xlsr.text import normalize_unicode

__all__ = ["ClassificationScores", "classification_scores", "confusion_metrics"]


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
    classes = sorted(set(refs) | set(hyps))
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for r, h in zip(refs, hyps):
        confusion[index[r], index[h]] += 1
    metrics = confusion_metrics(confusion, classes)
    correct, total = int(np.trace(confusion)), len(refs)
    nan = float("nan")
    return ClassificationScores(accuracy=metrics["accuracy"] if total else nan,
                                macro_f1=metrics["macro_f1"] if total else nan,
                                correct=correct, total=total, f1=metrics["per_class_f1"])


def confusion_metrics(confusion: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Metrics of a confusion matrix (rows: reference class, columns: predicted class, counts of utterances).

    Returns:
        ``accuracy`` (right / all), ``macro_f1`` (the mean F1 = 2 TP / (2 TP + FP + FN) over the classes that occur
        as reference or prediction, as scikit-learn's ``f1_score(average="macro")``), ``per_class_f1`` ({label: F1}
        of those classes), ``per_class_accuracy``
        ({label: right / its utterances, None for a class without utterances}) and ``confusion_matrix``
        ({"labels": [...], "counts": [[...]]}, row = reference).
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    true_positive = np.diag(confusion)
    references = confusion.sum(axis=1)
    predictions = confusion.sum(axis=0)
    occurring = (references + predictions) > 0
    f1 = 2 * true_positive / np.maximum(references + predictions, 1)
    total = int(confusion.sum())
    return {
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "macro_f1": float(f1[occurring].mean()) if occurring.any() else 0.0,
        "per_class_f1": {label: float(f1[i]) for i, label in enumerate(labels) if occurring[i]},
        "per_class_accuracy": {label: (float(true_positive[i] / references[i]) if references[i] else None)
                               for i, label in enumerate(labels)},
        "confusion_matrix": {"labels": list(labels), "counts": confusion.tolist()},
    }

