"""The CTC fine-tuning task (fairseq's ``audio_finetuning`` task + ``ctc`` criterion), run by the engine
(:mod:`xlsr.training`: the loop, DDP / FSDP, mixed precision, checkpoints, exact resume, logging).

The task: the model (``Wav2Vec2ForCTC`` from any checkpoint, a new head for the
dictionary), the labelled data, the loss (CTC summed over the batch, normalised by the number of utterances, as
fairseq's ``sentence_avg``), the tri-stage schedule, and validation (CTC loss, greedy WER and CER, a few examples).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xlsr.checkpoints.ctc import is_ctc_checkpoint
from xlsr.ctc import CTCOutput, Wav2Vec2ForCTC
from xlsr.data.batch import AudioBatch, CTCBatch
from xlsr.data.source import hf_split_of, is_hf_source, training_data
from xlsr.finetune.config import FineTuneConfig
from xlsr.data.audio_dataset import check_data_source
from xlsr.data.lhotse_source import CutItems, CutTranscripts, build_lhotse_loader, is_lhotse_source, lhotse_transcripts
from xlsr.finetune.data import (FrameCounter, build_finetune_dataloader, check_finetune_data_config, collate_ctc,
                                hf_split_transcripts)
from xlsr.finetune.labels import dictionary_path, read_labels
from xlsr.vocabulary import Dictionary, letters_to_words
from xlsr.finetune.wer import error_counts
from xlsr.model import Wav2Vec2Model
from xlsr.training.metrics import Totals
from xlsr.training.optim import tri_stage_lr
from xlsr.training.task import Task, register_task

logger = logging.getLogger("xlsr.finetune")

LOG2 = math.log(2)


@dataclass
class CTCLoss:
    """One batch's CTC loss as the trainer needs it."""

    total: torch.Tensor  # () summed over the batch (nats)
    sample_size: int  # utterances (fairseq's sentence_avg)
    ntokens: int  # target letters
    infeasible: int  # utterances whose loss was infinite (targets longer than the audio allows), zeroed
    empty_outputs: int  # utterances whose greedy output is the blank at every frame (an empty transcript)


class CTCTotals(Totals):
    """Sums of what one update, an epoch or a validation pass logs (the interface of ``StepTotals``)."""

    KEYS = ("loss", "sample_size", "ntokens", "infeasible", "empty_outputs", "num_batches", "audio_seconds",
            "word_edits", "words", "char_edits", "chars")

    def add(self, loss: CTCLoss, out, audio_seconds: float) -> None:
        v = self.values
        v["loss"] += float(loss.total.detach())
        v["sample_size"] += loss.sample_size
        v["ntokens"] += loss.ntokens
        v["infeasible"] += loss.infeasible
        v["empty_outputs"] += loss.empty_outputs
        v["num_batches"] += 1
        v["audio_seconds"] += audio_seconds

    def add_errors(self, word: tuple[int, int], char: tuple[int, int]) -> None:
        v = self.values
        v["word_edits"] += word[0]
        v["words"] += word[1]
        v["char_edits"] += char[0]
        v["chars"] += char[1]


def ctc_record(stats: dict[str, float]) -> dict[str, float]:
    """Summed statistics -> logged values: ``loss`` in bits per utterance (fairseq's CTC ``loss``), ``nll_loss`` in
    bits per letter, ``empty_outputs`` the fraction of utterances whose greedy transcript is empty (validation adds
    ``wer`` / ``cer``, see ``CTCTask.validation_extras``)."""
    record = {
        "loss": stats["loss"] / max(stats["sample_size"], 1.0) / LOG2,
        "nll_loss": stats["loss"] / max(stats["ntokens"], 1.0) / LOG2,
        "sample_size": stats["sample_size"],
        "ntokens": stats["ntokens"],
        "infeasible": stats["infeasible"],
        "empty_outputs": stats["empty_outputs"] / max(stats["sample_size"], 1.0),
        "num_batches": stats["num_batches"],
        "audio_seconds": stats["audio_seconds"],
    }
    return record


