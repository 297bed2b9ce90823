"""The vocabulary of letter-based CTC models: fairseq's ``Dictionary`` (specials, ``dict.ltr.txt``), the word
boundary, and the conversions letters <-> words <-> text.

* ``dict.ltr.txt``: fairseq's ``Dictionary`` text file, one ``symbol count`` a line, most frequent first; the four
  specials are not in the file: ``<s>`` = 0 (the CTC blank), ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, and line k
  (0-based) of the file is index k + 4 (:class:`Dictionary`). The vocabulary of a fine-tuned model in another
  layout (e.g. Hugging Face's: letters, ``|``, ``[UNK]``, ``[PAD]`` = the blank) is saved as every symbol in index
  order after a first line ``#xlsr:vocabulary blank=<index>`` (:meth:`Dictionary.from_vocab`), which fairseq
  refuses to read rather than misread.
* ``.ltr`` lines: letters separated by spaces, ``|`` after every word (``H E L L O | W O R L D |``,
  :func:`words_to_letters`); :func:`letters_to_words` and :func:`letters_to_text` go back to words.

Used by the label files (:mod:`xlsr.finetune.labels`), the manifest tool, the CTC head and its checkpoints.
"""

from __future__ import annotations

import collections
import logging
import os
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from xlsr.files import write_text_atomic
from xlsr.text import normalize_unicode, read_text_lines

__all__ = [
    "LabelError",
    "Dictionary",
    "SPECIAL_SYMBOLS",
    "UNK_SYMBOLS",
    "PAD_SYMBOLS",
    "WORD_BOUNDARY",
    "DROPPED_SYMBOLS",
    "words_to_letters",
    "letters_to_words",
    "letters_to_text",
    "tokens_to_text",
    "normalize_transcript",
    "letter_tokens",
    "nfc_vocab",
    "vocab_from_mapping",
]

logger = logging.getLogger(__name__)

SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")
"""fairseq's ``Dictionary`` specials, at indices 0..3; ``<s>`` (bos) is the CTC blank of ``audio_finetuning``."""

UNK_SYMBOLS = ("<unk>", "[UNK]")
"""Names of the unknown symbol in a model's vocabulary: fairseq's, Hugging Face's (its tutorials' ``[UNK]``)."""

PAD_SYMBOLS = ("<pad>", "[PAD]")
"""Names of the padding symbol (Hugging Face's CTC blank is its ``pad_token``)."""

_NOT_TARGETS = ("<s>", "</s>", *PAD_SYMBOLS)  # besides the blank: symbols a transcript cannot hold
_VOCABULARY_HEADER = "#xlsr:vocabulary"

WORD_BOUNDARY = "|"
"""The letter that ends every word in ``.ltr`` files."""

_OVERWRITE_FLAG = "#fairseq:overwrite"

DROPPED_SYMBOLS = ("<s>", "</s>")
"""Symbols fairseq's ``Dictionary.string`` leaves out of the text (its bos and eos); the blank is removed before."""



class LabelError(ValueError):
    """A malformed dictionary or label file, or a transcript that cannot be encoded; the message names the file
    and line (``path:line: ...``)."""


