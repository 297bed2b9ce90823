"""Hugging Face ``datasets`` as a data source (xlsr/data/hf_dataset.py): datasets written by ``datasets`` itself
(audio bytes embedded, ``save_to_disk`` and parquet) train exactly as a manifest of the same files in the same order
(pretraining and CTC: the same final parameters), other rates are resampled as the manifest path does, and bad rows
and missing columns are named."""

from __future__ import annotations

import io
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch

from xlsr.audio import AudioWarning
from xlsr.data.audio_dataset import AudioDataset, BadFilesError
from xlsr.data.hf_dataset import HFAudioDataset, HFDatasetError
from xlsr.manifest import read_manifest, read_transcript_table, write_manifest
from xlsr.vocabulary import LabelError

FIXTURES = Path(__file__).parent / "fixtures"
SPEECH, DIGITS = FIXTURES / "speech", FIXTURES / "digits"


def manifest_files(manifest: Path) -> list[str]:
    """The files of a manifest, in its row order."""
    root, entries = read_manifest(manifest)
    return [os.path.join(root, rel) for rel, _ in entries]


def audio_table(paths: list[str], blobs: dict[int, bytes] | None = None, **columns) -> datasets.Dataset:
    """A Dataset whose ``audio`` column (``datasets.Audio``) embeds the bytes of ``paths`` (row i's replaced by
    ``blobs[i]``), written by ``datasets`` (a struct column cast to ``Audio``: encoding through ``Audio`` itself
    would need torchcodec); ``columns``: more columns (strings, or ints)."""
    blobs = blobs or {}
    audio = [{"bytes": blobs.get(i, Path(p).read_bytes()), "path": os.path.basename(p)} for i, p in enumerate(paths)]
    features = datasets.Features({"audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                                  **{k: datasets.Value("string" if isinstance(v[0], str) else "int64")
                                     for k, v in columns.items()}})
    table = datasets.Dataset.from_dict({"audio": audio, **columns}, features=features)
    return table.cast_column("audio", datasets.Audio())


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """The manifest of tests/fixtures/speech and a DatasetDict (train, validation) of the same files in its order."""
    dest = tmp_path_factory.mktemp("speech_hf")
    write_manifest(SPEECH, dest / "manifest", valid_percent=0.0, progress=False)
    manifest = dest / "manifest" / "train.tsv"
    table = audio_table(manifest_files(manifest))
    datasets.DatasetDict({"train": table, "validation": table}).save_to_disk(str(dest / "hf"))
    return manifest, dest / "hf"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits' manifest + .ltr (from transcripts.tsv) and a dataset of the same files with the raw transcripts
    in lower case as its ``sentence`` column; a tiny random 'pretrained' model."""
    import xlsr

    dest = tmp_path_factory.mktemp("digits_hf")
    table_path = DIGITS / "transcripts.tsv"
    write_manifest(DIGITS, dest / "manifest", valid_percent=0.0, progress=False,
                   transcripts=read_transcript_table(table_path))
    manifest = dest / "manifest" / "train.tsv"
    raw = dict(line.split("\t", 1) for line in table_path.read_text(encoding="utf-8").splitlines() if line.strip())
    files = manifest_files(manifest)
    sentences = [raw[os.path.basename(p)].lower() for p in files]
    datasets.DatasetDict({"train": audio_table(files, sentence=sentences)}).save_to_disk(str(dest / "hf"))
    torch.manual_seed(0)
    xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny")).save_pretrained(dest / "pretrained")
    return manifest, dest / "hf", dest / "pretrained"


def same_items(a, b) -> None:
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.sizes, b.sizes)
    for i in range(len(a)):
        torch.testing.assert_close(a[i]["source"], b[i]["source"], rtol=0, atol=0)


def test_rows_load_as_the_manifest_files(speech):
    """Sizes (from the headers), items and crops equal the manifest's; keys name dataset, split and row."""
    manifest, hf = speech
    options = dict(max_sample_size=20000, min_sample_size=16000, normalize=True, seed=3)
    by_manifest = AudioDataset(str(manifest), **options)
    by_rows = HFAudioDataset(str(hf), split="train", **options)
    same_items(by_manifest, by_rows)
    assert by_rows.key(0) == f"{hf}:train[{int(by_rows.manifest_row_of([0])[0])}]"


