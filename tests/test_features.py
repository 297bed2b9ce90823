"""``python -m xlsr.features``: every layer equals transformers' ``hidden_states[L]`` (batched and padded, both
layouts), the fairseq npy + lengths layout read back with numpy, safetensors files read with
``safetensors.torch.load_file``, the encoder of a fine-tuned checkpoint, fairseq's ``--layer`` numbering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_classification import save_hf
from test_huggingface import make_hf_model

import xlsr
from xlsr.audio import load_audio, normalize_waveform
from xlsr.features import main
from xlsr.inference import pad_batch

TOL = 1e-5
SPEECH = Path(__file__).parent / "fixtures" / "speech"
FILES = sorted(str(p) for p in SPEECH.rglob("*.flac"))[:6]  # 1 to 2.4 s, all different lengths
CTC_MINI = Path(__file__).parent / "fixtures" / "fairseq" / "ctc_mini" / "checkpoint.pt"


@pytest.fixture(scope="module", params=["layer", "group"])
def hf_model(request, tmp_path_factory):
    """(HF folder, transformers Wav2Vec2Model) of a random 2-layer model: "layer" = XLS-R layout (layer-norm conv,
    pre-LN), "group" = wav2vec 2.0 base (group-norm first conv, post-LN)."""
    import transformers

    pretraining = make_hf_model(transformers, request.param)
    folder = save_hf(pretraining, tmp_path_factory.mktemp(request.param) / "hf")
    return request.param, folder, transformers.Wav2Vec2Model.from_pretrained(folder).eval()


def hf_hidden_states(hf, path: str) -> list[torch.Tensor]:
    """transformers' hidden_states of one file, unpadded: (L + 1) x (T, D)."""
    source = normalize_waveform(torch.from_numpy(load_audio(path)))[None]
    with torch.no_grad():
        return [h[0] for h in hf(source, output_hidden_states=True).hidden_states]


def test_layer_all_equals_transformers_hidden_states_safetensors(hf_model, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    layout, folder, hf = hf_model
    assert main([str(folder), *FILES, "--layer", "all", "--out", str(tmp_path), "--format", "safetensors",
                 "--batch-seconds", "20", "--no-progress"]) == 0
    for path in FILES:
        out = tmp_path / f"{Path(path).stem}.safetensors"
        got = load_file(out)
        expected = hf_hidden_states(hf, path)
        assert sorted(got) == sorted(f"layer_{i}" for i in range(len(expected)))
        for layer, state in enumerate(expected):
            assert got[f"layer_{layer}"].shape == state.shape
            assert (got[f"layer_{layer}"] - state).abs().max().item() < TOL, (layout, path, layer)
        with safe_open(out, "pt") as f:
            assert f.metadata()["path"] == path


def test_npy_layout_of_one_layer_from_a_padded_batch(hf_model, tmp_path):
    layout, folder, hf = hf_model
    data = tmp_path / "data"
    data.mkdir()
    rows = FILES + [str(tmp_path / "missing.flac")]
    (data / "valid.tsv").write_text("/\n" + "".join(f"{p.lstrip('/')}\t16000\n" for p in rows))
    (data / "valid.wrd").write_text("".join(f"words {i}\n" for i in range(len(rows))))
    out = tmp_path / "feats"
    assert main([str(folder), "--manifest", str(data / "valid.tsv"), "--layer", "1", "--out", str(out),
                 "--batch-seconds", "20", "--no-progress"]) == 1  # the missing file
    features = np.load(out / "valid.npy")
    lengths = [int(n) for n in (out / "valid.lengths").read_text().split()]
    assert lengths[-1] == 0 and features.shape == (sum(lengths), hf.config.hidden_size)
    assert (out / "valid.tsv").read_bytes() == (data / "valid.tsv").read_bytes()
    assert (out / "valid.wrd").read_bytes() == (data / "valid.wrd").read_bytes()
    offsets = np.cumsum([0] + lengths)
    for row, path in enumerate(FILES):
        expected = hf_hidden_states(hf, path)[1].numpy()
        assert np.abs(features[offsets[row]: offsets[row + 1]] - expected).max() < TOL, (layout, path)
    # runs of at most 4 x 1.2 s of audio (several runs, written in input order as they finish): the same file
    assert main([str(folder), "--manifest", str(data / "valid.tsv"), "--layer", "1", "--out", str(tmp_path / "runs"),
                 "--batch-seconds", "1.2", "--no-progress"]) == 1
    assert (tmp_path / "runs" / "valid.lengths").read_text() == (out / "valid.lengths").read_text()
    assert np.abs(np.load(tmp_path / "runs" / "valid.npy") - features).max() < TOL


def test_padding_changes_nothing_in_layer_norm_models_only(hf_model):
    """Why the CLI batches layer-norm models but runs group-norm ones one file per forward."""
    layout, folder, _ = hf_model
    model = xlsr.Wav2Vec2Model.from_pretrained(folder)
    waves = [normalize_waveform(torch.from_numpy(load_audio(p))) for p in FILES[:3]]
    source, padding_mask = pad_batch(waves)
    with torch.no_grad():
        padded, frame_padding = model.hidden_states(source, padding_mask)
        diff = 0.0
        for row, wave in enumerate(waves):
            alone, _ = model.hidden_states(wave[None])
            frames = int((~frame_padding[row]).sum())
            assert frames == alone[0].shape[1]
            diff = max(diff, max((p[row, :frames] - a[0]).abs().max().item() for p, a in zip(padded, alone)))
    if layout == "layer":
        assert diff < TOL
    else:
        assert diff > 1e-3


def test_encoder_of_a_ctc_checkpoint_fairseq_layer_numbering_and_fp16(tmp_path):
    from safetensors.torch import load_file

    ctc = xlsr.Wav2Vec2ForCTC.from_pretrained(CTC_MINI)
    encoder = ctc.wav2vec2
    wav = tmp_path / "clip.wav"
    sf.write(wav, load_audio(FILES[0]), 16000, subtype="FLOAT")
    assert main([str(CTC_MINI), str(wav), "--layer", "all", "--out", str(tmp_path / "f32"), "--format",
                 "safetensors", "--no-progress"]) == 0
    assert main([str(CTC_MINI), str(wav), "--layer", "all", "--out", str(tmp_path / "f16"), "--format",
                 "safetensors", "--dtype", "float16", "--no-progress"]) == 0
    got = load_file(tmp_path / "f32" / "clip.safetensors")
    half = load_file(tmp_path / "f16" / "clip.safetensors")
    source = torch.from_numpy(load_audio(wav))[None]
    source = normalize_waveform(source[0])[None] if encoder.cfg.normalize else source
    with torch.no_grad():
        states, _ = encoder.hidden_states(source)
        for n in range(encoder.cfg.encoder_layers):  # fairseq's --layer n: extract_features(layer=n)["x"]
            fairseq_style = encoder.extract_features(source, layer=n).x[0]
            assert (got[f"layer_{n + 1}"] - fairseq_style).abs().max().item() < TOL
    assert len(got) == encoder.cfg.encoder_layers + 1
    for layer, state in enumerate(states):
        assert (got[f"layer_{layer}"] - state[0]).abs().max().item() < TOL
        assert half[f"layer_{layer}"].dtype == torch.float16
        assert (half[f"layer_{layer}"].float() - state[0]).abs().max().item() < 1e-2 * state.abs().max().item()
    # a layer the model does not have: a clear error
    assert main([str(CTC_MINI), str(wav), "--layer", "99", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
