"""Hugging Face's own clients agree with us: transformers' ASR pipeline and ``python -m xlsr.transcribe`` print the same
text for an HF folder saved by transformers and for our ``--to hf`` export of a fairseq model; HF folders in every
layout load (transformers 5's processor_config.json, a projection when conv dim == hidden size); Hub ids resolve
through huggingface_hub's cache."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch
from conftest import FIXTURES, GOLDEN

import xlsr
from xlsr.checkpoints import CheckpointError, safe_torch_load
from xlsr.checkpoints.huggingface import save_huggingface

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_fairseq.py"
CTC_MINI = GOLDEN / "ctc_mini"
# one recording per language, different lengths (xlsr.transcribe pads them into one batch)
SPEECH = sorted((FIXTURES / "speech").glob("*/*.flac"))[::4]
# HF's fine-tuning blog vocabulary: letters, '|' for the space, then [UNK] and [PAD] (the blank) at the end
BLOG_LETTERS = list("abcdefghijklmnopqrstuvwxyz'") + ["|"]
TOL = 1e-5


def run(args, **env):
    """Run a command as a user would (the worktree first on the path); its completed process."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    result = subprocess.run(args, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def convert():
    """tools/convert_fairseq.py's main (the command line, in this process)."""
    spec = importlib.util.spec_from_file_location("convert_fairseq_hf_clients", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def xlsr_transcripts(model_dir, paths):
    """``python -m xlsr.transcribe MODEL FILES...``: {path: text}."""
    result = run([sys.executable, "-m", "xlsr.transcribe", str(model_dir), *map(str, paths), "--no-progress"])
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {row["path"]: row["text"] for row in rows}


def pipeline_transcripts(model_dir, paths):
    """transformers' ``pipeline("automatic-speech-recognition", model=DIR)``, one file at a time: {path: text}."""
    asr = transformers.pipeline("automatic-speech-recognition", model=str(model_dir), device="cpu")
    texts = {}
    for path in paths:
        audio, rate = soundfile.read(path, dtype="float32")
        texts[str(path)] = asr({"raw": audio, "sampling_rate": rate})["text"]
    return texts


def normalized(path):
    """A recording, normalised to zero mean and unit variance: (1, S)."""
    audio, _ = soundfile.read(path, dtype="float32")
    return torch.nn.functional.layer_norm(torch.from_numpy(audio), audio.shape)[None]


def bias_head(bias, logits, letters, blank, delimiter):
    """Make a head emit what a trained one does: ``logits`` (T, V) of one recording; each output's mean over its
    frames is subtracted (no output wins everywhere), the others pushed down, so that a few letters, the word
    delimiter and the blank take turns from frame to frame."""
    spread = logits.std(0).mean()
    with torch.no_grad():
        bias.sub_(logits.mean(0) + 3 * spread)
        bias[letters] += 3 * spread
        bias[[blank, delimiter]] += 3.5 * spread


def assert_same_text(ours, theirs):
    assert sorted(ours) == sorted(theirs) == sorted(map(str, SPEECH))
    for path in theirs:
        assert ours[path] == theirs[path], path
    letters = {c for text in theirs.values() for c in text if c.isalpha()}
    assert all(text.strip() for text in theirs.values()) and len(letters) > 1, theirs
    assert any(" " in text for text in theirs.values()), theirs  # the word delimiter was emitted


# ---------------------------------------------------------------------------------------------- (a) saved by HF
def small_hf_config(vocab_size, pad_token_id, **overrides):
    values = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=[32] * 7,
        conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2], num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
        vocab_size=vocab_size, pad_token_id=pad_token_id, ctc_loss_reduction="mean",
    )
    values.update(overrides)
    return transformers.Wav2Vec2Config(**values)


