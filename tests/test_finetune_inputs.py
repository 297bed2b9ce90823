"""What real users give ``python -m xlsr.finetune``: clips too short for one frame (and empty files), a batch in
which nothing is masked, a fine-tuned model to continue (Hugging Face's layout, fairseq's) with no dictionary, and
a pretraining checkpoint of any kind (a sharded FSDP folder, a ``.pt`` training checkpoint)."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import xlsr
from xlsr.finetune.config import compose_config
from xlsr.finetune.data import LabelledAudioDataset, frames_of
from xlsr.finetune.labels import Dictionary, LabelError, read_labels, words_to_letters
from xlsr.manifest import read_transcript_table, write_manifest

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "tests" / "fixtures" / "digits"
CTC_MINI = REPO / "tests" / "fixtures" / "fairseq" / "ctc_mini"
SHORT_CLIPS = (0, 160, 400, 480, 560)  # samples: 0 and 160 give no frame, the others one (tiny conv stack)


def overrides(manifest: Path, init_from: Path, out: Path, *extra: str) -> list[str]:
    """A fast command line: ``extra`` adds settings or replaces these (key=value)."""
    settings = [
        f"model.init_from={init_from}", f"data.manifest={manifest}", f"output_dir={out}", "data.num_workers=0",
        "data.max_tokens=200000", "log_interval=1", "progress_bar=false", "tensorboard=false", "device=cpu",
        "model.freeze_finetune_updates=0", "model.mask_prob=0.05", "model.mask_channel_prob=0.0",
        "model.encoder_layerdrop=0.0", "optim.lr=5e-3", "optim.max_update=2", *extra,
    ]
    return list({setting.split("=")[0]: setting for setting in settings}.values())


def train_updates(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["update"] for r in map(json.loads, lines) if r["split"] == "train"]


def run(args: list[str]):
    from xlsr.finetune.trainer import FineTuner

    trainer = FineTuner(compose_config(args))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "tiny"
    torch.manual_seed(0)
    xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny")).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """train.tsv + .ltr/.wrd of the 21 digits prompts, without a dict.ltr.txt beside them."""
    dest = tmp_path_factory.mktemp("digits")
    write_manifest(DIGITS, dest, valid_percent=0.0, progress=False,
                   transcripts=read_transcript_table(DIGITS / "transcripts.tsv"))
    (dest / "dict.ltr.txt").unlink()
    return dest / "train.tsv"


@pytest.fixture(scope="module")
def with_short_clips(tmp_path_factory) -> Path:
    """The digits prompts plus noise clips of SHORT_CLIPS samples (an empty .wav among them) transcribed 'SEVEN',
    listed among the real ones; the manifest is written by hand (xlsr.manifest leaves 0-sample files out)."""
    dest = tmp_path_factory.mktemp("short_clips")
    rows = [(str((DIGITS / name).resolve()), sf.info(DIGITS / name).frames, text)
            for name, text in sorted(read_transcript_table(DIGITS / "transcripts.tsv").items())]
    rng = np.random.default_rng(0)
    for position, size in enumerate(SHORT_CLIPS):
        path = dest / f"clip{size}.wav"
        sf.write(path, (0.1 * rng.standard_normal(size)).astype(np.float32), 16000)
        assert sf.info(path).frames == size
        rows.insert(3 * position + 1, (str(path), size, "SEVEN"))
    (dest / "train.tsv").write_text("/\n" + "".join(f"{p.lstrip('/')}\t{n}\n" for p, n, _ in rows))
    (dest / "train.ltr").write_text("".join(words_to_letters(text) + "\n" for *_, text in rows))
    return dest / "train.tsv"


# ---------------------------------------------------------------------- short and empty clips


def test_clips_without_a_frame_are_left_out_with_one_warning(with_short_clips):
    dictionary = Dictionary.from_transcripts(r for r in read_labels(with_short_clips) if r)
    conv_layers = xlsr.Wav2Vec2Config.from_preset("tiny").conv_layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = LabelledAudioDataset(str(with_short_clips), dictionary, num_frames=frames_of(conv_layers))
    about_frames = [str(w.message) for w in caught if "too short for one frame" in str(w.message)]
    assert len(about_frames) == 1, [str(w.message) for w in caught]
    assert about_frames[0].startswith("2 item(s) left out") and "clip0.wav (0 samples)" in about_frames[0]
    assert "clip160.wav (160 samples)" in about_frames[0]
    assert sorted(Path(p).name for p, _ in dataset.dropped) == ["clip0.wav", "clip160.wav"]
    kept = sorted(Path(dataset.path(i)).name for i in range(len(dataset)))
    assert len(kept) == 21 + 3 and {"clip400.wav", "clip480.wav", "clip560.wav"} <= set(kept)
    assert frames_of(conv_layers)(np.array([400, 560])).tolist() == [1, 1]


def test_short_and_empty_clips_do_not_stop_the_finetune_command(with_short_clips, pretrained, tmp_path):
    """The recipe's masks (0.75 x 10 over time): the one-frame clips leave batches in which no frame is drawn."""
    out = tmp_path / "run"
    args = overrides(with_short_clips, pretrained, out, "model.mask_prob=0.75", "optim.max_update=8")
    result = subprocess.run([sys.executable, "-m", "xlsr.finetune", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 item(s) left out, too short for one frame" in result.stderr
    assert train_updates(out) == list(range(1, 9))
    # the one-frame clips are kept, too short for 'SEVEN' under CTC: counted, their loss zeroed (zero_infinity)
    assert "3 item(s) have fewer encoder frames than CTC needs" in result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["infeasible"] for r in records if r["split"] == "train") > 0
    assert (out / "model" / "model.safetensors").is_file()


def test_a_batch_without_masked_frames_trains_unmasked_but_pretraining_needs_one():
    """fairseq: the fine-tuning encoder applies an all-False time mask as it is; the contrastive task refuses."""
    torch.manual_seed(0)
    cfg = xlsr.Wav2Vec2Config.from_preset("tiny")
    model = xlsr.Wav2Vec2Model(cfg).eval()
    source = torch.randn(2, 4000)
    frames = int(frames_of(cfg.conv_layers)(4000))
    nothing = torch.zeros(2, frames, dtype=torch.bool)
    with torch.no_grad():
        masked = model.extract_features_masked(source, mask_indices=nothing).x
        plain = model.extract_features(source).x
    assert torch.equal(masked, plain)
    with pytest.raises(ValueError, match="no frame is masked"):
        model(source, mask_indices=nothing)


# ---------------------------------------------------------------------- continuing a fine-tuned model


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """A tiny random ``Wav2Vec2ForCTC`` + ``Wav2Vec2Processor`` saved by transformers, with a vocabulary made as in
    Hugging Face's fine-tuning tutorial: the transcripts' characters (the space as ``|``), then ``[UNK]``, ``[PAD]``
    (the pad token: the CTC blank); the tokenizer adds ``<s>`` and ``</s>``."""
    transformers = pytest.importorskip("transformers")
    dest = tmp_path_factory.mktemp("hf") / "model"
    dest.mkdir()
    texts = read_transcript_table(DIGITS / "transcripts.tsv").values()
    vocab = {char: index for index, char in enumerate(sorted(set(" ".join(texts))))}
    vocab["|"] = vocab.pop(" ")
    vocab["[UNK]"] = len(vocab)
    vocab["[PAD]"] = len(vocab)
    (dest.parent / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(dest.parent / "vocab.json"), unk_token="[UNK]",
                                                  pad_token="[PAD]", word_delimiter_token="|")
    extractor = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                      do_normalize=True, return_attention_mask=False)
    config = transformers.Wav2Vec2Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, ctc_loss_reduction="mean",
    )
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(config).save_pretrained(dest)
    transformers.Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(dest)
    return dest


