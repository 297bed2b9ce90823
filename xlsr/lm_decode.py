"""CTC beam search with an n-gram language model (KenLM ARPA or binary) over a letter vocabulary.

A thin layer over pyctcdecode (the decoder behind Hugging Face's ``Wav2Vec2ProcessorWithLM``) and kenlm, both
optional: ``pip install "xlsr[lm]"``. The model's vocabulary becomes pyctcdecode's alphabet: the blank -> ``""``,
the word boundary ``|`` -> ``" "``, letters unchanged. The other special symbols (``<s>``, ``</s>``, ``<pad>``,
``<unk>``, ``[PAD]``...) are not text: their probability is added to the blank's and they are never emitted (the
greedy decoder drops ``<s>``/``</s>`` the same way, but writes ``<pad>``/``<unk>`` literally). LM words must be
spelt as the vocabulary spells them (fairseq letter vocabularies are upper case, most HF ones lower case).
"""

from __future__ import annotations

import codecs
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from xlsr.vocabulary import WORD_BOUNDARY
from xlsr.text import normalize_unicode

logger = logging.getLogger(__name__)

INSTALL_HINT = 'LM beam search needs pyctcdecode and kenlm: pip install "xlsr[lm]" (or: pip install pyctcdecode kenlm)'
SPECIAL_SYMBOL = re.compile(r"^(<.+>|\[.+\])$")  # <s>, </s>, <pad>, <unk>, [PAD], [UNK], ...
_PRIVATE_USE = 0xE000  # stand-in labels of the neutralised specials (distinct, never in any LM word)


def decoder_labels(vocab: Sequence[str], blank_index: int) -> tuple[list[str], list[int]]:
    """pyctcdecode labels for ``vocab`` (in output index order) and the indices of the neutralised specials."""
    labels: list[str] = []
    specials: list[int] = []
    for index, symbol in enumerate(vocab):
        if index == blank_index:
            labels.append("")
        elif symbol == WORD_BOUNDARY:
            labels.append(" ")
        elif SPECIAL_SYMBOL.match(symbol):
            labels.append(chr(_PRIVATE_USE + index))
            specials.append(index)
        else:
            labels.append(symbol)
    return labels, specials


def arpa_unigrams(path: str | Path) -> list[str] | None:
    """The words of an ARPA file's ``\\1-grams:`` section (without ``<s>``, ``</s>``, ``<unk>``); None when the
    file is not a text ARPA file (a KenLM binary). A byte-order mark at the start is ignored; words are returned as
    written, since KenLM scores them so (a warning when they are not in Unicode NFC, as transcripts are)."""
    with open(path, "rb") as f:
        head = f.read(64).removeprefix(codecs.BOM_UTF8).lstrip()
    if not head.startswith(b"\\data\\"):
        return None
    words: list[str] = []
    in_unigrams = False
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            line = line.strip()
            if line.startswith("\\"):
                if in_unigrams:
                    break
                in_unigrams = line == "\\1-grams:"
            elif in_unigrams and line:
                fields = line.split()
                if len(fields) >= 2 and fields[1] not in ("<s>", "</s>", "<unk>"):
                    words.append(fields[1])
    not_nfc = [word for word in words if normalize_unicode(word) != word]
    if not_nfc:
        logger.warning("%s: %d word(s) not in Unicode NFC (e.g. %r): they never match a transcript, which is NFC; "
                       "build the LM from NFC text (xlsr.text.normalize_unicode)", path, len(not_nfc), not_nfc[0])
    return words


def _language_model_class() -> type:
    """pyctcdecode's LanguageModel, except that the empty word scores nothing (no OOV penalty, no ``beta``).

    pyctcdecode 0.5 ends the search by merging each hypothesis "A B" with its variant "A B " (a word boundary in
    the last frames, as fairseq models emit) and scoring the merged beam's pending word; when that is the
    variant's empty word, the hypothesis got the unknown-word penalty (``unk_score_offset``, -10 before
    ``alpha``) and could lose to worse ones (tests/test_lm_decode.py: "THE CAR" -> "CAR")."""
    from pyctcdecode.constants import LOG_BASE_CHANGE_FACTOR  # optional dependency (xlsr[lm]), as below
    from pyctcdecode.language_model import LanguageModel

    class EmptyWordSafeLanguageModel(LanguageModel):
        def score(self, prev_state, word: str, is_last_word: bool = False):
            if word:
                return super().score(prev_state, word, is_last_word=is_last_word)
            raw = self._get_raw_end_score(prev_state) if is_last_word else 0.0  # log10 P(</s> | context)
            return self.alpha * raw * LOG_BASE_CHANGE_FACTOR, prev_state

    return EmptyWordSafeLanguageModel


