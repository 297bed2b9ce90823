"""xlsr.audio: decoding, bad-file errors, downmixing, resampling, normalisation."""

import logging
import pickle
import sys
import warnings

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

import xlsr.audio
from xlsr.audio import AudioError, AudioWarning, audio_info, load_audio, normalize_waveform


def write_wav(path, num_samples, sample_rate=16000, channels=1, seed=0, subtype="FLOAT"):
    rng = np.random.default_rng(seed)
    shape = (num_samples,) if channels == 1 else (num_samples, channels)
    data = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    soundfile.write(str(path), data, sample_rate, subtype=subtype)
    return data


def test_load_mono_float32(tmp_path):
    path = tmp_path / "good.wav"
    data = write_wav(path, 1234)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.shape == (1234,)
    np.testing.assert_array_equal(wav, data)


def test_flac_is_decoded(tmp_path):
    path = tmp_path / "good.flac"
    write_wav(path, 800, subtype="PCM_16")
    assert load_audio(path).shape == (800,)


def test_corrupt_file_names_path(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(b"this is not audio" * 50)
    with pytest.raises(AudioError, match="cannot decode") as info:
        load_audio(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    with pytest.raises(AudioError, match="cannot read header") as info:
        audio_info(path)
    assert str(path) in str(info.value)


def test_empty_file_names_path(tmp_path):
    path = tmp_path / "empty.wav"
    write_wav(path, 0)
    with pytest.raises(AudioError, match=r"empty \(0 samples\)") as info:
        load_audio(path)
    assert str(info.value).startswith(str(path))


def test_wrong_sample_rate_names_path(tmp_path):
    path = tmp_path / "phone.wav"
    write_wav(path, 800, sample_rate=8000)
    with pytest.raises(AudioError, match="8000 Hz, expected 16000 Hz") as info:
        load_audio(path, sample_rate=16000)
    assert str(path) in str(info.value)


def test_resample_when_allowed_logs_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(xlsr.audio, "_warned_resample", False)
    first, second = tmp_path / "phone1.wav", tmp_path / "phone2.wav"
    write_wav(first, 800, sample_rate=8000)
    write_wav(second, 400, sample_rate=8000)
    with caplog.at_level(logging.WARNING, logger="xlsr.audio"):
        wav = load_audio(first, sample_rate=16000, resample=True)
        load_audio(second, sample_rate=16000, resample=True)
    assert wav.dtype == np.float32 and wav.shape == (1600,)
    messages = [r.getMessage() for r in caplog.records if "resampling" in r.getMessage()]
    assert len(messages) == 1 and str(first) in messages[0]


def test_resample_without_soxr_is_clear(tmp_path, monkeypatch):
    path = tmp_path / "phone.wav"
    write_wav(path, 800, sample_rate=8000)
    monkeypatch.setitem(sys.modules, "soxr", None)  # makes "import soxr" fail
    with pytest.raises(ImportError, match="pip install soxr"):
        load_audio(path, resample=True)


def test_stereo_downmixed_with_one_warning(tmp_path):
    path = tmp_path / "stereo.wav"
    data = write_wav(path, 500, channels=2)
    with pytest.warns(AudioWarning, match="stereo.wav: 2 channels, downmixed"):
        wav = load_audio(path)
    assert wav.shape == (500,)
    np.testing.assert_allclose(wav, data.mean(axis=1), rtol=1e-6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        load_audio(path)  # the same path again: no second warning
    assert not [w for w in record if issubclass(w.category, AudioWarning)]


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere.flac"
    with pytest.raises(AudioError, match="file not found") as info:
        load_audio(path)
    assert str(path) in str(info.value)
    with pytest.raises(AudioError, match="file not found"):
        audio_info(path)


def test_non_finite_samples_rejected(tmp_path):
    path = tmp_path / "nan.wav"
    data = np.zeros(100, dtype=np.float32)
    data[10] = np.nan
    soundfile.write(str(path), data, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_audio_info_reads_header(tmp_path):
    path = tmp_path / "stereo8k.wav"
    write_wav(path, 321, sample_rate=8000, channels=2)
    assert audio_info(path) == (321, 8000, 2)


def test_audio_error_pickles_for_workers(tmp_path):
    err = AudioError(tmp_path / "x.wav", "cannot decode (bad)")
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.reason == "cannot decode (bad)"
    assert isinstance(copy, ValueError)


def test_normalize_matches_layer_norm():
    wav = torch.randn(4000) * 3 + 0.5
    out = normalize_waveform(wav)
    torch.testing.assert_close(out, F.layer_norm(wav, wav.shape), rtol=0, atol=0)
    assert out.dtype == torch.float32
    assert abs(out.mean().item()) < 1e-5 and abs(out.std(unbiased=False).item() - 1) < 1e-3
    torch.testing.assert_close(normalize_waveform(wav.double()), out)
    with pytest.raises(ValueError, match="1-D"):
        normalize_waveform(torch.zeros(2, 10))
