"""The real speech of the demo corpus: Asterisk's G.722 voice prompts from Debian packages, decoded to WAV."""

from __future__ import annotations

import logging
import os
import pathlib
from dataclasses import dataclass
from typing import Sequence

from tqdm import tqdm

from xlsr.demo import apt, g722
from xlsr.demo.clips import MIN_SECONDS, SAMPLE_RATE, is_silent, write_wav

logger = logging.getLogger(__name__)

# language -> Debian package holding that language's 16 kHz (G.722) prompts.
ASTERISK_PACKAGES: dict[str, str] = {
    "en": "asterisk-core-sounds-en-g722",
    "es": "asterisk-core-sounds-es-g722",
    "fr": "asterisk-core-sounds-fr-g722",
    "it": "asterisk-core-sounds-it-g722",
    "ru": "asterisk-core-sounds-ru-g722",
}

# Asterisk prompts that are not speech (tones, beeps, silence).
_NON_SPEECH_NAMES = {"beep", "beeperr", "ascending-2tone", "descending-2tone"}
_NON_SPEECH_DIRS = {"silence"}


@dataclass(frozen=True)
class Source:
    src: pathlib.Path  # the .g722 file
    rel: str  # output path relative to the corpus root, e.g. "en/digits/1.wav"


def asterisk_sources(lang: str, package: str) -> list[Source]:
    """The usable .g722 prompts of one language package."""
    files = sorted(p for p in apt.package_files(package) if p.suffix == ".g722")
    if not files:
        raise RuntimeError(f"package {package} contains no .g722 files")
    # The prompts live in one folder per voice (e.g. .../sounds/en_US_f_Allison),
    # possibly with subfolders (digits/, letters/...): keep paths relative to it.
    base = pathlib.Path(os.path.commonpath([str(p.parent) for p in files]))
    out = []
    for p in files:
        rel = p.relative_to(base)
        if p.stem in _NON_SPEECH_NAMES or any(part in _NON_SPEECH_DIRS for part in rel.parts[:-1]):
            continue
        out.append(Source(p, f"{lang}/{rel.with_suffix('.wav').as_posix()}"))
    return out


def decode_asterisk(root: pathlib.Path, sources: Sequence[Source], *,
                    min_seconds: float = MIN_SECONDS) -> dict[str, int]:
    """Decode the prompts of at least ``min_seconds`` into ``root``; returns counts of what happened."""
    stats = {"decoded": 0, "cached": 0, "short": 0, "silent": 0}
    todo = []
    for s in sources:
        # 64 kbit/s G.722 = 8000 bytes/s = 2 samples/byte at 16 kHz: the length
        # is known without decoding.
        if s.src.stat().st_size * 2 < min_seconds * SAMPLE_RATE:
            stats["short"] += 1
        elif (root / s.rel).exists():
            stats["cached"] += 1
        else:
            todo.append(s)
    if not todo:
        return stats
    decoder = g722.g722_decoder()
    logger.info("decoding %d G.722 prompts with %s", len(todo), decoder.name)
    for s in tqdm(todo, desc="decode G.722", unit="file"):
        data = s.src.read_bytes()
        pcm = decoder(data)
        if abs(pcm.size - 2 * len(data)) > 2 * SAMPLE_RATE // 100:  # > 10 ms off
            raise RuntimeError(
                f"{s.src}: decoded {pcm.size} samples from {len(data)} bytes; expected "
                f"{2 * len(data)} for 64 kbit/s G.722 at 16 kHz"
            )
        if is_silent(pcm):
            stats["silent"] += 1
            continue
        write_wav(root / s.rel, pcm)
        stats["decoded"] += 1
    return stats
