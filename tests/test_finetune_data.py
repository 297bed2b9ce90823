"""xlsr.finetune: fairseq letter dictionary and label files, CTC batches, WER/CER, manifest --transcripts."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from xlsr.audio import AudioWarning
from xlsr.data.batch import CTCBatch
from xlsr.finetune.data import (
    FinetuneDataConfig,
    LabelledAudioDataset,
    build_finetune_dataloader,
    collate_ctc,
    ctc_feasible,
    ctc_min_frames,
    frames_of,
    set_loader_epoch,
)
from xlsr.finetune.labels import (
    Dictionary,
    LabelError,
    label_path,
    letters_to_words,
    normalize_transcript,
    read_labels,
    words_to_letters,
)
from xlsr.finetune.wer import char_error_rate, error_counts, rate, word_error_rate
from xlsr.manifest import main as manifest_main
from xlsr.manifest import read_manifest, write_manifest_file
from xlsr.modules.feature_encoder import conv_output_length

CTC_MINI = Path(__file__).parent / "fixtures" / "fairseq" / "ctc_mini"
SR = 16000
CONV = [(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2  # wav2vec 2.0's stack: 320 samples per frame


def write_audio(path, num_samples, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = 0.1 * np.random.default_rng(seed).standard_normal(num_samples)
    soundfile.write(str(path), wav.astype(np.float32), SR, subtype="FLOAT" if path.suffix == ".wav" else "PCM_16")


def write_lines(path, lines):
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def labelled_corpus(folder, items, dictionary_lines=None):
    """``items``: [(name, num_samples, text)] -> manifest (file order), .ltr and dict.ltr.txt beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, n, _) in enumerate(items):
        write_audio(folder / name, n, seed=i)
    manifest = str(folder / "train.tsv")
    write_manifest_file(manifest, os.path.realpath(folder), [(name, n) for name, n, _ in items])
    ltr = [words_to_letters(text) for _, _, text in items]
    write_lines(folder / "train.ltr", ltr)
    dictionary = Dictionary.from_transcripts(ltr) if dictionary_lines is None else Dictionary(dictionary_lines)
    dictionary.save(folder / "dict.ltr.txt")
    return manifest, dictionary


# --------------------------------------------------------------------------- dictionary


def test_dictionary_matches_fairseq_fixture_and_round_trips(tmp_path):
    path = CTC_MINI / "dict.ltr.txt"
    d = Dictionary.load(path)
    assert d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (d.blank_index, d.pad_index, d.eos_index, d.unk_index) == (0, 1, 2, 3)
    assert len(d) == 32  # as the fixture README says
    file_symbols = [line.rsplit(" ", 1)[0] for line in path.read_text().splitlines()]
    assert [d.index(sym) for sym in file_symbols] == list(range(4, 32))  # line k -> index k + 4
    assert d.index("|") == 4 and d[4] == "|"
    d.save(tmp_path / "dict.ltr.txt")
    assert (tmp_path / "dict.ltr.txt").read_bytes() == path.read_bytes()
    assert Dictionary.load(tmp_path / "dict.ltr.txt") == d


def test_encoding_matches_fairseq_targets():
    """fairseq's own targets for the ctc_mini texts (made by its LabelEncoder from libri_labels-style .ltr)."""
    d = Dictionary.load(CTC_MINI / "dict.ltr.txt")
    inputs = torch.load(CTC_MINI / "inputs.pt", weights_only=True)
    assert inputs["pad_index"] == d.pad_index and inputs["blank_index"] == d.blank_index
    for row, text in enumerate(inputs["texts"]):
        ids = d.encode(words_to_letters(text).split(), where="x")
        length = int(inputs["target_lengths"][row])
        assert ids == inputs["target"][row, :length].tolist()
        assert letters_to_words(d.string(ids)) == text


def test_from_transcripts_orders_by_count_then_symbol():
    d = Dictionary.from_transcripts(["B A | A |", ["C", "|", "<unk>"], "B |"])
    assert d.symbols[4:] == ["|", "A", "B", "C"]  # | 4, A 2, B 2 (tie: code point order), C 1; specials not counted
    assert d.counts[4:] == [4, 2, 2, 1]


