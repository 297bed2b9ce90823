"""A small multilingual speech corpus for CPU pretraining demos.

The corpus is assembled from sources that are available from the Debian
package archive, so it can be built on any Debian/Ubuntu machine (or CI
runner) without downloading data sets from elsewhere:

* **Real speech** - the Asterisk PBX voice prompts shipped as
  ``asterisk-core-sounds-{en,es,fr,it,ru}-g722``: about 2,800 short studio
  recordings by one professional speaker per language (about 1,700 of them,
  0.35-0.47 h per language, are speech of 1 s or longer), stored as raw
  64 kbit/s G.722 bitstreams (16 kHz audio).  They are decoded to
  16 kHz mono 16-bit WAV with the G.722 decoder of ``libspandsp`` (the
  library Asterisk's own codec derives from), called through ``ctypes``;
  ``ffmpeg`` is used instead if spandsp is not installed but ffmpeg is.
* **Synthetic speech** (optional, on by default) - a fixed list of ten
  sentences per language spoken by ``espeak-ng`` in three voice variants, for
  German, Portuguese, Polish, Dutch, Swedish, Turkish, Hindi and Swahili,
  resampled to 16 kHz.  These go to ``tts_<lang>/`` folders so that they can
  never be mistaken for real speech.

The result is a folder with ``train.tsv`` / ``valid.tsv`` in the fairseq
manifest format (first line: absolute root folder, then
``relative/path.wav<TAB>num_samples``), plus ``corpus.json`` (summary) and
``ATTRIBUTION.txt`` (licences).  Building it the first time takes well under
a minute once the packages are installed; later calls return at once.

Usage::

    from xlsr.pretrain.demo_corpus import build_demo_corpus
    manifest_dir = build_demo_corpus()          # -> ~/.cache/xlsr/demo_corpus

    python -m xlsr.pretrain.demo_corpus [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import soundfile as sf

try:  # progress bars are nice to have, never required
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover - tqdm is a declared dependency
    _tqdm = None

logger = logging.getLogger(__name__)

__all__ = [
    "build_demo_corpus",
    "default_cache_dir",
    "required_apt_packages",
    "write_manifest",
    "decode_g722",
    "ASTERISK_PACKAGES",
    "TTS_LANGUAGES",
    "SAMPLE_RATE",
]

SAMPLE_RATE = 16_000
MIN_SECONDS = 1.0
# Peak-normalised RMS below this (about -50 dBFS) counts as silence.
_SILENCE_RMS = 10 ** (-50 / 20)
# Bump when the corpus content or layout changes: it invalidates done-markers.
_CORPUS_VERSION = 1
_DONE_MARKER = ".done.json"

# language -> Debian package holding that language's 16 kHz (G.722) prompts.
ASTERISK_PACKAGES: dict[str, str] = {
    "en": "asterisk-core-sounds-en-g722",
    "es": "asterisk-core-sounds-es-g722",
    "fr": "asterisk-core-sounds-fr-g722",
    "it": "asterisk-core-sounds-it-g722",
    "ru": "asterisk-core-sounds-ru-g722",
}

# Per-language credits, as given in /usr/share/doc/<package>/copyright
# (asterisk-core-sounds 1.6.1-1, Debian bookworm).
_ASTERISK_CREDITS: dict[str, tuple[str, str, str]] = {
    # lang: (speaker / copyright holder, licence, notes)
    "en": ("2003-2010 Allison Smith (recorded by Allison Smith, "
           "financial contributions by Digium, Inc.)", "CC-BY-SA-3.0", "en-US, female"),
    "es": ("2003-2010 Allison Smith (recorded by Allison Smith, "
           "financial contributions by Digium, Inc.)", "CC-BY-SA-3.0", "es-MX, female"),
    "fr": ("2006-2008 June Wallack (recorded by June Wallack; translated by "
           "Clod Patry, Kristopher Lalletti, June Wallack; financial contributions "
           "by Digium, Inc., Unlimitel, BGM Informatique)", "CC-BY-SA-3.0", "fr-CA, female"),
    "it": ("2012 Carlo Flora <http://www.segreterietelefoniche.it> (translated by "
           "Silvia Petrin)", "CC-BY-3.0", "it-IT, male"),
    "ru": ("2010 Maxim Topal <http://www.ivrvoice.ru>", "CC-BY-3.0", "ru-RU, female"),
}

# Asterisk prompts that are not speech (tones, beeps, silence).
_NON_SPEECH_NAMES = {"beep", "beeperr", "ascending-2tone", "descending-2tone"}
_NON_SPEECH_DIRS = {"silence"}

# Debian package names of the G.722 decoder library, newest first; the first
# one that apt knows about is installed when no decoder is present.
_SPANDSP_PACKAGES = ("libspandsp3", "libspandsp2t64", "libspandsp2")
_SPANDSP_SONAMES = ("libspandsp.so.3", "libspandsp.so.2")
_ESPEAK_PACKAGE = "espeak-ng"

# espeak-ng voice variants x speaking rate (words/min) x pitch (0-99).
_TTS_VARIANTS: tuple[tuple[str, int, int], ...] = (
    ("m1", 150, 45),
    ("f2", 165, 60),
    ("m3", 140, 35),
)

# Ten everyday sentences per language, the same content in each language.
# Written for this corpus; they are only used to drive the synthesiser.
_TTS_SENTENCES: dict[str, tuple[str, ...]] = {
    "de": (
        "Der Wind weht heute kräftig über die weiten Felder im Norden des Landes.",
        "Am Morgen trinke ich meistens eine Tasse Kaffee und lese die Zeitung.",
        "Die Bibliothek in unserer Stadt hat am Wochenende leider geschlossen.",
        "Nach dem langen Winter freuen sich alle auf die ersten warmen Tage.",
        "Mein Bruder fährt jeden Tag mit dem Fahrrad zur Arbeit in die Innenstadt.",
        "Im Garten wachsen Tomaten, Bohnen und viele bunte Blumen.",
        "Der Zug nach Hamburg hat heute ungefähr zwanzig Minuten Verspätung.",
        "Kinder lernen neue Sprachen oft schneller als Erwachsene.",
        "Wir haben gestern Abend gemeinsam gekocht und bis spät in die Nacht geredet.",
        "Bitte schließen Sie das Fenster, bevor Sie das Haus verlassen.",
    ),
    "pt": (
        "O vento sopra com força sobre os campos largos do norte do país.",
        "De manhã costumo beber uma chávena de café e ler o jornal.",
        "A biblioteca da nossa cidade está fechada durante o fim de semana.",
        "Depois de um inverno longo, todos esperam pelos primeiros dias quentes.",
        "O meu irmão vai de bicicleta para o trabalho todos os dias.",
        "No jardim crescem tomates, feijões e muitas flores coloridas.",
        "O comboio para o Porto está atrasado cerca de vinte minutos.",
        "As crianças aprendem línguas novas mais depressa do que os adultos.",
        "Ontem à noite cozinhámos juntos e conversámos até muito tarde.",
        "Por favor, feche a janela antes de sair de casa.",
    ),
    "pl": (
        "Dzisiaj silny wiatr wieje nad szerokimi polami na północy kraju.",
        "Rano zwykle piję filiżankę kawy i czytam gazetę.",
        "Biblioteka w naszym mieście jest niestety zamknięta w weekend.",
        "Po długiej zimie wszyscy czekają na pierwsze ciepłe dni.",
        "Mój brat codziennie jeździ rowerem do pracy w centrum miasta.",
        "W ogrodzie rosną pomidory, fasola i wiele kolorowych kwiatów.",
        "Pociąg do Krakowa ma dzisiaj około dwudziestu minut opóźnienia.",
        "Dzieci często uczą się nowych języków szybciej niż dorośli.",
        "Wczoraj wieczorem gotowaliśmy razem i rozmawialiśmy do późna w nocy.",
        "Proszę zamknąć okno przed wyjściem z domu.",
    ),
    "nl": (
        "De wind waait vandaag hard over de wijde velden in het noorden van het land.",
        "'s Ochtends drink ik meestal een kop koffie en lees ik de krant.",
        "De bibliotheek in onze stad is in het weekend helaas gesloten.",
        "Na de lange winter kijkt iedereen uit naar de eerste warme dagen.",
        "Mijn broer fietst elke dag naar zijn werk in het centrum.",
        "In de tuin groeien tomaten, bonen en veel kleurrijke bloemen.",
        "De trein naar Amsterdam heeft vandaag ongeveer twintig minuten vertraging.",
        "Kinderen leren nieuwe talen vaak sneller dan volwassenen.",
        "Gisteravond hebben we samen gekookt en tot laat in de nacht gepraat.",
        "Wilt u alstublieft het raam sluiten voordat u het huis verlaat?",
    ),
    "sv": (
        "Vinden blåser kraftigt över de vida fälten i norra delen av landet.",
        "På morgonen dricker jag oftast en kopp kaffe och läser tidningen.",
        "Biblioteket i vår stad är tyvärr stängt under helgen.",
        "Efter den långa vintern längtar alla efter de första varma dagarna.",
        "Min bror cyklar till jobbet i centrum varje dag.",
        "I trädgården växer tomater, bönor och många färgglada blommor.",
        "Tåget till Göteborg är ungefär tjugo minuter försenat i dag.",
        "Barn lär sig ofta nya språk snabbare än vuxna.",
        "I går kväll lagade vi mat tillsammans och pratade till sent på natten.",
        "Var snäll och stäng fönstret innan du går hemifrån.",
    ),
    "tr": (
        "Bugün rüzgar ülkenin kuzeyindeki geniş tarlaların üzerinde sert esiyor.",
        "Sabahları genellikle bir fincan kahve içip gazete okurum.",
        "Şehrimizdeki kütüphane maalesef hafta sonu kapalı.",
        "Uzun kıştan sonra herkes ilk sıcak günleri bekliyor.",
        "Kardeşim her gün bisikletle şehir merkezindeki işine gidiyor.",
        "Bahçede domates, fasulye ve birçok renkli çiçek yetişiyor.",
        "Ankara treni bugün yaklaşık yirmi dakika gecikmeli.",
        "Çocuklar yeni dilleri çoğu zaman yetişkinlerden daha hızlı öğrenir.",
        "Dün akşam birlikte yemek pişirdik ve gece geç saatlere kadar sohbet ettik.",
        "Lütfen evden çıkmadan önce pencereyi kapatın.",
    ),
    "hi": (
        "आज देश के उत्तर में खुले खेतों पर तेज़ हवा चल रही है।",
        "सुबह मैं आम तौर पर एक कप चाय पीता हूँ और अख़बार पढ़ता हूँ।",
        "हमारे शहर का पुस्तकालय सप्ताहांत में बंद रहता है।",
        "लंबी सर्दी के बाद सब लोग पहले गरम दिनों का इंतज़ार कर रहे हैं।",
        "मेरा भाई हर दिन साइकिल से दफ़्तर जाता है।",
        "बगीचे में टमाटर, सेम और बहुत से रंग-बिरंगे फूल उगते हैं।",
        "दिल्ली जाने वाली ट्रेन आज लगभग बीस मिनट देर से चल रही है।",
        "बच्चे अक्सर बड़ों से जल्दी नई भाषाएँ सीख लेते हैं।",
        "कल शाम हमने साथ मिलकर खाना बनाया और देर रात तक बातें कीं।",
        "कृपया घर से निकलने से पहले खिड़की बंद कर दीजिए।",
    ),
    "sw": (
        "Leo upepo unavuma kwa nguvu juu ya mashamba mapana kaskazini mwa nchi.",
        "Asubuhi mimi hunywa kikombe cha chai na kusoma gazeti.",
        "Maktaba ya mji wetu imefungwa mwishoni mwa wiki.",
        "Baada ya msimu mrefu wa mvua, kila mtu anasubiri siku za jua.",
        "Kaka yangu huenda kazini kwa baiskeli kila siku.",
        "Bustanini kuna nyanya, maharage na maua mengi ya rangi mbalimbali.",
        "Treni ya kwenda Mombasa imechelewa kwa takriban dakika ishirini leo.",
        "Watoto mara nyingi hujifunza lugha mpya haraka kuliko watu wazima.",
        "Jana jioni tulipika chakula pamoja na tukazungumza hadi usiku sana.",
        "Tafadhali funga dirisha kabla ya kutoka nyumbani.",
    ),
}
TTS_LANGUAGES: tuple[str, ...] = tuple(_TTS_SENTENCES)


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
    """``$XLSR_CACHE/demo_corpus`` if ``XLSR_CACHE`` is set, else
    ``~/.cache/xlsr/demo_corpus``."""
    root = os.environ.get("XLSR_CACHE")
    base = pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "xlsr"
    return base / "demo_corpus"


def _progress(iterable, **kwargs):
    if _tqdm is None:
        return iterable
    return _tqdm(iterable, **kwargs)


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    """Exclusive advisory lock so that concurrent builders (e.g. several
    ranks of one job) do not step on each other."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_wav_atomic(path: pathlib.Path, pcm16: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    sf.write(str(tmp), pcm16, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _is_silent(pcm16: np.ndarray) -> bool:
    if pcm16.size == 0:
        return True
    x = pcm16.astype(np.float32) / 32768.0
    return float(np.sqrt(np.mean(x * x))) < _SILENCE_RMS


