"""CTC speech recognition (xlsr.Wav2Vec2ForCTC): fairseq's wav2vec_ctc golden fixture, Hugging Face parity, new heads
on pretrained encoders, decoding, training behaviour, conversion and bad inputs."""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN

import xlsr
from xlsr.checkpoints import CheckpointError, safe_torch_load
from xlsr.checkpoints.ctc import read_fairseq_dictionary, save_ctc_huggingface
from xlsr.ctc import letters_to_text

CTC_MINI = GOLDEN / "ctc_mini"
TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_fairseq.py"
TOL = 1e-5


def relative_max_diff(ours, theirs, valid):
    return ((ours.double() - theirs.double())[valid].abs().max() / theirs.double()[valid].abs().max()).item()


@pytest.fixture()
def lone_checkpoint(tmp_path):
    """ctc_mini's checkpoint.pt in a folder of its own (no dict.ltr.txt beside it)."""
    path = tmp_path / "alone" / "checkpoint.pt"
    path.parent.mkdir()
    shutil.copy(CTC_MINI / "checkpoint.pt", path)
    return path


def golden_inputs():
    return torch.load(CTC_MINI / "inputs.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------- fairseq golden
@pytest.mark.parametrize("expected_file", ["expected.pt", "expected_fp64.pt"])
def test_fairseq_ctc_fixture(lone_checkpoint, expected_file):
    expected = torch.load(CTC_MINI / expected_file, weights_only=True)
    dtype = expected["logits"].dtype
    inputs = golden_inputs()
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(lone_checkpoint).to(dtype)
    assert model.vocab == read_fairseq_dictionary(CTC_MINI / "dict.ltr.txt")
    assert model.checkpoint_info["vocab_from"] == "task_state"
    assert len(model.vocab) == 32 and model.blank_index == inputs["blank_index"] == 0
    with torch.no_grad():
        out = model(inputs["source"].to(dtype), inputs["padding_mask"])
    assert torch.equal(out.padding_mask, expected["frame_padding_mask"])
    assert torch.equal(out.lengths, expected["output_lengths"])
    valid = ~expected["frame_padding_mask"]
    assert out.logits.dtype == dtype and out.log_probs.dtype == torch.float32
    assert relative_max_diff(out.logits, expected["logits"], valid) <= TOL
    assert relative_max_diff(out.log_probs, expected["log_probs"], valid) <= TOL
    # padded frames: forced to the blank exactly as fairseq's get_logits
    assert torch.equal(out.log_probs[~valid], expected["log_probs"][~valid])
    loss = model.ctc_loss(out, inputs["target"], inputs["target_lengths"])
    assert abs(loss.item() - expected["ctc_loss_sum"]) <= TOL * abs(expected["ctc_loss_sum"])
    assert model.greedy_units(out) == expected["greedy_units"]
    assert model.decode(out) == expected["greedy_text"]


def test_fairseq_ctc_config(lone_checkpoint):
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(lone_checkpoint)
    cfg = model.cfg
    assert cfg.zero_infinity and cfg.apply_mask and cfg.ctc_loss_reduction == "sum" and cfg.final_dropout == 0.0
    assert cfg.encoder.normalize and cfg.encoder.feature_grad_mult == 0.0
    assert (cfg.encoder.mask_prob, cfg.encoder.mask_length) == (0.5, 2)
    assert (cfg.encoder.mask_channel_prob, cfg.encoder.mask_channel_length) == (0.1, 4)
    assert model.num_updates == 1 and not model.encoder_frozen
    assert model.wav2vec2.quantizer is None and model.wav2vec2.project_q is None and model.wav2vec2.final_proj is None
    keys = set(model.state_dict())
    assert {"lm_head.weight", "lm_head.bias", "wav2vec2.mask_embedding"} <= keys
    assert all(k.startswith(("wav2vec2.", "lm_head.")) for k in keys)


def test_dict_file_beside_gives_the_same_vocab(tmp_path, lone_checkpoint):
    # the fixture folder has dict.ltr.txt beside checkpoint.pt
    with_dict = xlsr.Wav2Vec2ForCTC.from_pretrained(CTC_MINI / "checkpoint.pt")
    alone = xlsr.Wav2Vec2ForCTC.from_pretrained(lone_checkpoint)
    assert with_dict.vocab == alone.vocab
    # and a checkpoint whose task_state lost the dictionary reads the file
    checkpoint = safe_torch_load(CTC_MINI / "checkpoint.pt")
    checkpoint["task_state"] = {}
    stripped = tmp_path / "stripped" / "checkpoint.pt"
    stripped.parent.mkdir()
    torch.save(checkpoint, stripped)
    with pytest.raises(CheckpointError, match="no vocabulary") as err:
        xlsr.Wav2Vec2ForCTC.from_pretrained(stripped)
    assert str(stripped) in str(err.value)
    shutil.copy(CTC_MINI / "dict.ltr.txt", stripped.parent / "dict.ltr.txt")
    from_file = xlsr.Wav2Vec2ForCTC.from_pretrained(stripped)
    assert from_file.vocab == alone.vocab and from_file.checkpoint_info["vocab_from"] == "dict.ltr.txt"


# ---------------------------------------------------------------------------------------------- Hugging Face
def small_hf_ctc(transformers, seed=0, **overrides):
    values = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, conv_dim=[32] * 7,
        conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2], num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
        vocab_size=12, pad_token_id=0, mask_time_prob=0.05, ctc_zero_infinity=True, ctc_loss_reduction="mean",
    )
    values.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**values)).eval()
    with torch.no_grad():  # random non-trivial norms and biases, so that a swapped key would show
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


