"""Text as it enters xlsr: one Unicode form and no byte-order mark, wherever it comes from.

The same Czech letter can arrive as one code point (``ř``, NFC: what most tools write) or as a letter plus a
combining mark (``r`` + U+030C, NFD: macOS file names, some corpora). Left alone, the two forms become different
dictionary symbols, and WER / CER depend on how a file was saved. Every transcript, label file, dictionary,
reference and hypothesis therefore passes through :func:`normalize_unicode` (NFC) before anything else is done to
it. Text files written by Windows tools often start with a UTF-8 byte-order mark (U+FEFF): :func:`read_text_file`
drops it, so it never becomes part of the first row's file name or first letter.
"""

from __future__ import annotations

import os
import re
import unicodedata

__all__ = ["BOM", "normalize_unicode", "read_text_file", "read_text_lines"]

BOM = "\ufeff"
"""The byte-order mark, as a decoded character."""

_LINE_END = re.compile(r"\r\n|\r|\n")  # what Python's `for line in open(path)` ends lines at


def normalize_unicode(text: str) -> str:
    """``text`` in Unicode normal form C (composed: ``r`` + U+030C -> ``ř``); a leading byte-order mark dropped."""
    if text.startswith(BOM):
        text = text[1:]
    return unicodedata.normalize("NFC", text)


def read_text_file(path: str | os.PathLike) -> str:
    """The whole of a UTF-8 text file, a leading byte-order mark dropped, in NFC (:func:`normalize_unicode`).

    Line ends are kept as they are in the file (``\\r\\n`` too); split with ``splitlines()`` or on ``\\n``.

    Raises:
        FileNotFoundError: no such file.
        UnicodeDecodeError: the bytes are not UTF-8 (callers name the file in their own error).
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        return unicodedata.normalize("NFC", f.read())


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """The lines of :func:`read_text_file` (no byte-order mark, NFC), without their line ends.

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` only, as when Python (and fairseq) iterate over a text file;
    unlike ``str.splitlines()``, characters such as U+2028 or U+0085 inside a transcript do not start a new line.
    A line end at the end of the file does not make an empty last line.

    Raises:
        FileNotFoundError: no such file.
        UnicodeDecodeError: the bytes are not UTF-8 (callers name the file in their own error).
    """
    lines = _LINE_END.split(read_text_file(path))
    if lines[-1] == "":
        lines.pop()
    return lines