# --------------------------------------------------------------------------
# Debian packages
# --------------------------------------------------------------------------


def _dpkg_installed(package: str) -> bool:
    """Whether a Debian package is installed (False if dpkg is absent)."""
    if shutil.which("dpkg-query") is None:
        return False
    res = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True, text=True, check=False,
    )
    return res.returncode == 0 and res.stdout.strip().endswith("install ok installed")


def _missing_packages(packages: Sequence[str]) -> list[str]:
    return [p for p in packages if not _dpkg_installed(p)]


def _package_files(package: str) -> list[pathlib.Path]:
    """Files installed by a Debian package (``dpkg -L``)."""
    res = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"dpkg -L {package} failed: {res.stderr.strip()}")
    return [pathlib.Path(line) for line in res.stdout.splitlines() if line.strip()]


def _apt_candidate(package: str) -> bool:
    """Whether apt can install ``package`` (has a candidate version)."""
    if shutil.which("apt-cache") is None:
        return False
    res = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, check=False)
    for line in res.stdout.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            return line.split(":", 1)[1].strip() not in ("", "(none)")
    return False


def _spandsp_package() -> str:
    """The Debian package name of the spandsp library on this release."""
    for name in _SPANDSP_PACKAGES:
        if _dpkg_installed(name):
            return name
    for name in _SPANDSP_PACKAGES:
        if _apt_candidate(name):
            return name
    return _SPANDSP_PACKAGES[-1]