HF_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|", "A", "B", "C", "D", "E", "F", "'"]


def write_vocab(folder, vocab):
    (Path(folder) / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}))


def padded_batch(seed=0, lengths=(16000, 11200)):
    generator = torch.Generator().manual_seed(seed)
    source = torch.zeros(len(lengths), max(lengths))
    padding_mask = torch.ones(len(lengths), max(lengths), dtype=torch.bool)
    for row, length in enumerate(lengths):
        source[row, :length] = torch.randn(length, generator=generator)
        padding_mask[row, :length] = False
    return source, padding_mask


@pytest.mark.parametrize("layout", ["layer", "group"])
def test_hf_ctc_loads_and_matches(tmp_path, layout):
    transformers = pytest.importorskip("transformers")
    extra = {} if layout == "layer" else dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)
    hf = small_hf_ctc(transformers, **extra)
    hf.save_pretrained(tmp_path)
    write_vocab(tmp_path, HF_VOCAB)
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(tmp_path)
    assert model.vocab == HF_VOCAB and model.blank_index == 0
    assert model.cfg.zero_infinity and model.cfg.ctc_loss_reduction == "mean"
    source, padding_mask = padded_batch(seed=1)
    if layout == "group":  # base-style models were trained without padding: compare unpadded
        source, padding_mask = source[:1], None
    with torch.no_grad():
        attention_mask = None if padding_mask is None else (~padding_mask).long()
        theirs = hf(source, attention_mask=attention_mask).logits
        out = model(source, padding_mask)
    valid = torch.ones(out.logits.shape[:2], dtype=torch.bool) if out.padding_mask is None else ~out.padding_mask
    assert (out.logits - theirs)[valid].abs().max().item() <= TOL
    if padding_mask is not None:
        labels = torch.tensor([[5, 6, 4, 7, 8], [9, 10, 11, -100, -100]])
        target_lengths = (labels >= 0).sum(-1)
        with torch.no_grad():
            hf_loss = hf(source, attention_mask=attention_mask, labels=labels).loss
        ours = model.ctc_loss(out, labels.clamp(min=0), target_lengths)
        assert abs(ours.item() - hf_loss.item()) <= TOL * abs(hf_loss.item())


