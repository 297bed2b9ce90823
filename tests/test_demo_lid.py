"""The demo's language-ID step without apt or the network: the split and labels it builds from the corpus manifests
(the step itself trains with the engine, tested in tests/test_classification_training.py)."""

from __future__ import annotations

import pytest

from xlsr.demo.lid import build_lid_data
from xlsr.manifest import read_manifest, write_manifest_file


def test_lid_data_holds_out_the_corpus_valid_files_labelled_by_folder(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    train = [("en/a.flac", 100), ("en/b.flac", 200), ("fr/c.flac", 300), ("tts_sw/d.flac", 400), ("ru/e.flac", 500)]
    valid = [("en/f.flac", 600), ("fr/g.flac", 700), ("tts_sw/h.flac", 800), ("ru/i.flac", 900)]
    write_manifest_file(corpus / "train.tsv", "/audio", train)
    write_manifest_file(corpus / "valid.tsv", "/audio", valid)
    counts = build_lid_data(corpus, tmp_path / "lid")
    assert counts == {"en": (2, 1), "fr": (1, 1), "ru": (1, 1)}  # synthetic speech left out
    for split, rows in (("train", train), ("valid", valid)):
        root, entries = read_manifest(tmp_path / "lid" / f"{split}.tsv")
        real = [(rel, size) for rel, size in rows if not rel.startswith("tts_")]
        assert root == "/audio" and entries == real
        labels = (tmp_path / "lid" / f"{split}.lang").read_text().splitlines()
        assert labels == [rel.split("/")[0] for rel, _ in real]
    held_out = {rel for rel, _ in read_manifest(tmp_path / "lid" / "valid.tsv")[1]}
    assert not held_out & {rel for rel, _ in read_manifest(tmp_path / "lid" / "train.tsv")[1]}


def test_lid_data_needs_held_out_files_of_every_language(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_manifest_file(corpus / "train.tsv", "/audio", [("en/a.flac", 100), ("it/b.flac", 100)])
    write_manifest_file(corpus / "valid.tsv", "/audio", [("en/c.flac", 100)])
    with pytest.raises(ValueError, match=r"missing for \['it'\]"):
        build_lid_data(corpus, tmp_path / "lid")
