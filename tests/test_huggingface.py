"""Hugging Face transformers checkpoints: reading HF exports, writing ours as HF, and numerical equivalence."""

import dataclasses
import json

import pytest
import torch
from conftest import load_golden

import xlsr
from xlsr.checkpoints import CheckpointError, read_checkpoint
from xlsr.checkpoints.huggingface import (
    config_from_huggingface,
    config_to_huggingface,
    preprocessor_to_huggingface,
    read_huggingface,
    save_huggingface,
)
from xlsr.modules.masking import compute_mask_indices, sample_negatives

TOL = 1e-5

LAYOUTS = {
    # XLS-R / large: layer norm in every conv layer, pre-LN transformer
    "layer": {"feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True},
    # wav2vec 2.0 base: one group norm in the first conv layer, post-LN transformer
    "group": {"feat_extract_norm": "group", "do_stable_layer_norm": False, "conv_bias": False},
}


def small_hf_config(transformers, **overrides):
    values = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "conv_dim": [32] * 7,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
        "num_codevectors_per_group": 16,
        "num_codevector_groups": 2,
        "codevector_dim": 48,  # total over both groups; deliberately different from proj_codevector_dim
        "proj_codevector_dim": 24,
        "num_negatives": 5,
        "mask_time_prob": 0.5,
    }
    values.update(overrides)
    return transformers.Wav2Vec2Config(**values)


