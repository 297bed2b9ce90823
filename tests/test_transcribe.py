"""``python -m xlsr.transcribe`` on a model that emits letters: streaming JSON lines over several batches and a
manifest, error lines for unusable files, ``--resume``, and ``--score`` against an independent jiwer computation."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch

import xlsr
import xlsr.inference as inference_module
import xlsr.transcribe as transcribe_module
from xlsr.audio import audio_info, load_audio, normalize_waveform
from xlsr.manifest import read_transcript_table, write_manifest
from xlsr.inference import length_sorted_batches
from xlsr.transcribe import main

REPO = Path(__file__).resolve().parents[1]
DIGITS = Path(__file__).parent / "fixtures" / "digits"
CTC_MINI = Path(__file__).parent / "fixtures" / "fairseq" / "ctc_mini"
FILES = [str(DIGITS / f"{n}.flac") for n in (3, 17, 0, 12, 7, 20, 1, 9, 14)]
BATCH_SECONDS = "2.5"  # 2 to 4 of these clips (0.5 to 1.1 s) per batch


def waveform(model, path: str) -> torch.Tensor:
    """(1, S) model input of one file, as transcribe reads it."""
    wav = torch.from_numpy(load_audio(path, model.cfg.encoder.sample_rate, resample=True))
    return (normalize_waveform(wav) if model.cfg.encoder.normalize else wav).unsqueeze(0)


def save_letter_emitting_model(dest: Path, blank_share: float = 0.6) -> Path:
    """fairseq's fine-tuned ctc_mini (32 letters) with its output bias set as training would leave it, so that
    greedy decoding of real speech gives letters and blanks: the mean logit of every output over the 21 digit
    clips removed, ``<pad>``/``</s>``/``<unk>`` never chosen, and the blank raised until it wins ``blank_share`` of
    the frames. Saved with ``save_pretrained`` into ``dest``."""
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(CTC_MINI / "checkpoint.pt").eval()
    with torch.inference_mode():
        logits = torch.cat([model(waveform(model, str(p))).logits[0] for p in sorted(DIGITS.glob("*.flac"))])
    bias = -logits.mean(0)
    specials = [model.vocab.index(s) for s in ("<pad>", "</s>", "<unk>")]
    bias[specials] = -1e4
    blank = model.blank_index
    centred = logits + bias
    others = [i for i in range(len(model.vocab)) if i != blank and i not in specials]
    margin = centred[:, others].max(-1).values - centred[:, blank]  # > 0: a letter wins the frame
    bias[blank] += torch.quantile(margin, blank_share)
    with torch.no_grad():
        model.lm_head.bias += bias
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def letter_model(tmp_path_factory):
    """(model folder, the model) of :func:`save_letter_emitting_model`."""
    dest = save_letter_emitting_model(tmp_path_factory.mktemp("letters") / "model")
    return dest, xlsr.Wav2Vec2ForCTC.from_pretrained(dest).eval()


@torch.inference_mode()
def one_by_one(model, paths) -> list[str]:
    """The library's greedy transcript of each file, one file per forward (no batching, no padding)."""
    return [model.decode(model(waveform(model, p)))[0] for p in paths]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def batch_sizes(paths, batch_seconds: float) -> list[int]:
    return [len(b) for b in length_sorted_batches([audio_info(p)[0] for p in paths], int(batch_seconds * 16000))]


