"""The conversion CLI (tools/convert_fairseq.py) on the golden fairseq checkpoints."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import load_golden

import xlsr
from xlsr.checkpoints.native import save_native

TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_fairseq.py"


@pytest.fixture(scope="module")
def convert():
    spec = importlib.util.spec_from_file_location("convert_fairseq", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_to_native_with_verify(convert, tmp_path, capsys):
    checkpoint, inputs, expected = load_golden("xlsr_mini")
    dst = tmp_path / "native"
    assert convert.main([str(checkpoint), str(dst), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "source format:   fairseq" in out
    assert "2 layers, dim 64, ffn 128, 4 heads, extractor layer_norm, pre-LN" in out
    params = sum(p.numel() for p in xlsr.Wav2Vec2Model.from_pretrained(checkpoint).parameters())
    assert f"parameters:      {params:,}" in out
    assert "normalize input: True" in out and "sample rate:     16000 Hz" in out and "num_updates:     1" in out
    for row in ("conv features", "layer 0", "layer 1", "final output"):
        assert row in out
    assert "verify ok" in out
    assert json.loads((dst / "config.json").read_text())["model_type"] == "xlsr-wav2vec2"
    model = xlsr.Wav2Vec2Model.from_pretrained(dst)
    with torch.no_grad():
        feats = model.extract_features(inputs["source"], inputs["padding_mask"])
    valid = ~expected["frame_padding_mask"]
    assert (feats.x - expected["encoder_out"])[valid].abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["xlsr_mini", "base_mini"])
def test_to_hf_with_verify(convert, tmp_path, capsys, name):
    pytest.importorskip("transformers")
    checkpoint, _, _ = load_golden(name)
    dst = tmp_path / "hf"
    assert convert.main([str(checkpoint), str(dst), "--to", "hf", "--verify", "--tolerance", "1e-5"]) == 0
    out = capsys.readouterr().out
    mode, ln = ("layer_norm", "pre-LN") if name == "xlsr_mini" else ("group_norm", "post-LN")
    assert f"extractor {mode}, {ln}" in out
    assert "transformers.Wav2Vec2ForPreTraining" in out and "verify ok" in out
    assert json.loads((dst / "config.json").read_text())["architectures"] == ["Wav2Vec2ForPreTraining"]


def test_hf_source_back_to_native(convert, tmp_path, capsys):
    checkpoint, _, _ = load_golden("base_mini")
    assert convert.main([str(checkpoint), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "native"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "source format:   huggingface" in out and "verify ok" in out


def _corrupting(save):
    """Wrap a writer so that one transformer weight of what it wrote is perturbed."""
    from safetensors.torch import load_file, save_file

    def write(model, out_dir):
        result = save(model, out_dir)
        path = Path(out_dir) / "model.safetensors"
        state = load_file(path)
        key = next(k for k in state if "layers.1." in k and k.endswith(("fc2.weight", "output_dense.weight")))
        state[key] = state[key] + 1e-2
        save_file(state, path, metadata={"format": "pt"})
        return result

    return write


@pytest.mark.parametrize("to", ["native", "hf"])
def test_verify_fails_on_corrupted_output(convert, tmp_path, capsys, monkeypatch, to):
    if to == "hf":
        pytest.importorskip("transformers")
        monkeypatch.setattr(convert, "save_huggingface", _corrupting(convert.save_huggingface))
    else:
        monkeypatch.setattr(xlsr.Wav2Vec2Model, "save_pretrained",
                            _corrupting(save_native))
    checkpoint, _, _ = load_golden("xlsr_mini")
    assert convert.main([str(checkpoint), str(tmp_path / "out"), "--to", to, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "VERIFY FAILED" in out and "layer 1" in out.split("VERIFY FAILED")[1]
    assert "exceeds tolerance" in out


def test_verify_fails_on_unreadable_output(convert, tmp_path, capsys, monkeypatch):
    def write_garbage(model, out_dir):
        save_native(model, out_dir)
        (Path(out_dir) / "model.safetensors").write_bytes(b"garbage")

    monkeypatch.setattr(xlsr.Wav2Vec2Model, "save_pretrained", write_garbage)
    checkpoint, _, _ = load_golden("base_mini")
    assert convert.main([str(checkpoint), str(tmp_path / "out"), "--verify"]) == 1
    assert "VERIFY FAILED: cannot reload" in capsys.readouterr().out


def test_negative_tolerance_always_fails(convert, tmp_path, capsys):
    checkpoint, _, _ = load_golden("base_mini")
    assert convert.main([str(checkpoint), str(tmp_path / "out"), "--verify", "--tolerance", "-1"]) == 1
    assert "VERIFY FAILED" in capsys.readouterr().out


def test_missing_source_is_an_error(convert, tmp_path, capsys):
    assert convert.main([str(tmp_path / "nope.pt"), str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_runs_as_a_script(tmp_path):
    import subprocess
    import sys

    checkpoint, _, _ = load_golden("base_mini")
    result = subprocess.run([sys.executable, str(TOOL), str(checkpoint), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "parameters:" in result.stdout