@pytest.mark.parametrize(
    "content, line, pattern",
    [
        ("| 10\nE\n", 2, "expected '<symbol> <count>'"),
        ("| 10\nE x\n", 2, "expected '<symbol> <count>'"),
        ("| 10\nE 3\n| 2\n", 3, "duplicate symbol '\\|'"),
        ("<s> 3\n", 1, "duplicate symbol '<s>'"),
        ("| 10\n\nE 3\n", 2, "expected"),
    ],
)
def test_dictionary_load_errors_name_file_and_line(tmp_path, content, line, pattern):
    path = tmp_path / "dict.ltr.txt"
    path.write_text(content)
    with pytest.raises(LabelError, match=f"{path}:{line}: .*{pattern}"):
        Dictionary.load(path)


def test_encode_unknown_character_names_where_unless_unk(tmp_path):
    d = Dictionary(["|", "A", "B"])
    d.path = "dict.ltr.txt"
    with pytest.raises(LabelError, match=r"train\.ltr:7: character 'Z' is not in the dictionary \(dict\.ltr\.txt\)"):
        d.encode(["A", "Z", "|"], where="train.ltr:7")
    assert d.encode(["A", "Z", "|"], where="train.ltr:7", unk=True) == [5, 3, 4]
    assert d.encode(["<unk>", "B"], where="x") == [3, 6]
    with pytest.raises(LabelError, match="special symbol '<s>'"):
        d.encode(["A", "<s>"], where="x")
    with pytest.raises(KeyError, match="'Z'"):
        d.index("Z")


def test_words_letters_round_trip():
    assert words_to_letters("HELLO WORLD") == "H E L L O | W O R L D |"
    assert words_to_letters("  IT'S   A TEST ") == "I T ' S | A | T E S T |"
    assert words_to_letters("") == ""
    assert letters_to_words("H E L L O | W O R L D |") == "HELLO WORLD"
    assert letters_to_words(words_to_letters("A BC D")) == "A BC D"
    with pytest.raises(ValueError, match="word-boundary"):
        words_to_letters("A|B")
    assert normalize_transcript("  hello \t wörld ") == "HELLO WÖRLD"
    assert normalize_transcript("  hello \t wörld ", keep_case=True) == "hello wörld"


# --------------------------------------------------------------------------- label files


def test_read_labels_ltr_and_wrd(tmp_path):
    manifest = write_lines(tmp_path / "train.tsv", [str(tmp_path), "a.wav\t10", "b.wav\t20"])
    assert label_path(manifest) == str(tmp_path / "train.ltr")
    write_lines(tmp_path / "train.ltr", ["H I |", "A | B C |"])
    write_lines(tmp_path / "train.wrd", ["HI", "A  BC"])
    expected = [["H", "I", "|"], ["A", "|", "B", "C", "|"]]
    assert read_labels(manifest, "ltr") == expected
    assert read_labels(manifest, "wrd", num_rows=2) == expected


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    manifest = write_lines(tmp_path / "train.tsv", [str(tmp_path), "a.wav\t10", "b.wav\t20", "c.wav\t30"])
    write_lines(tmp_path / "train.ltr", ["H I |", "A |"])
    with pytest.raises(ValueError) as err:
        read_labels(manifest)
    message = str(err.value)
    assert str(tmp_path / "train.ltr") in message and manifest in message
    assert "2 line(s)" in message and "3 row(s)" in message


def test_empty_transcript_is_an_error_or_skipped(tmp_path):
    manifest = write_lines(tmp_path / "train.tsv", [str(tmp_path), "a.wav\t10", "b.wav\t20", "c.wav\t30"])
    write_lines(tmp_path / "train.ltr", ["H I |", "   ", "A |"])
    with pytest.raises(LabelError, match=f"{tmp_path / 'train.ltr'}:2: empty transcript"):
        read_labels(manifest)
    with pytest.warns(UserWarning, match="1 empty transcript"):
        assert read_labels(manifest, skip_empty=True) == [["H", "I", "|"], None, ["A", "|"]]