def test_continue_a_hugging_face_model_with_no_dictionary(digits, hf_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.Wav2Vec2CTCTokenizer.from_pretrained(hf_model)
    hf_vocab = [symbol for symbol, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    start = transformers.Wav2Vec2ForCTC.from_pretrained(hf_model).lm_head.weight.detach()
    out = tmp_path / "run"
    trainer = run(overrides(digits, hf_model, out))
    assert trainer.task.dictionary.symbols == hf_vocab and trainer.task.dictionary.blank_index == tokenizer.pad_token_id
    # targets are the tokenizer's own ids (its text has no final word boundary: ours ends every word with |)
    dataset = trainer.train_loader.dataset
    transcripts = read_transcript_table(DIGITS / "transcripts.tsv")
    for i in range(len(dataset)):
        text = transcripts[Path(dataset.path(i)).name]
        assert dataset.target(i).tolist()[:-1] == tokenizer(text).input_ids, text
    assert train_updates(out) == [1, 2]
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(out / "model")
    assert model.vocab == hf_vocab and model.blank_index == tokenizer.pad_token_id
    assert not torch.allclose(model.lm_head.weight, start), "training did not move the head"
    # output_dir's dict.ltr.txt is the model's vocabulary: the run continues with it given as the dictionary
    saved = Dictionary.load(out / "dict.ltr.txt")
    assert saved == Dictionary.from_vocab(model.vocab, model.blank_index)
    assert saved.unk_index == hf_vocab.index("[UNK]") and saved.pad_index == tokenizer.pad_token_id
    again = run(overrides(digits, out / "model", tmp_path / "again", f"dictionary={out / 'dict.ltr.txt'}",
                          "optim.max_update=1"))
    assert again.model.vocab == hf_vocab and train_updates(tmp_path / "again") == [1]


def test_continue_fairseq_ctc_mini_over_a_different_dict_beside_the_manifest(digits, tmp_path, caplog):
    """fairseq's wav2vec_ctc checkpoint: its Dictionary is the dictionary; the digits' own dict.ltr.txt beside the
    manifest (other symbols, other order) is set aside with a warning."""
    data = tmp_path / "data"
    shutil.copytree(digits.parent, data)
    Dictionary.from_transcripts(r for r in read_labels(data / "train.tsv") if r).save(data / "dict.ltr.txt")
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="xlsr.finetune"):
        trainer = run(overrides(data / "train.tsv", CTC_MINI / "checkpoint.pt", out))
    assert any("differs from the vocabulary of the fine-tuned model" in r.getMessage() for r in caplog.records)
    fairseq_dictionary = Dictionary.load(CTC_MINI / "dict.ltr.txt")
    assert trainer.task.dictionary == fairseq_dictionary
    assert Dictionary.load(out / "dict.ltr.txt") == fairseq_dictionary
    assert (out / "dict.ltr.txt").read_text().split()[::2] == (CTC_MINI / "dict.ltr.txt").read_text().split()[::2]
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(out / "model")
    assert model.vocab == fairseq_dictionary.symbols and model.blank_index == 0
    start = xlsr.Wav2Vec2ForCTC.from_pretrained(CTC_MINI / "checkpoint.pt").lm_head.weight
    assert not torch.allclose(model.lm_head.weight, start)
    assert train_updates(out) == [1, 2]


HF_STYLE = ["|", "E", "N", "O", "[UNK]", "[PAD]", "<s>", "</s>"]


def test_dictionary_of_a_hugging_face_vocabulary():
    d = Dictionary.from_vocab(HF_STYLE, blank_index=5)
    assert (d.blank_index, d.pad_index, d.unk_index, d.eos_index) == (5, 5, 4, 7)
    assert d.encode("O N E |".split(), where="train.ltr:1") == [3, 2, 1, 0]
    with pytest.raises(LabelError, match=r"train.ltr:2: character 'Z' is not in the dictionary.*\[UNK\]"):
        d.encode(["Z", "E"], where="train.ltr:2")
    assert d.encode(["Z", "E"], where="train.ltr:2", unk=True) == [4, 1]
    for special in ("[PAD]", "<s>", "</s>"):
        with pytest.raises(LabelError, match="cannot be a CTC target"):
            d.encode([special], where="train.ltr:3")
    assert d.string([3, 5, 2, 6, 1, 7, 0]) == "O N E |"
    own_blank = Dictionary.from_vocab(["<blank>", "A", "[PAD]"], blank_index=0)  # padding is not the blank here
    assert own_blank.pad_index == 2
    with pytest.raises(LabelError, match="cannot be a CTC target"):
        own_blank.encode(["[PAD]"], where="train.ltr:4")


def test_dictionary_of_a_fairseq_vocabulary_is_fairseqs():
    fairseq = Dictionary(["|", "E", "N", "O"])
    assert Dictionary.from_vocab(fairseq.symbols, blank_index=0) == fairseq
    assert Dictionary.from_vocab(fairseq.symbols, blank_index=0).fairseq_layout
    converted = Dictionary.from_vocab(fairseq.symbols, blank_index=1)  # HF's conversion: <pad> is the blank
    assert not converted.fairseq_layout and converted.blank_index == 1 and converted.unk_index == 3
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Dictionary.from_vocab(fairseq.symbols, blank_index=8)


def test_vocabulary_file_round_trips_and_names_bad_lines(tmp_path):
    d = Dictionary.from_vocab(HF_STYLE, blank_index=5)
    loaded = Dictionary.load(d.save(tmp_path / "dict.ltr.txt"))
    assert loaded == d and loaded.symbols == HF_STYLE and (loaded.unk_index, loaded.pad_index) == (4, 5)
    no_unk = Dictionary.from_vocab(["|", "A", "<blank>"], blank_index=2)
    assert Dictionary.load(no_unk.save(tmp_path / "no_unk.txt")).unk_index is None
    with pytest.raises(LabelError, match="has no unknown symbol"):
        no_unk.encode(["Z"], where="x:1", unk=True)
    (tmp_path / "bad.txt").write_text("#xlsr:vocabulary blank=1\n| 0\nA\n")
    with pytest.raises(LabelError, match="bad.txt:3: expected"):
        Dictionary.load(tmp_path / "bad.txt")
    (tmp_path / "bad_blank.txt").write_text("#xlsr:vocabulary blank=7\n| 0\nA 0\n")
    with pytest.raises(LabelError, match="bad_blank.txt: blank index 7 is outside"):
        Dictionary.load(tmp_path / "bad_blank.txt")


# ---------------------------------------------------------------------- any pretraining checkpoint


@pytest.fixture(scope="module")
def pretraining_checkpoints(digits, tmp_path_factory) -> dict[str, Path]:
    """2 updates of ``python -m xlsr.pretrain`` on the digits audio: with FSDP in one process (a sharded checkpoint
    folder) and without (a ``.pt`` training checkpoint)."""
    root = tmp_path_factory.mktemp("pretraining")
    found = {}
    for strategy, name in (("fsdp", "checkpoint_2"), ("ddp", "checkpoint_2.pt")):
        out = root / strategy
        args = ["model=tiny", f"data.manifest={digits}", f"output_dir={out}", "data.num_workers=0",
                "data.max_tokens=96000", "data.min_sample_size=8000", "data.max_sample_size=16000",
                "optim.max_update=2", "optim.warmup_updates=1", "checkpoint.save_interval_updates=2",
                f"distributed.strategy={strategy}", "distributed.backend=gloo", "device=cpu", "threads=1",
                "log_interval=1", "progress_bar=false", "tensorboard=false"]
        result = subprocess.run([sys.executable, "-m", "xlsr.pretrain", *args], cwd=REPO, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        found[strategy] = out / "checkpoints" / name
    assert found["fsdp"].is_dir() and not (found["fsdp"] / "config.json").exists()
    assert found["ddp"].is_file()
    return found


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_finetune_starts_from_a_pretraining_checkpoint(digits, pretraining_checkpoints, strategy, tmp_path):
    """The encoder is the checkpoint's (kept frozen here: equal after training), with a new head."""
    checkpoint = pretraining_checkpoints[strategy]
    out = tmp_path / "run"
    trainer = run(overrides(digits, checkpoint, out, "model.freeze_finetune_updates=100"))
    assert train_updates(out) == [1, 2]
    pretrained = xlsr.Wav2Vec2Model.from_pretrained(checkpoint).state_dict()
    encoder = xlsr.Wav2Vec2ForCTC.from_pretrained(out / "model").wav2vec2.state_dict()
    assert encoder.keys() <= pretrained.keys() and len(encoder) > 10
    assert all(torch.equal(value, pretrained[key]) for key, value in encoder.items())
    assert trainer.model.vocab == trainer.task.dictionary.symbols and trainer.task.dictionary.fairseq_layout