def test_cli_over_batches_and_a_manifest_equals_file_by_file_decoding(letter_model, tmp_path):
    model_dir, model = letter_model
    rest = [str(DIGITS / f"{n}.flac") for n in (5, 11, 16, 19)]
    manifest = tmp_path / "test.tsv"
    manifest.write_text(f"{DIGITS}\n" + "".join(f"{Path(p).name}\t{audio_info(p)[0]}\n" for p in rest))
    assert len(batch_sizes(FILES + rest, float(BATCH_SECONDS))) >= 3
    result = subprocess.run([sys.executable, "-m", "xlsr.transcribe", str(model_dir), *FILES, "--manifest",
                             str(manifest), "--batch-seconds", BATCH_SECONDS, "--no-progress"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    lines.sort(key=lambda line: line["index"])
    assert [line["index"] for line in lines] == list(range(len(FILES) + len(rest)))
    assert [line["path"] for line in lines] == FILES + rest
    texts = [line["text"] for line in lines]
    assert texts == one_by_one(model, FILES + rest)
    for text in texts:
        assert len(set(text) - {" "}) > 1, texts


def test_each_batch_is_written_before_the_next_is_read(letter_model, tmp_path, monkeypatch):
    model_dir, model = letter_model
    out = tmp_path / "out.jsonl"
    on_disk = []  # lines in the output file each time a batch is assembled
    real_pad_batch = transcribe_module.pad_batch

    def pad_batch(waveforms):
        on_disk.append(len(out.read_text().splitlines()))
        return real_pad_batch(waveforms)

    monkeypatch.setattr(transcribe_module, "pad_batch", pad_batch)
    assert main([str(model_dir), *FILES, "--batch-seconds", BATCH_SECONDS, "--no-progress",
                 "--output", str(out)]) == 0
    sizes = batch_sizes(FILES, float(BATCH_SECONDS))
    assert len(sizes) >= 3 and on_disk == [sum(sizes[:k]) for k in range(len(sizes))]
    lines = read_jsonl(out)
    assert [len(lines)] == [len(FILES)] and sorted(line["index"] for line in lines) == list(range(len(FILES)))
    assert [line["path"] for line in lines] == [FILES[line["index"]] for line in lines]
    assert {line["path"]: line["text"] for line in lines} == dict(zip(FILES, one_by_one(model, FILES)))


def logged_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "xlsr.transcribe" and r.levelno == logging.ERROR]


def test_unusable_files_are_error_lines_and_the_rest_go_on(letter_model, tmp_path, capsys, caplog):
    model_dir, model = letter_model
    rate = 16000
    bad = {"missing": tmp_path / "missing.wav", "corrupt": tmp_path / "corrupt.wav",
           "empty": tmp_path / "empty.wav", "nan": tmp_path / "nan.wav", "short": tmp_path / "short.wav"}
    bad["corrupt"].write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" * 3)
    sf.write(bad["empty"], np.zeros(0, dtype=np.float32), rate)
    sf.write(bad["nan"], np.full(4000, np.nan, dtype=np.float32), rate, subtype="FLOAT")
    sf.write(bad["short"], load_audio(FILES[0])[:399], rate)  # one sample short of the first frame (400)
    paths = [FILES[0], *map(str, bad.values()), FILES[1]]
    out = tmp_path / "out.jsonl"
    assert main([str(model_dir), *paths, "--batch-seconds", "1", "--no-progress", "--output", str(out)]) == 1
    lines = {line["path"]: line for line in read_jsonl(out)}
    assert sorted(lines) == sorted(paths)
    errors = logged_errors(caplog)
    for name, path in bad.items():
        line = lines[str(path)]
        assert "text" not in line and line["error"].startswith(f"{path}: "), (name, line)
        assert line["error"] in errors, name
    assert "too short: 399 samples" in lines[str(bad["short"])]["error"]
    assert [lines[p]["text"] for p in FILES[:2]] == one_by_one(model, FILES[:2])
    assert errors[-1].startswith("5 of 7 files could not be transcribed")
    assert "Traceback" not in capsys.readouterr().err


def test_another_sample_rate_without_soxr_is_a_one_line_error(letter_model, tmp_path, monkeypatch, capsys, caplog):
    model_dir, model = letter_model
    wav8k = tmp_path / "8k.wav"
    sf.write(wav8k, load_audio(FILES[0])[::2], 8000)
    out = tmp_path / "out.jsonl"
    monkeypatch.setitem(sys.modules, "soxr", None)  # import soxr -> ImportError
    assert main([str(model_dir), str(wav8k), FILES[1], "--no-progress", "--output", str(out)]) == 1
    lines = {line["path"]: line for line in read_jsonl(out)}
    message = lines[str(wav8k)]["error"]
    assert message.startswith(str(wav8k)) and "8000 Hz" in message and "\n" not in message
    assert "pip install soxr" in message and "xlsr[resample]" in message
    assert [m for m in logged_errors(caplog) if str(wav8k) in m] == [message]
    assert "Traceback" not in capsys.readouterr().err
    assert lines[FILES[1]]["text"] == one_by_one(model, FILES[1:2])[0]
    monkeypatch.delitem(sys.modules, "soxr")  # with soxr: resampled and transcribed
    assert main([str(model_dir), str(wav8k), "--no-progress", "--output", str(out)]) == 0
    assert read_jsonl(out)[0]["text"] == one_by_one(model, [str(wav8k)])[0]


def test_resume_keeps_what_was_done_and_transcribes_the_rest(letter_model, tmp_path, monkeypatch):
    model_dir, model = letter_model
    full = tmp_path / "full.jsonl"
    args = [str(model_dir), *FILES, "--batch-seconds", BATCH_SECONDS, "--no-progress"]
    assert main([*args, "--output", str(full)]) == 0
    done = read_jsonl(full)
    # as a killed run leaves it: two batches' lines, then a line for a file that failed then, then a torn line
    kept, failed, torn = done[:2], done[2], json.dumps(done[3])
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in kept)
                       + json.dumps({"index": failed["index"], "path": failed["path"], "error": "x: was missing"})
                       + "\n" + torn[: len(torn) // 2])
    read = []
    real_load = inference_module.load_audio
    monkeypatch.setattr(inference_module, "load_audio", lambda path, *a, **k: read.append(path) or real_load(
        path, *a, **k))
    assert main([*args, "--output", str(partial), "--resume"]) == 0
    assert sorted(read) == sorted(set(FILES) - {r["path"] for r in kept})  # the failed and torn ones again
    lines = read_jsonl(partial)
    assert lines[:2] == kept
    assert sorted((r["index"], r["path"], r["text"]) for r in lines) == sorted(
        (r["index"], r["path"], r["text"]) for r in done)


def digits_test_set(dest: Path) -> tuple[Path, dict[str, str]]:
    """A manifest (train.tsv, with .wrd/.ltr beside it) of all 21 digit clips by ``xlsr.manifest``, and the
    reference words of each absolute path, read from transcripts.tsv here."""
    write_manifest(DIGITS, dest, valid_percent=0.0, progress=False,
                   transcripts=read_transcript_table(DIGITS / "transcripts.tsv"))
    references = {}
    for line in (DIGITS / "transcripts.tsv").read_text(encoding="utf-8").splitlines():
        name, words = line.split("\t")
        references[name] = words
    return dest / "train.tsv", references


def printed_rates(stdout: str) -> tuple[float, float]:
    found = re.search(r"WER ([0-9.]+) % .*CER ([0-9.]+) %", stdout)
    assert found, stdout
    return float(found.group(1)), float(found.group(2))


@pytest.mark.parametrize("labels", ["ltr", "wrd"])
def test_score_prints_the_wer_and_cer_of_the_written_transcripts(letter_model, tmp_path, labels):
    model_dir, _ = letter_model
    manifest, references = digits_test_set(tmp_path / "data")
    if labels == "wrd":
        manifest.with_suffix(".ltr").unlink()  # (so that the .ltr cannot be what is read)
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "xlsr.transcribe", str(model_dir), "--manifest", str(manifest),
                             "--score", "--labels", labels, "--batch-seconds", "4", "--no-progress",
                             "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = read_jsonl(out)
    assert len(lines) == 21
    refs = [references[Path(line["path"]).name] for line in lines]
    hyps = [line["text"] for line in lines]
    assert [line["reference"] for line in lines] == refs
    assert len(set("".join(hyps)) - {" "}) > 1
    wer, cer = printed_rates(result.stdout)
    assert wer == round(100 * jiwer.wer(refs, hyps), 2) and cer == round(100 * jiwer.cer(refs, hyps), 2)
    assert f"scored 21 utterances against {manifest.with_suffix('.' + labels)}" in result.stdout


def test_score_needs_a_manifest_with_labels(letter_model, tmp_path, capsys):
    model_dir, _ = letter_model
    with pytest.raises(SystemExit):
        main([str(model_dir), FILES[0], "--score"])
    manifest, _ = digits_test_set(tmp_path / "data")
    manifest.with_suffix(".ltr").write_text("O N E\n")
    assert main([str(model_dir), "--manifest", str(manifest), "--score", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and str(manifest.with_suffix(".ltr")) in err and "1 line(s)" in err


def test_score_leaves_out_failed_files_and_empty_references(letter_model, tmp_path, capsys):
    model_dir, _ = letter_model
    names = ["4.flac", "missing.flac", "8.flac", "13.flac"]
    words = ["FOUR", "", "", "THIRTEEN"]  # the missing file, and 8.flac with an empty transcript
    manifest = tmp_path / "test.tsv"
    manifest.write_text(f"{DIGITS}\n" + "".join(f"{name}\t16000\n" for name in names))
    (tmp_path / "test.wrd").write_text("".join(w + "\n" for w in words))
    out = tmp_path / "out.jsonl"
    assert main([str(model_dir), "--manifest", str(manifest), "--score", "--labels", "wrd", "--no-progress",
                 "--output", str(out)]) == 1
    lines = {Path(line["path"]).name: line for line in read_jsonl(out)}
    assert "error" in lines["missing.flac"] and lines["8.flac"]["reference"] is None and "text" in lines["8.flac"]
    refs, hyps = ["FOUR", "THIRTEEN"], [lines["4.flac"]["text"], lines["13.flac"]["text"]]
    printed = capsys.readouterr().out
    assert "scored 2 utterances" in printed and "(not scored: 1 failed; 1 with an empty reference)" in printed
    assert printed_rates(printed) == (round(100 * jiwer.wer(refs, hyps), 2), round(100 * jiwer.cer(refs, hyps), 2))
