"""The demo's transcribed speech, for CTC fine-tuning: the demo audio whose words are known.

* **Asterisk's English number, calendar and letter prompts** (``asterisk-core-sounds-en-g722``): files named by
  what they say (``digits/7.g722`` "seven", ``digits/h-3.g722`` "third", ``digits/mon-0.g722`` "January",
  ``digits/day-0.g722`` "Sunday", ``letters/q.g722`` the letter Q, ...).  Most of them are shorter than the
  pretraining corpus's one second, so all of them are decoded again, whatever their length, into the ``asr/en/``
  folder of the corpus cache, by the same G.722 code (:func:`xlsr.demo.asterisk.decode_asterisk`).
* **The espeak-ng sentences** of the corpus (``tts_<lang>/sNN_vK.wav`` is sentence NN of
  :data:`xlsr.demo.tts.TTS_SENTENCES` in voice variant K).

:func:`build_asr_data` writes the transcript table ``asr/transcripts.tsv`` (paths relative to the corpus root)
and, through :func:`xlsr.manifest.write_manifest`, ``asr/{train,valid}.{tsv,wrd,ltr}`` and ``asr/dict.ltr.txt``:
the layout ``python -m xlsr.finetune`` reads.  The split is drawn per file, so a sentence can be in the valid set
in one voice variant and in the training set in another.
"""

from __future__ import annotations

import logging
import pathlib
import re
from typing import Mapping

from xlsr.demo import asterisk
from xlsr.demo.asterisk import ASTERISK_PACKAGES
from xlsr.demo.tts import TTS_SENTENCES
from xlsr.files import write_text_atomic
from xlsr.manifest import ManifestSummary, read_transcript_table, write_manifest

logger = logging.getLogger(__name__)

__all__ = ["ENGLISH_PROMPT_TEXT", "ASR_FOLDER", "tts_transcripts", "decode_english_prompts", "build_asr_data"]

