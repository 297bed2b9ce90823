"""Wav2Vec2ForSequenceClassification: Hugging Face parity (transformers as the reference: its model, its export
reader, its audio-classification pipeline) and fairseq ``wav2vec_classification`` state dicts by key name."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_huggingface import LAYOUTS, small_hf_config

import xlsr
from xlsr.audio import load_audio, normalize_waveform
from xlsr.checkpoints import CheckpointError
from xlsr.checkpoints.fairseq import FAIRSEQ_KEY_MAP, config_to_fairseq
from xlsr.checkpoints.keymap import rename, split_qkv

TOL = 1e-5
SPEECH = Path(__file__).parent / "fixtures" / "speech"
TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_fairseq.py"
LABELS = ["cs", "en", "nl"]
MAX_SAMPLES = 24000  # 1.5 s per file keeps the test fast


def speech_files(count=3):
    return sorted(SPEECH.rglob("*.flac"))[:count]


def speech_batch(count=3):
    """Real recordings of different lengths, zero padded: (source (B, S), padding_mask (B, S) True = pad, waves)."""
    waves = [torch.from_numpy(load_audio(p)[:MAX_SAMPLES - 3000 * i]).float() for i, p in enumerate(speech_files(count))]
    lengths = [len(w) for w in waves]
    assert len(set(lengths)) == len(lengths), "the batch must pad"
    source = torch.zeros(len(waves), max(lengths))
    padding_mask = torch.ones_like(source, dtype=torch.bool)
    for row, wave in enumerate(waves):
        source[row, : len(wave)] = wave
        padding_mask[row, : len(wave)] = False
    return source, padding_mask, waves


def make_hf_classifier(transformers, layout, weighted, seed=0):
    torch.manual_seed(seed)
    config = small_hf_config(transformers, **LAYOUTS[layout], num_labels=len(LABELS), classifier_proj_size=24,
                             use_weighted_layer_sum=weighted, id2label=dict(enumerate(LABELS)),
                             label2id={s: i for i, s in enumerate(LABELS)})
    model = transformers.Wav2Vec2ForSequenceClassification(config).eval()
    with torch.no_grad():  # non-trivial norms, biases and layer weights, so a swapped key or state would show
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
        if weighted:
            model.layer_weights.copy_(torch.randn_like(model.layer_weights))
    return model


def save_hf(model, out_dir, do_normalize=True):
    import transformers

    model.save_pretrained(out_dir)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=do_normalize, return_attention_mask=True).save_pretrained(out_dir)
    return out_dir


@pytest.mark.parametrize("layout", ["layer", "group"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_hf_classifier_loads_matches_and_round_trips(layout, weighted, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = make_hf_classifier(transformers, layout, weighted)
    ours = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(save_hf(hf, tmp_path / "hf"))
    assert ours.labels == LABELS and ours.cfg.use_weighted_layer_sum == weighted
    source, padding_mask, _ = speech_batch()
    with torch.no_grad():
        expected = hf(source, attention_mask=(~padding_mask).long()).logits
        got = ours(source, padding_mask=padding_mask).logits
        assert (got - expected).abs().max().item() < TOL
        # unpadded: HF's plain mean, ours without a mask
        assert (ours(source[:1]).logits - hf(source[:1]).logits).abs().max().item() < TOL

    # our export loads in transformers with no missing keys and the same logits
    ours.save_pretrained(tmp_path / "export", huggingface=True)
    reloaded, info = transformers.AutoModelForAudioClassification.from_pretrained(tmp_path / "export",
                                                                                  output_loading_info=True)
    assert type(reloaded).__name__ == "Wav2Vec2ForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.id2label == dict(enumerate(LABELS)) and reloaded.config.label2id == ours.label2id
    with torch.no_grad():
        again = reloaded.eval()(source, attention_mask=(~padding_mask).long()).logits
    assert (again - expected).abs().max().item() < TOL

    # ours: save and load
    ours.save_pretrained(tmp_path / "native")
    native = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(tmp_path / "native")
    assert native.labels == LABELS
    with torch.no_grad():
        assert torch.equal(native(source, padding_mask=padding_mask).logits, got)


def test_audio_classification_pipeline_top_label_equals_ours(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = make_hf_classifier(transformers, "layer", weighted=True, seed=1)
    ours = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(save_hf(hf, tmp_path / "hf"))
    export = ours.save_pretrained(tmp_path / "export", huggingface=True)
    classify = transformers.pipeline("audio-classification", model=str(export), device="cpu")
    _, _, waves = speech_batch(count=6)
    for wave in waves:
        scores = classify({"raw": wave.numpy(), "sampling_rate": 16000}, top_k=len(LABELS))
        with torch.no_grad():
            source = normalize_waveform(wave) if ours.cfg.encoder.normalize else wave
            probs = ours(source[None]).logits.softmax(-1)[0]
        assert scores[0]["label"] == ours.labels[int(probs.argmax())]
        pipeline_probs = {s["label"]: s["score"] for s in scores}
        assert max(abs(pipeline_probs[label] - probs[i].item()) for i, label in enumerate(ours.labels)) < 1e-4
    assert ours.cfg.encoder.normalize


def test_new_head_on_any_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = make_hf_classifier(transformers, "layer", weighted=False)
    clf = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(save_hf(hf, tmp_path / "hf"))
    encoder_dir = clf.wav2vec2.save_pretrained(tmp_path / "encoder")
    fresh = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(encoder_dir, labels=["a", "b"],
                                                                   use_weighted_layer_sum=True)
    assert fresh.labels == ["a", "b"] and fresh.checkpoint_info["new_head"]
    assert fresh.layer_weights.shape == (clf.cfg.encoder.encoder_layers + 1,)
    for key, value in clf.wav2vec2.state_dict().items():
        assert torch.equal(fresh.wav2vec2.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="labels=\\[...\\]"):
        xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(encoder_dir)


# ---------------------------------------------------------------------------------------------- fairseq
def fairseq_classification_checkpoint(encoder, projector, classifier, activation):
    """A hand-made fairseq ``wav2vec_classification`` checkpoint (MeanPoolingFast) in the original's key layout."""
    state = {f"w2v_encoder.w2v_model.{k}": v for k, v in fairseq_encoder_state(encoder).items()}
    state.update({f"pooling_layer.linear.{k}": v for k, v in projector.state_dict().items()})
    state.update({f"pooling_layer.projection.{k}": v for k, v in classifier.state_dict().items()})
    w2v_model = {"_name": "wav2vec2", **config_to_fairseq(encoder.cfg)}
    return {
        "cfg": {"model": {"_name": "wav2vec_classification", "pooling": "mean", "activation_fn": activation,
                          "latent_embed_dim": projector.out_features,
                          "w2v_args": {"model": w2v_model, "task": {"normalize": encoder.cfg.normalize}}},
                "task": {"_name": "audio_classification", "labels": "lang"}},
        "model": state,
    }


