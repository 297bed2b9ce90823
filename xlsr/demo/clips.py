"""What goes into the demo corpus: 16 kHz mono 16-bit WAV clips of at least one second that are not silence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from xlsr.files import write_atomic

SAMPLE_RATE = 16_000
MIN_SECONDS = 1.0
# Peak-normalised RMS below this (about -50 dBFS) counts as silence.
SILENCE_RMS = 10 ** (-50 / 20)


def is_silent(pcm16: np.ndarray) -> bool:
    """Whether int16 samples are empty or quieter than :data:`SILENCE_RMS`."""
    if pcm16.size == 0:
        return True
    x = pcm16.astype(np.float32) / 32768.0
    return float(np.sqrt(np.mean(x * x))) < SILENCE_RMS


def write_wav(path: Path, pcm16: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write int16 samples as a 16-bit WAV file through :func:`xlsr.files.write_atomic`."""
    write_atomic(path, lambda handle: sf.write(handle, pcm16, sample_rate, format="WAV", subtype="PCM_16"))