ASR_FOLDER = "asr"
"""The labelled set's folder inside the corpus cache."""

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen twenty").split()
_TENS = {30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy", 80: "eighty", 90: "ninety"}
_ORDINALS = ("first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
             "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth").split()
_TENTHS = {30: "thirtieth", 40: "fortieth", 50: "fiftieth", 60: "sixtieth", 70: "seventieth", 80: "eightieth",
           90: "ninetieth"}
_MONTHS = ("January February March April May June July August September October November December").split()
_DAYS = ("Sunday Monday Tuesday Wednesday Thursday Friday Saturday").split()  # Asterisk: day-N = tm_wday N


def _english_prompt_text() -> dict[str, str]:
    text = {f"digits/{n}.g722": word for n, word in enumerate(_ONES)}
    text.update({f"digits/{n}.g722": word for n, word in _TENS.items()})
    text.update({f"digits/h-{n}.g722": word for n, word in enumerate(_ORDINALS, start=1)})
    text.update({f"digits/h-{n}.g722": word for n, word in _TENTHS.items()})
    for word in ("hundred", "thousand", "million", "billion"):
        text[f"digits/{word}.g722"] = word
        text[f"digits/h-{word}.g722"] = word + "th"
    text.update({f"digits/mon-{n}.g722": word for n, word in enumerate(_MONTHS)})
    text.update({f"digits/day-{n}.g722": word for n, word in enumerate(_DAYS)})
    for word in ("today", "tomorrow", "yesterday", "minus", "dollars", "star", "pound"):  # not "oh": letters/o
        text[f"digits/{word}.g722"] = word
    text.update({f"letters/{c}.g722": c for c in "abcdefghijklmnopqrstuvwxyz"})  # the letter's name, spelt as it
    return text


ENGLISH_PROMPT_TEXT: dict[str, str] = _english_prompt_text()
"""Asterisk English prompt (path inside the voice folder) -> what it says."""


def tts_transcripts(root: pathlib.Path) -> dict[str, str]:
    """``{tts_<lang>/sNN_vK.wav: sentence}`` for the espeak-ng files present under ``root``."""
    table = {}
    for path in sorted(root.glob("tts_*/s*_v*.wav")):
        match = re.fullmatch(r"s(\d+)_v\d+", path.stem)
        lang = path.parent.name[len("tts_"):]
        if match is None or lang not in TTS_SENTENCES or int(match.group(1)) >= len(TTS_SENTENCES[lang]):
            continue
        table[path.relative_to(root).as_posix()] = TTS_SENTENCES[lang][int(match.group(1))]
    return table


def decode_english_prompts(root: pathlib.Path) -> dict[str, str]:
    """Decode the prompts of :data:`ENGLISH_PROMPT_TEXT` (any length) into ``root/asr/en/``; returns
    ``{path relative to root: text}`` of the decoded (or already decoded) ones."""
    sources = asterisk.asterisk_sources("en", ASTERISK_PACKAGES["en"])
    wanted = []
    for s in sources:
        inner = s.rel.split("/", 1)[1].removesuffix(".wav") + ".g722"  # "en/digits/7.wav" -> "digits/7.g722"
        if inner in ENGLISH_PROMPT_TEXT:
            wanted.append((asterisk.Source(s.src, f"{ASR_FOLDER}/{s.rel}"), ENGLISH_PROMPT_TEXT[inner]))
    missing = len(ENGLISH_PROMPT_TEXT) - len(wanted)
    if missing:
        logger.warning("%d of the %d transcribed English prompts are not in %s", missing, len(ENGLISH_PROMPT_TEXT),
                       ASTERISK_PACKAGES["en"])
    stats = asterisk.decode_asterisk(root, [s for s, _ in wanted], min_seconds=0.0)
    logger.info("transcribed English prompts: %s", ", ".join(f"{k} {v}" for k, v in stats.items() if v))
    return {s.rel: text for s, text in wanted if (root / s.rel).is_file()}


def _table_text(table: Mapping[str, str]) -> str:
    return "".join(f"{path}\t{' '.join(text.split())}\n" for path, text in sorted(table.items()))


def build_asr_data(corpus_root: pathlib.Path, *, valid_percent: float = 0.1, seed: int = 0,
                   english_prompts: bool = True) -> tuple[pathlib.Path, ManifestSummary]:
    """Write the transcript table and the fine-tuning manifests of the demo corpus at ``corpus_root``.

    Returns ``(corpus_root/asr, summary)``; the folder holds ``transcripts.tsv``, ``train.tsv`` / ``valid.tsv``
    (fairseq manifests, rooted at ``corpus_root``), their ``.wrd`` / ``.ltr`` transcripts and ``dict.ltr.txt``.
    Cheap: the audio is decoded once, the manifests are rewritten each call.
    """
    root = pathlib.Path(corpus_root).resolve()
    table = tts_transcripts(root)
    if english_prompts:
        table.update(decode_english_prompts(root))
    if not table:
        raise RuntimeError(f"{root}: no transcribed audio (espeak-ng sentences or Asterisk English prompts)")
    dest = root / ASR_FOLDER
    dest.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dest / "transcripts.tsv", _table_text(table))
    summary = write_manifest(root, dest, valid_percent=valid_percent, seed=seed, extensions=("wav",),
                             progress=False, transcripts=read_transcript_table(dest / "transcripts.tsv"),
                             drop_missing_transcripts=True)  # the rest of the corpus has no transcript
    if summary.num_valid == 0 or summary.num_train == 0:
        raise RuntimeError(f"{dest}: {summary.num_train} training and {summary.num_valid} valid utterances; "
                           "need both")
    logger.info("fine-tuning data in %s: %d train, %d valid utterances, %d symbols", dest, summary.num_train,
                summary.num_valid, summary.dictionary_size)
    return dest, summary
