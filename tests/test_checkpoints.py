"""Loading and saving: full-size stand-ins of the released checkpoints, our format, and bad input."""

import argparse
import json
import subprocess
import sys

import pytest
import torch

import xlsr
from conftest import FIXTURES, GOLDEN
from xlsr.checkpoints import CheckpointError
from xlsr.config import parse_conv_layers


def manifest(name):
    return json.loads((GOLDEN / f"{name}_manifest.json").read_text())


def random_state_dict(entries, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for entry in entries:
        tensor = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]))
        state[entry["key"]] = tensor.normal_(0.0, 0.02, generator=gen)
    return state


@pytest.fixture(scope="module")
def xlsr_300m_standin(tmp_path_factory):
    """The released xlsr2_300m.pt as far as loading goes: its real cfg + random weights of the right keys/shapes."""
    official = torch.load(FIXTURES / "official" / "xlsr2_300m_config_only.pt", weights_only=True)
    path = tmp_path_factory.mktemp("standin") / "xlsr2_300m.pt"
    checkpoint = {
        "cfg": official["cfg"],
        "task_state": official["task_state"],
        "model": random_state_dict(manifest("xlsr_300m")["state_dict"]),
        "optimizer_history": [{"criterion_name": "Wav2vecCriterion", "num_updates": 1_000_000}],
        "extra_state": {"metrics": {}, "train_iterator": {"epoch": 40}},
        "last_optimizer_state": None,
    }
    torch.save(checkpoint, path)
    return path


def test_official_300m_standin_loads_strictly(xlsr_300m_standin):
    model = xlsr.Wav2Vec2Model.from_pretrained(xlsr_300m_standin)
    info = manifest("xlsr_300m")
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"] == 317_390_592
    cfg = model.cfg
    assert (cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads) == (24, 1024, 16)
    assert cfg.extractor_mode == "layer_norm" and cfg.layer_norm_first and cfg.normalize
    assert cfg.conv_layers == parse_conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2")
    assert model.quantizer.curr_temp == pytest.approx(0.1)  # 1M updates: at the floor
    with torch.no_grad():
        feats = model.extract_features(torch.randn(1, 8000), layer=3)
    assert feats.x.shape == (1, 24, 1024) and torch.isfinite(feats.x).all()


def test_official_300m_load_does_not_copy_weights(xlsr_300m_standin):
    """mmap + assign: peak memory stays well under two copies of the 1.27 GB of weights."""
    code = (
        "import resource, xlsr, sys;"
        f"m = xlsr.Wav2Vec2Model.from_pretrained({str(xlsr_300m_standin)!r});"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    weights = manifest("xlsr_300m")["fp32_bytes"]
    assert peak < 1.6 * weights, f"peak RSS {peak / 2**30:.2f} GiB for {weights / 2**30:.2f} GiB of weights"


def test_base_standin_with_legacy_args_namespace(tmp_path):
    """wav2vec 2.0 base/large releases keep their cfg as an argparse Namespace under 'args'."""
    info = manifest("base")
    model_cfg = {k: v for k, v in info["model_cfg"].items() if k != "_name"}
    args = argparse.Namespace(arch="wav2vec2", task="audio_pretraining", normalize=False, sample_rate=16000,
                              lr=[0.0005], max_tokens=1400000, **model_cfg)
    path = tmp_path / "wav2vec_small.pt"
    torch.save({"args": args, "model": random_state_dict(info["state_dict"]), "optimizer_history": []}, path)
    model = xlsr.Wav2Vec2Model.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == info["num_parameters"] == 95_044_608
    assert model.cfg.extractor_mode == "group_norm" and not model.cfg.layer_norm_first
    assert not model.cfg.conv_bias and not model.cfg.normalize and model.cfg.feature_grad_mult == 0.1


def test_native_round_trip(tmp_path, golden):
    checkpoint, inputs, _ = golden
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]
    again = xlsr.Wav2Vec2Model.from_pretrained(tmp_path / "ours")
    assert again.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    with torch.no_grad():
        a = model.extract_features(inputs["source"], inputs["padding_mask"]).x
        b = again.extract_features(inputs["source"], inputs["padding_mask"]).x
    assert torch.equal(a, b)