# --------------------------------------------------------------------------- CTC feasibility


def test_ctc_feasible_counts_repeats():
    assert ctc_min_frames([5, 6, 7]) == 3
    assert ctc_min_frames([5, 5, 6, 6, 6]) == 5 + 3  # a blank between each equal pair
    assert ctc_min_frames([]) == 0
    assert ctc_feasible(3, [5, 6, 7]) and not ctc_feasible(2, [5, 6, 7])
    assert ctc_feasible(3, torch.tensor([5, 5])) and not ctc_feasible(2, torch.tensor([5, 5]))
    sizes = np.array([400, 16000, 16320, 50000])
    assert frames_of(CONV)(sizes).tolist() == [conv_output_length(int(n), CONV) for n in sizes] == [1, 49, 50, 156]
    assert frames_of(CONV)(100).tolist() == 0  # shorter than the receptive field: no frame


# --------------------------------------------------------------------------- collate


def test_collate_pads_sources_and_targets():
    samples = [
        {"id": 0, "source": torch.ones(5), "target": torch.tensor([7, 8, 9])},
        None,  # an unreadable file
        {"id": 2, "source": 2 * torch.ones(3), "target": torch.tensor([4])},
    ]
    batch = collate_ctc(samples, pad_index=1)
    assert isinstance(batch, CTCBatch)
    assert {f.name for f in dataclasses.fields(batch)} == {"ids", "source", "padding_mask", "target", "target_lengths"}
    assert batch.ids.tolist() == [0, 2]
    assert batch.source.shape == (2, 5) and batch.source.dtype == torch.float32
    assert batch.source[1].tolist() == [2, 2, 2, 0, 0]
    assert batch.padding_mask.tolist() == [[False] * 5, [False] * 3 + [True] * 2]
    assert batch.target.tolist() == [[7, 8, 9], [4, 1, 1]] and batch.target.dtype == torch.int64
    assert batch.target_lengths.tolist() == [3, 1]
    same = collate_ctc([samples[0], {"id": 3, "source": torch.zeros(5), "target": torch.tensor([1, 2])}], 1)
    assert same.padding_mask is None  # nothing padded
    assert collate_ctc([None], 1) is None and collate_ctc([], 1) is None


# --------------------------------------------------------------------------- dataset and loader


def test_dataset_targets_follow_manifest_rows_across_dropped_files(tmp_path):
    items = [
        ("a.wav", 3200, "ONE"),
        ("short.wav", 100, "DROPPED FOR LENGTH"),
        ("b.wav", 4000, "TWO WORDS"),
        ("gone.wav", 3000, "MISSING FILE"),
        ("c.wav", 5000, "THREE"),
    ]
    manifest, d = labelled_corpus(tmp_path, items)
    os.remove(tmp_path / "gone.wav")
    with pytest.warns(AudioWarning):
        ds = LabelledAudioDataset(manifest, d, min_sample_size=1000)
    assert len(ds) == 3
    for i in range(len(ds)):
        item = ds[i]
        name = os.path.basename(ds.path(i))
        n, text = {nm: (n, t) for nm, n, t in items}[name]
        assert item["id"] == i and item["source"].shape == (n,)  # whole file, not cropped
        assert item["target"].dtype == torch.int64
        assert letters_to_words(d.string(item["target"].tolist())) == text


def test_dataset_targets_follow_rows_after_header_checks(tmp_path):
    items = [("a.wav", 3000, "ONE"), ("bad.wav", 3000, "CORRUPT"), ("b.wav", 3000, "TWO"), ("c.wav", 3000, "THREE")]
    manifest, d = labelled_corpus(tmp_path, items)
    (tmp_path / "bad.wav").write_bytes(b"RIFF but not really" * 30)
    with pytest.warns(AudioWarning, match="bad.wav"):
        ds = LabelledAudioDataset(manifest, d, check_headers=True)  # validate() drops the corrupt file
    texts = {os.path.basename(ds.path(i)): letters_to_words(d.string(ds[i]["target"].tolist())) for i in range(len(ds))}
    assert texts == {"a.wav": "ONE", "b.wav": "TWO", "c.wav": "THREE"}