def required_apt_packages(tts: bool = True) -> list[str]:
    """The Debian packages this corpus needs (for CI scripts).

    The decoder package name is the one that fits this Debian release
    (``libspandsp2`` on bookworm)."""
    pkgs = list(ASTERISK_PACKAGES.values()) + [_spandsp_package()]
    if tts:
        pkgs.append(_ESPEAK_PACKAGE)
    return pkgs


def _apt_install(packages: Sequence[str], *, install: bool) -> None:
    """Install missing Debian packages with apt-get, or explain how to."""
    missing = _missing_packages(packages)
    if not missing:
        return
    cmd = "apt-get update && apt-get install -y --no-install-recommends " + " ".join(missing)
    if not install:
        raise RuntimeError(
            "The demo corpus needs these Debian packages, which are not installed: "
            f"{' '.join(missing)}.\nInstall them with:\n    sudo {cmd}\n"
            "(or call build_demo_corpus(install=True) as root)."
        )
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            "The demo corpus needs these Debian packages: " + " ".join(missing)
            + ", but apt-get was not found (is this a Debian/Ubuntu system?)."
        )
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise RuntimeError(
            "The demo corpus needs these Debian packages, which are not installed: "
            f"{' '.join(missing)}.\nInstalling them needs root; run:\n    sudo {cmd}\n"
            "and then call build_demo_corpus() again."
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    logger.info("installing Debian packages: %s", " ".join(missing))
    t0 = time.perf_counter()
    for args in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
        res = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(args)}` failed (exit {res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
            )
    still = _missing_packages(missing)
    if still:
        raise RuntimeError(f"apt-get reported success but these are still missing: {' '.join(still)}")
    logger.info("installed %d package(s) in %.1f s", len(missing), time.perf_counter() - t0)


# --------------------------------------------------------------------------
# G.722 decoding
# --------------------------------------------------------------------------

# spandsp's g722 options: G722_SAMPLE_RATE_8000 = 1, G722_PACKED = 2.  We want
# neither: 16 kHz output from unpacked 8-bit codewords.
_G722_RATE_64K = 64_000


class _SpandspG722:
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


class _FfmpegG722:
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


def _g722_decoder() -> Callable[[bytes], np.ndarray]:
    """The lightest available G.722 decoder (spandsp, else ffmpeg)."""
    for cls in (_SpandspG722, _FfmpegG722):
        try:
            return cls()
        except OSError as exc:
            logger.debug("G.722 decoder %s unavailable: %s", cls.name, exc)
    raise RuntimeError(
        "No G.722 decoder found. Install the spandsp library "
        f"(`apt-get install {_spandsp_package()}`) or ffmpeg."
    )


def _have_g722_decoder() -> bool:
    try:
        _g722_decoder()
        return True
    except RuntimeError:
        return False


def decode_g722(data: bytes) -> np.ndarray:
    """Decode a raw 64 kbit/s G.722 bitstream to 16 kHz int16 samples."""
    return _g722_decoder()(data)


# --------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    src: pathlib.Path  # the .g722 file
    rel: str  # output path relative to the corpus root, e.g. "en/digits/1.wav"


def _asterisk_sources(lang: str, package: str) -> list[_Source]:
    """The usable .g722 prompts of one language package."""
    files = sorted(p for p in _package_files(package) if p.suffix == ".g722")
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
        out.append(_Source(p, f"{lang}/{rel.with_suffix('.wav').as_posix()}"))
    return out


def _decode_asterisk(root: pathlib.Path, sources: Sequence[_Source]) -> dict[str, int]:
    """Decode the prompts into ``root``; returns counts of what happened."""
    stats = {"decoded": 0, "cached": 0, "short": 0, "silent": 0}
    todo = []
    for s in sources:
        # 64 kbit/s G.722 = 8000 bytes/s = 2 samples/byte at 16 kHz: the length
        # is known without decoding.
        if s.src.stat().st_size * 2 < MIN_SECONDS * SAMPLE_RATE:
            stats["short"] += 1
        elif (root / s.rel).exists():
            stats["cached"] += 1
        else:
            todo.append(s)
    if not todo:
        return stats
    decoder = _g722_decoder()
    logger.info("decoding %d G.722 prompts with %s", len(todo), decoder.name)
    for s in _progress(todo, desc="decode G.722", unit="file"):
        data = s.src.read_bytes()
        pcm = decoder(data)
        if abs(pcm.size - 2 * len(data)) > 2 * SAMPLE_RATE // 100:  # > 10 ms off
            raise RuntimeError(
                f"{s.src}: decoded {pcm.size} samples from {len(data)} bytes; expected "
                f"{2 * len(data)} for 64 kbit/s G.722 at 16 kHz"
            )
        if _is_silent(pcm):
            stats["silent"] += 1
            continue
        _write_wav_atomic(root / s.rel, pcm)
        stats["decoded"] += 1
    return stats


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample float32 mono audio (soxr if available, else FFT)."""
    if sr_in == sr_out:
        return x
    try:
        import soxr

        return soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32)
    except ImportError:
        n_out = int(round(x.size * sr_out / sr_in))
        spec = np.fft.rfft(x)
        spec = spec[: n_out // 2 + 1]
        return (np.fft.irfft(spec, n_out) * (n_out / x.size)).astype(np.float32)


def _synthesize(root: pathlib.Path, languages: Sequence[str]) -> dict[str, int]:
    """espeak-ng speech for the fixed sentences into ``root/tts_<lang>/``."""
    stats = {"synthesized": 0, "cached": 0, "short": 0}
    jobs = []
    for lang in languages:
        for i, text in enumerate(_TTS_SENTENCES[lang]):
            for j, (variant, rate, pitch) in enumerate(_TTS_VARIANTS):
                rel = f"tts_{lang}/s{i:02d}_v{j}.wav"
                if (root / rel).exists():
                    stats["cached"] += 1
                else:
                    jobs.append((lang, text, variant, rate, pitch, rel))
    if not jobs:
        return stats
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(f"espeak-ng not found (apt-get install {_ESPEAK_PACKAGE})")
    logger.info("synthesizing %d utterances with espeak-ng", len(jobs))
    with tempfile.TemporaryDirectory(prefix="xlsr_tts_") as tmp:
        tmp_wav = os.path.join(tmp, "out.wav")
        for lang, text, variant, rate, pitch, rel in _progress(jobs, desc="espeak-ng", unit="utt"):
            res = subprocess.run(
                [exe, "-b", "1", "-v", f"{lang}+{variant}", "-s", str(rate), "-p", str(pitch),
                 "-w", tmp_wav, "--", text],
                capture_output=True, text=True, check=False,
            )
            if res.returncode != 0:
                raise RuntimeError(f"espeak-ng failed for {lang}: {res.stderr.strip()}")
            x, sr = sf.read(tmp_wav, dtype="float32", always_2d=False)
            if x.ndim > 1:
                x = x.mean(axis=1)
            y = _resample(x, sr, SAMPLE_RATE)
            if y.size < MIN_SECONDS * SAMPLE_RATE:
                stats["short"] += 1
                continue
            pcm = np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)
            _write_wav_atomic(root / rel, pcm)
            stats["synthesized"] += 1
    return stats


# --------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------


def _scan(root: pathlib.Path, folders: Sequence[str]) -> dict[str, list[tuple[str, int]]]:
    """``{folder: [(relpath, num_samples), ...]}`` for WAVs of >= MIN_SECONDS."""
    out: dict[str, list[tuple[str, int]]] = {}
    for folder in folders:
        entries = []
        for p in sorted((root / folder).rglob("*.wav")):
            info = sf.info(str(p))
            if info.samplerate != SAMPLE_RATE or info.channels != 1:
                logger.warning("skipping %s: %d Hz, %d channel(s)", p, info.samplerate, info.channels)
                continue
            if info.frames < MIN_SECONDS * SAMPLE_RATE:
                continue
            entries.append((p.relative_to(root).as_posix(), int(info.frames)))
        out[folder] = entries
    return out


def write_manifest(
    root: pathlib.Path,
    groups: dict[str, list[tuple[str, int]]],
    out_dir: pathlib.Path,
    *,
    valid_percent: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[int, int]]:
    """Write fairseq ``train.tsv`` / ``valid.tsv``.

    ``groups`` maps a group name (language folder) to ``(relpath, samples)``
    pairs.  The validation split is drawn per group (so every language is in
    both splits when it has at least two files), deterministically from
    ``seed``.  Rows are sorted by path.  Returns ``{group: (n_train, n_valid)}``.
    """
    if not 0.0 <= valid_percent < 1.0:
        raise ValueError(f"valid_percent must be in [0, 1), got {valid_percent}")
    rng = np.random.default_rng(seed)
    train: list[tuple[str, int]] = []
    valid: list[tuple[str, int]] = []
    counts = {}
    for name in sorted(groups):
        entries = sorted(groups[name])
        n_valid = int(round(len(entries) * valid_percent))
        if valid_percent > 0 and n_valid == 0 and len(entries) >= 2:
            n_valid = 1
        picked = set(rng.permutation(len(entries))[:n_valid].tolist())
        for k, e in enumerate(entries):
            (valid if k in picked else train).append(e)
        counts[name] = (len(entries) - n_valid, n_valid)
    out_dir.mkdir(parents=True, exist_ok=True)
    head = str(root.resolve())
    for fname, rows in (("train.tsv", train), ("valid.tsv", valid)):
        lines = [head] + [f"{rel}\t{n}" for rel, n in sorted(rows)]
        _write_text_atomic(out_dir / fname, "\n".join(lines) + "\n")
    return counts


# --------------------------------------------------------------------------
# attribution + summary
# --------------------------------------------------------------------------


def _attribution(langs: Sequence[str], tts_langs: Sequence[str]) -> str:
    lines = [
        "xlsr demo corpus - sources and licences",
        "=" * 40,
        "",
        "Real speech: Asterisk PBX core sound prompts (asterisk-core-sounds 1.6.1),",
        "as packaged by Debian (source package `asterisk-core-sounds`, upstream",
        "http://downloads.asterisk.org/pub/telephony/asterisk/).  The prompts were",
        "decoded from G.722 to 16 kHz 16-bit WAV; tones, beeps and silence files were",
        "left out.  Otherwise unmodified.  Full licence texts: the `copyright` file",
        "of each package, e.g. /usr/share/doc/asterisk-core-sounds-en-g722/copyright.",
        "",
    ]
    for lang in langs:
        holder, licence, notes = _ASTERISK_CREDITS[lang]
        lines += [
            f"  {lang}/  ({notes})",
            f"    Debian package: {ASTERISK_PACKAGES[lang]}",
            f"    Copyright: {holder}",
            f"    Licence: {licence}",
            "",
        ]
    if tts_langs:
        lines += [
            "Synthetic speech (NOT real speech): folders " + ", ".join(f"tts_{lang}/" for lang in tts_langs),
            "  Generated with espeak-ng (Debian package `espeak-ng`; the engine and its",
            "  voice data are GPL-3.0-or-later) from sentences written for this corpus,",
            "  in three voice variants each, resampled to 16 kHz.",
            "",
        ]
    return "\n".join(lines)


def _summary(root: pathlib.Path, groups: dict[str, list[tuple[str, int]]],
             counts: dict[str, tuple[int, int]], decoder: str | None, packages: Sequence[str],
             elapsed: float) -> dict:
    langs = {}
    for name in sorted(groups):
        entries = groups[name]
        synthetic = name.startswith("tts_")
        lang = name[4:] if synthetic else name
        langs[name] = {
            "language": lang,
            "synthetic": synthetic,
            "source": "espeak-ng" if synthetic else ASTERISK_PACKAGES.get(lang, "?"),
            "files": len(entries),
            "train_files": counts[name][0],
            "valid_files": counts[name][1],
            "hours": round(sum(n for _, n in entries) / SAMPLE_RATE / 3600, 4),
        }
    total = sum(n for e in groups.values() for _, n in e)
    real = sum(n for k, e in groups.items() if not k.startswith("tts_") for _, n in e)
    return {
        "version": _CORPUS_VERSION,
        "root": str(root.resolve()),
        "sample_rate": SAMPLE_RATE,
        "files": sum(len(e) for e in groups.values()),
        "hours": round(total / SAMPLE_RATE / 3600, 4),
        "real_hours": round(real / SAMPLE_RATE / 3600, 4),
        "synthetic_hours": round((total - real) / SAMPLE_RATE / 3600, 4),
        "train_files": sum(c[0] for c in counts.values()),
        "valid_files": sum(c[1] for c in counts.values()),
        "g722_decoder": decoder,
        "apt_packages": list(packages),
        "build_seconds": round(elapsed, 1),
        "languages": langs,
    }


# --------------------------------------------------------------------------
# main entry point
# --------------------------------------------------------------------------


def build_demo_corpus(
    cache_dir: pathlib.Path | None = None,
    *,
    install: bool = True,
    valid_percent: float = 0.05,
    seed: int = 0,
    tts: bool = True,
) -> pathlib.Path:
    """Build (once) the demo corpus and return the folder holding
    ``train.tsv`` and ``valid.tsv`` (fairseq manifests).

    Args:
        cache_dir: where to put the corpus; default :func:`default_cache_dir`
            (``$XLSR_CACHE/demo_corpus`` or ``~/.cache/xlsr/demo_corpus``).
        install: install missing Debian packages with apt-get (needs root).
            If False, a missing package raises ``RuntimeError`` naming it.
        valid_percent: fraction of files per language in ``valid.tsv``.
        seed: seed of the train/valid split.
        tts: also add espeak-ng synthetic speech (``tts_<lang>/`` folders).

    A second call with the same settings returns at once (done-marker).
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    config = {"version": _CORPUS_VERSION, "valid_percent": float(valid_percent),
              "seed": int(seed), "tts": bool(tts)}
    marker = root / _DONE_MARKER

    def _is_done() -> bool:
        try:
            done = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if done.get("config") != config or done.get("root") != str(root):
            return False
        return all((root / f).is_file() for f in ("train.tsv", "valid.tsv", "corpus.json"))

    if _is_done():
        logger.info("demo corpus already built in %s", root)
        return root

    with _locked(root / ".lock"):
        if _is_done():  # another process finished it while we waited
            return root
        t0 = time.perf_counter()
        logger.info("building demo corpus in %s", root)
        marker.unlink(missing_ok=True)

        needed = list(ASTERISK_PACKAGES.values())
        if not _have_g722_decoder():
            needed.append(_spandsp_package())
        if tts:
            needed.append(_ESPEAK_PACKAGE)
        _apt_install(needed, install=install)

        decoder = _g722_decoder().name
        for lang, pkg in ASTERISK_PACKAGES.items():
            sources = _asterisk_sources(lang, pkg)
            stats = _decode_asterisk(root, sources)
            logger.info("%s (%s): %d prompts; %s", lang, pkg, len(sources),
                        ", ".join(f"{k} {v}" for k, v in stats.items() if v))

        folders = list(ASTERISK_PACKAGES)
        if tts:
            stats = _synthesize(root, TTS_LANGUAGES)
            logger.info("espeak-ng: %s", ", ".join(f"{k} {v}" for k, v in stats.items() if v))
            folders += [f"tts_{lang}" for lang in TTS_LANGUAGES]

        groups = _scan(root, folders)
        counts = write_manifest(root, groups, root, valid_percent=valid_percent, seed=seed)
        _write_text_atomic(root / "ATTRIBUTION.txt",
                           _attribution(list(ASTERISK_PACKAGES), TTS_LANGUAGES if tts else ()))
        packages = list(ASTERISK_PACKAGES.values()) + [_spandsp_package()]
        if tts:
            packages.append(_ESPEAK_PACKAGE)
        summary = _summary(root, groups, counts, decoder, packages, time.perf_counter() - t0)
        _write_text_atomic(root / "corpus.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        _write_text_atomic(marker, json.dumps({"config": config, "root": str(root)}) + "\n")
        logger.info("demo corpus: %d files, %.2f h (%.2f h real, %.2f h synthetic) in %.1f s",
                    summary["files"], summary["hours"], summary["real_hours"],
                    summary["synthetic_hours"], summary["build_seconds"])
    return root


def load_summary(corpus_dir: pathlib.Path) -> dict:
    """The ``corpus.json`` summary of a built corpus."""
    return json.loads((pathlib.Path(corpus_dir) / "corpus.json").read_text(encoding="utf-8"))


def _format_summary(summary: dict) -> str:
    rows = [f"{'folder':<8} {'files':>6} {'train':>6} {'valid':>6} {'hours':>7}  source"]
    for name, s in summary["languages"].items():
        rows.append(f"{name:<8} {s['files']:>6} {s['train_files']:>6} {s['valid_files']:>6} "
                    f"{s['hours']:>7.3f}  {s['source']}")
    rows.append(f"{'total':<8} {summary['files']:>6} {summary['train_files']:>6} "
                f"{summary['valid_files']:>6} {summary['hours']:>7.3f}  "
                f"({summary['real_hours']:.3f} h real, {summary['synthetic_hours']:.3f} h synthetic)")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xlsr.pretrain.demo_corpus",
        description="Build the small multilingual demo corpus (fairseq manifests).",
    )
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None,
                        help=f"where to build it (default: {default_cache_dir()})")
    parser.add_argument("--no-install", action="store_true",
                        help="do not run apt-get; fail if Debian packages are missing")
    parser.add_argument("--no-tts", action="store_true", help="leave out espeak-ng synthetic speech")
    parser.add_argument("--valid-percent", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-packages", action="store_true",
                        help="print the Debian packages needed and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.print_packages:
        print(" ".join(required_apt_packages(tts=not args.no_tts)))
        return 0
    t0 = time.perf_counter()
    try:
        path = build_demo_corpus(args.cache_dir, install=not args.no_install,
                                 valid_percent=args.valid_percent, seed=args.seed, tts=not args.no_tts)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = load_summary(path)
    print(f"demo corpus: {path}  ({time.perf_counter() - t0:.1f} s)")
    print(f"  manifests: {path / 'train.tsv'}, {path / 'valid.tsv'}")
    print(f"  G.722 decoder: {summary['g722_decoder']}")
    print(_format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