def test_parquet_file_gives_the_same_rows(speech, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    manifest, hf = speech
    parquet = tmp_path / "train.parquet"
    datasets.load_from_disk(str(hf))["train"].to_parquet(str(parquet))
    same_items(AudioDataset(str(manifest), max_sample_size=20000, seed=1),
               HFAudioDataset(str(parquet), max_sample_size=20000, seed=1))


def run(cfg, trainer_module: str):
    if trainer_module == "pretrain":
        from xlsr.pretrain.trainer import Trainer
    else:
        from xlsr.finetune.trainer import FineTuner as Trainer
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def records(out: Path, split: str) -> list[dict]:
    import json

    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)
    assert worst <= 1e-6, worst


@pytest.mark.slow
def test_pretraining_from_the_dataset_equals_the_manifest(speech, tmp_path):
    """Same batches, crops and updates: final parameters and every logged loss (train and validation) agree."""
    from xlsr.pretrain.config import compose_config

    manifest, hf = speech
    common = ["model=tiny", "data.num_workers=0", "data.max_tokens=80000", "data.max_sample_size=20000",
              "data.min_sample_size=16000", "optim.max_update=3", "optim.warmup_updates=2", "log_interval=1",
              "progress_bar=false", "tensorboard=false", "device=cpu", "validate_interval_updates=3",
              "max_valid_batches=2"]
    a = run(compose_config([*common, f"output_dir={tmp_path / 'a'}", f"data.manifest={manifest}",
                            f"data.valid_manifest={manifest}"]), "pretrain")
    b = run(compose_config([*common, f"output_dir={tmp_path / 'b'}", f"data.hf_dataset={hf}",
                            "data.hf_valid_split=validation"]), "pretrain")
    assert_same_parameters(a.model, b.model)
    for split in ("train", "valid"):
        la, lb = records(tmp_path / "a", split), records(tmp_path / "b", split)
        assert la and [r["update"] for r in la] == [r["update"] for r in lb]
        assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-6)


@pytest.mark.slow
def test_ctc_finetuning_from_a_text_column_equals_the_manifest_and_labels(digits, tmp_path):
    """The text column (lower case) becomes the same letters and dictionary as the manifest tool's .ltr and
    dict.ltr.txt; training gives the same parameters."""
    from xlsr.finetune.config import compose_config

    manifest, hf, pretrained = digits
    common = [f"model.init_from={pretrained}", "data.num_workers=0", "data.max_tokens=200000", "log_interval=1",
              "progress_bar=false", "tensorboard=false", "model.freeze_finetune_updates=0", "model.mask_prob=0.05",
              "model.mask_channel_prob=0.0", "model.encoder_layerdrop=0.0", "optim.lr=5e-3", "optim.max_update=2",
              "device=cpu"]
    a = run(compose_config([*common, f"output_dir={tmp_path / 'a'}", f"data.manifest={manifest}"]), "finetune")
    b = run(compose_config([*common, f"output_dir={tmp_path / 'b'}", f"data.hf_dataset={hf}"]), "finetune")
    assert a.task.dictionary == b.task.dictionary
    assert_same_parameters(a.model, b.model)
    assert [r["loss"] for r in records(tmp_path / "a", "train")] == pytest.approx(
        [r["loss"] for r in records(tmp_path / "b", "train")], rel=1e-6)


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_rates_are_resampled_as_the_manifest_path_does(tmp_path, rate):
    wav, sr = sf.read(sorted(SPEECH.rglob("*.flac"))[0], dtype="float32")
    t = np.arange(int(len(wav) * rate / sr))
    other = np.interp(t * sr / rate, np.arange(len(wav)), wav).astype(np.float32)
    folder = tmp_path / "audio"
    folder.mkdir()
    sf.write(folder / "other.flac", other, rate)
    sf.write(folder / "native.flac", wav, sr)
    write_manifest(folder, tmp_path / "manifest", valid_percent=0.0, progress=False)
    manifest = tmp_path / "manifest" / "train.tsv"
    audio_table(manifest_files(manifest)).save_to_disk(str(tmp_path / "hf"))
    by_manifest = AudioDataset(str(manifest), resample=True, check_headers=True)
    by_rows = HFAudioDataset(str(tmp_path / "hf"), resample=True)
    same_items(by_manifest, by_rows)
    assert rate in {sf.info(p).samplerate for p in manifest_files(manifest)}
    with pytest.raises(BadFilesError, match=rf"hf:train\[\d\]: sample rate is {rate} Hz"):
        HFAudioDataset(str(tmp_path / "hf"), skip_bad=False)


