"""n-gram LM beam search (xlsr.lm_decode, ``python -m xlsr.transcribe --lm``) on hand-built CTC log-probs with a
tiny ARPA model written here, and on a real fixture model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jiwer
import pytest
import torch

LM_MISSING = 'LM decoding needs pyctcdecode and kenlm: pip install "xlsr[lm]"; this module is skipped'
pytest.importorskip("pyctcdecode", reason=LM_MISSING)
pytest.importorskip("kenlm", reason=LM_MISSING)

from test_transcribe import digits_test_set, letter_model, one_by_one, printed_rates, waveform  # noqa: E402,F401
from xlsr.ctc import ctc_greedy_units, letters_to_text  # noqa: E402
from xlsr.lm_decode import LMDecoder, arpa_unigrams, decoder_labels  # noqa: E402

DIGITS = Path(__file__).parent / "fixtures" / "digits"
REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
LETTERS = list("ACEHRST")
FAIRSEQ_VOCAB = SPECIALS + ["|"] + LETTERS  # fairseq dict.ltr.txt order: blank = <s> = 0
HF_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|"] + [c.lower() for c in LETTERS]  # HF: blank = <pad>


def write_arpa(path: Path, sentences: list[str]) -> Path:
    """A word bigram ARPA file of ``sentences``: relative-frequency unigrams (<unk> counted as 0.5), bigrams
    at half their relative frequency, every unigram backing off with log10 0.5."""
    unigrams: Counter[str] = Counter()
    bigrams: Counter[tuple[str, str]] = Counter()
    for sentence in sentences:
        words = ["<s>", *sentence.split(), "</s>"]
        unigrams.update(words[1:])
        bigrams.update(zip(words[:-1], words[1:]))
    contexts = Counter(first for first, _ in bigrams.elements())
    total = sum(unigrams.values()) + 0.5
    backoff = math.log10(0.5)
    uni_lines = [f"-99\t<s>\t{backoff:.6f}", f"{math.log10(0.5 / total):.6f}\t<unk>\t{backoff:.6f}"]
    uni_lines += [f"{math.log10(c / total):.6f}\t{w}\t{backoff:.6f}" for w, c in sorted(unigrams.items())]
    bi_lines = [f"{math.log10(0.5 * c / contexts[a]):.6f}\t{a} {b}" for (a, b), c in sorted(bigrams.items())]
    text = ["\\data\\", f"ngram 1={len(uni_lines)}", f"ngram 2={len(bi_lines)}", "", "\\1-grams:", *uni_lines, "",
            "\\2-grams:", *bi_lines, "", "\\end\\", ""]
    path.write_text("\n".join(text))
    return path


def emissions(vocab: list[str], frames: list[dict[str, float]]) -> torch.Tensor:
    """(1, T, V) log-probs: frame t gives each named symbol its probability ("" = the blank, vocab[0] or
    <pad>) and spreads the rest evenly over the other symbols."""
    blank = vocab[0]
    rows = []
    for frame in frames:
        named = {blank if s == "" else s: p for s, p in frame.items()}
        rest = (1.0 - sum(named.values())) / (len(vocab) - len(named))
        rows.append([named.get(s, rest) for s in vocab])
    return torch.tensor(rows).log().unsqueeze(0)


def greedy(log_probs: torch.Tensor, vocab: list[str], lengths: torch.Tensor | None = None) -> list[str]:
    return [letters_to_text([vocab[i] for i in units]) for units in ctc_greedy_units(log_probs, lengths, 0)]


def spell(word: str, last: dict[str, float] | None = None, case=str.upper) -> list[dict[str, float]]:
    """Frames of ``word``: each letter (p 0.9) then a blank; ``last`` replaces the last letter's frame."""
    frames: list[dict[str, float]] = []
    for index, letter in enumerate(word):
        frame = {case(letter): 0.9}
        if last is not None and index == len(word) - 1:
            frame = {case(k): v for k, v in last.items()}
        frames += [frame, {"": 0.9}]
    return frames


def test_labels_map_blank_boundary_and_specials():
    labels, specials = decoder_labels(FAIRSEQ_VOCAB, 0)
    assert labels[0] == "" and labels[4] == " " and labels[5:] == LETTERS
    assert specials == [1, 2, 3] and len(set(labels)) == len(labels)
    labels, specials = decoder_labels(HF_VOCAB, 0)
    assert labels[0] == "" and labels[4] == " " and specials == [1, 2, 3]


@pytest.mark.parametrize("vocab", [FAIRSEQ_VOCAB, HF_VOCAB], ids=["fairseq", "hf"])
def test_lm_fixes_a_misspelling_greedy_makes(tmp_path, vocab):
    case = str.upper if vocab is FAIRSEQ_VOCAB else str.lower
    # "THE CAT": the last letter is R (0.5) or T (0.45); the LM knows both words, but "THE CAR" only by backoff
    frames = spell("THE", case=case) + [{"|": 0.9}] + spell("CAT", last={"R": 0.5, "T": 0.45}, case=case)
    log_probs = emissions(vocab, frames)
    assert greedy(log_probs, vocab) == [case("THE CAR")]
    lm = write_arpa(tmp_path / "lm.arpa", [case(s) for s in ["THE CAT SAT", "THE CAT", "A CAR", "THE HAT"]])
    assert LMDecoder(vocab, lm, alpha=0.0, beta=0.0, beam_width=20).decode(log_probs) == [case("THE CAR")]
    assert LMDecoder(vocab, lm, alpha=0.5, beta=1.0, beam_width=20).decode(log_probs) == [case("THE CAT")]


