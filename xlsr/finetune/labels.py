"""Transcripts for CTC fine-tuning in fairseq's formats: ``dict.ltr.txt``, ``.ltr`` and ``.wrd`` label files.

* ``train.wrd``: one transcript per manifest row, words separated by single spaces (``HELLO WORLD``);
* ``train.ltr``: the same as letters separated by spaces, ``|`` after every word (``H E L L O | W O R L D |``),
  as fairseq's ``examples/wav2vec/libri_labels.py`` writes it (:func:`words_to_letters`);
* ``dict.ltr.txt``: fairseq's ``Dictionary`` text file, one ``symbol count`` a line, most frequent first; the four
  specials are not in the file: ``<s>`` = 0 (the CTC blank), ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, and line k
  (0-based) of the file is index k + 4 (:class:`Dictionary`).

Line k of ``train.ltr`` belongs to row k of ``train.tsv`` (the k-th entry after the root line), whether or not the
audio is later dropped (too short, missing), as in fairseq's ``audio_finetuning`` task.
"""

from __future__ import annotations

import collections
import os
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

from xlsr.files import write_text_atomic
from xlsr.text import normalize_unicode, read_text_lines

__all__ = [
    "LabelError",
    "Dictionary",
    "SPECIAL_SYMBOLS",
    "WORD_BOUNDARY",
    "words_to_letters",
    "letters_to_words",
    "normalize_transcript",
    "letter_tokens",
    "label_path",
    "dictionary_path",
    "read_labels",
]

SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")
"""fairseq's ``Dictionary`` specials, at indices 0..3; ``<s>`` (bos) is the CTC blank of ``audio_finetuning``."""

WORD_BOUNDARY = "|"
"""The letter that ends every word in ``.ltr`` files."""

_OVERWRITE_FLAG = "#fairseq:overwrite"


class LabelError(ValueError):
    """A malformed dictionary or label file, or a transcript that cannot be encoded; the message names the file
    and line (``path:line: ...``)."""