class Dictionary:
    """fairseq's ``fairseq.data.Dictionary`` for letters: specials ``<s>`` 0 (CTC blank), ``<pad>`` 1, ``</s>`` 2,
    ``<unk>`` 3, then the symbols of ``dict.ltr.txt`` in file order. :meth:`from_vocab` makes one of a fine-tuned
    model's own vocabulary in any layout (then ``nspecial`` is 0 and the indices below are the model's;
    ``eos_index`` and ``unk_index`` are None where it has no such symbol).

    Args:
        symbols: the non-special symbols in index order (index 4, 5, ...).
        counts: their counts (written by :meth:`save`); 0 each when not given.
    """

    blank_index: int = 0
    pad_index: int = 1
    eos_index: Optional[int] = 2
    unk_index: Optional[int] = 3
    nspecial: int = len(SPECIAL_SYMBOLS)
    _not_targets: frozenset = frozenset({0, 1, 2})  # indices refused as CTC targets: blank, pad, eos
    _not_text: frozenset = frozenset({0, 2})  # indices fairseq's ``Dictionary.string`` leaves out: bos (blank), eos

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
        return (isinstance(other, Dictionary) and self.symbols == other.symbols
                and self.blank_index == other.blank_index)

    @property
    def fairseq_layout(self) -> bool:
        """Whether the specials are fairseq's at 0..3 (``dict.ltr.txt`` can hold it as fairseq reads it)."""
        return self.nspecial == len(SPECIAL_SYMBOLS)

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
        The blank and the specials ``<s>``, ``<pad>``, ``</s>`` (``[PAD]``) are refused as targets; the unknown
        symbol is allowed.
        """
        out = []
        for sym in letters:
            idx = self._indices.get(sym)
            if idx is None:
                if not unk or self.unk_index is None:
                    fix = (f"map unknown characters to {self.symbols[self.unk_index]} (unk=True)"
                           if self.unk_index is not None else "this vocabulary has no unknown symbol")
                    raise LabelError(
                        f"{where}: character {sym!r} is not in the dictionary{self._from()}; add it to the "
                        f"dictionary, or {fix}"
                    )
                idx = self.unk_index
            elif idx in self._not_targets:
                raise LabelError(f"{where}: the special symbol {sym!r} cannot be a CTC target")
            out.append(idx)
        return out

    def string(self, indices: Iterable[int]) -> str:
        """Letter tokens of ``indices`` joined by spaces, the blank, ``<s>`` and ``</s>`` left out (fairseq's
        ``Dictionary.string``); :func:`letters_to_words` turns the result into words."""
        return " ".join(self.symbols[int(i)] for i in indices if int(i) not in self._not_text)

    @classmethod
    def from_vocab(cls, symbols: Sequence[str], blank_index: int, unk_symbol: Optional[str] = None) -> "Dictionary":
        """The dictionary of a fine-tuned model's vocabulary: ``symbols[i]`` is output ``i``, ``blank_index`` the CTC
        blank (``Wav2Vec2ForCTC.vocab`` and ``.blank_index``).

        fairseq's layout (``<s>`` ``<pad>`` ``</s>`` ``<unk>`` first, blank 0) gives a plain :class:`Dictionary`;
        any other (Hugging Face: ``[PAD]`` = blank, ``[UNK]``) keeps the model's indices: the unknown symbol is
        ``unk_symbol``, else the first of ``<unk>``/``[UNK]`` present; padding is ``<pad>``/``[PAD]``, else the blank.

        Raises:
            ValueError: ``blank_index`` outside the vocabulary, ``unk_symbol`` not in it, a repeated symbol, or a
                symbol that is empty or holds whitespace.
        """
        symbols = [str(s) for s in symbols]
        if not 0 <= blank_index < len(symbols):
            raise ValueError(f"blank index {blank_index} is outside the vocabulary of {len(symbols)} symbols")
        if unk_symbol is not None and unk_symbol not in symbols:
            raise ValueError(f"unknown symbol {unk_symbol!r} is not in the vocabulary")
        fairseq_specials = symbols[: len(SPECIAL_SYMBOLS)] == list(SPECIAL_SYMBOLS)
        if fairseq_specials and blank_index == 0 and unk_symbol in (None, "<unk>"):
            return cls(symbols[len(SPECIAL_SYMBOLS) :])
        d = cls()
        d.symbols, d.counts, d._indices = [], [], {}
        for sym in symbols:
            d._add(sym, 0)

        def first_of(names: Sequence[str]) -> Optional[int]:
            return next((d._indices[n] for n in names if n in d._indices), None)

        d.nspecial = 0
        d.blank_index = blank_index
        d.unk_index = d._indices[unk_symbol] if unk_symbol is not None else first_of(UNK_SYMBOLS)
        pad = first_of(PAD_SYMBOLS)
        d.pad_index = blank_index if pad is None else pad
        d.eos_index = d._indices.get("</s>")
        d._not_targets = frozenset({blank_index, *(d._indices[n] for n in _NOT_TARGETS if n in d._indices)})
        d._not_text = frozenset({blank_index, *(d._indices[n] for n in ("<s>", "</s>") if n in d._indices)})
        return d

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
        if lines and lines[0].split(" ")[0] == _VOCABULARY_HEADER:
            return cls._load_vocabulary(path, lines)
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

    @classmethod
    def _load_vocabulary(cls, path: str, lines: list[str]) -> "Dictionary":
        """A file :meth:`save` wrote for a vocabulary not in fairseq's layout (header, then every symbol)."""
        header = lines[0].split()
        fields = dict(item.partition("=")[::2] for item in header[1:])
        try:
            blank_index = int(fields["blank"])
        except (KeyError, ValueError):
            raise LabelError(f"{path}:1: expected '{_VOCABULARY_HEADER} blank=<index>', found {lines[0]!r}") from None
        symbols, counts = [], []
        for number, raw in enumerate(lines[1:], start=2):
            sym, sep, field = raw.rstrip().rpartition(" ")
            if not sep or not sym or not field.lstrip("-").isdigit():
                raise LabelError(f"{path}:{number}: expected '<symbol> <count>', found {raw!r}")
            symbols.append(sym)
            counts.append(int(field))
        try:
            d = cls.from_vocab(symbols, blank_index, fields.get("unk"))
        except ValueError as err:
            raise LabelError(f"{path}: {err}") from None
        d.counts = counts
        d.path = path
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write the dictionary file, atomically: fairseq's layout as fairseq's ``dict.ltr.txt`` (the non-special
        symbols with their counts), any other as every symbol after a ``#xlsr:vocabulary blank=<index>`` line."""
        if self.fairseq_layout:
            header = ""
            pairs = zip(self.symbols[self.nspecial :], self.counts[self.nspecial :])
        else:
            unk = "" if self.unk_index is None else f" unk={self.symbols[self.unk_index]}"
            header = f"{_VOCABULARY_HEADER} blank={self.blank_index}{unk}\n"
            pairs = zip(self.symbols, self.counts)
        text = header + "".join(f"{sym} {count}\n" for sym, count in pairs)
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