def test_without_an_lm_preference_it_is_greedy(tmp_path):
    # both CAT and CAR are equally likely to the LM; R clearly wins acoustically; specials get some mass but are
    # never the argmax (their probability counts as the blank's, which greedy drops too). The spread-out rest
    # keeps "THE CAR " (trailing boundary) beams alive: stock pyctcdecode 0.5 then decoded "CAR" (see lm_decode)
    frames = spell("THE") + [{"|": 0.6, "</s>": 0.2}] + spell("CAT", last={"R": 0.6, "T": 0.3})
    frames[1] = {"": 0.5, "<pad>": 0.2, "<unk>": 0.2}
    log_probs = emissions(FAIRSEQ_VOCAB, frames)
    lm = write_arpa(tmp_path / "lm.arpa", ["THE CAT", "THE CAR"])
    decoder = LMDecoder(FAIRSEQ_VOCAB, lm, beam_width=20)
    assert greedy(log_probs, FAIRSEQ_VOCAB) == ["THE CAR"]
    assert decoder.decode(log_probs) == ["THE CAR"]


def test_only_valid_frames_are_decoded(tmp_path):
    short = emissions(FAIRSEQ_VOCAB, spell("HAT"))
    long = emissions(FAIRSEQ_VOCAB, spell("THE") + [{"|": 0.9}] + spell("RAT"))
    padded = torch.cat([short, emissions(FAIRSEQ_VOCAB, [{"S": 0.9}] * (long.shape[1] - short.shape[1]))], dim=1)
    batch = torch.cat([long, padded])  # row 1: HAT, then loud S frames past its length
    lengths = torch.tensor([long.shape[1], short.shape[1]])
    lm = write_arpa(tmp_path / "lm.arpa", ["THE RAT", "HAT", "THE HATS"])
    decoder = LMDecoder(FAIRSEQ_VOCAB, lm, beam_width=20)
    assert decoder.decode(batch, lengths) == greedy(batch, FAIRSEQ_VOCAB, lengths) == ["THE RAT", "HAT"]
    assert decoder.decode(padded) == ["HATS"]  # (all frames: the S frames count)


def test_arpa_unigrams_and_missing_file(tmp_path):
    lm = write_arpa(tmp_path / "words.txt", ["THE CAT", "A HAT"])  # ARPA is found by content, not the name
    assert sorted(arpa_unigrams(lm)) == ["A", "CAT", "HAT", "THE"]
    (tmp_path / "binary").write_bytes(b"mmap lm http://kheafield.com/code format version 5\0")
    assert arpa_unigrams(tmp_path / "binary") is None
    with pytest.raises(FileNotFoundError, match="nowhere.arpa"):
        LMDecoder(FAIRSEQ_VOCAB, tmp_path / "nowhere.arpa")


@pytest.fixture(scope="module")
def digits_lm(tmp_path_factory):
    """An ARPA bigram LM of the 21 digit transcripts (upper case, as ctc_mini's letters)."""
    sentences = [line.split("\t")[1] for line in (DIGITS / "transcripts.tsv").read_text().splitlines() if line]
    return write_arpa(tmp_path_factory.mktemp("lm_digits") / "digits.arpa", sentences)


def test_transcribe_command_with_lm_scores_its_transcripts(letter_model, digits_lm, tmp_path):
    """--lm over several batches of a manifest with --score: each text is the LM decoder's on that file alone,
    and the printed WER / CER are jiwer's of the written lines."""
    model_dir, model = letter_model
    manifest, references = digits_test_set(tmp_path / "data")
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "xlsr.transcribe", str(model_dir), "--manifest", str(manifest),
                             "--score", "--batch-seconds", "3", "--no-progress", "--lm", str(digits_lm),
                             "--lm-alpha", "0.7", "--beam-width", "16", "--output", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda line: line["index"])
    paths = [line["path"] for line in lines]
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in DIGITS.glob("*.flac"))
    decoder = LMDecoder(model.vocab, digits_lm, blank_index=model.blank_index, alpha=0.7, beam_width=16)
    with torch.inference_mode():
        alone = [decoder.decode(model(waveform(model, p)).log_probs)[0] for p in paths]
    hyps = [line["text"] for line in lines]
    assert hyps == alone
    assert hyps != one_by_one(model, paths)  # (the LM changed something)
    assert len(set("".join(hyps)) - {" "}) > 1
    refs = [references[Path(p).name] for p in paths]
    wer, cer = printed_rates(result.stdout)
    assert wer == round(100 * jiwer.wer(refs, hyps), 2) and cer == round(100 * jiwer.cer(refs, hyps), 2)


def test_transcribe_missing_lm_is_a_one_line_error(letter_model, tmp_path):
    model_dir, _ = letter_model
    missing = tmp_path / "no.arpa"
    result = subprocess.run([sys.executable, "-m", "xlsr.transcribe", str(model_dir), str(DIGITS / "1.flac"),
                             "--lm", str(missing)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no such LM file: {missing}"]


def test_missing_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "kenlm", None)  # import kenlm -> ImportError
    with pytest.raises(ImportError, match=r'pip install "xlsr\[lm\]"'):
        LMDecoder(FAIRSEQ_VOCAB, write_arpa(tmp_path / "lm.arpa", ["THE CAT"]))
