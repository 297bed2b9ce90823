"""The demo's fine-tuning step without apt or the network: the transcript table of the demo speech, and the step
end to end on real transcribed speech (tests/fixtures/digits) from a tiny random 'pretrained' model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import xlsr
from xlsr.demo import apt, asr, g722, plots
from xlsr.demo import __main__ as demo_main
from xlsr.demo.asterisk import ASTERISK_PACKAGES
from xlsr.demo.finetune import FINETUNE_PNG, finetune_and_report
from xlsr.demo.tts import TTS_SENTENCES
from xlsr.manifest import read_transcript_table, write_manifest

DIGITS = Path(__file__).parent / "fixtures" / "digits"
SR = 16000


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory):
    """Manifests + .wrd/.ltr + dict.ltr.txt of the 21 number prompts (train and valid), a tiny random model."""
    dest = tmp_path_factory.mktemp("demo_ft")
    summary = write_manifest(DIGITS, dest / "data", valid_percent=0.2, seed=42, progress=False,
                             transcripts=read_transcript_table(DIGITS / "transcripts.tsv"))
    assert summary.num_valid >= 2 and summary.num_train >= 10
    torch.manual_seed(0)
    xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny")).save_pretrained(dest / "pretrained")
    return dest / "data", dest / "pretrained"


def test_finetune_step_end_to_end(digits_data, tmp_path, capsys):
    data, pretrained = digits_data
    out = tmp_path / "demo" / "finetune"
    result = finetune_and_report(
        data, pretrained, out, minutes=1.0, train_eval_utterances=6,
        overrides=["optim.max_update=4", "validate_interval_updates=3", "log_interval=1", "progress_bar=false",
                   "data.num_workers=0", "data.max_tokens=200000", "device=cpu"],
    )
    printed = capsys.readouterr().out
    assert result["updates"] == 4
    for when in ("before", "after"):
        for split in ("valid", "train"):
            for key in ("wer", "cer"):
                value = result[when][split][key]
                assert isinstance(value, float) and not math.isnan(value) and value >= 0, (when, split, key)
        assert f"valid (  {len(read_lines(data / 'valid.wrd'))} utterances), {when}" in printed
        assert f"train (  6 utterances), {when}" in printed
    assert result["after"]["valid"]["loss"] < result["before"]["valid"]["loss"]  # 4 updates of lr 5e-3 do that
    assert "WER" in printed and "CER" in printed and "CTC loss (bits/letter)" in printed
    assert len(result["examples"]) == 2
    references = dict(zip((str((DIGITS / p).resolve()) for p in read_lines(data / "valid.tsv", skip_root=True)),
                          read_lines(data / "valid.wrd")))
    for path, ref, hyp in result["examples"]:
        assert references[str(Path(path).resolve())] == ref and isinstance(hyp, str)
        assert f"reference:  {ref}" in printed
    assert xlsr.Wav2Vec2ForCTC.from_pretrained(result["model"]).vocab[4:] == read_dictionary(data)
    if plots.have_matplotlib():
        assert result["png"] == tmp_path / "demo" / FINETUNE_PNG
        assert result["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"learning curve: {result['png']}" in printed
    else:
        assert result["png"] is None and plots.PLOT_HINT in printed


def read_lines(path: Path, skip_root: bool = False) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines = lines[1:] if skip_root else lines
    return [line.split("\t")[0] for line in lines]


def read_dictionary(data: Path) -> list[str]:
    return [line.split()[0] for line in (data / "dict.ltr.txt").read_text(encoding="utf-8").splitlines()]


def test_english_prompt_text_is_named_by_what_it_says():
    text = asr.ENGLISH_PROMPT_TEXT
    assert text["digits/0.g722"] == "zero" and text["digits/13.g722"] == "thirteen"
    assert text["digits/20.g722"] == "twenty" and text["digits/90.g722"] == "ninety"
    assert text["digits/h-1.g722"] == "first" and text["digits/h-12.g722"] == "twelfth"
    assert text["digits/h-hundred.g722"] == "hundredth"
    assert text["digits/mon-0.g722"] == "January" and text["digits/mon-11.g722"] == "December"
    assert text["digits/day-0.g722"] == "Sunday" and text["digits/day-6.g722"] == "Saturday"
    assert text["letters/a.g722"] == "a" and text["letters/z.g722"] == "z"
    assert sum(key.startswith("letters/") for key in text) == 26


def _wav(path: Path, seconds: float, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).normal(0, 0.1, int(seconds * SR)).astype(np.float32)
    sf.write(str(path), noise, SR, subtype="PCM_16")


def test_tts_files_map_back_to_their_sentence(tmp_path):
    _wav(tmp_path / "tts_de" / "s03_v1.wav", 1.5)
    _wav(tmp_path / "tts_sw" / "s09_v2.wav", 1.5)
    _wav(tmp_path / "tts_de" / "s99_v0.wav", 1.5)  # no such sentence
    _wav(tmp_path / "en" / "hello.wav", 1.5)  # not synthetic
    assert asr.tts_transcripts(tmp_path) == {"tts_de/s03_v1.wav": TTS_SENTENCES["de"][3],
                                             "tts_sw/s09_v2.wav": TTS_SENTENCES["sw"][9]}


@pytest.mark.skipif(not g722.have_g722_decoder(), reason="no G.722 decoder (libspandsp or ffmpeg) installed")
def test_build_asr_data_with_a_fake_english_package(tmp_path, monkeypatch):
    """Short digit prompts (below the corpus's 1 s) are decoded into asr/; manifests + transcripts + dictionary."""
    base = tmp_path / "fs" / "usr/share/asterisk/sounds/en_US_f_Test"
    listed = []
    rng = np.random.default_rng(0)
    for rel, seconds in (("digits/7.g722", 0.6), ("digits/h-3.g722", 0.8), ("letters/q.g722", 0.5),
                         ("digits/beep.g722", 0.5), ("hello.g722", 1.2)):  # the last two: no transcript
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(rng.integers(0, 256, int(seconds * 8000), dtype=np.uint8).tobytes())
        listed.append(base / rel)
    monkeypatch.setattr(apt, "package_files", lambda pkg: listed if pkg == ASTERISK_PACKAGES["en"] else [])
    root = tmp_path / "corpus"
    for i in range(10):
        _wav(root / "tts_nl" / f"s{i:02d}_v0.wav", 1.2, seed=i)
    _wav(root / "en" / "hello.wav", 1.2)  # pretraining audio without a transcript: left out

    dest, summary = asr.build_asr_data(root, valid_percent=0.3, seed=0)
    assert dest == root.resolve() / "asr"
    for rel in ("asr/en/digits/7.wav", "asr/en/digits/h-3.wav", "asr/en/letters/q.wav"):
        info = sf.info(str(root / rel))
        assert (info.samplerate, info.channels) == (SR, 1)
    table = read_transcript_table(dest / "transcripts.tsv")
    assert table["asr/en/digits/7.wav"] == "SEVEN" and table["asr/en/letters/q.wav"] == "Q"
    assert table["tts_nl/s04_v0.wav"] == TTS_SENTENCES["nl"][4].upper()
    assert len(table) == 13 and summary.num_train + summary.num_valid == 13
    assert summary.num_valid > 0 and summary.num_train > 0
    rows = read_lines(dest / "train.tsv", skip_root=True) + read_lines(dest / "valid.tsv", skip_root=True)
    words = read_lines(dest / "train.wrd") + read_lines(dest / "valid.wrd")
    assert dict(zip(rows, words)) == table
    assert (dest / "dict.ltr.txt").is_file() and (dest / "train.ltr").is_file()


def test_command_line_runs_both_steps_or_only_pretraining(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo_main, "build_demo_corpus", lambda cache, install: tmp_path)
    monkeypatch.setattr(demo_main, "build_asr_data", lambda corpus: (calls.append("asr"), (tmp_path / "asr", None))[1])
    monkeypatch.setattr(demo_main, "train_and_report",
                        lambda corpus, out, minutes, overrides: (calls.append(("pretrain", minutes)), tmp_path / "m")[1])
    monkeypatch.setattr(demo_main, "finetune_and_report",
                        lambda data, init, out, minutes: calls.append(("finetune", data, init, out, minutes)))
    monkeypatch.setattr(demo_main, "lid_and_report",
                        lambda corpus, init, out, minutes: calls.append(("lid", corpus, init, out, minutes)))
    assert demo_main.main(["--minutes", "2", "--finetune-minutes", "0.5", "--output-dir", str(tmp_path / "o"),
                           "--lid-minutes", "0.25"]) == 0
    assert calls == ["asr", ("pretrain", 2.0), ("finetune", tmp_path / "asr", tmp_path / "m", tmp_path / "o" / "finetune",
                                                0.5), ("lid", tmp_path, tmp_path / "m", tmp_path / "o" / "lid", 0.25)]
    calls.clear()
    assert demo_main.main(["--minutes", "2", "--no-finetune", "--no-lid"]) == 0
    assert calls == [("pretrain", 2.0)]