class Dictionary:
    """fairseq's ``fairseq.data.Dictionary`` for letters: specials ``<s>`` 0 (CTC blank), ``<pad>`` 1, ``</s>`` 2,
    ``<unk>`` 3, then the symbols of ``dict.ltr.txt`` in file order.

    Args:
        symbols: the non-special symbols in index order (index 4, 5, ...).
        counts: their counts (written by :meth:`save`); 0 each when not given.
    """

    blank_index = 0
    pad_index = 1
    eos_index = 2
    unk_index = 3
    nspecial = len(SPECIAL_SYMBOLS)

    def __init__(self, symbols: Iterable[str] = (), counts: Optional[Iterable[int]] = None):
        symbols = list(symbols)
        counts = [0] * len(symbols) if counts is None else [int(c) for c in counts]
        if len(counts) != len(symbols):
            raise ValueError(f"{len(symbols)} symbols but {len(counts)} counts")
        self.symbols: list[str] = list(SPECIAL_SYMBOLS)
        self.counts: list[int] = [0] * self.nspecial
        self._indices: dict[str, int] = {sym: i for i, sym in enumerate(SPECIAL_SYMBOLS)}
        self.path: Optional[str] = None  # the file it was loaded from, named in encoding errors
        for sym, count in zip(symbols, counts):
            self._add(sym, count)

    def _add(self, sym: str, count: int, overwrite: bool = False) -> int:
        sym = normalize_unicode(sym)
        if not sym or any(ch.isspace() for ch in sym):
            raise ValueError(f"a symbol must be non-empty and hold no whitespace, got {sym!r}")
        if sym in self._indices and not overwrite:
            raise ValueError(f"duplicate symbol {sym!r} (already index {self._indices[sym]})")
        self._indices[sym] = len(self.symbols)  # with overwrite, the later entry wins, as in fairseq
        self.symbols.append(sym)
        self.counts.append(count)
        return self._indices[sym]

    # ------------------------------------------------------------------ lookups

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, sym: str) -> bool:
        return sym in self._indices

    def __getitem__(self, index: int) -> str:
        return self.symbols[index]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dictionary) and self.symbols == other.symbols

    def __repr__(self) -> str:
        where = f", path={self.path!r}" if self.path else ""
        return f"Dictionary({len(self)} symbols: {' '.join(self.symbols[self.nspecial:])}{where})"

    def index(self, sym: str) -> int:
        """Index of ``sym``; KeyError if it is not in the dictionary (fairseq returns ``<unk>``: see :meth:`encode`)."""
        try:
            return self._indices[sym]
        except KeyError:
            raise KeyError(f"{sym!r} is not in the dictionary{self._from()}") from None

    def _from(self) -> str:
        return f" ({self.path})" if self.path else ""

    def encode(self, letters: Sequence[str], *, where: str, unk: bool = False) -> list[int]:
        """Indices of the letter tokens ``letters`` (one ``.ltr`` line, split on whitespace).

        A letter not in the dictionary is a :class:`LabelError` naming ``where`` (e.g. ``train.ltr:12``) and the
        letter, unless ``unk`` maps it to ``<unk>`` (what fairseq's ``LabelEncoder`` always does, silently).
        The specials ``<s>``, ``<pad>`` and ``</s>`` are refused as targets (``<s>`` is the CTC blank); ``<unk>``
        is allowed.
        """
        out = []
        for sym in letters:
            idx = self._indices.get(sym)
            if idx is None:
                if not unk:
                    raise LabelError(
                        f"{where}: character {sym!r} is not in the dictionary{self._from()}; add it to the "
                        "dictionary, or map unknown characters to <unk> (unk=True)"
                    )
                idx = self.unk_index
            elif idx < self.nspecial and idx != self.unk_index:
                raise LabelError(f"{where}: the special symbol {sym!r} cannot be a CTC target")
            out.append(idx)
        return out

    def string(self, indices: Iterable[int]) -> str:
        """Letter tokens of ``indices`` joined by spaces, ``<s>`` and ``</s>`` left out (fairseq's
        ``Dictionary.string``); :func:`letters_to_words` turns the result into words."""
        skip = (self.blank_index, self.eos_index)
        return " ".join(self.symbols[int(i)] for i in indices if int(i) not in skip)

    # ------------------------------------------------------------------ files

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Dictionary":
        """Read a fairseq dictionary file (``symbol count`` a line, optionally ``#fairseq:overwrite``); symbols in
        Unicode NFC, a byte-order mark at the start ignored.

        Raises:
            FileNotFoundError: no such file.
            LabelError: a malformed line, a duplicate or special symbol (also two forms of one letter, NFC and NFD),
                or text that is not UTF-8 (file and line named).
        """
        path = os.fspath(path)
        try:
            lines = read_text_lines(path)
        except UnicodeDecodeError as err:
            raise LabelError(f"{path}: not UTF-8 text ({err})") from None
        d = cls()
        for number, raw in enumerate(lines, start=1):
            line = raw.rstrip()
            sym, sep, field = line.rpartition(" ")
            overwrite = field == _OVERWRITE_FLAG
            if overwrite:
                sym, sep, field = sym.rpartition(" ")
            try:
                count = int(field)
            except ValueError:
                count = None
            if not sep or not sym or count is None:
                raise LabelError(f"{path}:{number}: expected '<symbol> <count>', found {raw!r}")
            try:
                d._add(sym, count, overwrite=overwrite)
            except ValueError as err:
                raise LabelError(f"{path}:{number}: {err}") from None
        d.path = path
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write the dictionary file (the non-special symbols with their counts), atomically."""
        pairs = zip(self.symbols[self.nspecial :], self.counts[self.nspecial :])
        text = "".join(f"{sym} {count}\n" for sym, count in pairs)
        return write_text_atomic(path, text)

    @classmethod
    def from_transcripts(cls, lines: Iterable[str | Sequence[str]]) -> "Dictionary":
        """Dictionary of the letter tokens in ``lines`` (``.ltr`` lines, split by :func:`letter_tokens`, or token
        lists; tokens in Unicode NFC).

        Ordered by count, most frequent first, ties by symbol (code point order): fairseq's ``Dictionary.finalize``,
        which ``fairseq-preprocess --only-source`` uses to build ``dict.ltr.txt``, but without its padding of the
        vocabulary to a multiple of 8 with ``madeupword`` entries. Special symbols in the lines are not counted.
        """
        counter: collections.Counter = collections.Counter()
        for line in lines:
            counter.update(letter_tokens(line) if isinstance(line, str) else map(normalize_unicode, line))
        for sym in SPECIAL_SYMBOLS:
            counter.pop(sym, None)
        ordered = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([sym for sym, _ in ordered], [count for _, count in ordered])


# ---------------------------------------------------------------------- text <-> letters


def words_to_letters(text: str) -> str:
    """fairseq's ``.ltr`` form of a transcript: its letters separated by spaces, ``|`` after every word.

    ``"HELLO WORLD"`` -> ``"H E L L O | W O R L D |"`` (as ``libri_labels.py``; runs of whitespace count as one).
    An empty text gives ``""``. Raises ValueError if the text holds ``|`` (it could not be told from a word end).
    """
    words = text.split()
    if any(WORD_BOUNDARY in word for word in words):
        raise ValueError(f"the transcript holds the word-boundary symbol {WORD_BOUNDARY!r}: {text!r}")
    return " ".join(" ".join(word) + " " + WORD_BOUNDARY for word in words)


def letters_to_words(ltr: str) -> str:
    """Words of a ``.ltr`` line (fairseq's ``post_process(..., "letter")``): spaces dropped, ``|`` -> space."""
    return " ".join(ltr.replace(" ", "").replace(WORD_BOUNDARY, " ").split())


def normalize_transcript(text: str, *, keep_case: bool = False) -> str:
    """What ``python -m xlsr.manifest --transcripts`` does to a transcript: Unicode NFC (``r`` + U+030C -> ``ř``,
    :func:`xlsr.text.normalize_unicode`), strip, collapse runs of whitespace to one space, upper-case
    (``str.upper``, as LibriSpeech's transcripts are) unless ``keep_case``. Punctuation is kept: whatever characters
    remain become letters of the dictionary. The result is NFC (upper-casing can decompose: ``ΐ`` -> 3 code
    points, recomposed)."""
    text = " ".join(normalize_unicode(text).split())
    return text if keep_case else normalize_unicode(text.upper())


def letter_tokens(ltr: str) -> list[str]:
    """The letter tokens of one ``.ltr`` line, in NFC: split on whitespace; a token of combining marks that NFC
    composes with the letter before it is joined to that letter.

    A ``.ltr`` file written from NFD text (fairseq's ``libri_labels.py`` splits every code point) holds
    ``P R ̌ E D M E ̌ T``; this gives ``P Ř E D M Ě T``, the tokens of the same text written in NFC. Marks that stay
    separate code points in NFC (a Devanagari virama, the caron of ``J̌``) stay separate tokens, as
    :func:`words_to_letters` makes them.
    """
    tokens: list[str] = []
    for token in ltr.split():
        token = normalize_unicode(token)
        if tokens and all(unicodedata.combining(ch) for ch in token):
            joined = normalize_unicode(tokens[-1] + token)
            if len(joined) < len(tokens[-1]) + len(token):  # composed: one letter written in two tokens
                tokens[-1] = joined
                continue
        tokens.append(token)
    return tokens


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
        from xlsr.manifest import read_manifest

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
