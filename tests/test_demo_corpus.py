"""Tests of the demo corpus builder that need neither apt nor the network.

The Debian package look-ups are monkeypatched to point at small G.722 files
made up in a temporary folder; tests that need the G.722 decoder or
espeak-ng skip when those are not installed.
"""

from __future__ import annotations

import ctypes
import json
import pathlib
import shutil

import numpy as np
import pytest
import soundfile as sf

from xlsr.demo import apt, asterisk, corpus, g722, tts
from xlsr.demo.asterisk import ASTERISK_PACKAGES
from xlsr.demo.clips import SAMPLE_RATE

SR = SAMPLE_RATE


def _spandsp():
    for name in ("libspandsp.so.3", "libspandsp.so.2"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


needs_decoder = pytest.mark.skipif(
    not g722.have_g722_decoder(), reason="no G.722 decoder (libspandsp or ffmpeg) installed"
)


def _g722_encode(pcm16: np.ndarray) -> bytes:
    """Encode 16 kHz int16 audio to 64 kbit/s G.722 with spandsp."""
    lib = _spandsp()
    lib.g722_encode_init.restype = ctypes.c_void_p
    lib.g722_encode_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.g722_encode.restype = ctypes.c_int
    lib.g722_encode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.g722_encode_free.argtypes = [ctypes.c_void_p]
    pcm16 = np.ascontiguousarray(pcm16, dtype=np.int16)
    out = np.empty(pcm16.size // 2 + 1, dtype=np.uint8)
    state = lib.g722_encode_init(None, 64000, 0)
    n = lib.g722_encode(state, out.ctypes.data, pcm16.ctypes.data, int(pcm16.size))
    lib.g722_encode_free(state)
    return out[:n].tobytes()


def _tone(freq: float, seconds: float, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def _g722_bytes(seconds: float, seed: int) -> bytes:
    """A G.722 stream of the given length: a real encoding when spandsp is
    there, else random codewords (every byte string is valid G.722)."""
    if _spandsp() is not None:
        return _g722_encode(_tone(300 + 50 * seed, seconds))
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, int(seconds * 8000), dtype=np.uint8).tobytes()


# ---------------------------------------------------------------------------


def test_write_manifest_format_and_split(tmp_path):
    root = tmp_path / "corpus"
    groups = {}
    for lang, n in (("aa", 20), ("bb", 7)):
        groups[lang] = []
        for i in range(n):
            rel = f"{lang}/sub/f{i:02d}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(root / rel), _tone(200, 1.0 + i / 10), SR, subtype="PCM_16")
            groups[lang].append((rel, int(SR * (1.0 + i / 10))))

    counts = corpus.write_split_manifests(root, groups, tmp_path / "m1", valid_percent=0.1, seed=3)
    assert counts == {"aa": (18, 2), "bb": (6, 1)}  # every group gets >= 1 valid file
    train = (tmp_path / "m1" / "train.tsv").read_text().splitlines()
    valid = (tmp_path / "m1" / "valid.tsv").read_text().splitlines()
    assert train[0] == valid[0] == str(root.resolve())
    rows = [line.split("\t") for line in train[1:] + valid[1:]]
    assert sorted(r[0] for r in rows) == sorted(rel for g in groups.values() for rel, _ in g)
    for rel, n in rows:
        assert sf.info(str(root / rel)).frames == int(n)
    assert train[1:] == sorted(train[1:])

    # deterministic in the seed, different across seeds
    corpus.write_split_manifests(root, groups, tmp_path / "m2", valid_percent=0.1, seed=3)
    assert (tmp_path / "m2" / "valid.tsv").read_text() == "\n".join(valid) + "\n"
    corpus.write_split_manifests(root, groups, tmp_path / "m3", valid_percent=0.1, seed=4)
    assert (tmp_path / "m3" / "valid.tsv").read_text() != "\n".join(valid) + "\n"

    with pytest.raises(ValueError):
        corpus.write_split_manifests(root, groups, tmp_path / "m4", valid_percent=1.0)


@pytest.mark.skipif(_spandsp() is None, reason="libspandsp not installed")
def test_g722_decode_is_16khz():
    """A 1 kHz tone survives the G.722 round trip at 16 kHz: right length,
    right frequency, and energy above 4 kHz (the wideband sub-band) works."""
    for freq in (1000.0, 5000.0):
        x = _tone(freq, 1.0)
        y = g722.decode_g722(_g722_encode(x))
        assert y.dtype == np.int16 and y.size == x.size
        spec = np.abs(np.fft.rfft(y[400:].astype(np.float64)))  # skip codec warm-up
        peak = np.fft.rfftfreq(y.size - 400, 1 / SR)[np.argmax(spec)]
        assert abs(peak - freq) < 5
        assert np.sqrt(np.mean(y[400:].astype(np.float64) ** 2)) > 0.15 * 32767


def _fake_packages(tmp_path: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """A made-up sounds tree per package, like `dpkg -L` would list it."""
    files = {}
    for k, (lang, pkg) in enumerate(ASTERISK_PACKAGES.items()):
        base = tmp_path / "usr/share/asterisk/sounds" / f"{lang}_XX_voice"
        layout = {
            "hello.g722": 1.5,
            "goodbye.g722": 2.0,
            "digits/1.g722": 1.2,
            "digits/2.g722": 0.5,  # too short
            "beep.g722": 1.1,  # not speech
            "silence/1.g722": 1.0,  # not speech
        }
        listed = [tmp_path / "usr", base.parent, base]
        for rel, seconds in layout.items():
            p = base / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(_g722_bytes(seconds, k))
            listed.append(p)
        listed.append(tmp_path / "usr/share/doc" / pkg / "copyright")
        files[pkg] = listed
    return files


@needs_decoder
def test_build_demo_corpus_with_fake_packages(tmp_path, monkeypatch):
    pkg_files = _fake_packages(tmp_path / "fs")
    monkeypatch.setattr(apt, "missing_packages", lambda pkgs: [])
    monkeypatch.setattr(apt, "package_files", lambda pkg: pkg_files[pkg])
    monkeypatch.setattr(g722, "spandsp_package", lambda: "libspandsp2")

    cache = tmp_path / "cache"
    out = corpus.build_demo_corpus(cache, install=False, valid_percent=0.34, seed=1, tts=False)
    assert out == cache.resolve()

    for lang in ASTERISK_PACKAGES:
        got = sorted(p.relative_to(out / lang).as_posix() for p in (out / lang).rglob("*.wav"))
        assert got == ["digits/1.wav", "goodbye.wav", "hello.wav"]
        info = sf.info(str(out / lang / "hello.wav"))
        assert (info.samplerate, info.channels, info.frames) == (SR, 1, int(1.5 * SR))
        assert info.subtype == "PCM_16"

    train = (out / "train.tsv").read_text().splitlines()
    valid = (out / "valid.tsv").read_text().splitlines()
    assert train[0] == valid[0] == str(out)
    assert len(train) - 1 == 5 * 2 and len(valid) - 1 == 5 * 1
    assert all(line.count("\t") == 1 for line in train[1:] + valid[1:])

    summary = json.loads((out / "corpus.json").read_text())
    assert summary["files"] == 15 and summary["sample_rate"] == SR
    assert summary["languages"]["en"]["hours"] == round((1.5 + 2.0 + 1.2) / 3600, 4)
    assert not any(v["synthetic"] for v in summary["languages"].values())
    text = (out / "ATTRIBUTION.txt").read_text()
    assert "CC-BY-SA-3.0" in text and "asterisk-core-sounds-ru-g722" in text
    assert "espeak" not in text

    # the second call is a no-op: nothing is looked up or decoded again
    def boom(*a, **k):
        raise AssertionError("should not be called on a built corpus")

    monkeypatch.setattr(apt, "package_files", boom)
    monkeypatch.setattr(asterisk, "decode_asterisk", boom)
    before = (out / "train.tsv").stat().st_mtime_ns
    assert corpus.build_demo_corpus(cache, install=False, valid_percent=0.34, seed=1, tts=False) == out
    assert (out / "train.tsv").stat().st_mtime_ns == before

    # a different split re-writes the manifests but re-uses the decoded audio
    monkeypatch.setattr(apt, "package_files", lambda pkg: pkg_files[pkg])
    monkeypatch.setattr(asterisk, "decode_asterisk", lambda root, sources: {"cached": len(sources)})
    corpus.build_demo_corpus(cache, install=False, valid_percent=0.0, seed=1, tts=False)
    assert len((out / "valid.tsv").read_text().splitlines()) == 1
    assert len((out / "train.tsv").read_text().splitlines()) == 16


def test_missing_packages_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(apt, "missing_packages", lambda pkgs: list(pkgs))
    monkeypatch.setattr(g722, "spandsp_package", lambda: "libspandsp2")
    with pytest.raises(RuntimeError) as err:
        corpus.build_demo_corpus(tmp_path / "c", install=False)
    msg = str(err.value)
    assert "apt-get install" in msg
    for pkg in ASTERISK_PACKAGES.values():
        assert pkg in msg
    assert "espeak-ng" in msg
    assert not (tmp_path / "c" / "train.tsv").exists()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_synthesize_small(tmp_path, monkeypatch):
    monkeypatch.setattr(tts, "TTS_SENTENCES", {"de": ("Guten Morgen, wie geht es dir heute?",)})
    monkeypatch.setattr(tts, "TTS_VARIANTS", (("m1", 150, 45),))
    stats = tts.synthesize(tmp_path, ["de"])
    assert stats["synthesized"] == 1
    x, sr = sf.read(str(tmp_path / "tts_de" / "s00_v0.wav"), dtype="int16")
    assert sr == SR and x.ndim == 1 and x.size > SR
    assert tts.synthesize(tmp_path, ["de"])["cached"] == 1


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XLSR_CACHE", str(tmp_path))
    assert corpus.default_cache_dir() == tmp_path / "demo_corpus"
    monkeypatch.delenv("XLSR_CACHE")
    assert corpus.default_cache_dir() == pathlib.Path.home() / ".cache" / "xlsr" / "demo_corpus"