def test_hf_dir_without_vocab_is_a_clear_error(tmp_path):
    transformers = pytest.importorskip("transformers")
    small_hf_ctc(transformers).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no vocab.json") as err:
        xlsr.Wav2Vec2ForCTC.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_export_to_hf_loads_in_transformers(tmp_path, lone_checkpoint):
    transformers = pytest.importorskip("transformers")
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(lone_checkpoint)
    save_ctc_huggingface(model, tmp_path)
    hf, loading = transformers.Wav2Vec2ForCTC.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]
    assert hf.config.vocab_size == 32 and hf.config.pad_token_id == 0 and hf.config.ctc_zero_infinity
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert [s for s, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == model.vocab
    # fairseq's names kept; the blank (<s>, index 0) is the tokenizer's pad_token, so HF's decoding drops it
    tokenizer = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer["pad_token"] == "<s>" and tokenizer["unk_token"] == "<unk>" and tokenizer["eos_token"] == "</s>"
    inputs = golden_inputs()
    with torch.no_grad():
        theirs = hf.eval()(inputs["source"], attention_mask=(~inputs["padding_mask"]).long()).logits
        out = model(inputs["source"], inputs["padding_mask"])
    assert relative_max_diff(out.logits, theirs, ~out.padding_mask) <= TOL
    back = xlsr.Wav2Vec2ForCTC.from_pretrained(tmp_path)
    assert back.vocab == model.vocab and back.blank_index == 0 and back.unk_symbol == "<unk>"
    assert back.cfg == dataclasses.replace(model.cfg, text_style="huggingface")
    assert back.decode(back(inputs["source"], inputs["padding_mask"])) == model.decode(out)


# ---------------------------------------------------------------------------------------------- our format
def test_native_round_trip(tmp_path, lone_checkpoint):
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(lone_checkpoint)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "xlsr-wav2vec2-ctc"
    back = xlsr.Wav2Vec2ForCTC.from_pretrained(tmp_path)
    assert back.vocab == model.vocab and back.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    inputs = golden_inputs()
    with torch.no_grad():
        a, b = model(inputs["source"], inputs["padding_mask"]), back(inputs["source"], inputs["padding_mask"])
    assert torch.equal(a.logits, b.logits) and model.decode(a) == back.decode(b)


def test_pretrained_model_refuses_ctc_checkpoints(tmp_path, lone_checkpoint):
    with pytest.raises(CheckpointError, match="Wav2Vec2ForCTC"):
        xlsr.Wav2Vec2Model.from_pretrained(lone_checkpoint)
    xlsr.Wav2Vec2ForCTC.from_pretrained(lone_checkpoint).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="Wav2Vec2ForCTC"):
        xlsr.Wav2Vec2Model.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- new heads
NEW_VOCAB = ["<s>", "<pad>", "</s>", "<unk>", "|", "a", "b", "c"]


@pytest.mark.parametrize("name", ["xlsr_mini", "base_mini"])
def test_new_head_on_a_pretrained_encoder(tmp_path, name):
    pretrained_path = GOLDEN / name / "checkpoint.pt"
    torch.manual_seed(0)
    ctc = xlsr.Wav2Vec2ForCTC.from_pretrained(pretrained_path, vocab=NEW_VOCAB)
    pretrained = xlsr.Wav2Vec2Model.from_pretrained(pretrained_path)
    assert ctc.vocab == NEW_VOCAB and ctc.lm_head.weight.shape == (len(NEW_VOCAB), pretrained.cfg.encoder_embed_dim)
    assert ctc.checkpoint_info["new_head"] and ctc.num_updates == 0
    assert torch.count_nonzero(ctc.lm_head.bias) == 0
    bound = (6 / sum(ctc.lm_head.weight.shape)) ** 0.5  # xavier uniform
    assert ctc.lm_head.weight.abs().max() <= bound and ctc.lm_head.weight.std() > bound / 4
    # fine-tuning defaults replace the pretraining settings (fairseq's Wav2VecEncoder overrides)
    enc = ctc.cfg.encoder
    assert (enc.dropout, enc.attention_dropout, enc.encoder_layerdrop, enc.feature_grad_mult) == (0.0, 0.0, 0.0, 0.0)
    assert (enc.mask_prob, enc.mask_length, enc.mask_channel_prob) == (0.5, 10, 0.0) and not ctc.cfg.apply_mask
    assert enc.conv_layers == pretrained.cfg.conv_layers and enc.normalize == pretrained.cfg.normalize
    source, padding_mask = padded_batch(seed=2)
    with torch.no_grad():
        ours = ctc.wav2vec2.extract_features(source, padding_mask)
        theirs = pretrained.extract_features(source, padding_mask)
    assert torch.equal(ours.x, theirs.x)
    # settings pass through; a new head also goes on a CTC model's encoder
    other = xlsr.Wav2Vec2ForCTC.from_pretrained(pretrained_path, vocab=NEW_VOCAB[:6], mask_prob=0.3,
                                                apply_mask=True, final_dropout=0.1)
    assert other.cfg.encoder.mask_prob == 0.3 and other.cfg.apply_mask and other.cfg.final_dropout == 0.1
    assert other.cfg.vocab_size == 6
    with pytest.raises(TypeError, match="not_a_setting"):
        xlsr.Wav2Vec2ForCTC.from_pretrained(pretrained_path, vocab=NEW_VOCAB, not_a_setting=1)