def test_dataset_unknown_character_names_label_file_and_line(tmp_path):
    manifest, d = labelled_corpus(tmp_path, [("a.wav", 2000, "AB"), ("b.wav", 2000, "AC")], ["|", "A", "B"])
    with pytest.raises(LabelError, match=f"{tmp_path / 'train.ltr'}:2: character 'C'"):
        LabelledAudioDataset(manifest, d)
    ds = LabelledAudioDataset(manifest, d, unk=True)
    targets = {os.path.basename(ds.path(i)): ds[i]["target"].tolist() for i in range(len(ds))}
    assert targets["b.wav"] == [d.index("A"), d.unk_index, d.index("|")]


def test_dataset_drops_too_long_and_counts_infeasible(tmp_path):
    items = [("a.wav", 16000, "OK"), ("long.wav", 40000, "TOO LONG"), ("tight.wav", 1600, "AAAA BBBB CCCC")]
    manifest, d = labelled_corpus(tmp_path, items)
    with pytest.warns(AudioWarning) as record:
        ds = LabelledAudioDataset(manifest, d, max_sample_size=32000, num_frames=frames_of(CONV))
    messages = " ".join(str(w.message) for w in record)
    assert "long.wav (40000 samples)" in messages and "longer than 32000 samples" in messages
    assert "tight.wav (4 frames, needs" in messages and "kept" in messages
    assert len(ds) == 2 and [os.path.basename(p) for p, *_ in ds.infeasible] == ["tight.wav"]
    with pytest.warns(AudioWarning) as record:
        ds = LabelledAudioDataset(manifest, d, max_sample_size=32000, num_frames=frames_of(CONV), drop_infeasible=True)
    assert "tight.wav (4 frames, needs" in " ".join(str(w.message) for w in record if "dropped" in str(w.message))
    assert [os.path.basename(ds.path(i)) for i in range(len(ds))] == ["a.wav"]


def test_dataset_skip_empty_drops_rows(tmp_path):
    manifest, d = labelled_corpus(tmp_path, [("a.wav", 2000, "A"), ("b.wav", 2000, "B"), ("c.wav", 2000, "C")])
    write_lines(tmp_path / "train.ltr", ["A |", "", "C |"])
    with pytest.raises(LabelError, match="train.ltr:2: empty transcript"):
        LabelledAudioDataset(manifest, d)
    with pytest.warns(UserWarning, match="empty transcript"):
        ds = LabelledAudioDataset(manifest, d, skip_empty=True)
    assert sorted(os.path.basename(ds.path(i)) for i in range(len(ds))) == ["a.wav", "c.wav"]
    assert ds.dropped == [(os.path.realpath(tmp_path / "b.wav"), "empty transcript")]


