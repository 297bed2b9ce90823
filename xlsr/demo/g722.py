"""G.722 decoding to 16 kHz int16 samples: libspandsp through ctypes, or the ffmpeg command as a fallback."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import shutil
import subprocess
from typing import Callable

import numpy as np

from xlsr.demo import apt
from xlsr.demo.clips import SAMPLE_RATE

logger = logging.getLogger(__name__)

# Debian package names of the G.722 decoder library, newest first; the first
# one that apt knows about is installed when no decoder is present.
SPANDSP_PACKAGES = ("libspandsp3", "libspandsp2t64", "libspandsp2")
_SPANDSP_SONAMES = ("libspandsp.so.3", "libspandsp.so.2")

# spandsp's g722 options: G722_SAMPLE_RATE_8000 = 1, G722_PACKED = 2.  We want
# neither: 16 kHz output from unpacked 8-bit codewords.
_G722_RATE_64K = 64_000


def spandsp_package() -> str:
    """The Debian package name of the spandsp library on this release."""
    for name in SPANDSP_PACKAGES:
        if apt.dpkg_installed(name):
            return name
    for name in SPANDSP_PACKAGES:
        if apt.apt_candidate(name):
            return name
    return SPANDSP_PACKAGES[-1]


class SpandspG722:
    """G.722 decoder from libspandsp, through ctypes."""

    name = "libspandsp (G.722, ctypes)"

    def __init__(self) -> None:
        lib = None
        errors = []
        for soname in (*_SPANDSP_SONAMES, ctypes.util.find_library("spandsp")):
            if not soname:
                continue
            try:
                lib = ctypes.CDLL(soname)
                break
            except OSError as exc:
                errors.append(str(exc))
        if lib is None:
            raise OSError("libspandsp not found: " + "; ".join(errors))
        lib.g722_decode_init.restype = ctypes.c_void_p
        lib.g722_decode_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.g722_decode.restype = ctypes.c_int
        lib.g722_decode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        lib.g722_decode_free.restype = ctypes.c_int
        lib.g722_decode_free.argtypes = [ctypes.c_void_p]
        self._lib = lib

    def __call__(self, data: bytes) -> np.ndarray:
        code = np.frombuffer(data, dtype=np.uint8)
        out = np.empty(2 * code.size, dtype=np.int16)  # 2 samples per byte at 64 kbit/s
        state = self._lib.g722_decode_init(None, _G722_RATE_64K, 0)
        if not state:
            raise MemoryError("g722_decode_init failed")
        try:
            n = self._lib.g722_decode(state, out.ctypes.data, code.ctypes.data, int(code.size))
        finally:
            self._lib.g722_decode_free(state)
        return out[:n]


class FfmpegG722:
    """G.722 decoder of the ffmpeg command-line tool (fallback)."""

    name = "ffmpeg (adpcm_g722)"

    def __init__(self) -> None:
        self._exe = shutil.which("ffmpeg")
        if self._exe is None:
            raise OSError("ffmpeg not found")

    def __call__(self, data: bytes) -> np.ndarray:
        res = subprocess.run(
            [self._exe, "-hide_banner", "-loglevel", "error", "-f", "g722", "-i", "pipe:0",
             "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le", "pipe:1"],
            input=data, capture_output=True, check=False,
        )
        if res.returncode != 0:
            raise RuntimeError("ffmpeg failed to decode G.722: " + res.stderr.decode(errors="replace"))
        return np.frombuffer(res.stdout, dtype="<i2").astype(np.int16)


def g722_decoder() -> Callable[[bytes], np.ndarray]:
    """The lightest available G.722 decoder (spandsp, else ffmpeg); it has a ``name``."""
    for cls in (SpandspG722, FfmpegG722):
        try:
            return cls()
        except OSError as exc:
            logger.debug("G.722 decoder %s unavailable: %s", cls.name, exc)
    raise RuntimeError(
        "No G.722 decoder found. Install the spandsp library "
        f"(`apt-get install {spandsp_package()}`) or ffmpeg."
    )


def have_g722_decoder() -> bool:
    """Whether :func:`g722_decoder` finds a decoder."""
    try:
        g722_decoder()
        return True
    except RuntimeError:
        return False


def decode_g722(data: bytes) -> np.ndarray:
    """Decode a raw 64 kbit/s G.722 bitstream to 16 kHz int16 samples."""
    return g722_decoder()(data)