def save_hf_folder(folder, seed=0, **overrides):
    """A Wav2Vec2ForCTC (random small weights, biased head) + Wav2Vec2Processor (blog vocabulary, do_normalize),
    all saved by transformers' own save_pretrained; returns the model."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder.parent / f"{folder.name}-vocab.json"
    vocab = {symbol: index for index, symbol in enumerate(BLOG_LETTERS)}
    vocab["[UNK]"] = len(vocab)
    vocab["[PAD]"] = len(vocab)
    vocab_file.write_text(json.dumps(vocab))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="[UNK]", pad_token="[PAD]",
                                                  word_delimiter_token="|")
    extractor = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                      do_normalize=True, return_attention_mask=True)
    transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForCTC(small_hf_config(len(tokenizer), tokenizer.pad_token_id, **overrides)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # random weights give logits of about 0.1: spread them as training would
        logits = model(normalized(SPEECH[0])).logits[0]
    # <s> (added by the tokenizer after [PAD]) too: HF's pipeline prints it, and so must we
    favoured = [vocab[c] for c in "aeinst"] + [tokenizer.convert_tokens_to_ids("<s>")]
    bias_head(model.lm_head.bias, logits, favoured, tokenizer.pad_token_id, vocab["|"])
    model.save_pretrained(folder)
    return model


def test_hf_saved_folder_pipeline_equals_transcribe(tmp_path):
    folder = tmp_path / "hf"
    save_hf_folder(folder)
    # transformers 5's layout: the feature extractor inside processor_config.json, no preprocessor_config.json
    assert (folder / "processor_config.json").is_file() and not (folder / "preprocessor_config.json").exists()
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(folder)
    assert model.cfg.encoder.normalize is True
    assert model.checkpoint_info["normalize_from"] == "processor_config.json"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert len(model.vocab) == len(tokenizer) and model.vocab[model.blank_index] == "[PAD]"
    assert model.blank_index == tokenizer.pad_token_id and model.unk_symbol == "[UNK]"
    theirs = pipeline_transcripts(folder, SPEECH)
    assert any("<s>" in text for text in theirs.values())
    assert_same_text(xlsr_transcripts(folder, SPEECH), theirs)


def test_feature_extractor_settings_in_either_file(tmp_path):
    """do_normalize is read from processor_config.json (transformers 5) or preprocessor_config.json (4.x), and
    processor_config.json wins where both are, as in transformers 5."""
    folder = tmp_path / "hf"
    save_hf_folder(folder)
    processor = json.loads((folder / "processor_config.json").read_text())
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    (legacy / "processor_config.json").unlink()
    (legacy / "preprocessor_config.json").write_text(json.dumps(processor["feature_extractor"]))
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(legacy)
    assert model.cfg.encoder.normalize is True
    assert model.checkpoint_info["normalize_from"] == "preprocessor_config.json"
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor["feature_extractor"],
                                                                 "do_normalize": False}))
    assert xlsr.Wav2Vec2ForCTC.from_pretrained(folder).cfg.encoder.normalize is True


# ---------------------------------------------------------------------------------------------- (b) our export
def test_fairseq_export_pipeline_equals_transcribe(tmp_path, convert):
    checkpoint = safe_torch_load(CTC_MINI / "checkpoint.pt")
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(CTC_MINI / "checkpoint.pt")
    vocab = model.vocab
    with torch.no_grad():
        logits = model(normalized(SPEECH[0])).logits[0]
    bias_head(checkpoint["model"]["w2v_encoder.proj.bias"], logits, [vocab.index(c) for c in "EATON"], blank=0,
              delimiter=vocab.index("|"))
    checkpoint["task_state"] = {}  # the pickled Dictionary (read as an inert stand-in) cannot be saved again:
    source = tmp_path / "fairseq" / "checkpoint.pt"  # the vocabulary comes from dict.ltr.txt beside it
    source.parent.mkdir()
    torch.save(checkpoint, source)
    shutil.copy(CTC_MINI / "dict.ltr.txt", source.parent / "dict.ltr.txt")
    exported = tmp_path / "hf"
    assert convert([str(source), str(exported), "--to", "hf", "--verify", "--tolerance", "1e-5"]) == 0

    processor = transformers.Wav2Vec2Processor.from_pretrained(str(exported))
    assert processor.tokenizer.pad_token_id == 0 and processor.feature_extractor.do_normalize is True
    assert type(transformers.AutoProcessor.from_pretrained(str(exported))).__name__ == "Wav2Vec2Processor"
    theirs = pipeline_transcripts(exported, SPEECH)
    assert_same_text(xlsr_transcripts(exported, SPEECH), theirs)
    # and the fairseq checkpoint itself (fairseq's decoding) prints the same
    assert xlsr_transcripts(source, SPEECH) == theirs


# ---------------------------------------------------------------------------------------------- projection
@pytest.mark.parametrize("head", ["ctc", "pretraining"])
def test_conv_dim_equal_to_hidden_size_keeps_the_projection(tmp_path, head):
    config = small_hf_config(12, 0, conv_dim=[64] * 7)
    torch.manual_seed(0)
    source = torch.randn(2, 16000)
    attention_mask = torch.ones(2, 16000, dtype=torch.long)
    attention_mask[1, 12000:] = 0
    source[1, 12000:] = 0
    if head == "ctc":
        hf = transformers.Wav2Vec2ForCTC(config).eval()
        hf.save_pretrained(tmp_path)
        (tmp_path / "vocab.json").write_text(json.dumps({f"<{i}>": i for i in range(12)}))
        model = xlsr.Wav2Vec2ForCTC.from_pretrained(tmp_path)
        with torch.no_grad():
            theirs = hf(source, attention_mask=attention_mask).logits
            out = model(source, attention_mask == 0)
        ours, valid = out.logits, ~out.padding_mask
        encoder = model.wav2vec2
    else:
        hf = transformers.Wav2Vec2ForPreTraining(config).eval()
        hf.save_pretrained(tmp_path)
        model = xlsr.Wav2Vec2Model.from_pretrained(tmp_path)
        with torch.no_grad():
            theirs = hf.wav2vec2(source, attention_mask=attention_mask).last_hidden_state
            feats = model.extract_features(source, attention_mask == 0)
        ours, valid = feats.x, ~feats.padding_mask
        encoder = model
    assert encoder.cfg.keep_feature_projection and encoder.feature_projection.projection is not None
    assert (ours - theirs)[valid].abs().max().item() <= TOL


def test_identity_projection_of_our_export_is_dropped(tmp_path):
    """Ours (fairseq semantics) with conv dim == hidden size has no projection; the export writes the identity, and
    reading it back gives the model without one again."""
    cfg = xlsr.Wav2Vec2Config.from_preset("tiny", conv_layers=[(128, 10, 5)] + [(128, 3, 2)] * 4 + [(128, 2, 2)] * 2)
    model = xlsr.Wav2Vec2Model(cfg)
    assert model.feature_projection.projection is None
    save_huggingface(model, tmp_path)
    back = xlsr.Wav2Vec2Model.from_pretrained(tmp_path)
    assert not back.cfg.keep_feature_projection and back.feature_projection.projection is None


# ---------------------------------------------------------------------------------------------- Hub ids
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(tmp_path, monkeypatch, repos):
    """A huggingface_hub cache in tmp_path holding ``repos`` ({"owner/name": folder}), in its layout:
    models--owner--name/snapshots/<commit>/<files> and refs/main = <commit>; HF_HUB_CACHE and HF_HUB_OFFLINE=1 set
    (environment for subprocesses, huggingface_hub's constants for this process, which read them at import)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub-cache"
    for repo_id, folder in repos.items():
        storage = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(folder, storage / "snapshots" / REVISION)
        (storage / "refs").mkdir()
        (storage / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_ids_resolve_through_the_cache(tmp_path, monkeypatch, convert):
    pretrained = xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny"))
    save_huggingface(pretrained, tmp_path / "pretrained")
    ctc = xlsr.Wav2Vec2ForCTC.from_pretrained(CTC_MINI / "checkpoint.pt")
    assert convert([str(CTC_MINI / "checkpoint.pt"), str(tmp_path / "ctc"), "--to", "hf"]) == 0
    hub_cache(tmp_path, monkeypatch, {"someone/tiny-xlsr": tmp_path / "pretrained",
                                      "someone/ctc-mini": tmp_path / "ctc"})
    monkeypatch.chdir(tmp_path)  # no local folder of that name

    model = xlsr.Wav2Vec2Model.from_pretrained("someone/tiny-xlsr")
    for key, value in pretrained.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    from_hub = xlsr.Wav2Vec2ForCTC.from_pretrained("someone/ctc-mini")
    assert from_hub.vocab == ctc.vocab
    for key, value in ctc.state_dict().items():
        assert torch.equal(value, from_hub.state_dict()[key]), key

    # the converter as a command: a fresh process reads HF_HUB_CACHE / HF_HUB_OFFLINE from its environment
    result = run([sys.executable, str(TOOL), "someone/ctc-mini", str(tmp_path / "converted")])
    assert "source format:   huggingface" in result.stdout
    assert xlsr.Wav2Vec2ForCTC.from_pretrained(tmp_path / "converted").vocab == ctc.vocab

    with pytest.raises(CheckpointError, match="could not be resolved") as err:
        xlsr.Wav2Vec2Model.from_pretrained("someone/not-cached")
    assert "someone/not-cached" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_hub_id_without_huggingface_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(CheckpointError, match="needs the huggingface_hub package") as err:
        xlsr.Wav2Vec2ForCTC.from_pretrained("facebook/wav2vec2-base-960h")
    assert "facebook/wav2vec2-base-960h" in str(err.value)


def test_tokenizer_settings_in_transformers_4_form(tmp_path):
    """transformers 4.x writes special tokens as {"__type": "AddedToken", "content": ...}; a bad entry names the file."""
    from xlsr.checkpoints.ctc import save_ctc_huggingface

    model = xlsr.Wav2Vec2ForCTC.from_pretrained(CTC_MINI / "checkpoint.pt")
    save_ctc_huggingface(model, tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key in ("pad_token", "unk_token"):
        config[key] = {"__type": "AddedToken", "content": config[key], "lstrip": False, "rstrip": False}
    config["word_delimiter_token"] = "'"
    config_file.write_text(json.dumps(config))
    back = xlsr.Wav2Vec2ForCTC.from_pretrained(tmp_path)
    assert back.unk_symbol == "<unk>" and back.cfg.word_delimiter == "'" and back.blank_index == 0
    config["unk_token"] = ["<unk>"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unk_token must be a string") as err:
        xlsr.Wav2Vec2ForCTC.from_pretrained(tmp_path)
    assert str(config_file) in str(err.value)
