"""``python -m xlsr.classify``: top labels equal to transformers' audio-classification pipeline on an HF folder,
crops averaged on a long input equal to the mean of per-crop logits computed with the library, streaming JSON
lines and ``--resume``, error lines for unusable files, ``--score`` against the labels beside a manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_classification import save_hf
from test_huggingface import LAYOUTS, small_hf_config

import xlsr
import xlsr.inference as inference_module
from xlsr.audio import load_audio, normalize_waveform
from xlsr.classify import main

SPEECH = Path(__file__).parent / "fixtures" / "speech"
FILES = sorted(str(p) for p in SPEECH.rglob("*.flac"))  # 20 clips, 1 to 2.4 s, 4 per language
LANGUAGES = sorted({Path(p).parent.name for p in FILES})


def model_input(model, wave: torch.Tensor) -> torch.Tensor:
    return normalize_waveform(wave) if model.cfg.encoder.normalize else wave


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    """(HF folder, our model loaded from it) of a random 5-language transformers classifier whose classifier is
    re-centred on the speech clips (bias = minus the mean logit, weights scaled up), so that different clips get
    different top labels with clear margins."""
    import transformers

    torch.manual_seed(3)
    config = small_hf_config(transformers, **LAYOUTS["layer"], num_labels=len(LANGUAGES), classifier_proj_size=24,
                             id2label=dict(enumerate(LANGUAGES)), label2id={s: i for i, s in enumerate(LANGUAGES)})
    hf = transformers.Wav2Vec2ForSequenceClassification(config).eval()
    waves = [normalize_waveform(torch.from_numpy(load_audio(p))) for p in FILES]
    source = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    attention_mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(w), dtype=torch.long) for w in waves],
                                                     batch_first=True)
    with torch.no_grad():
        logits = hf(source, attention_mask=attention_mask).logits  # (20, 5) = pooled @ W.T + b
        scale = 4.0 / (logits - hf.classifier.bias).std(0).mean()
        hf.classifier.weight.mul_(scale)
        hf.classifier.bias.copy_(-scale * (logits - hf.classifier.bias).mean(0))
    folder = save_hf(hf, tmp_path_factory.mktemp("clf") / "hf")
    return folder, xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(folder)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_top_labels_equal_the_audio_classification_pipeline(hf_classifier, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, model = hf_classifier
    out = tmp_path / "out.jsonl"
    assert main([str(folder), *FILES, "--output", str(out), "--top-k", "5", "--batch-seconds", "5",
                 "--no-progress"]) == 0
    lines = sorted(read_jsonl(out), key=lambda r: r["index"])
    assert [r["path"] for r in lines] == FILES
    classify = transformers.pipeline("audio-classification", model=str(folder), device="cpu")
    clear = 0
    for record, path in list(zip(lines, FILES))[::2]:  # 2 clips per language
        expected = classify({"raw": load_audio(path), "sampling_rate": 16000}, top_k=len(LANGUAGES))
        # (1e-3: the pipeline's feature extractor normalises with eps 1e-7, fairseq and we with layer_norm's 1e-5)
        got = {t["label"]: t["score"] for t in record["top_k"]}
        assert max(abs(got[e["label"]] - e["score"]) for e in expected) < 1e-3
        if expected[0]["score"] - expected[1]["score"] > 2e-3:  # no near tie that the 1e-3 could flip
            assert record["label"] == expected[0]["label"]
            clear += 1
        assert record["crops"] == 1
    assert clear >= 7
    assert len({r["label"] for r in lines}) >= 3, "degenerate model: every clip gets the same label"


def test_long_input_is_scored_on_crops_whose_logits_are_averaged(hf_classifier, tmp_path):
    folder, model = hf_classifier
    long_wave = np.concatenate([load_audio(p) for p in FILES[:6]])  # about 9 s
    long_path = tmp_path / "long.wav"
    sf.write(long_path, long_wave, 16000, subtype="FLOAT")
    out = tmp_path / "out.jsonl"
    assert main([str(folder), str(long_path), FILES[0], "--crop-seconds", "2", "--top-k", "5", "--output", str(out),
                 "--batch-seconds", "4", "--no-progress"]) == 0
    got = {r["path"]: r for r in read_jsonl(out)}[str(long_path)]
    # by hand: crops of 32000 samples at 0, 32000, ..., the last one ending at the end
    source = model_input(model, torch.from_numpy(load_audio(long_path)))
    n, c = source.shape[0], 32000
    starts = [s for s in range(0, n, c) if s + c < n] + [n - c]
    with torch.no_grad():
        crop_logits = torch.cat([model(source[None, s: s + c]).logits for s in starts])
    probs = crop_logits.mean(0).softmax(-1)
    assert got["crops"] == len(starts) == 5
    expected = sorted(zip(model.labels, probs.tolist()), key=lambda t: -t[1])
    assert [t["label"] for t in got["top_k"]] == [label for label, _ in expected]
    assert max(abs(t["score"] - p) for t, (_, p) in zip(got["top_k"], expected)) < 1e-5
    # and not the whole file's
    with torch.no_grad():
        whole = model(source[None]).logits.softmax(-1)[0]
    assert (whole - probs).abs().max() > 1e-3


def test_streams_json_lines_and_resume_classifies_only_the_rest(hf_classifier, tmp_path, monkeypatch):
    folder, _ = hf_classifier
    args = [str(folder), *FILES[:9], "--batch-seconds", "3", "--no-progress", "--top-k", "2"]
    full = tmp_path / "full.jsonl"
    assert main([*args, "--output", str(full)]) == 0
    done = read_jsonl(full)
    assert len(done) == 9 and done[0]["index"] != 0  # longest batch first, not the input order
    kept, torn = done[:3], json.dumps(done[3])
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in kept) + torn[: len(torn) // 2])
    read = []
    real_load = inference_module.load_audio
    monkeypatch.setattr(inference_module, "load_audio", lambda path, *a, **k: read.append(path) or real_load(
        path, *a, **k))
    assert main([*args, "--output", str(partial), "--resume"]) == 0
    assert sorted(read) == sorted(set(FILES[:9]) - {r["path"] for r in kept})
    lines = read_jsonl(partial)
    assert lines[:3] == kept
    assert sorted(json.dumps(r, sort_keys=True) for r in lines) == sorted(json.dumps(r, sort_keys=True) for r in done)


def test_a_bad_file_is_an_error_line_and_exit_1(hf_classifier, tmp_path, capsys):
    folder, _ = hf_classifier
    missing, garbage = tmp_path / "missing.flac", tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all" * 10)
    out = tmp_path / "out.jsonl"
    assert main([str(folder), FILES[0], str(missing), str(garbage), FILES[1], "--output", str(out),
                 "--no-progress"]) == 1
    lines = {r["index"]: r for r in read_jsonl(out)}
    assert set(lines) == {0, 1, 2, 3}
    for index, path in ((1, missing), (2, garbage)):
        assert "label" not in lines[index] and str(path) in lines[index]["error"]
    assert lines[0]["label"] and lines[3]["label"]
    # without --output: a table on standard output, error rows included
    capsys.readouterr()
    assert main([str(folder), FILES[0], str(missing), "--no-progress"]) == 1
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split("\t") == ["index", "path", "label", "score", "top_k"]
    assert sorted(row.split("\t")[:3] for row in rows) == [["0", FILES[0], lines[0]["label"]],
                                                            ["1", str(missing), "error"]]


def test_score_prints_accuracy_and_macro_f1_against_the_labels_file(hf_classifier, tmp_path, capsys):
    folder, _ = hf_classifier
    manifest = tmp_path / "test.tsv"
    manifest.write_text(str(SPEECH) + "\n" + "".join(f"{Path(p).relative_to(SPEECH)}\t{sf.info(p).frames}\n"
                                                     for p in FILES))
    references = [Path(p).parent.name for p in FILES]
    (tmp_path / "test.lang").write_text("".join(f"{r}\n" for r in references))
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main([str(folder), "--manifest", str(manifest), "--score", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    lines = sorted(read_jsonl(out), key=lambda r: r["index"])
    assert [r["reference"] for r in lines] == references
    predicted = [r["label"] for r in lines]
    correct = sum(p == r for p, r in zip(predicted, references))
    f1 = []
    for label in sorted(set(references) | set(predicted)):
        tp = sum(p == r == label for p, r in zip(predicted, references))
        precision = tp / max(1, predicted.count(label))
        recall = tp / max(1, references.count(label))
        f1.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    match = re.search(r"accuracy ([\d.]+) % \((\d+) / (\d+)\), macro-F1 ([\d.]+) %", printed)
    assert match, printed
    assert (int(match[2]), int(match[3])) == (correct, len(FILES))
    assert float(match[1]) == pytest.approx(100 * correct / len(FILES), abs=0.005)
    assert float(match[4]) == pytest.approx(100 * sum(f1) / len(f1), abs=0.005)
    # a label file of the wrong length is a clear error (exit 2)
    (tmp_path / "test.lang").write_text("en\n")
    assert main([str(folder), "--manifest", str(manifest), "--score", "--no-progress"]) == 2
    assert "1 labels for the 20 rows" in capsys.readouterr().err
