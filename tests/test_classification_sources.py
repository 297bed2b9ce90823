"""Classification training (``task=classification``) from the other data sources: a Hugging Face dataset with a
label column and a Lhotse CutSet with the label in a custom field train exactly as the manifest + ``train.lang`` of
the same files in the same order (same final parameters, same validation records); Shar shards written by
``--to-shar`` from the manifest and its ``.lang`` train and validate; a missing label column or field, and a label
missing from the classes, are named."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

import xlsr
from test_classification_training import SPEECH, records, run, write_split
from test_hf_dataset import assert_same_parameters, audio_table
from xlsr.data.hf_dataset import HFDatasetError
from xlsr.finetune.classification_data import ClassificationDataConfig, build_classification_loader
from xlsr.finetune.config import compose_config
from xlsr.manifest import read_manifest
from xlsr.vocabulary import LabelError

COMMON = ("task=classification", "data.num_workers=0", "data.max_tokens=50000", "data.max_sample_size=16000",
          "optim.max_update=6", "validate_interval_updates=3", "optim.lr=1e-3", "log_interval=1",
          "progress_bar=false", "tensorboard=false", "threads=1", "device=cpu")


def rows(manifest: Path) -> list[tuple[Path, str, str]]:
    """(file, path relative to the root, label) of every row of a manifest and its .lang file."""
    root, entries = read_manifest(manifest)
    labels = manifest.with_suffix(".lang").read_text().splitlines()
    return [(Path(root) / rel, rel, label) for (rel, _), label in zip(entries, labels, strict=True)]


@pytest.fixture(scope="module")
def lid(tmp_path_factory):
    """Per language 3 training files (en: 2, so that the class order is not alphabetical) and 1 held out, as
    train/valid manifests + .lang; the same rows as a DatasetDict (``lang`` column) and as CutSets (custom field
    ``language``); a tiny random 'pretrained' model."""
    lhotse = pytest.importorskip("lhotse")
    dest = tmp_path_factory.mktemp("lid_sources")
    splits: dict[str, list] = {"train": [], "valid": []}
    for language in sorted(p.name for p in SPEECH.iterdir() if p.is_dir()):
        files = sorted((SPEECH / language).glob("*.flac"))
        splits["train"] += [(f, language) for f in files[1 if language == "en" else 0:3]]
        splits["valid"] += [(f, language) for f in files[3:]]
    manifests = {split: write_split(dest, split, items) for split, items in splits.items()}
    table = {split: rows(manifest) for split, manifest in manifests.items()}
    datasets.DatasetDict({
        name: audio_table([str(f) for f, _, _ in table[split]], lang=[label for _, _, label in table[split]])
        for name, split in (("train", "train"), ("validation", "valid"))
    }).save_to_disk(str(dest / "hf"))
    for split in ("train", "valid"):
        cuts = []
        for path, rel, label in table[split]:
            cut = lhotse.Recording.from_file(path, recording_id=rel).to_cut()
            cut.custom = {"language": label}
            cuts.append(cut)
        lhotse.CutSet.from_cuts(cuts).to_file(dest / f"{split}_cuts.jsonl.gz")
    torch.manual_seed(0)
    xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny")).save_pretrained(dest / "pretrained")
    return dest


def train(lid: Path, out: Path, *data: str):
    return run(compose_config([*COMMON, f"model.init_from={lid / 'pretrained'}", f"output_dir={out}", *data]))


@pytest.fixture(scope="module")
def by_manifest(lid, tmp_path_factory):
    """The reference run: the manifests and their .lang files."""
    out = tmp_path_factory.mktemp("by_manifest") / "run"
    trainer = train(lid, out, f"data.manifest={lid / 'train.tsv'}", f"data.valid_manifest={lid / 'valid.tsv'}")
    assert trainer.task.labels == ["es", "fr", "it", "ru", "en"]  # most frequent first, ties by name
    return trainer, out


def assert_same_run(reference, out: Path, trainer) -> None:
    """The same classes (in order, saved with the same counts), the same final parameters, the same training
    losses and the same validation records (all but their time)."""
    ref_trainer, ref_out = reference
    assert trainer.task.labels == ref_trainer.task.labels
    assert (out / "dict.lang.txt").read_text() == (ref_out / "dict.lang.txt").read_text()
    assert_same_parameters(ref_trainer.model, trainer.model)
    assert [r["loss"] for r in records(out, "train")] == pytest.approx(
        [r["loss"] for r in records(ref_out, "train")], rel=1e-6)
    valid, ref_valid = records(out, "valid"), records(ref_out, "valid")
    assert [r["update"] for r in valid] == [r["update"] for r in ref_valid] == [3, 6]
    for got, expected in zip(valid, ref_valid):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        drop = ("time", "loss")
        assert {k: v for k, v in got.items() if k not in drop} == {k: v for k, v in expected.items() if k not in drop}


def test_a_label_column_trains_exactly_as_the_manifest_and_its_labels(lid, by_manifest, tmp_path):
    trainer = train(lid, tmp_path, f"data.hf_dataset={lid / 'hf'}", "data.hf_valid_split=validation",
                    "data.label_column=lang")
    assert_same_run(by_manifest, tmp_path, trainer)
    assert records(tmp_path, "valid")[-1]["sample_size"] == 5


def test_a_cut_custom_field_trains_exactly_as_the_manifest_and_its_labels(lid, by_manifest, tmp_path):
    trainer = train(lid, tmp_path, f"data.lhotse_cuts={lid / 'train_cuts.jsonl.gz'}",
                    f"data.valid_lhotse_cuts={lid / 'valid_cuts.jsonl.gz'}", "data.label_column=language")
    assert_same_run(by_manifest, tmp_path, trainer)


def test_shar_shards_written_from_the_manifest_train_the_classifier(lid, by_manifest, tmp_path):
    """``--to-shar`` writes ``train.lang`` as the cuts' ``lang`` field, the default label field (``data.labels``):
    the stream trains (its batches differ from the manifest's), validates on Shar, and saves a model with the
    manifest's classes."""
    from xlsr.manifest import write_shar

    for split in ("train", "valid"):
        write_shar(lid / f"{split}.tsv", tmp_path / f"{split}_shar", shard_size=4, progress=False)
    out = tmp_path / "run"
    trainer = train(lid, out, f"data.lhotse_shar={tmp_path / 'train_shar'}",
                    f"data.valid_lhotse_shar={tmp_path / 'valid_shar'}", "data.lhotse_shuffle_buffer=4")
    assert trainer.task.labels == by_manifest[0].task.labels
    last = records(out, "valid")[-1]
    assert last["update"] == 6 and last["sample_size"] == 5 and 0.0 <= last["accuracy"] <= 1.0
    assert sum(map(sum, last["confusion_matrix"]["counts"])) == 5
    assert [r["update"] for r in records(out, "train")] == [1, 2, 3, 4, 5, 6]
    model = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(out / "model")
    assert model.labels == trainer.task.labels


# ---------------------------------------------------------------------- errors


def data_config(**settings) -> ClassificationDataConfig:
    return ClassificationDataConfig(num_workers=0, max_tokens=50000, **settings)


def loader(cfg: ClassificationDataConfig, name: str, labels=("es", "fr", "it", "ru", "en")):
    return build_classification_loader(cfg, name, list(labels), normalize=False, seed=1, epoch=1,
                                       dictionary_file="dict.lang.txt")


def test_a_missing_label_column_or_field_is_named(lid, tmp_path):
    with pytest.raises(HFDatasetError, match=r"no column 'language' \(data.label_column\); its columns: "
                                             r"\['audio', 'lang'\]"):
        train(lid, tmp_path / "a", f"data.hf_dataset={lid / 'hf'}", "data.label_column=language")
    with pytest.raises(HFDatasetError, match=r"train: no column 'langue' \(data.label_column, unset: data.labels\)"):
        train(lid, tmp_path / "b", f"data.hf_dataset={lid / 'hf'}", "data.labels=langue")
    first_cut = read_manifest(lid / "train.tsv")[1][0][0]
    with pytest.raises(LabelError, match=f"cut {first_cut}: no custom field 'lang' "
                                         r"\(data.label_column, unset: data.labels\)"):
        train(lid, tmp_path / "c", f"data.lhotse_cuts={lid / 'train_cuts.jsonl.gz'}")


def test_a_label_missing_from_the_classes_is_named_with_its_row_or_cut(lid):
    hf = str(lid / "hf")
    cfg = data_config(hf_dataset=hf, hf_split="validation", label_column="lang")
    assert len(loader(cfg, "hf-split:validation")) > 0  # every class known
    row = [label for _, _, label in rows(lid / "valid.tsv")].index("en")
    with pytest.raises(LabelError, match=rf"{hf}:validation\[{row}\]: label 'en' is not in dict.lang.txt "
                                         r"\(4 classes: es, fr, it, ru\)"):
        loader(cfg, "hf-split:validation", labels=("es", "fr", "it", "ru"))
    cuts = lid / "valid_cuts.jsonl.gz"
    cut = rows(lid / "valid.tsv")[row][1]
    with pytest.raises(LabelError, match=f"cut {cut}: label 'en' is not in dict.lang.txt"):
        loader(data_config(lhotse_cuts=str(cuts), label_column="language"), f"lhotse-cuts:{cuts}",
               labels=("es", "fr", "it", "ru"))


def test_an_empty_label_is_named_with_its_row(lid, tmp_path):
    table = datasets.load_from_disk(str(lid / "hf"))["validation"]
    labels = list(table["lang"])
    labels[2] = "  "
    table.remove_columns("lang").add_column("lang", labels).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(LabelError, match=rf"{tmp_path / 'hf'}:train\[2\]: empty label"):
        train(lid, tmp_path / "run", f"data.hf_dataset={tmp_path / 'hf'}", "data.hf_split=null")