def test_bad_row_is_named_with_its_index(speech, tmp_path):
    manifest, _ = speech
    files = manifest_files(manifest)[:4]
    audio_table(files, blobs={2: b"RIFF not audio at all"}).save_to_disk(str(tmp_path / "bad"))
    name = f"{tmp_path / 'bad'}:train[2]"
    with pytest.raises(BadFilesError) as err:
        HFAudioDataset(str(tmp_path / "bad"), skip_bad=False)
    assert f"{name}: cannot read header" in str(err.value) and len(err.value.bad_files) == 1
    with pytest.warns(AudioWarning, match=rf"\[2\]: cannot read header"):
        kept = HFAudioDataset(str(tmp_path / "bad"))
    assert len(kept) == 3 and [n for n, _ in kept.dropped] == [name]


def test_bad_bytes_found_while_training_are_named(speech, tmp_path):
    """With a length column (no header read at start), a row that does not decode is skipped when loaded, named."""
    manifest, _ = speech
    files = manifest_files(manifest)[:3]
    lengths = [sf.info(path).frames for path in files]
    audio_table(files, blobs={1: b"garbage"}, length=lengths).save_to_disk(str(tmp_path / "bad"))
    dataset = HFAudioDataset(str(tmp_path / "bad"), length_column="length")
    with pytest.warns(AudioWarning, match=r"bad:train\[1\]: cannot decode"):
        assert dataset[1] is None
    assert dataset.num_skipped == 1


def test_missing_columns_are_named_with_those_that_exist(speech, digits):
    _, hf = speech
    with pytest.raises(HFDatasetError, match=r"no column 'speech' \(data.audio_column\); its columns: \['audio'\]"):
        HFAudioDataset(str(hf), split="train", audio_column="speech")
    with pytest.raises(HFDatasetError, match=r"no split 'test'; its splits: \['train', 'validation'\]"):
        HFAudioDataset(str(hf), split="test")
    from xlsr.finetune.config import FinetuneDataConfig
    from xlsr.finetune.data import hf_split_transcripts

    cfg = FinetuneDataConfig(hf_dataset=str(digits[1]), text_column="text")
    with pytest.raises(HFDatasetError, match=r"no column 'text' \(data.text_column\); its columns: \['audio', "
                                             r"'sentence'\]"):
        hf_split_transcripts(cfg, "train")


def test_empty_transcript_is_named(digits, tmp_path):
    from xlsr.finetune.config import FinetuneDataConfig
    from xlsr.finetune.data import hf_split_transcripts

    table = datasets.load_from_disk(str(digits[1]))["train"]
    sentences = list(table["sentence"])
    sentences[4] = "  "
    table.remove_columns("sentence").add_column("sentence", sentences).save_to_disk(str(tmp_path / "hf"))
    cfg = FinetuneDataConfig(hf_dataset=str(tmp_path / "hf"))
    with pytest.raises(LabelError, match=r"hf:train\[4\]: empty transcript"):
        hf_split_transcripts(cfg, None)


def test_audio_given_as_paths_loads_as_the_manifest(speech, tmp_path):
    """A string column of paths (relative ones from the dataset's folder) instead of embedded bytes."""
    import shutil

    manifest, _ = speech
    (tmp_path / "hf" / "audio").mkdir(parents=True)
    relative = []
    for i, path in enumerate(manifest_files(manifest)):
        relative.append(f"audio/{i}.flac")
        shutil.copy(path, tmp_path / "hf" / relative[-1])
    datasets.Dataset.from_dict({"file": relative}).save_to_disk(str(tmp_path / "hf"))
    same_items(AudioDataset(str(manifest), max_sample_size=20000, seed=2),
               HFAudioDataset(str(tmp_path / "hf"), audio_column="file", max_sample_size=20000, seed=2))