class LMDecoder:
    """Beam search over CTC log-probabilities with shallow fusion of a KenLM n-gram model.

    ``vocab``: the model's output symbols in index order (``Wav2Vec2ForCTC.vocab``); ``blank_index``: its blank.
    ``lm_path``: ARPA (its unigrams are read from it) or KenLM binary (give ``unigrams`` for the best results).
    Score = acoustic log-prob + ``alpha`` * LM log-prob + ``beta`` * words; ``beam_width`` hypotheses are kept.
    """

    def __init__(self, vocab: Sequence[str], lm_path: str | Path, *, blank_index: int = 0, alpha: float = 0.5,
                 beta: float = 1.0, beam_width: int = 100, unigrams: Iterable[str] | None = None):
        try:
            import kenlm  # (pyctcdecode imports without it, then cannot load an LM)
            from pyctcdecode import Alphabet, BeamSearchDecoderCTC
            from pyctcdecode.alphabet import verify_alphabet_coverage
        except ImportError as err:
            raise ImportError(INSTALL_HINT) from err
        if not 0 <= blank_index < len(vocab):
            raise ValueError(f"blank_index {blank_index} is outside the vocabulary of {len(vocab)}")
        if beam_width < 1:
            raise ValueError(f"beam_width must be positive, got {beam_width}")
        lm_path = Path(lm_path)
        if not lm_path.is_file():
            raise FileNotFoundError(f"no such LM file: {lm_path}")
        with open(lm_path, "rb") as f:
            if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8:  # KenLM reads it as part of "\data\" and fails
                raise ValueError(f"{lm_path}: starts with a UTF-8 byte-order mark, which KenLM cannot read; remove "
                                 f"it: sed -i '1s/^\\xEF\\xBB\\xBF//' {lm_path}")
        labels, self.specials = decoder_labels(vocab, blank_index)
        self.vocab_size = len(vocab)
        self.blank_index = blank_index
        self.beam_width = beam_width
        words = list(unigrams) if unigrams is not None else arpa_unigrams(lm_path)
        alphabet = Alphabet.build_alphabet(labels)
        if words:
            verify_alphabet_coverage(alphabet, words)  # (warns when the LM is spelt otherwise, e.g. lower case)
        lm = _language_model_class()(kenlm.Model(str(lm_path)), words, alpha=float(alpha), beta=float(beta))
        self.decoder = BeamSearchDecoderCTC(alphabet, lm)

    def neutralise_specials(self, log_probs: torch.Tensor) -> torch.Tensor:
        """(..., V) log-probs with the specials' probability moved onto the blank (theirs -> -inf)."""
        if not self.specials:
            return log_probs
        log_probs = log_probs.float().clone()
        merged = torch.logsumexp(log_probs[..., [self.blank_index, *self.specials]], dim=-1)
        log_probs[..., self.blank_index] = merged
        log_probs[..., self.specials] = float("-inf")
        return log_probs

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
        """Best transcript per utterance of ``log_probs`` (B, T, V) (``CTCOutput.log_probs``), using the first
        ``lengths[b]`` frames of row b (``lengths`` (B,), default all T)."""
        if log_probs.dim() != 3 or log_probs.shape[-1] != self.vocab_size:
            raise ValueError(f"log_probs must be (B, T, {self.vocab_size}), got {tuple(log_probs.shape)}")
        batch, frames = log_probs.shape[:2]
        counts = [frames] * batch if lengths is None else [int(n) for n in lengths.tolist()]
        emissions = self.neutralise_specials(log_probs.detach().float()).cpu().numpy()
        texts = []
        for row, count in enumerate(counts):
            if count <= 0:
                texts.append("")
                continue
            text = self.decoder.decode(emissions[row, :count], beam_width=self.beam_width)
            texts.append(" ".join(normalize_unicode(text).split()))
        return texts