def test_new_head_on_a_ctc_encoder(lone_checkpoint):
    ctc = xlsr.Wav2Vec2ForCTC.from_pretrained(lone_checkpoint)
    fresh = xlsr.Wav2Vec2ForCTC.from_pretrained(lone_checkpoint, vocab=NEW_VOCAB)
    assert fresh.lm_head.out_features == len(NEW_VOCAB) and fresh.checkpoint_info["new_head"]
    for key, value in ctc.wav2vec2.state_dict().items():
        assert torch.equal(value, fresh.wav2vec2.state_dict()[key]), key


def test_non_ctc_file_without_vocab_is_an_error(tmp_path):
    pretrained_path = GOLDEN / "xlsr_mini" / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="not a CTC model") as err:
        xlsr.Wav2Vec2ForCTC.from_pretrained(pretrained_path)
    assert str(pretrained_path) in str(err.value)
    xlsr.Wav2Vec2Model.from_pretrained(pretrained_path).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a CTC model"):
        xlsr.Wav2Vec2ForCTC.from_pretrained(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        xlsr.Wav2Vec2ForCTC.from_pretrained(garbage)


# ---------------------------------------------------------------------------------------------- decoding
def hand_made_model(vocab):
    cfg = xlsr.CTCConfig(encoder=xlsr.Wav2Vec2Config.from_preset("tiny"), vocab_size=len(vocab), blank_index=0)
    return xlsr.Wav2Vec2ForCTC(cfg, vocab)


def one_hot_logits(rows):
    length, classes = max(len(r) for r in rows), 8
    logits = torch.zeros(len(rows), length, classes)
    for b, row in enumerate(rows):
        for t, unit in enumerate(row):
            logits[b, t, unit] = 5.0
    return logits


def test_decode_hand_made_logits():
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "|", "A", "B", "C"]
    model = hand_made_model(vocab)
    rows = [
        [5, 5, 0, 5, 6, 6, 4, 4, 7, 0, 0, 7],  # A A (blank) A B B | | C (blank) C -> "AAB C" + "C"
        [4, 5, 2, 5, 4, 0, 4, 6, 3, 1],        # leading/trailing '|' stripped, </s> dropped, <unk>/<pad> kept
        [0, 0, 0, 0],                           # only blanks
    ]
    logits = one_hot_logits(rows)
    lengths = torch.tensor([12, 10, 4])
    assert model.greedy_units(logits, lengths) == [[5, 5, 6, 4, 7, 7], [4, 5, 2, 5, 4, 4, 6, 3, 1], []]
    assert model.decode(logits, lengths) == ["AAB CC", "AA  B<unk><pad>", ""]
    # frames past the length are ignored
    assert model.decode(logits, torch.tensor([3, 2, 4])) == ["A", "A", ""]
    assert letters_to_text(["<s>", "H", "I", "|", "Y", "O", "|"]) == "HI YO"


def test_decode_uses_the_output_lengths():
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "|", "A", "B", "C"]
    model = hand_made_model(vocab)
    logits = one_hot_logits([[5, 4, 6, 7], [6, 6, 7, 7]])
    out = xlsr.CTCOutput(logits=logits, log_probs=logits.log_softmax(-1), lengths=torch.tensor([4, 2]),
                         padding_mask=torch.tensor([[False] * 4, [False, False, True, True]]))
    assert model.decode(out) == ["A BC", "B"]