def letters_to_text(symbols: Sequence[str], word_delimiter: str = WORD_BOUNDARY) -> str:
    """Letter units -> text, exactly fairseq's ``Dictionary.string`` then ``post_process(..., "letter")``:
    ``<s>`` and ``</s>`` dropped, symbols joined with spaces, all spaces removed, ``|`` -> space, stripped; then
    Unicode NFC (a letter and a combining mark emitted as two units become one character, as in the labels)."""
    pieces = " ".join(s for s in symbols if s not in DROPPED_SYMBOLS)
    return normalize_unicode(pieces.replace(" ", "").replace(word_delimiter, " ").strip())


def tokens_to_text(symbols: Sequence[str], word_delimiter: str = WORD_BOUNDARY) -> str:
    """Units (repeats collapsed, blanks removed) -> text, exactly transformers' ``Wav2Vec2CTCTokenizer.decode``
    as its ASR pipeline calls it (``skip_special_tokens=False``, no lower-casing, no clean-up of spaces): the word
    delimiter -> space, every other symbol as it is, joined, stripped; then Unicode NFC, as :func:`letters_to_text`."""
    return normalize_unicode("".join(" " if s == word_delimiter else s for s in symbols).strip())


def nfc_vocab(vocab: Sequence[str]) -> list[str]:
    """``vocab`` with every symbol in Unicode NFC (:func:`xlsr.text.normalize_unicode`), so that labels, which are
    NFC, find their letters; unchanged (with a warning) when two symbols would become one (e.g. ``;`` and the
    Greek question mark U+037E), since the head has an output for each."""
    normalized = [normalize_unicode(symbol) for symbol in vocab]
    if len(set(normalized)) < len(normalized):
        seen: dict[str, str] = {}
        merged = sorted({f"{seen[n]!r} / {s!r}" for s, n in zip(vocab, normalized) if seen.setdefault(n, s) != s})
        logger.warning("the vocabulary is not put in Unicode NFC: symbols %s are one symbol in NFC", ", ".join(merged))
        return list(vocab)
    return normalized


def vocab_from_mapping(mapping: dict[str, Any]) -> list[str]:
    """A ``vocab.json`` mapping {symbol: index} -> symbols in index order (indices must be 0..V-1, distinct)."""
    by_index: dict[int, str] = {}
    for symbol, index in mapping.items():
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError(f"index of {symbol!r} is {index!r}, not an integer")
        if index in by_index:
            raise ValueError(f"symbols {by_index[index]!r} and {symbol!r} share index {index}")
        by_index[index] = symbol
    if sorted(by_index) != list(range(len(by_index))):
        missing = sorted(set(range(max(by_index, default=-1) + 1)) - set(by_index))
        raise ValueError(f"indices must be 0..{len(by_index) - 1} without gaps (missing {missing[:10]})")
    return [by_index[i] for i in range(len(by_index))]