def test_finetune_loader_shards_whole_utterances(tmp_path):
    lengths = [1000 + 137 * i for i in range(11)]
    items = [(f"u{i:02d}.wav", n, "AB " * (i % 3 + 1)) for i, n in enumerate(lengths)]
    manifest, d = labelled_corpus(tmp_path, items)
    cfg = FinetuneDataConfig(manifest=manifest, max_tokens=6000, num_workers=0)
    seen = {}
    for rank in range(2):
        loader = build_finetune_dataloader(cfg, manifest, normalize=False, seed=3, epoch=0, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == loader.batch_sampler.total_batches
        for batch in batches:
            if batch is None:  # the padding batch of a rank short of one
                continue
            assert batch.source.shape[0] * batch.source.shape[1] <= cfg.max_tokens
            for row, i in enumerate(batch.ids.tolist()):
                path = loader.dataset.path(i)
                assert path not in seen
                n = dict((nm, n) for nm, n, _ in items)[os.path.basename(path)]
                valid = n if batch.padding_mask is None else int((~batch.padding_mask[row]).sum())
                assert valid == n  # never cropped
                length = int(batch.target_lengths[row])
                assert (batch.target[row, length:] == d.pad_index).all()
                seen[path] = d.string(batch.target[row, :length].tolist())
    assert len(seen) == len(items)
    for name, _, text in items:
        assert letters_to_words(seen[os.path.realpath(tmp_path / name)]) == " ".join(text.split())
    set_loader_epoch(loader, 1)  # the pretraining helper works on these loaders too
    assert sum(b is not None for b in loader) >= 1


def test_finetune_loader_drops_items_over_max_tokens(tmp_path):
    manifest, _ = labelled_corpus(tmp_path, [("a.wav", 2000, "A"), ("big.wav", 9000, "B")])
    cfg = FinetuneDataConfig(manifest=manifest, max_tokens=5000, num_workers=0)
    with pytest.warns(AudioWarning, match="big.wav"):
        loader = build_finetune_dataloader(cfg, manifest, normalize=False, seed=0, epoch=0)
    assert len(loader.dataset) == 1  # the dictionary came from dict.ltr.txt beside the manifest
    cfg.num_workers = 1  # the dataset pickles to a worker
    with pytest.warns(AudioWarning, match="longer than 5000 samples"):
        loader = build_finetune_dataloader(cfg, manifest, normalize=True, seed=0, epoch=0, num_frames=frames_of(CONV))
    (batch,) = list(loader)
    assert batch.source.shape == (1, 2000) and batch.target.tolist() == [[5, 4]]  # A |: index 5, | 4
    assert abs(float(batch.source.mean())) < 1e-4  # normalised


# --------------------------------------------------------------------------- WER / CER


def test_wer_cer_hand_computed():
    refs = ["the cat sat on the mat", "hello world"]
    hyps = ["the cat sit on mat", "hello there  world"]
    # 1 substitution (sat -> sit) + 1 deletion (the) over 6 words; 1 insertion (there) over 2 words
    assert error_counts(refs, hyps) == (3, 8)
    assert word_error_rate(refs, hyps) == pytest.approx(3 / 8)
    # "abcd" -> "axcd": 1 substitution over 4; "hello world" -> "helo world": 1 deletion over 11 (space counts)
    assert error_counts(["abcd", "hello world"], ["axcd", "helo world"], unit="char") == (2, 15)
    assert char_error_rate(["abcd", "hello world"], ["axcd", "helo world"]) == pytest.approx(2 / 15)
    assert word_error_rate("a b", "a b") == 0.0 and word_error_rate("a", "b c d") == pytest.approx(3.0)
    assert error_counts([""], ["x y"]) == (2, 0)
    assert np.isnan(rate([error_counts([""], [""])]))
    with pytest.raises(ValueError, match="2 reference"):
        word_error_rate(["a", "b"], ["a"])


def test_rates_add_up_over_batches():
    refs = ["a b c d", "e f", "g h i", "j"]
    hyps = ["a x c d", "e", "g h i j k", "q"]
    whole = error_counts(refs, hyps)
    parts = [error_counts(refs[:1], hyps[:1]), error_counts(refs[1:3], hyps[1:3]), error_counts(refs[3:], hyps[3:])]
    assert tuple(map(sum, zip(*parts))) == whole == (1 + 1 + 2 + 1, 10)
    assert rate(parts) == word_error_rate(refs, hyps) == pytest.approx(0.5)
    assert np.mean([e / n for e, n in parts]) != pytest.approx(0.5)  # averaging per-batch rates would be wrong


# --------------------------------------------------------------------------- manifest --transcripts


def test_manifest_transcripts_end_to_end(tmp_path, capsys):
    audio = tmp_path / "audio"
    names = {"spk1/a.wav": 2000, "spk1/b.wav": 3000, "spk2/c.flac": 2500, "d.wav": 1800}
    for i, (rel, n) in enumerate(names.items()):
        write_audio(audio / rel, n, seed=i)
    table = write_lines(
        tmp_path / "table.tsv",
        [
            "spk1/a.wav\t  hello   world ",
            "spk1/b.wav\tit's a test",
            "",
            "spk2/c.flac\tHello",
            "d.wav\tzed",
            "x.wav\tunused",
        ],
    )
    dest = tmp_path / "out"
    assert manifest_main([str(audio), "--dest", str(dest), "--valid-percent", "0", "--transcripts", table]) == 0
    assert "warning: 1 transcript(s) match no manifest file" in capsys.readouterr().err
    root, entries = read_manifest(dest / "train.tsv")
    texts = {"spk1/a.wav": "HELLO WORLD", "spk1/b.wav": "IT'S A TEST", "spk2/c.flac": "HELLO", "d.wav": "ZED"}
    wrd = (dest / "train.wrd").read_text().splitlines()
    ltr = (dest / "train.ltr").read_text().splitlines()
    assert wrd == [texts[rel] for rel, _ in entries]  # manifest row order
    assert ltr == [words_to_letters(texts[rel]) for rel, _ in entries]
    assert (dest / "valid.wrd").read_text() == "" and (dest / "valid.ltr").read_text() == ""
    d = Dictionary.load(dest / "dict.ltr.txt")
    assert d.symbols[4:7] == ["|", "L", "E"]  # | 8, L 5, E 4 ...
    assert d == Dictionary.from_transcripts(ltr)
    ds = LabelledAudioDataset(str(dest / "train.tsv"), d)
    got = {os.path.relpath(ds.path(i), root): letters_to_words(d.string(ds[i]["target"].tolist())) for i in range(4)}
    assert got == texts

    keep = tmp_path / "keep"
    args = [str(audio), "--dest", str(keep), "--valid-percent", "0", "--transcripts", table, "--keep-case"]
    assert manifest_main(args) == 0
    assert "hello world" in (keep / "train.wrd").read_text().splitlines()


def test_manifest_missing_transcripts_listed_or_dropped(tmp_path, capsys):
    audio = tmp_path / "audio"
    for i, rel in enumerate(["a.wav", "b.wav", "sub/c.wav"]):
        write_audio(audio / rel, 2000, seed=i)
    table = write_lines(tmp_path / "table.tsv", ["a.wav\tAAA"])
    dest = tmp_path / "out"
    assert manifest_main([str(audio), "--dest", str(dest), "--valid-percent", "0", "--transcripts", table]) == 2
    err = capsys.readouterr().err
    assert "2 audio file(s) have no transcript" in err
    assert os.path.realpath(audio / "b.wav") in err and os.path.realpath(audio / "sub/c.wav") in err
    assert not dest.exists() or not any(dest.iterdir())  # nothing written
    args = [str(audio), "--dest", str(dest), "--valid-percent", "0", "--transcripts", table]
    args.append("--drop-missing-transcripts")
    assert manifest_main(args) == 0
    assert [rel for rel, _ in read_manifest(dest / "train.tsv")[1]] == ["a.wav"]
    assert (dest / "train.ltr").read_text() == "A A A |\n"


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("a.wav", "expected 'relative_path<TAB>transcript'"),
        ("a.wav\t   ", "empty transcript"),
        ("a.wav\tX|Y", "word-boundary"),
    ],
)
def test_manifest_bad_table_line_named(tmp_path, capsys, line, pattern):
    audio = tmp_path / "audio"
    write_audio(audio / "a.wav", 2000)
    table = write_lines(tmp_path / "table.tsv", ["b.wav\tB", line])
    assert manifest_main([str(audio), "--dest", str(tmp_path / "out"), "--transcripts", table]) == 2
    err = capsys.readouterr().err
    assert f"{table}:2: " in err and pattern in err


def test_manifest_duplicate_table_path(tmp_path, capsys):
    audio = tmp_path / "audio"
    write_audio(audio / "a.wav", 2000)
    table = write_lines(tmp_path / "table.tsv", ["a.wav\tA", "./a.wav\tB"])
    assert manifest_main([str(audio), "--dest", str(tmp_path / "out"), "--transcripts", table]) == 2
    assert f"{table}:2: './a.wav' already has a transcript on line 1" in capsys.readouterr().err
