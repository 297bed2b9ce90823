"""Reading raw audio for wav2vec 2.0 / XLS-R: decode, check, downmix, resample, normalise.

Every problem with a file is raised as :class:`AudioError` whose message starts with the
file's path, so a bad file in a corpus of millions can be found and removed.
"""

from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np
import soundfile
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["AudioError", "AudioWarning", "load_audio", "load_audio_bytes", "prepare_waveform", "normalize_waveform",
           "audio_info", "audio_bytes_info"]

# Paths already warned about (per process), so a file read every epoch warns only once.
_warned_downmix: set[str] = set()
_warned_resample = False


class AudioError(ValueError):
    """A file that cannot be used as training audio; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) when pickled across DataLoader workers
        return (type(self), (self.path, self.reason))


class AudioWarning(UserWarning):
    """A usable but suspicious file (downmixed, too short, skipped); filterable by category."""


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise AudioError(path, "file not found")
    if not os.path.isfile(path):
        raise AudioError(path, "not a regular file")


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """Read only the header of ``path``.

    Returns:
        ``(num_samples, sample_rate, channels)``; ``num_samples`` counts frames, i.e.
        samples per channel.

    Raises:
        AudioError: the file is missing or its header cannot be parsed.
    """
    path = os.fspath(path)
    _check_exists(path)
    try:
        info = soundfile.info(path)
    except Exception as err:  # libsndfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(path, f"cannot read header ({_describe(err)})") from err
    return int(info.frames), int(info.samplerate), int(info.channels)


def audio_bytes_info(data: bytes, name: str) -> tuple[int, int, int]:
    """:func:`audio_info` of an encoded file held in memory (e.g. a row of a Hugging Face dataset); errors name
    ``name``."""
    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as err:
        raise AudioError(name, f"cannot read header ({_describe(err)})") from err
    return int(info.frames), int(info.samplerate), int(info.channels)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000, resample: bool = False) -> np.ndarray:
    """Decode ``path`` into a mono float32 waveform at ``sample_rate``.

    Multi-channel audio is averaged over channels (with one :class:`AudioWarning` per path).
    A file at another rate is an error unless ``resample`` is True, in which case it is
    resampled with ``soxr`` (optional dependency, imported only then).

    Returns:
        float32 array of shape ``(S,)``.

    Raises:
        AudioError: missing, undecodable, empty, non-finite samples, or wrong sample rate.
    """
    path = os.fspath(path)
    _check_exists(path)
    return _decode(path, path, sample_rate, resample)


def load_audio_bytes(data: bytes, name: str, sample_rate: int = 16000, resample: bool = False) -> np.ndarray:
    """:func:`load_audio` of an encoded file held in memory (any format libsndfile reads: WAV, FLAC, OGG, MP3);
    errors and warnings name ``name``."""
    return _decode(io.BytesIO(data), name, sample_rate, resample)


def _decode(source, name: str, sample_rate: int, resample: bool) -> np.ndarray:
    """Decode ``source`` (a path or a file object) as :func:`load_audio` does; ``name`` names it in errors."""
    try:
        wav, file_rate = soundfile.read(source, dtype="float32", always_2d=True)  # (S, C)
    except Exception as err:
        raise AudioError(name, f"cannot decode ({_describe(err)})") from err
    return prepare_waveform(wav, file_rate, name, sample_rate, resample)


def prepare_waveform(wav: np.ndarray, file_rate: int, where: str, sample_rate: int = 16000,
                     resample: bool = False) -> np.ndarray:
    """Decoded audio -> what :func:`load_audio` returns: checked (not empty, finite, at ``sample_rate`` unless
    ``resample``), downmixed to mono (mean over channels, one :class:`AudioWarning` per ``where``) and resampled with
    ``soxr`` when ``resample`` and the rates differ. Also used for audio decoded elsewhere (Lhotse cuts).

    Args:
        wav: (S, C) float32 samples at ``file_rate``.
        where: what errors and warnings name (a path, a cut id).

    Returns:
        float32 array of shape ``(S',)``.
    """
    name = where
    if wav.shape[0] == 0:
        raise AudioError(name, "empty (0 samples)")
    if file_rate != sample_rate and not resample:
        raise AudioError(
            name,
            f"sample rate is {file_rate} Hz, expected {sample_rate} Hz (resample the corpus, or enable resampling)",
        )

    if wav.shape[1] > 1:
        if name not in _warned_downmix:
            _warned_downmix.add(name)
            warnings.warn(
                f"{name}: {wav.shape[1]} channels, downmixed to mono (mean over channels)",
                AudioWarning,
                stacklevel=3,
            )
        mono = wav.mean(axis=1, dtype=np.float32)
    else:
        mono = wav[:, 0]

    if not np.isfinite(mono).all():
        raise AudioError(name, "contains NaN or infinite samples")

    if file_rate != sample_rate:
        mono = _resample(mono, file_rate, sample_rate, name)
        if mono.shape[0] == 0:
            raise AudioError(name, f"empty after resampling {file_rate} Hz -> {sample_rate} Hz")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _resample(wav: np.ndarray, from_rate: int, to_rate: int, path: str) -> np.ndarray:
    global _warned_resample
    try:
        import soxr  # optional dependency (xlsr[resample])
    except ImportError as err:
        raise ImportError(
            f"{path} is at {from_rate} Hz and resampling to {to_rate} Hz needs the 'soxr' "
            "package: pip install soxr (or pip install 'xlsr[resample]')"
        ) from err
    if not _warned_resample:
        _warned_resample = True
        logger.warning(
            "resampling audio on the fly (first file: %s, %d Hz -> %d Hz); resampling the "
            "corpus once beforehand is faster. Further resampled files are not reported.",
            path,
            from_rate,
            to_rate,
        )
    return soxr.resample(wav, from_rate, to_rate)


def normalize_waveform(wav: torch.Tensor) -> torch.Tensor:
    """Per-utterance zero mean / unit variance, exactly as fairseq: ``layer_norm`` over ``(S,)``.

    Args:
        wav: waveform of shape ``(S,)``.

    Returns:
        float32 tensor of shape ``(S,)``.
    """
    if wav.dim() != 1:
        raise ValueError(f"normalize_waveform expects a 1-D waveform, got shape {tuple(wav.shape)}")
    wav = wav.float()
    with torch.no_grad():
        return F.layer_norm(wav, wav.shape)


def _describe(err: Exception) -> str:
    text = str(err).strip()
    # libsndfile messages repeat the path ("Error opening '<path>': ..."); keep only the reason.
    if ": " in text and text.startswith("Error opening"):
        text = text.split(": ", 1)[1]
    return text or type(err).__name__