def test_new_torch_weight_norm_names_accepted(tmp_path):
    checkpoint = torch.load(GOLDEN / "xlsr_mini" / "checkpoint.pt", weights_only=True)
    state = checkpoint["model"]
    state["encoder.pos_conv.0.parametrizations.weight.original0"] = state.pop("encoder.pos_conv.0.weight_g")
    state["encoder.pos_conv.0.parametrizations.weight.original1"] = state.pop("encoder.pos_conv.0.weight_v")
    torch.save(checkpoint, tmp_path / "renamed.pt")
    a = xlsr.Wav2Vec2Model.from_pretrained(tmp_path / "renamed.pt").state_dict()
    b = xlsr.Wav2Vec2Model.from_pretrained(GOLDEN / "xlsr_mini" / "checkpoint.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def golden_checkpoint():
    return torch.load(GOLDEN / "xlsr_mini" / "checkpoint.pt", weights_only=True)


def test_missing_key_is_named_unless_non_strict(tmp_path):
    checkpoint = golden_checkpoint()
    del checkpoint["model"]["final_proj.bias"]
    torch.save(checkpoint, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing key final_proj.bias"):
        xlsr.Wav2Vec2Model.from_pretrained(tmp_path / "missing.pt")
    model = xlsr.Wav2Vec2Model.from_pretrained(tmp_path / "missing.pt", strict=False)
    assert model.final_proj.bias.shape == (32,)


def test_unexpected_key_is_named(tmp_path):
    checkpoint = golden_checkpoint()
    checkpoint["model"]["encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    torch.save(checkpoint, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="encoder.layers.0.self_attn.rotary.weight"):
        xlsr.Wav2Vec2Model.from_pretrained(tmp_path / "extra.pt")


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    checkpoint = golden_checkpoint()
    checkpoint["model"]["final_proj.weight"] = torch.zeros(16, 64)
    torch.save(checkpoint, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"final_proj.weight: checkpoint has shape \(16, 64\), model expects \(32, 64\)"):
        xlsr.Wav2Vec2Model.from_pretrained(tmp_path / "shape.pt")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are my notes, not a model\n")
    with pytest.raises(CheckpointError, match="notes.pt: not a PyTorch checkpoint"):
        xlsr.Wav2Vec2Model.from_pretrained(path)


def test_truncated_checkpoint(tmp_path):
    data = (GOLDEN / "xlsr_mini" / "checkpoint.pt").read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        xlsr.Wav2Vec2Model.from_pretrained(path)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file"):
        xlsr.Wav2Vec2Model.from_pretrained("/nonexistent/xlsr2_300m.pt")


def test_other_model_family(tmp_path):
    checkpoint = golden_checkpoint()
    checkpoint["cfg"]["model"]["_name"] = "hubert"
    torch.save(checkpoint, tmp_path / "hubert.pt")
    with pytest.raises(CheckpointError, match="'hubert' checkpoint, not a wav2vec 2.0"):
        xlsr.Wav2Vec2Model.from_pretrained(tmp_path / "hubert.pt")


def test_code_in_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "cfg": {"model": {}}, "hook": subprocess.Popen}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle '.*Popen'"):
        xlsr.Wav2Vec2Model.from_pretrained(path)


def test_fairseq_objects_in_metadata_are_read_inertly(tmp_path):
    """Older checkpoints keep fairseq meter objects in extra_state: read them as inert data, run no fairseq code."""
    meter_class = type("AverageMeter", (), {})
    meter_class.__module__ = "fairseq.meters"
    meter = meter_class()
    meter.avg = 1.5
    checkpoint = golden_checkpoint()
    checkpoint["extra_state"]["train_meters"] = {"train_loss": meter}
    sys.modules.setdefault("fairseq", type(sys)("fairseq"))
    sys.modules["fairseq.meters"] = type(sys)("fairseq.meters")
    sys.modules["fairseq.meters"].AverageMeter = meter_class
    try:
        torch.save(checkpoint, tmp_path / "old.pt")
    finally:
        del sys.modules["fairseq.meters"], sys.modules["fairseq"]
    model = xlsr.Wav2Vec2Model.from_pretrained(tmp_path / "old.pt")
    assert model.cfg.encoder_layers == 2


def test_audio_of_wrong_rank_is_refused():
    model = xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny"))
    with pytest.raises(ValueError, match=r"\(batch, samples\).*shape \(16000,\).*source\[None\]"):
        model.extract_features(torch.zeros(16000))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 16000\)"):
        model.extract_features(torch.zeros(1, 1, 16000))
    with pytest.raises(ValueError, match="shorter than one frame"):
        model.extract_features(torch.zeros(1, 100))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]", 7),
        ("[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32,2,2)] * 2", 7),
        ("[(512, 10, 5)]", 1),
    ],
)
def test_conv_layer_expressions_parse_without_eval(spec, expected):
    assert len(parse_conv_layers(spec)) == expected


@pytest.mark.parametrize("spec", ["__import__('os').system('true')", "[(1, 2)]", "[(512, 10, 5)] * n"])
def test_conv_layer_expressions_reject_code(spec):
    with pytest.raises(ValueError):
        parse_conv_layers(spec)


def test_config_to_fairseq_is_the_inverse_of_config_from_fairseq():
    from xlsr.checkpoints.fairseq import config_from_fairseq, config_to_fairseq

    official = torch.load(FIXTURES / "official" / "xlsr2_300m_config_only.pt", weights_only=True)["cfg"]["model"]
    ours = config_from_fairseq(official, {})
    exported = config_to_fairseq(ours)
    def same(key, a, b):
        if key == "conv_feature_layers":
            return parse_conv_layers(a) == parse_conv_layers(b)
        return (tuple(a) if isinstance(a, (list, tuple)) else a) == (tuple(b) if isinstance(b, (list, tuple)) else b)

    shared = [key for key in exported if key in official]
    assert len(shared) > 30
    for key in shared:  # every field we write has the released cfg's value
        assert same(key, exported[key], official[key]), (key, exported[key], official[key])
    for preset in xlsr.PRESETS:
        cfg = xlsr.Wav2Vec2Config.from_preset(preset)
        back = config_from_fairseq(config_to_fairseq(cfg), {"normalize": cfg.normalize, "sample_rate": cfg.sample_rate})
        assert back == cfg, preset