def fairseq_encoder_state(encoder):
    """Our encoder's state in fairseq's key names (the inverse of ``state_dict_from_fairseq``)."""
    renamed, unmatched = rename(split_qkv(encoder.state_dict()), FAIRSEQ_KEY_MAP, reverse=True)
    assert not unmatched
    return renamed


def test_fairseq_classification_state_dict_by_key_name(tmp_path):
    torch.manual_seed(0)
    cfg = xlsr.Wav2Vec2Config.from_preset("tiny")
    encoder = xlsr.Wav2Vec2Model(cfg, pretraining_head=False).eval()
    projector, classifier = torch.nn.Linear(cfg.encoder_embed_dim, 16), torch.nn.Linear(16, len(LABELS))
    checkpoint = fairseq_classification_checkpoint(encoder, projector, classifier, "gelu")
    torch.save(checkpoint, tmp_path / "checkpoint_best.pt")
    (tmp_path / "dict.lang.txt").write_text("".join(f"{label} 5\n" for label in LABELS))
    clf = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(tmp_path / "checkpoint_best.pt")
    assert clf.labels == LABELS and clf.cfg.pooling_activation == "gelu"

    source, padding_mask, _ = speech_batch()
    with torch.no_grad():
        got = clf(source, padding_mask=padding_mask).logits
        # by hand from the same tensors: masked mean of the projected frames, gelu, linear
        feats = encoder.extract_features(source, padding_mask)
        valid = ~feats.padding_mask
        expected = torch.stack([
            classifier(F.gelu(projector(feats.x[b, valid[b]]).mean(0))) for b in range(len(source))
        ])
    assert valid.sum(-1).unique().numel() == len(source)
    assert (got - expected).abs().max().item() < TOL

    with pytest.raises(CheckpointError, match="activation"):  # HF's head has no activation after the mean
        clf.save_pretrained(tmp_path / "hf", huggingface=True)
    checkpoint["model"]["pooling_layer.extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="pooling_layer.extra.weight"):
        xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(tmp_path / "bad.pt")


def test_convert_tool_writes_hf_folder_transformers_loads(tmp_path):
    """tools/convert_fairseq.py SRC DST --to hf on a fairseq classifier with an identity activation: the folder
    loads in AutoModelForAudioClassification and the audio-classification pipeline, same logits as ours."""
    transformers = pytest.importorskip("transformers")
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("convert_fairseq_cls", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.manual_seed(0)
    cfg = xlsr.Wav2Vec2Config.from_preset("tiny", normalize=True)
    encoder = xlsr.Wav2Vec2Model(cfg, pretraining_head=False).eval()
    projector, classifier = torch.nn.Linear(cfg.encoder_embed_dim, 16), torch.nn.Linear(16, len(LABELS))
    checkpoint = fairseq_classification_checkpoint(encoder, projector, classifier, "linear")
    checkpoint["cfg"]["model"]["activation_fn"] = "gelu"
    torch.save(checkpoint, tmp_path / "gelu.pt")
    assert tool.main([str(tmp_path / "gelu.pt"), str(tmp_path / "refused"), "--to", "hf"]) == 2
    checkpoint["cfg"]["model"]["activation_fn"] = "linear"  # fairseq's name for the identity
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    (tmp_path / "dict.lang.txt").write_text("".join(f"{label} 1\n" for label in LABELS))
    assert tool.main([str(tmp_path / "checkpoint.pt"), str(tmp_path / "hf"), "--to", "hf", "--verify",
                      "--tolerance", "1e-5"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Wav2Vec2ForSequenceClassification"] and config["num_labels"] == 3
    assert config["classifier_proj_size"] == 16 and config["use_weighted_layer_sum"] is False
    assert config["label2id"] == {s: i for i, s in enumerate(LABELS)}
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()

    ours = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(tmp_path / "checkpoint.pt")
    classify = transformers.pipeline("audio-classification", model=str(tmp_path / "hf"), device="cpu")
    _, _, waves = speech_batch(count=4)
    for wave in waves:
        with torch.no_grad():
            label = ours.labels[int(ours(normalize_waveform(wave)[None]).logits.argmax())]
        assert classify({"raw": wave.numpy(), "sampling_rate": 16000})[0]["label"] == label
