"""Transcripts for CTC fine-tuning in fairseq's formats: ``.ltr`` and ``.wrd`` label files beside a manifest.

* ``train.wrd``: one transcript per manifest row, words separated by single spaces (``HELLO WORLD``);
* ``train.ltr``: the same as letters separated by spaces, ``|`` after every word (``H E L L O | W O R L D |``),
  as fairseq's ``examples/wav2vec/libri_labels.py`` writes it (:func:`xlsr.vocabulary.words_to_letters`);
* ``dict.ltr.txt``: the letters' dictionary (:class:`xlsr.vocabulary.Dictionary`).

Line k of ``train.ltr`` belongs to row k of ``train.tsv`` (the k-th entry after the root line), whether or not the
audio is later dropped (too short, missing), as in fairseq's ``audio_finetuning`` task.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

from xlsr.manifest import read_manifest
from xlsr.text import read_text_lines
from xlsr.vocabulary import (  # re-exported: the vocabulary's public names, where they were before
    PAD_SYMBOLS,
    SPECIAL_SYMBOLS,
    UNK_SYMBOLS,
    WORD_BOUNDARY,
    Dictionary,
    LabelError,
    letter_tokens,
    letters_to_words,
    normalize_transcript,
    words_to_letters,
)

__all__ = ["label_path", "dictionary_path", "read_labels", "text_transcripts",  # and, re-exported, the vocabulary's names:
           "LabelError", "Dictionary", "SPECIAL_SYMBOLS", "UNK_SYMBOLS", "PAD_SYMBOLS", "WORD_BOUNDARY",
           "words_to_letters", "letters_to_words", "normalize_transcript", "letter_tokens"]


# ---------------------------------------------------------------------- label files


def label_path(manifest_path: str | os.PathLike, labels: str = "ltr") -> str:
    """The label file beside a manifest: ``dir/train.tsv`` -> ``dir/train.ltr`` (fairseq's ``{split}.{labels}``)."""
    stem, _ = os.path.splitext(os.fspath(manifest_path))
    return f"{stem}.{labels}"


def dictionary_path(manifest_path: str | os.PathLike, labels: str = "ltr") -> str:
    """The dictionary beside a manifest: ``dir/train.tsv`` -> ``dir/dict.ltr.txt`` (for ``wrd`` labels too: the
    targets are letters)."""
    return os.path.join(os.path.dirname(os.fspath(manifest_path)), "dict.ltr.txt")


def read_labels(
    manifest_path: str | os.PathLike,
    labels: str = "ltr",
    num_rows: Optional[int] = None,
    *,
    skip_empty: bool = False,
) -> list[Optional[list[str]]]:
    """Letter tokens of every row of a manifest, from the label file beside it (:func:`label_path`), in Unicode NFC
    (a byte-order mark at the start ignored; ``.ltr`` lines split by :func:`letter_tokens`).

    Args:
        manifest_path: ``train.tsv``; its labels are ``train.ltr`` (``labels="ltr"``: tokens split on whitespace)
            or ``train.wrd`` (``labels="wrd"``: words, converted with :func:`words_to_letters`).
        num_rows: entries of the manifest (after its root line); read from the manifest when None.
        skip_empty: an empty (blank) transcript gives None for its row, with one warning counting them, instead
            of a :class:`LabelError`.

    Returns:
        One list of letter tokens per manifest row (None for a skipped empty transcript).

    Raises:
        FileNotFoundError: no label file.
        ValueError: the label file and the manifest have different line counts (both files and counts named).
        LabelError: an empty transcript (file and line named), ``|`` in a ``.wrd`` line, text that is not UTF-8.
    """
    if labels not in ("ltr", "wrd"):
        raise ValueError(f"labels must be 'ltr' or 'wrd', got {labels!r}")
    manifest_path = os.fspath(manifest_path)
    if num_rows is None:
        num_rows = len(read_manifest(manifest_path)[1])
    path = label_path(manifest_path, labels)
    try:
        lines = read_text_lines(path)  # lines end at \n, \r\n or \r, as fairseq's `for line in f`; NFC
    except UnicodeDecodeError as err:
        raise LabelError(f"{path}: not UTF-8 text ({err})") from None
    if len(lines) != num_rows:
        raise ValueError(
            f"{path} has {len(lines)} line(s) but its manifest {manifest_path} has {num_rows} row(s); "
            "the label file needs one transcript per manifest row, in the same order"
        )
    out: list[Optional[list[str]]] = []
    empty: list[int] = []
    for number, line in enumerate(lines, start=1):
        if labels == "wrd":
            try:
                line = words_to_letters(line)
            except ValueError as err:
                raise LabelError(f"{path}:{number}: {err}") from None
        tokens = letter_tokens(line)
        if not tokens:
            if not skip_empty:
                raise LabelError(f"{path}:{number}: empty transcript (remove the row from the manifest, or skip_empty)")
            empty.append(number)
            out.append(None)
            continue
        out.append(tokens)
    if empty:
        shown = ", ".join(str(n) for n in empty[:10]) + (" ..." if len(empty) > 10 else "")
        warnings.warn(f"{path}: {len(empty)} empty transcript(s) skipped (lines {shown})", stacklevel=2)
    return out


def text_transcripts(texts: Sequence[str], names: Sequence[str], *, keep_case: bool = False,
                     skip_empty: bool = False) -> list[tuple[str, Optional[list[str]]]]:
    """Letter tokens of transcripts given as text (a dataset's column), each exactly as
    ``python -m xlsr.manifest --transcripts`` and :func:`read_labels` make them from a transcript table:
    :func:`normalize_transcript` (NFC, whitespace, upper-case unless ``keep_case``), :func:`words_to_letters`,
    :func:`letter_tokens`.

    Args:
        texts: one transcript per row.
        names: each row's name (in errors, and returned as where each transcript came from).
        skip_empty: an empty transcript gives None (one warning counting them) instead of a :class:`LabelError`.

    Returns:
        ``(name, tokens or None)`` per row.

    Raises:
        LabelError: an empty transcript, or one holding ``|`` (the row named).
    """
    out: list[tuple[str, Optional[list[str]]]] = []
    empty: list[str] = []
    for name, text in zip(names, texts):
        try:
            tokens = letter_tokens(words_to_letters(normalize_transcript(text, keep_case=keep_case)))
        except ValueError as err:
            raise LabelError(f"{name}: {err}") from None
        if not tokens:
            if not skip_empty:
                raise LabelError(f"{name}: empty transcript (remove the row, or skip_empty)")
            empty.append(name)
            tokens = None
        out.append((name, tokens))
    if empty:
        shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        warnings.warn(f"{len(empty)} empty transcript(s) skipped ({shown})", stacklevel=2)
    return out
