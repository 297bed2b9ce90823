"""xlsr.manifest: fairseq manifest writing/reading, header-only sizes, bad files, CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile

import xlsr.manifest
from xlsr.manifest import ManifestError, find_audio_files, main, read_manifest, write_manifest


def write_audio(path, num_samples, sample_rate=16000, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (num_samples,) if channels == 1 else (num_samples, channels)
    soundfile.write(str(path), np.zeros(shape, dtype=np.float32), sample_rate)


@pytest.fixture
def corpus(tmp_path):
    """A folder with good audio in nested folders, a corrupt file and a non-audio file."""
    root = tmp_path / "corpus"
    sizes = {"a/one.wav": 1000, "a/b/two.flac": 2000, "three.WAV": 3000, "c/four.ogg": 4000}
    for rel, n in sizes.items():
        write_audio(root / rel, n)
    (root / "c" / "broken.flac").write_bytes(b"\x00garbage" * 40)
    (root / "notes.txt").write_text("not audio")
    return root, sizes


def test_round_trip_with_header_sizes(corpus, tmp_path):
    root, sizes = corpus
    summary = write_manifest(root, tmp_path / "out", valid_percent=0.0, progress=False)
    manifest_root, entries = read_manifest(tmp_path / "out" / "train.tsv")
    assert manifest_root == os.path.realpath(root)
    assert dict(entries) == sizes
    assert summary.num_train == 4 and summary.num_valid == 0
    assert summary.train_samples == sum(sizes.values())
    # fairseq layout: root line, then relpath<TAB>frames
    lines = (tmp_path / "out" / "train.tsv").read_text().splitlines()
    assert lines[0] == os.path.realpath(root) and all(len(line.split("\t")) == 2 for line in lines[1:])


def test_only_headers_are_read(corpus, tmp_path, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("write_manifest must not decode audio")

    monkeypatch.setattr(soundfile, "read", no_decoding)
    root, sizes = corpus
    write_manifest(root, tmp_path / "out", valid_percent=0.0, progress=False, num_workers=1)
    assert dict(read_manifest(tmp_path / "out" / "train.tsv")[1]) == sizes


def test_unreadable_files_reported_and_left_out(corpus, tmp_path):
    root, sizes = corpus
    write_audio(root / "empty.wav", 0)
    summary = write_manifest(root, tmp_path / "out", valid_percent=0.0, progress=False)
    reasons = dict(summary.bad_files)
    broken = os.path.join(os.path.realpath(root), "c", "broken.flac")
    empty = os.path.join(os.path.realpath(root), "empty.wav")
    assert set(reasons) == {broken, empty}
    assert "cannot read header" in reasons[broken] and "empty" in reasons[empty]
    assert dict(read_manifest(tmp_path / "out" / "train.tsv")[1]) == sizes  # no good file lost


def test_valid_percent_zero_writes_root_only_valid(corpus, tmp_path):
    root, _ = corpus
    write_manifest(root, tmp_path / "out", valid_percent=0.0, progress=False)
    assert (tmp_path / "out" / "valid.tsv").read_text() == os.path.realpath(root) + "\n"


def test_split_is_seeded_and_complete(tmp_path):
    root = tmp_path / "many"
    for i in range(40):
        write_audio(root / f"f{i:02d}.wav", 100 + i)
    splits = []
    for run in range(2):
        dest = tmp_path / f"out{run}"
        write_manifest(root, dest, valid_percent=0.3, seed=7, progress=False, num_workers=1 + 3 * run)
        train = read_manifest(dest / "train.tsv")[1]
        valid = read_manifest(dest / "valid.tsv")[1]
        splits.append((train, valid))
    assert splits[0] == splits[1]  # same seed, any thread count => same split
    train, valid = splits[0]
    assert 0 < len(valid) < 40 and len(train) + len(valid) == 40
    assert not set(train) & set(valid)
    with pytest.raises(ValueError, match="fraction"):
        write_manifest(root, tmp_path / "bad", valid_percent=1.5, progress=False)


def test_extensions_case_insensitive_and_filtered(corpus):
    root, _ = corpus
    found = find_audio_files(str(root), ["wav"])
    assert sorted(os.path.basename(p) for p in found) == ["one.wav", "three.WAV"]
    assert len(find_audio_files(str(root), ["flac"], path_must_contain="/a/")) == 1


@pytest.mark.parametrize(
    "content, line_number, pattern",
    [
        ("", 1, "root folder"),
        ("/root\nok.wav\t10\nno_tab_here\n", 3, "found 1 tab-separated"),
        ("/root\na.wav\t10\textra\n", 2, "found 3 tab-separated"),
        ("/root\na.wav\tten\n", 2, "non-negative integer"),
        ("/root\na.wav\t-5\n", 2, "non-negative integer"),
        ("a.wav\t10\n", 1, "root folder"),
    ],
)
def test_malformed_manifest_names_file_and_line(tmp_path, content, line_number, pattern):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(ManifestError, match=pattern) as info:
        read_manifest(path)
    assert f"{path}:{line_number}:" in str(info.value)


def test_blank_trailing_lines_are_fine(tmp_path):
    path = tmp_path / "ok.tsv"
    path.write_text("/root\na b.wav\t10\n\n")
    assert read_manifest(path) == ("/root", [("a b.wav", 10)])


def test_cli_main_reports_bad_files(corpus, tmp_path, capsys):
    root, _ = corpus
    dest = tmp_path / "cli"
    code = main([str(root), "--dest", str(dest), "--valid-percent", "0.25", "--ext", "flac,wav,ogg", "--seed", "3"])
    captured = capsys.readouterr()
    assert code == 0
    assert "broken.flac" in captured.err and "left out 1 unreadable" in captured.out
    train = read_manifest(dest / "train.tsv")[1]
    valid = read_manifest(dest / "valid.tsv")[1]
    assert len(train) + len(valid) == 4
    assert main([str(tmp_path / "does-not-exist"), "--dest", str(dest)]) == 2


def test_runs_as_module(corpus, tmp_path):
    root, _ = corpus
    dest = tmp_path / "module"
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(xlsr.manifest.__file__)))
    result = subprocess.run(
        [sys.executable, "-m", "xlsr.manifest", str(root), "--dest", str(dest), "--valid-percent", "0"],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(read_manifest(dest / "train.tsv")[1]) == 4