BLANK_PLATEAU_ADVICE = (
    "every greedy output is blank (WER 100 %%) after the frozen phase (model.freeze_finetune_updates=%d): %s. "
    "The usual causes and what to try: too few updates yet (CTC first learns to emit only the blank; give it more); "
    "optim.lr too low (nothing moves) or too high (the outputs collapse to the blank): try a few values around "
    "the recipe's 3e-4; "
    "model.freeze_finetune_updates too long for the run; on little data the masks, "
    "LayerDrop and dropout too strong: try model.mask_prob=0 model.mask_channel_prob=0 model.encoder_layerdrop=0 "
    "model.activation_dropout=0; a dictionary that does not match the transcripts (check dict.ltr.txt against "
    "the .ltr files, and the vocabulary of a fine-tuned model.init_from)"
)


@register_task(FineTuneConfig)
class CTCTask(Task):
    """CTC fine-tuning of a ``Wav2Vec2ForCTC`` on labelled audio (its encoder: ``model.wav2vec2``)."""

    cfg: FineTuneConfig
    BEST_METRICS = ("wer", "cer", "loss")
    HEADLINE = (("loss", "loss %.3f bits"), ("wer", "WER %.2f %%"), ("cer", "CER %.2f %%"))
    BLANK_PATIENCE = 1000
    """Training updates in a row after the frozen phase with every greedy output blank (every utterance of every
    micro-batch on every rank, masks and dropout on) before the blank-plateau warning."""

    def __init__(self, cfg: FineTuneConfig):
        super().__init__(cfg)
        self.dictionary = self._dictionary(cfg)
        self._examples: list[tuple[str, str]] = []
        self._errors = CTCTotals()
        self._blank_updates = 0  # unfrozen training updates in a row with every greedy output blank
        self._warned_blank = False

    def output_ready(self) -> None:
        if self.trainer.is_main:
            self.dictionary.save(self.trainer.output_dir / "dict.ltr.txt")

    def _dictionary(self, cfg: FineTuneConfig) -> Dictionary:
        """The targets' dictionary (the same on every rank), the first of: ``cfg.dictionary``; the vocabulary of
        ``model.init_from`` when it is fine-tuned (its output indices and blank: a ``dict.ltr.txt`` beside the
        manifest that differs is not used, with a warning); ``dict.ltr.txt`` beside the (first) training manifest;
        one built from its transcripts (``data.hf_dataset``: the training split's ``data.text_column``; Lhotse: the
        cuts' transcripts), as the manifest tool builds ``dict.ltr.txt``. Records in ``self._continue`` whether
        ``init_from`` is fine-tuned."""
        check_data_source(cfg.data)
        train_data = training_data(cfg.data)
        hf, lhotse = is_hf_source(train_data), is_lhotse_source(train_data)
        first_manifest = train_data.split(",")[0].strip()
        beside = "" if hf or lhotse else dictionary_path(first_manifest)  # no dict.ltr.txt beside these sources
        if not (hf or lhotse) and not Path(first_manifest).is_file():  # named before the checkpoint is looked at
            raise FileNotFoundError(f"data.manifest={first_manifest}: no such file")
        self._continue = is_ctc_checkpoint(cfg.model.init_from)
        if cfg.dictionary:
            if not Path(cfg.dictionary).is_file():
                raise FileNotFoundError(f"dictionary={cfg.dictionary}: no such file")
            return Dictionary.load(cfg.dictionary)
        if self._continue:
            model = Wav2Vec2ForCTC.from_pretrained(cfg.model.init_from)
            dictionary = Dictionary.from_vocab(model.vocab, model.blank_index, model.unk_symbol)
            del model
            if beside and Path(beside).is_file() and Dictionary.load(beside) != dictionary:
                logger.warning("%s differs from the vocabulary of the fine-tuned model %s (%d symbols, blank %d): "
                               "training on the model's vocabulary", beside, cfg.model.init_from, len(dictionary),
                               dictionary.blank_index)
            return dictionary
        if hf:
            rows = [r for _, r in hf_split_transcripts(cfg.data, cfg.data.hf_split) if r is not None]
            logger.info("building the dictionary from the %d transcripts of %s:%s (data.text_column=%s)", len(rows),
                        cfg.data.hf_dataset, cfg.data.hf_split, cfg.data.text_column)
            return Dictionary.from_transcripts(rows)
        if lhotse:
            rows = lhotse_transcripts(train_data, self._transcripts(None))
            logger.info("building the dictionary from the %d transcripts of %s", len(rows), train_data)
            return Dictionary.from_transcripts(rows)
        if Path(beside).is_file():
            return Dictionary.load(beside)
        rows = [r for r in read_labels(first_manifest, cfg.data.labels, skip_empty=True) if r is not None]
        logger.info("no %s: building the dictionary from the %d transcripts of %s", beside, len(rows), first_manifest)
        return Dictionary.from_transcripts(rows)

    def build_model(self) -> Wav2Vec2ForCTC:
        m = self.cfg.model
        settings = dict(
            mask_prob=m.mask_prob, mask_length=m.mask_length, mask_channel_prob=m.mask_channel_prob,
            mask_channel_length=m.mask_channel_length, encoder_layerdrop=m.encoder_layerdrop, dropout=m.dropout,
            attention_dropout=m.attention_dropout, activation_dropout=m.activation_dropout,
            feature_grad_mult=m.feature_grad_mult, final_dropout=m.final_dropout,
            freeze_finetune_updates=m.freeze_finetune_updates, apply_mask=True, zero_infinity=True,
            ctc_loss_reduction="sum",
        )
        symbols = list(self.dictionary.symbols)
        if self._continue:
            model = Wav2Vec2ForCTC.from_pretrained(m.init_from, **settings)
            if model.vocab != symbols:
                raise ValueError(f"{m.init_from}: its vocabulary ({len(model.vocab)} symbols) differs from "
                                 f"dictionary={self.cfg.dictionary} ({len(symbols)}); leave dictionary unset to train "
                                 "on the model's own vocabulary, or give model.init_from a pretrained model")
            logger.info("continuing from the fine-tuned model %s", m.init_from)
        else:  # a pretrained encoder, and a new head for the dictionary
            model = Wav2Vec2ForCTC.from_pretrained(m.init_from, vocab=symbols,
                                                   blank_index=self.dictionary.blank_index, **settings)
            logger.info("initialised the encoder from %s; new output layer for %d symbols", m.init_from, len(symbols))
        model.wav2vec2.set_activation_checkpointing(m.activation_checkpointing)
        return model

    def model_recipe(self, model: Wav2Vec2ForCTC) -> tuple[type, tuple]:
        return type(model), (model.cfg, model.vocab)

    def encoder(self, model: Wav2Vec2ForCTC) -> Wav2Vec2Model:
        return model.wav2vec2

    def find_unused_parameters(self, model: Wav2Vec2ForCTC) -> bool:
        return True  # frozen conv stack, frozen encoder for freeze_finetune_updates, LayerDrop

    def _transcripts(self, dictionary: Dictionary | None) -> CutTranscripts:
        """How a Lhotse cut's transcript becomes targets (``data.lhotse_text_field``, ``data.labels``)."""
        data = self.cfg.data
        return CutTranscripts(dictionary, text_field=data.lhotse_text_field, labels=data.labels, unk=data.unk)

    def build_loader(self, manifest: str, epoch: int, shuffle: bool = True):
        t = self.trainer
        if is_lhotse_source(manifest):  # whole cuts (never cropped), padded, with their transcripts
            data = self.cfg.data
            check_finetune_data_config(data)
            items = CutItems(
                sample_rate=data.sample_rate, min_sample_size=data.min_sample_size,
                max_sample_size=data.max_tokens if data.max_sample_size is None else min(data.max_sample_size,
                                                                                        data.max_tokens),
                crop=False, normalize=t.model_cfg.normalize if data.normalize is None else data.normalize,
                resample=data.resample, skip_bad=data.skip_bad, targets=self._transcripts(self.dictionary),
                collater=functools.partial(collate_ctc, pad_index=self.dictionary.pad_index),
            )
            return build_lhotse_loader(manifest, data, items, seed=self.cfg.seed, epoch=epoch, rank=t.rank,
                                       world_size=t.world_size, shuffle=shuffle, skip_empty=data.skip_empty)
        if is_hf_source(manifest):  # ``build_finetune_dataloader`` takes the split's name with data.hf_dataset
            manifest = hf_split_of(manifest)
        return build_finetune_dataloader(
            self.cfg.data, manifest, self.dictionary, normalize=t.model_cfg.normalize, seed=self.cfg.seed,
            epoch=epoch, rank=t.rank, world_size=t.world_size, shuffle=shuffle,
            num_frames=FrameCounter(t.model_cfg.conv_layers),
        )

    def forward_and_loss(self, model, batch: CTCBatch, layer_keep) -> tuple[CTCOutput, CTCLoss]:
        out: CTCOutput = model(batch.source, batch.padding_mask, layer_keep=layer_keep)
        targets, target_lengths = batch.target, batch.target_lengths
        per_utterance = torch.nn.functional.ctc_loss(
            out.log_probs.transpose(0, 1), targets, out.lengths, target_lengths,
            blank=self.trainer.model.blank_index, reduction="none", zero_infinity=True,
        )
        with torch.no_grad():
            infeasible = int((per_utterance == 0).logical_and(target_lengths > 0).sum())
            emitted = out.log_probs.argmax(-1) != self.trainer.model.blank_index  # (B, T)
            if out.padding_mask is not None:
                emitted &= ~out.padding_mask
            empty = int((~emitted.any(-1)).sum())
        return out, CTCLoss(per_utterance.sum(), int(targets.shape[0]), int(target_lengths.sum()), infeasible, empty)

    def dummy_batch(self, batch: AudioBatch) -> CTCBatch:
        if isinstance(batch, CTCBatch):
            return batch
        # any symbol but the blank makes a valid CTC target (the pass has zero weight); not every vocabulary has <unk>
        symbol = next(i for i in range(len(self.dictionary)) if i != self.dictionary.blank_index)
        return CTCBatch(source=batch.source[:1], padding_mask=None, ids=batch.ids[:1],
                        target=torch.full((1, 1), symbol, dtype=torch.long),
                        target_lengths=torch.ones(1, dtype=torch.long))

    def new_totals(self) -> CTCTotals:
        return CTCTotals()

    def record(self, stats: dict[str, float]) -> dict[str, float]:
        return ctc_record(stats)

    def learning_rate(self, num_updates: int) -> float:
        return tri_stage_lr(num_updates - 1, self.cfg.optim)  # fairseq: update n runs with the LR set after n - 1

    def check_health(self, record: dict[str, Any]) -> None:
        num_updates = self.trainer.num_updates
        if record["infeasible"] and self.trainer.is_main:
            logger.warning("update %d: %d utterance(s) too long for their audio under CTC (loss zeroed)",
                           num_updates, int(record["infeasible"]))
        if num_updates > self.cfg.model.freeze_finetune_updates:
            self._blank_updates = self._blank_updates + 1 if record["empty_outputs"] >= 1.0 else 0
            if self._blank_updates >= self.BLANK_PATIENCE:
                self._warn_blank_plateau(f"in every training batch of the last {self._blank_updates} updates "
                                         f"(to update {num_updates})")

    def _warn_blank_plateau(self, where: str) -> None:
        """The "WER stuck at 100 %" warning, once per run."""
        if self.trainer.is_main and not self._warned_blank:
            logger.warning(BLANK_PLATEAU_ADVICE, self.cfg.model.freeze_finetune_updates, where)
        self._warned_blank = True

    # ------------------------------------------------------------------ validation: WER and CER
    def start_validation(self) -> None:
        self._examples = []
        self._errors = CTCTotals()

    def validation_batch_done(self, batch: CTCBatch, out: CTCOutput) -> None:
        hypotheses = self.trainer.model.decode(out)
        references = [letters_to_words(self.dictionary.string(t[:n].tolist()))
                      for t, n in zip(batch.target, batch.target_lengths)]
        self._errors.add_errors(error_counts(references, hypotheses, unit="word"),
                                error_counts(references, hypotheses, unit="char"))
        for ref, hyp in zip(references, hypotheses):
            if len(self._examples) < self.cfg.valid_examples:
                self._examples.append((ref, hyp))

    def validation_extras(self) -> dict[str, float]:
        t = self.trainer
        stats = self._errors.all_reduce(t.world_size, t.device)
        if t.is_main:
            for ref, hyp in self._examples:
                logger.info("  ref: %s\n  hyp: %s", ref, hyp)
        extras = {}
        if stats["words"] > 0:
            extras["wer"] = 100.0 * stats["word_edits"] / stats["words"]
            extras["cer"] = 100.0 * stats["char_edits"] / max(stats["chars"], 1.0)
            if t.is_main:
                logger.info("valid @ %d: WER %.2f %%, CER %.2f %%", t.num_updates, extras["wer"], extras["cer"])
        return extras
