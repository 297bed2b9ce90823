"""One Unicode form everywhere text enters (xlsr.text): transcripts, label files, dictionaries, vocabularies and
error rates give the same result whether the text was saved in NFC, in NFD or with a byte-order mark."""

import codecs
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import xlsr
from xlsr.checkpoints.ctc import read_fairseq_dictionary
from xlsr.files import read_json
from xlsr.finetune.labels import Dictionary, normalize_transcript, read_labels, words_to_letters
from xlsr.finetune.wer import char_error_rate, error_counts, word_error_rate
from xlsr.manifest import read_manifest, read_transcript_table
from xlsr.text import read_text_lines

REPO = Path(__file__).resolve().parents[1]
BOM = codecs.BOM_UTF8

# Czech, French and Vietnamese: letters that NFD writes as a base letter and one or two combining marks
TRANSCRIPTS = {
    "cs/předmět.wav": "Předmět  řeči je příliš žluťoučký",
    "fr/été.wav": "L'été à Noël, où ça?",
    "vi/tiếng.wav": "Tiếng Việt có dấu",
    "plain.wav": "no accents here",
}


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def encodings(text: str) -> dict[str, bytes]:
    """The same text as a file in NFC, in NFD, NFC after a byte-order mark, and NFD with one and with CRLF lines."""
    return {
        "nfc": text.encode(),
        "nfd": nfd(text).encode(),
        "bom+nfc": BOM + text.encode(),
        "bom+nfd+crlf": BOM + nfd(text).replace("\n", "\r\n").encode(),
    }


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """The TRANSCRIPTS' files (names in NFC on disk) and one more file whose name is NFD on disk."""
    root = tmp_path_factory.mktemp("audio")
    names = list(TRANSCRIPTS) + [nfd("fr/déjà.wav")]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        wav = 0.1 * np.random.default_rng(i).standard_normal(1600 + 100 * i)
        soundfile.write(str(root / name), wav.astype(np.float32), 16000)
    return root


def table_text() -> str:
    rows = dict(TRANSCRIPTS, **{"fr/déjà.wav": "Déjà vu"})  # the table names the NFD file in NFC
    return "".join(f"{path}\t{text}\n" for path, text in rows.items())


def test_manifest_tool_writes_the_same_bytes_for_nfc_nfd_and_bom_tables(audio, tmp_path):
    outputs = {}
    for form, data in encodings(table_text()).items():
        table = tmp_path / f"{form}.tsv"
        table.write_bytes(data)
        dest = tmp_path / form
        cmd = [sys.executable, "-m", "xlsr.manifest", str(audio), "--dest", str(dest), "--valid-percent", "0.4",
               "--transcripts", str(table)]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "no transcript" not in result.stderr and "match no manifest file" not in result.stderr
        outputs[form] = {p.name: p.read_bytes() for p in sorted(dest.iterdir())}
    names = ["dict.ltr.txt", "train.ltr", "train.tsv", "train.wrd", "valid.ltr", "valid.tsv", "valid.wrd"]
    assert sorted(outputs["nfc"]) == names
    for form in outputs:
        assert outputs[form] == outputs["nfc"], form
    # and the common result is the composed one: Ř is one letter, no lone combining mark anywhere
    letters = set((outputs["nfc"]["train.ltr"] + outputs["nfc"]["valid.ltr"]).decode().split())
    assert {"Ř", "Ě", "É", "Ế", "Ệ", "À"} <= letters
    assert outputs["nfc"]["valid.tsv"].count(b"\n") > 1 and outputs["nfc"]["train.tsv"].count(b"\n") > 1
    assert not any(unicodedata.combining(ch) for symbol in letters for ch in symbol)
    # the manifest keeps each file's name as it is on disk (it opens the file)
    rows = [rel for split in ("train", "valid") for rel, _ in read_manifest(tmp_path / "nfc" / f"{split}.tsv")[1]]
    assert sorted(rows) == sorted(list(TRANSCRIPTS) + [nfd("fr/déjà.wav")])


def test_transcript_table_normalize_transcript_and_text_lines(tmp_path):
    tables = {}
    for form, data in encodings(table_text()).items():
        (tmp_path / form).write_bytes(data)
        tables[form] = read_transcript_table(tmp_path / form)
        assert read_text_lines(tmp_path / form) == table_text().splitlines(), form
    assert all(table == tables["nfc"] for table in tables.values())
    assert tables["nfc"]["cs/předmět.wav"] == "PŘEDMĚT ŘEČI JE PŘÍLIŠ ŽLUŤOUČKÝ"
    for text in TRANSCRIPTS.values():
        assert normalize_transcript(nfd(text)) == normalize_transcript(text)
        assert normalize_transcript(nfd(text), keep_case=True) == normalize_transcript(text, keep_case=True)
    assert normalize_transcript("ΐ") == unicodedata.normalize("NFC", "ΐ".upper())  # upper() decomposes it


def write_labelled(folder: Path, form: str, words: list[str], ltr: list[str]) -> Path:
    """train.tsv (as the tool writes it) and train.wrd / train.ltr / dict.ltr.txt in ``form``."""
    folder.mkdir()
    (folder / "train.tsv").write_bytes(encodings("/root\n" + "".join(f"a{i}.wav\t1000\n" for i in range(len(words))))[
        "bom+nfc" if "bom" in form else "nfc"])
    (folder / "train.wrd").write_bytes(encodings("".join(w + "\n" for w in words))[form])
    (folder / "train.ltr").write_bytes(encodings("".join(line + "\n" for line in ltr))[form])
    counts = Dictionary.from_transcripts(ltr)
    dict_text = "".join(f"{s} {c}\n" for s, c in zip(counts.symbols[4:], counts.counts[4:]))
    (folder / "dict.ltr.txt").write_bytes(encodings(dict_text)[form])
    return folder / "train.tsv"