def make_hf_model(transformers, layout, seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForPreTraining(small_hf_config(transformers, **LAYOUTS[layout], **overrides)).eval()
    with torch.no_grad():  # random non-trivial norms and biases, so that a swapped key would show
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def padded_batch(seed=0, lengths=(16000, 11200)):
    generator = torch.Generator().manual_seed(seed)
    source = torch.zeros(len(lengths), max(lengths))
    padding_mask = torch.ones(len(lengths), max(lengths), dtype=torch.bool)
    for row, length in enumerate(lengths):
        source[row, :length] = torch.randn(length, generator=generator)
        padding_mask[row, :length] = False
    return source, padding_mask


def max_diff(a, b, valid):
    return (a - b)[valid].abs().max().item()


@pytest.mark.parametrize("layout", ["layer", "group"])
def test_hf_pretraining_model_loads_and_matches(layout, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = make_hf_model(transformers, layout)
    hf.save_pretrained(tmp_path)
    model = xlsr.Wav2Vec2Model.from_pretrained(tmp_path)  # strict
    cfg = model.cfg
    assert cfg.extractor_mode == ("layer_norm" if layout == "layer" else "group_norm")
    assert cfg.layer_norm_first is (layout == "layer")
    assert (cfg.codebook_dim, cfg.proj_dim, cfg.latent_vars, cfg.latent_groups) == (48, 24, 16, 2)
    assert model.checkpoint_info["format"] == "huggingface"

    if layout == "layer":  # layer-norm models take an attention mask: test a padded batch
        source, padding_mask = padded_batch()
    else:  # group-norm models are used without one (as HF recommends)
        source, padding_mask = padded_batch(lengths=(16000, 16000))
    attention_mask = (~padding_mask).long()
    with torch.no_grad():
        theirs = hf(source, attention_mask=attention_mask, output_hidden_states=True)
        theirs_last = hf.wav2vec2(source, attention_mask=attention_mask).last_hidden_state
        ours = model.extract_features(source, padding_mask)
    valid = ~ours.padding_mask if ours.padding_mask is not None else torch.ones(ours.x.shape[:2], dtype=torch.bool)
    if layout == "layer":
        assert valid.sum(1).tolist() == [49, 34]

    layers = ours.layer_results
    assert len(theirs.hidden_states) == len(layers) + 1  # hidden_states[0] is the input of the first layer
    for i in range(len(layers) - 1):
        assert max_diff(theirs.hidden_states[i + 1], layers[i], valid) <= TOL
    # the last entry: transformers 5 reports the last layer's output before the pre-LN model's final LayerNorm,
    # transformers 4 reported it after; either way it is one of ours
    last = theirs.hidden_states[-1]
    assert min(max_diff(last, layers[-1], valid), max_diff(last, ours.x, valid)) <= TOL
    if layout == "group":  # post-LN: no final LayerNorm after the last layer, so both are the same
        assert max_diff(last, layers[-1], valid) <= TOL
    assert max_diff(theirs_last, ours.x, valid) <= TOL

    # pretraining head: project_hid(output) and project_q(quantized features), argmax quantizer in eval
    with torch.no_grad():
        batch, time, _ = ours.features.shape
        quantized = model.quantizer(ours.features.reshape(batch * time, -1)).quantized
        projected_q = model.project_q(quantized).view(batch, time, -1)
        projected = model.final_proj(ours.x)
    assert max_diff(theirs.projected_states, projected, valid) <= TOL
    assert max_diff(theirs.projected_quantized_states, projected_q, valid) <= TOL


@pytest.mark.parametrize("layout", ["layer", "group"])
def test_contrastive_loss_matches_hf(layout, tmp_path):
    """Same mask and negatives: our pretraining logits give HF's contrastive loss."""
    transformers = pytest.importorskip("transformers")
    hf = make_hf_model(transformers, layout, seed=1)
    hf.save_pretrained(tmp_path)
    model = xlsr.Wav2Vec2Model.from_pretrained(tmp_path)
    source, padding_mask = padded_batch(seed=1) if layout == "layer" else padded_batch(seed=1, lengths=(16000, 16000))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        frame_padding = model.frame_padding_mask(padding_mask, 49)
        mask = compute_mask_indices((2, 49), frame_padding, 0.5, 5, 2, generator=generator)
        negatives = sample_negatives(mask, 5, frame_padding, generator=generator)
        ours = model(source, padding_mask, mask_indices=mask, negative_indices=negatives)
        theirs = hf(source, attention_mask=(~padding_mask).long(), mask_time_indices=mask,
                    sampled_negative_indices=negatives)
    ours_loss = torch.nn.functional.cross_entropy(ours.logits, torch.zeros(len(ours.logits), dtype=torch.long),
                                                  reduction="sum")
    assert abs(ours_loss.item() - theirs.contrastive_loss.item()) <= 1e-4 * max(1.0, abs(ours_loss.item()))


@pytest.mark.parametrize("name", ["xlsr_mini", "base_mini"])
def test_golden_fairseq_exported_to_hf_matches(name, tmp_path):
    """fairseq checkpoint -> our HF export -> transformers gives fairseq's golden encoder output; -> ours again gives
    back the same tensors and config."""
    transformers = pytest.importorskip("transformers")
    checkpoint, inputs, expected = load_golden(name)
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    save_huggingface(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == ["Wav2Vec2ForPreTraining"] and hf_config["model_type"] == "wav2vec2"

    hf, loading = transformers.Wav2Vec2ForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    hf.eval()
    valid = ~expected["frame_padding_mask"]
    with torch.no_grad():
        out = hf.wav2vec2(inputs["source"], attention_mask=(~inputs["padding_mask"]).long())
        conv = hf.wav2vec2.feature_extractor(inputs["source"])
    assert (conv - expected["conv_features"]).abs().max().item() <= TOL
    assert max_diff(out.last_hidden_state, expected["encoder_out"], valid) <= TOL
    assert max_diff(out.extract_features, expected["features_ln"], valid) <= TOL

    extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path)
    assert extractor.do_normalize is bool(inputs["normalized"])
    assert extractor.sampling_rate == inputs["sample_rate"]

    back = xlsr.Wav2Vec2Model.from_pretrained(tmp_path)
    assert back.cfg == model.cfg
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_pytorch_model_bin_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = make_hf_model(transformers, "layer", seed=2)
    hf.config.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = xlsr.Wav2Vec2Model.from_pretrained(tmp_path)
    assert model.checkpoint_info["weights"] == ["pytorch_model.bin"]
    source, padding_mask = padded_batch(seed=2)
    with torch.no_grad():
        theirs = hf.wav2vec2(source, attention_mask=(~padding_mask).long()).last_hidden_state
        ours = model.extract_features(source, padding_mask)
    assert max_diff(theirs, ours.x, ~ours.padding_mask) <= TOL


def test_sharded_safetensors_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint, _, _ = load_golden("xlsr_mini")
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    save_huggingface(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for file, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in names})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    back = xlsr.Wav2Vec2Model.from_pretrained(tmp_path)
    assert back.checkpoint_info["weights"] == sorted(shards)
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_bare_wav2vec2model_export_loads_without_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = make_hf_model(transformers, "layer", seed=3)
    hf.wav2vec2.save_pretrained(tmp_path)  # a bare Wav2Vec2Model: keys without "wav2vec2.", no quantizer
    with pytest.raises(CheckpointError) as err:
        xlsr.Wav2Vec2Model.from_pretrained(tmp_path)
    for key in ("quantizer.codebook", "quantizer.weight_proj.weight", "project_q.weight", "final_proj.weight"):
        assert f"missing key {key}" in str(err.value)
    model = xlsr.Wav2Vec2Model.from_pretrained(tmp_path, strict=False)
    source, padding_mask = padded_batch(seed=3)
    with torch.no_grad():
        theirs = hf.wav2vec2(source, attention_mask=(~padding_mask).long()).last_hidden_state
        ours = model.extract_features(source, padding_mask)
    assert max_diff(theirs, ours.x, ~ours.padding_mask) <= TOL


def test_hf_heads_we_do_not_have_are_named(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    ctc = transformers.Wav2Vec2ForCTC(small_hf_config(transformers, vocab_size=12, **LAYOUTS["layer"]))
    ctc.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight.*lm_head\.bias|lm_head\.bias.*lm_head\.weight") as err:
        xlsr.Wav2Vec2Model.from_pretrained(tmp_path)
    assert "CTC" in str(err.value)


def test_unknown_key_is_named(tmp_path):
    checkpoint, _, _ = load_golden("base_mini")
    save_huggingface(xlsr.Wav2Vec2Model.from_pretrained(checkpoint), tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["wav2vec2.encoder.something_new.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"wav2vec2\.encoder\.something_new\.weight"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"feat_extract_activation": "relu"}, "feat_extract_activation"),
        ({"add_adapter": True}, "add_adapter"),
        ({"adapter_attn_dim": 16}, "adapter_attn_dim"),
        ({"position_embeddings_type": "rotary"}, "position_embeddings_type"),
        ({"layer_norm_eps": 1e-6}, "layer_norm_eps"),
        ({"feat_extract_norm": "batch"}, "feat_extract_norm"),
        ({"conv_kernel": [10, 3]}, "conv_kernel"),
    ],
)
def test_unsupported_hf_settings_are_rejected(tmp_path, change, message):
    checkpoint, _, _ = load_golden("xlsr_mini")
    save_huggingface(xlsr.Wav2Vec2Model.from_pretrained(checkpoint), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as err:
        read_huggingface(tmp_path)
    assert "config.json" in str(err.value)


def test_damaged_weights_name_the_file(tmp_path):
    checkpoint, _, _ = load_golden("xlsr_mini")
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    save_huggingface(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_huggingface(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        read_huggingface(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_huggingface(tmp_path)


def test_normalisation_comes_from_preprocessor_config(tmp_path):
    checkpoint, _, _ = load_golden("xlsr_mini")
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    assert model.cfg.normalize is True
    save_huggingface(model, tmp_path)
    preprocessor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert preprocessor["do_normalize"] is True and preprocessor["return_attention_mask"] is True
    assert preprocessor["sampling_rate"] == 16000 and preprocessor["feature_size"] == 1
    preprocessor["do_normalize"] = False
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    assert read_huggingface(tmp_path)[0].normalize is False
    (tmp_path / "preprocessor_config.json").unlink()
    _, _, info = read_huggingface(tmp_path)
    assert info["normalize_from"] == "default"


@pytest.mark.parametrize("preset", ["tiny", "base", "xlsr-300m", "xlsr-1b"])
def test_config_round_trip(preset):
    cfg = xlsr.Wav2Vec2Config.from_preset(preset)
    d = config_to_huggingface(cfg)
    assert d["codevector_dim"] == cfg.codebook_dim and d["proj_codevector_dim"] == cfg.proj_dim
    assert d["do_stable_layer_norm"] is cfg.layer_norm_first
    assert config_from_huggingface(json.loads(json.dumps(d)), preprocessor_to_huggingface(cfg)) == cfg
    # without our extra fields (a config written by transformers itself) the architecture still comes through
    d.pop("xlsr_config")
    plain = config_from_huggingface(d)
    for field in ("conv_layers", "extractor_mode", "conv_bias", "encoder_layers", "encoder_embed_dim",
                  "encoder_ffn_embed_dim", "encoder_attention_heads", "layer_norm_first", "conv_pos",
                  "conv_pos_groups", "latent_vars", "latent_groups", "logit_temp", "mask_prob", "mask_length"):
        assert getattr(plain, field) == getattr(cfg, field), field
    assert (plain.proj_dim, plain.codebook_dim) == (cfg.proj_dim, cfg.codebook_dim)


def test_hf_config_fields_map_to_ours():
    transformers = pytest.importorskip("transformers")
    hf_config = small_hf_config(transformers, **LAYOUTS["layer"], layerdrop=0.05, hidden_dropout=0.2,
                                feat_proj_dropout=0.3, feat_quantizer_dropout=0.4, mask_time_length=7,
                                mask_time_min_masks=3, contrastive_logits_temperature=0.2)
    cfg = config_from_huggingface(hf_config.to_dict(), {"do_normalize": True, "sampling_rate": 16000})
    expected = {
        "extractor_mode": "layer_norm", "conv_bias": True, "layer_norm_first": True, "encoder_layers": 2,
        "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128, "encoder_attention_heads": 4, "conv_pos": 16,
        "conv_pos_groups": 4, "latent_vars": 16, "latent_groups": 2, "encoder_layerdrop": 0.05, "dropout": 0.2,
        "dropout_input": 0.3, "dropout_features": 0.4, "mask_prob": 0.5, "mask_length": 7, "min_masks": 3,
        "logit_temp": 0.2, "num_negatives": 5, "normalize": True,
    }
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.codebook_dim, cfg.proj_dim) == (48, 24)
    assert dataclasses.asdict(cfg)["conv_layers"][0] == (32, 10, 5)


def test_legacy_and_plain_pos_conv_spellings(tmp_path):
    """weight_g/weight_v (hub checkpoints), parametrizations.* (newer torch) and a plain weight all load the same."""
    from safetensors.torch import load_file, save_file

    checkpoint, _, _ = load_golden("xlsr_mini")
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    save_huggingface(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    prefix = "wav2vec2.encoder.pos_conv_embed.conv."
    assert prefix + "weight_g" in state and prefix + "weight_v" in state  # what we write
    g, v = state.pop(prefix + "weight_g"), state.pop(prefix + "weight_v")
    reference = model.encoder.pos_conv.conv.weight.detach()
    for spelling in ("parametrizations", "plain"):
        if spelling == "parametrizations":
            variant = {**state, prefix + "parametrizations.weight.original0": g,
                       prefix + "parametrizations.weight.original1": v}
        else:
            variant = {**state, prefix + "weight": reference.clone()}
        save_file(variant, tmp_path / "model.safetensors", metadata={"format": "pt"})
        back = xlsr.Wav2Vec2Model.from_pretrained(tmp_path)
        assert torch.allclose(back.encoder.pos_conv.conv.weight, reference, atol=1e-6), spelling