# ---------------------------------------------------------------------------------------------- training
def test_training_masks_freezing_and_gradients(lone_checkpoint):
    inputs = golden_inputs()
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(lone_checkpoint, freeze_finetune_updates=2)
    model.set_num_updates(0)
    model.train()
    assert model.encoder_frozen
    torch.manual_seed(0)
    out = model(inputs["source"], inputs["padding_mask"])
    model.ctc_loss(out, inputs["target"], inputs["target_lengths"]).backward()
    assert model.lm_head.weight.grad is not None
    assert all(p.grad is None for p in model.wav2vec2.parameters())
    model.zero_grad(set_to_none=True)
    model.set_num_updates(2)
    assert not model.encoder_frozen
    out = model(inputs["source"], inputs["padding_mask"])
    model.ctc_loss(out, inputs["target"], inputs["target_lengths"]).backward()
    grads = {n: p.grad for n, p in model.wav2vec2.named_parameters()}
    assert grads["encoder.layers.0.ffn_norm.weight"] is not None and grads["mask_embedding"] is not None
    assert all(g is None for n, g in grads.items() if n.startswith("feature_extractor."))  # feature_grad_mult 0
    # in training the masks change the output; in eval the same input gives the fixture's numbers
    model.eval()
    with torch.no_grad():
        evaluated = model(inputs["source"], inputs["padding_mask"]).logits
    assert not torch.allclose(out.logits.detach(), evaluated)


def test_masked_features_use_the_mask_embedding():
    cfg = xlsr.Wav2Vec2Config.from_preset("tiny", mask_prob=0.0, mask_channel_prob=0.0, dropout=0.0,
                                          attention_dropout=0.0)
    model = xlsr.Wav2Vec2Model(cfg).eval()
    source = torch.randn(2, 8000)
    with torch.no_grad():
        plain = model.extract_features(source).x
        unmasked = model.extract_features_masked(source).x
        mask = torch.zeros(plain.shape[:2], dtype=torch.bool)
        mask[:, 3:6] = True
        masked = model.extract_features_masked(source, mask_indices=mask).x
    assert torch.equal(plain, unmasked) and not torch.allclose(plain, masked)


# ---------------------------------------------------------------------------------------------- conversion tool
@pytest.fixture(scope="module")
def convert():
    spec = importlib.util.spec_from_file_location("convert_fairseq_ctc", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("to", ["hf", "native"])
def test_convert_ctc(convert, tmp_path, capsys, lone_checkpoint, to):
    if to == "hf":
        pytest.importorskip("transformers")
    dst = tmp_path / to
    assert convert.main([str(lone_checkpoint), str(dst), "--to", to, "--verify", "--tolerance", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "CTC head:        64 -> 32 outputs" in out and "logits (relative)" in out and "verify ok" in out
    if to == "hf":
        assert "transformers.Wav2Vec2ForCTC" in out
        assert json.loads((dst / "config.json").read_text())["architectures"] == ["Wav2Vec2ForCTC"]
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(dst)
    expected = torch.load(CTC_MINI / "expected.pt", weights_only=True)
    inputs = golden_inputs()
    with torch.no_grad():
        out = model(inputs["source"], inputs["padding_mask"])
    assert relative_max_diff(out.logits, expected["logits"], ~expected["frame_padding_mask"]) <= TOL
    assert model.decode(out) == expected["greedy_text"]


def test_the_ctc_encoder_is_built_without_the_pretraining_head():
    """Wav2Vec2ForCTC builds its encoder without quantizer / project_q / final_proj (not built then dropped); its
    state-dict keys are the pretrained model's without that head, under ``wav2vec2.``, and ``lm_head.*``."""
    cfg = xlsr.CTCConfig(encoder=xlsr.Wav2Vec2Config.from_preset("tiny"), vocab_size=8)
    model = xlsr.Wav2Vec2ForCTC(cfg)
    assert model.wav2vec2.quantizer is None and model.wav2vec2.project_q is None and model.wav2vec2.final_proj is None
    head = ("quantizer.", "project_q.", "final_proj.")
    pretrained = [k for k in xlsr.Wav2Vec2Model(cfg.encoder).state_dict() if not k.startswith(head)]
    assert list(model.state_dict()) == [f"wav2vec2.{k}" for k in pretrained] + ["lm_head.weight", "lm_head.bias"]