def test_labels_and_dictionary_are_the_same_for_every_form(tmp_path):
    words = [normalize_transcript(text) for text in TRANSCRIPTS.values()]
    ltr = [words_to_letters(text) for text in words]
    results = {}
    for form in encodings(""):
        manifest = write_labelled(tmp_path / form, form, words, ltr)
        assert read_manifest(manifest)[0] == "/root"
        results[form] = (read_labels(manifest, "ltr"), read_labels(manifest, "wrd"),
                         Dictionary.load(tmp_path / form / "dict.ltr.txt").symbols,
                         read_fairseq_dictionary(tmp_path / form / "dict.ltr.txt"))
    for form, result in results.items():
        assert result == results["nfc"], form
    ltr_labels, wrd_labels, symbols, checkpoint_symbols = results["nfc"]
    assert ltr_labels == wrd_labels and symbols == checkpoint_symbols
    assert ltr_labels[0][:8] == ["P", "Ř", "E", "D", "M", "Ě", "T", "|"]
    # a .ltr written from NFD words (code point by code point, as fairseq's libri_labels.py does) and the
    # dictionary counted from those lines: the letters of the NFC text
    split_marks = [" ".join(" ".join(nfd(word)) + " |" for word in line.split()) for line in words]
    assert "R \u030c" in split_marks[0]
    assert Dictionary.from_transcripts(split_marks) == Dictionary.from_transcripts(ltr)
    (tmp_path / "nfc" / "train.ltr").write_text("".join(line + "\n" for line in split_marks), encoding="utf-8")
    assert read_labels(tmp_path / "nfc" / "train.tsv", "ltr") == ltr_labels
    # marks that NFC keeps apart stay apart, in .wrd and .ltr alike (a virama, the caron of J̌)
    for word in ("क्षत्रिय", "J̌ERE"):
        (tmp_path / "nfc" / "train.wrd").write_text((word + "\n") * len(words), encoding="utf-8")
        (tmp_path / "nfc" / "train.ltr").write_text((words_to_letters(word) + "\n") * len(words), encoding="utf-8")
        from_wrd = read_labels(tmp_path / "nfc" / "train.tsv", "wrd")[0]
        assert from_wrd == read_labels(tmp_path / "nfc" / "train.tsv", "ltr")[0]
        assert from_wrd == list(word) + ["|"]


def test_cer_and_wer_of_nfd_reference_against_nfc_hypothesis_are_zero():
    refs = [nfd(text) for text in TRANSCRIPTS.values()]
    hyps = list(TRANSCRIPTS.values())
    assert refs != hyps
    assert char_error_rate(refs, hyps) == 0.0 and word_error_rate(refs, hyps) == 0.0
    assert error_counts(refs, hyps, unit="char") == (0, sum(len(" ".join(h.split())) for h in hyps))
    assert char_error_rate("\ufeffPŘEDMĚT", "PŘEDMĚT") == 0.0


def test_model_vocabulary_and_greedy_output_are_nfc(caplog):
    cfg = lambda n: xlsr.CTCConfig(encoder=xlsr.Wav2Vec2Config.from_preset("tiny"), vocab_size=n)  # noqa: E731
    nfd_vocab = ["<s>", "<pad>", "</s>", "<unk>", "|", nfd("Ř"), "E", "\u030c", "T"]
    model = xlsr.Wav2Vec2ForCTC(cfg(len(nfd_vocab)), nfd_vocab)
    assert model.vocab[5] == "Ř"
    # units Ř, E, caron (a mark the vocabulary holds on its own), T, |: "ŘĚT", composed
    units = [5, 0, 6, 7, 0, 8, 4]
    emissions = torch.nn.functional.one_hot(torch.tensor([units]), len(nfd_vocab)).float()
    assert model.decode(emissions) == ["ŘĚT"]
    # symbols that NFC would merge (';' and the Greek question mark): kept as they are, with a warning
    clash = ["<s>", "|", ";", "\u037e"]
    with caplog.at_level("WARNING"):
        assert xlsr.Wav2Vec2ForCTC(cfg(4), clash).vocab == clash
    assert "one symbol in NFC" in caplog.text


def test_json_and_vocab_files_with_a_byte_order_mark(tmp_path):
    vocab = {"<pad>": 0, "<s>": 1, "|": 2, "É": 3}
    (tmp_path / "vocab.json").write_bytes(BOM + json.dumps(vocab, ensure_ascii=False).encode())
    assert read_json(tmp_path / "vocab.json") == vocab


def test_arpa_with_byte_order_mark_and_nfd_words(tmp_path, caplog):
    pytest.importorskip("kenlm", reason="kenlm not installed")
    from xlsr.lm_decode import LMDecoder, arpa_unigrams

    arpa = "\\data\\\nngram 1=4\n\n\\1-grams:\n-1.0\t<s>\n-1.0\t</s>\n-0.5\tÉTÉ\n-0.5\tŘEČ\n\n\\end\\\n"
    (tmp_path / "bom.arpa").write_bytes(BOM + arpa.encode())
    assert arpa_unigrams(tmp_path / "bom.arpa") == ["ÉTÉ", "ŘEČ"]
    with pytest.raises(ValueError, match="byte-order mark"):  # KenLM itself cannot read it: say so, and how to fix
        LMDecoder(["<s>", "|", "É", "T"], tmp_path / "bom.arpa")
    (tmp_path / "nfd.arpa").write_text(nfd(arpa), encoding="utf-8")
    with caplog.at_level("WARNING"):
        assert arpa_unigrams(tmp_path / "nfd.arpa") == [nfd("ÉTÉ"), nfd("ŘEČ")]
    assert "2 word(s) not in Unicode NFC" in caplog.text
