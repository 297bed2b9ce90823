"""Word and character error rates, through the ``jiwer`` library (Levenshtein alignment by rapidfuzz).

Rates over several batches or ranks must be summed as counts, not averaged: keep :func:`error_counts` per batch
and divide the summed edits by the summed reference lengths at the end (fairseq's ``_num_word_errors`` /
``_num_words``), as :func:`rate` does.

Before scoring, every string is put in Unicode NFC (so ``ř`` written as ``r`` + U+030C is one character, the same
as the composed ``ř``: :func:`xlsr.text.normalize_unicode`), stripped, and its runs of whitespace become one space
(fairseq splits words on whitespace too); nothing else is changed (no case folding, punctuation kept). Words are whitespace-separated;
characters include those single spaces between words. fairseq's own ``uer`` counts edits of letter tokens, where
every word ends with ``|``, so it also counts the final ``|``; this CER does not.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jiwer

from xlsr.text import normalize_unicode

__all__ = ["error_counts", "rate", "word_error_rate", "char_error_rate"]


def _pairs(refs: str | Sequence[str], hyps: str | Sequence[str]) -> tuple[list[str], list[str]]:
    refs = [refs] if isinstance(refs, str) else list(refs)
    hyps = [hyps] if isinstance(hyps, str) else list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} reference(s) but {len(hyps)} hypothesis(es)")
    clean = lambda s: " ".join(normalize_unicode(str(s)).split())  # noqa: E731
    return [clean(r) for r in refs], [clean(h) for h in hyps]


def error_counts(refs: str | Sequence[str], hyps: str | Sequence[str], *, unit: str = "word") -> tuple[int, int]:
    """``(edits, reference_length)``: substitutions + deletions + insertions, and the reference's words
    (``unit="word"``) or characters (``unit="char"``), summed over the pairs."""
    if unit not in ("word", "char"):
        raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
    refs, hyps = _pairs(refs, hyps)
    if not refs:
        return 0, 0
    out = jiwer.process_words(refs, hyps) if unit == "word" else jiwer.process_characters(refs, hyps)
    edits = out.substitutions + out.deletions + out.insertions
    length = out.hits + out.substitutions + out.deletions
    return int(edits), int(length)


def rate(counts: Iterable[tuple[int, int]]) -> float:
    """Summed edits / summed reference lengths of several :func:`error_counts`; NaN when there is no reference
    word or character at all (as fairseq)."""
    edits = length = 0
    for e, n in counts:
        edits += e
        length += n
    return edits / length if length else float("nan")


def word_error_rate(refs: str | Sequence[str], hyps: str | Sequence[str]) -> float:
    """Word error rate of the hypotheses against the references (a fraction: 0.25 = 25 %; can exceed 1)."""
    return rate([error_counts(refs, hyps, unit="word")])


def char_error_rate(refs: str | Sequence[str], hyps: str | Sequence[str]) -> float:
    """Character error rate (spaces between words count as characters), a fraction."""
    return rate([error_counts(refs, hyps, unit="char")])
