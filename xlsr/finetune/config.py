"""Typed configuration of ``python -m xlsr.finetune`` (hydra structured configs: a typo is an error).

Defaults are fairseq's XLS-R fine-tuning recipe (``examples/wav2vec/xlsr/config/finetune.yaml``): Adam (0.9, 0.98),
eps 1e-8, lr 3e-4, tri-stage schedule [0.1, 0.4, 0.5] with final scale 0.05, masks 0.75 x 10 in time and 0.25 x 64
over channels, LayerDrop 0.1, activation dropout 0.1, a frozen conv stack, the encoder frozen for the first 10k
updates, CTC with zero_infinity, 1.28M samples per batch, and the best model by validation WER kept in ``best/``
(``checkpoint.best_metric=wer``, fairseq's ``best_checkpoint_metric: wer``).

Not the recipe's: its batch is 4 GPUs x ``update_freq`` 5 x 1.28M samples, in fp16; here one process with
``update_freq`` 1 in fp32 (on N GPUs: ``optim.update_freq=20/N``, ``precision=fp16`` or ``bf16``). The recipe
validates every 1000 updates from update 10000 (``validate_interval_updates=1000 validate_after_updates=10000``);
here at the end of every epoch from the start.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore

from xlsr.finetune.classification_data import ClassificationDataConfig
from xlsr.finetune.data import FinetuneDataConfig
from xlsr.training.run_config import CheckpointConfig, RunConfig, RunOptimConfig, compose_app_config


@dataclass
class FineTuneModelConfig:
    """Which model: a pretrained or fine-tuned checkpoint, and the fine-tuning settings of the encoder."""

    init_from: str = "???"
    """Any checkpoint ``Wav2Vec2ForCTC.from_pretrained`` reads (sharded training folders included): a pretrained
    one (a new head is made for the dictionary) or a fine-tuned one (its head and vocabulary are kept: see
    ``dictionary``)."""
    mask_prob: float = 0.75
    """Time masking in training: fraction of frames that start a span (fairseq ``mask_prob``)."""
    mask_length: int = 10
    """Span length in frames (fairseq ``mask_length``)."""
    mask_channel_prob: float = 0.25
    """Channel masking in training (fairseq ``mask_channel_prob``)."""
    mask_channel_length: int = 64
    """Channel span length (fairseq ``mask_channel_length``)."""
    encoder_layerdrop: float = 0.1
    """Probability of skipping each transformer layer in training (fairseq ``layerdrop``; the key pretraining
    uses too)."""
    layerdrop: Optional[float] = None
    """Deprecated: the old name of ``encoder_layerdrop`` (still read, with a warning)."""
    dropout: float = 0.0
    """Dropout in the transformer (fairseq ``dropout``)."""
    attention_dropout: float = 0.0
    """Dropout of the attention weights (fairseq ``attention_dropout``)."""
    activation_dropout: float = 0.1
    """Dropout after the FFN activation (fairseq ``activation_dropout``)."""
    final_dropout: float = 0.0
    """Dropout before the output layer (fairseq ``final_dropout``)."""
    feature_grad_mult: float = 0.0
    """Gradient scale of the conv stack; 0 = frozen (fairseq ``feature_grad_mult``)."""
    freeze_finetune_updates: int = 10000
    """Updates during which only the output layer trains (fairseq ``freeze_finetune_updates``)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of keeping them."""
    compile: bool = False
    """``torch.compile`` each transformer layer."""

    def __post_init__(self) -> None:
        if self.layerdrop is not None:
            warnings.warn("model.layerdrop is deprecated: use model.encoder_layerdrop (the same setting, as in "
                          "pretraining)", FutureWarning, stacklevel=2)
            self.encoder_layerdrop, self.layerdrop = self.layerdrop, None


@dataclass
class FineTuneOptimConfig(RunOptimConfig):
    """AdamW (the common fields of :class:`~xlsr.training.run_config.RunOptimConfig`, the fine-tuning recipe's
    defaults: peak ``lr`` 3e-4, ``eps`` 1e-8, no weight decay, 20k updates) with the tri-stage learning-rate schedule
    (fairseq's ``tri_stage``). ``step_in_backward`` is not available for fine-tuning."""

    lr: float = 3e-4
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_update: int = 20000
    phase_ratio: List[float] = field(default_factory=lambda: [0.1, 0.4, 0.5])
    """Fractions of max_update for warm-up, hold and decay."""
    init_lr_scale: float = 0.01
    """The warm-up starts at this fraction of lr."""
    final_lr_scale: float = 0.05
    """The decay ends at this fraction of lr."""


def _finetune_data() -> FinetuneDataConfig:
    return FinetuneDataConfig(max_tokens=1_280_000)  # XLS-R's finetune.yaml


def _finetune_checkpoint() -> CheckpointConfig:
    return CheckpointConfig(best_metric="wer")  # XLS-R's finetune.yaml: best_checkpoint_metric: wer


@dataclass
class FineTuneConfig(RunConfig):
    """Everything ``python -m xlsr.finetune`` takes: the run fields of :class:`~xlsr.training.run_config.RunConfig`
    (fine-tuning's defaults for ``checkpoint`` and ``output_dir``) and fine-tuning's own sections."""

    model: FineTuneModelConfig = field(default_factory=FineTuneModelConfig)
    """The checkpoint to start from and the encoder's fine-tuning settings."""
    data: FinetuneDataConfig = field(default_factory=_finetune_data)
    """Audio and transcripts: manifests with labels beside them, or a Hugging Face dataset with a text column
    (``data.hf_dataset``, ``data.text_column``); batching (whole utterances, padded)."""
    dictionary: Optional[str] = None
    """``dict.ltr.txt``; None = a fine-tuned ``model.init_from``'s own vocabulary (its indices and blank, fairseq's,
    Hugging Face's or ours: a ``dict.ltr.txt`` beside the manifest that differs is ignored with a warning, as the
    head's outputs are the model's), else the ``dict.ltr.txt`` beside the training manifest, else one built from
    its transcripts (with ``data.hf_dataset``: from the training split's ``data.text_column``). Saved to output_dir either way. A transcript character missing from it is an error naming the
    label file and line (``data.unk=true``: the unknown symbol, ``<unk>`` or ``[UNK]``)."""
    optim: FineTuneOptimConfig = field(default_factory=FineTuneOptimConfig)
    """Optimizer and schedule."""
    checkpoint: CheckpointConfig = field(default_factory=_finetune_checkpoint)
    """Saving, keep-last, resume, and the best model by validation WER (``best_metric``: wer, cer, loss or "")."""
    output_dir: str = "runs/finetune"
    """Where config.yaml, metrics.jsonl, checkpoints/ and model/ go."""
    valid_examples: int = 3
    """Reference / hypothesis pairs printed at each validation."""
    task: str = "ctc"
    """Which fine-tuning: ``ctc`` (this config) or ``classification`` (:class:`ClassificationFineTuneConfig`);
    chosen on the command line (``task=classification``) before the rest is read."""

    def __post_init__(self) -> None:
        if self.task != "ctc":
            raise ValueError(f"task={self.task!r}: this is the CTC config; task must be one of {sorted(TASKS)}")


@dataclass
class ClassificationModelConfig(FineTuneModelConfig):
    """The fine-tuning settings of :class:`FineTuneModelConfig` with the classification head's: pooling and the
    defaults of fairseq's XLS-R language-ID fine-tuning (``mask_prob`` 0.5; see
    :class:`ClassificationFineTuneConfig`). ``init_from``: any checkpoint ``Wav2Vec2ForSequenceClassification.
    from_pretrained`` reads: a pretrained or CTC one gets a new head for the labels; a classification one keeps
    its head and labels (see ``label_dictionary``). ``final_dropout`` has no place in this head (must stay 0)."""

    mask_prob: float = 0.5
    mask_channel_prob: float = 0.0
    freeze_finetune_updates: int = 0
    pooling_activation: str = "identity"
    """After the mean over frames: ``identity`` (Hugging Face's head, exportable with ``--to hf``) or fairseq's
    ``activation_fn`` (``gelu``, ``relu``, ``tanh``). A classification ``init_from`` keeps its own unless set here."""
    classifier_proj_size: int = 256
    """Width of the per-frame projector before pooling (HF ``classifier_proj_size``). New heads only."""
    use_weighted_layer_sum: bool = False
    """Pool a learned softmax-weighted sum of every layer's output (HF ``use_weighted_layer_sum``). New heads only."""


@dataclass
class ClassificationOptimConfig(FineTuneOptimConfig):
    """The tri-stage AdamW of :class:`FineTuneOptimConfig` at the language-ID run's peak ``lr`` of 1e-4."""

    lr: float = 1e-4


def _classification_data() -> ClassificationDataConfig:
    return ClassificationDataConfig()


def _classification_checkpoint() -> CheckpointConfig:
    return CheckpointConfig(best_metric="accuracy", maximize_best_metric=True)


@dataclass
class ClassificationFineTuneConfig(RunConfig):
    """Everything ``python -m xlsr.finetune task=classification`` takes: utterance classification (language ID,
    speaker, emotion) of a ``Wav2Vec2ForSequenceClassification``, fairseq's ``audio_classification`` task with
    the ``wav2vec_classification`` model and cross-entropy.

    fairseq's (its XLS-R language-ID fine-tuning): mean pooling over the valid frames, peak lr 1e-4 with the
    tri-stage schedule, ``mask_prob`` 0.5, training crops of at most 10 s (``data.max_sample_size``), the best model
    by validation accuracy. Not fairseq's: the head's activation after the pooling is ``identity`` (Hugging Face's
    head; fairseq applies ``activation_fn``, gelu by default: ``model.pooling_activation=gelu``); the other encoder
    settings, the schedule's phases, the batch size and the 20k updates are this package's CTC defaults
    (:class:`FineTuneConfig`), except no channel masks and no frozen-encoder phase; ``class_weighting`` and the
    validation metrics beyond accuracy are ours. One process, fp32, ``update_freq`` 1 unless set.
    """

    model: ClassificationModelConfig = field(default_factory=ClassificationModelConfig)
    """The checkpoint to start from, the encoder's fine-tuning settings and the head's."""
    data: ClassificationDataConfig = field(default_factory=_classification_data)
    """Audio and labels: manifests with ``{split}.{data.labels}`` beside them, or a Hugging Face dataset with a label
    column, or Lhotse cuts / Shar shards with a label field (``data.label_column``); crops, batching."""
    label_dictionary: Optional[str] = None
    """The classes (``dict.lang.txt``: ``label count`` lines, line order = class index); None = a classification
    ``model.init_from``'s own labels (a ``dict.lang.txt`` beside the manifest that differs is ignored with a
    warning), else the ``dict.{data.labels}.txt`` beside the training manifest, else one built from the training
    labels (most frequent first, ties by name; with ``data.hf_dataset`` or Lhotse data always built so, from the
    training split's column or the cuts' field). Saved to output_dir with the training counts either way. A label
    missing from it is an error naming the label file and line (the dataset, split and row; the cut id)."""
    class_weighting: str = "none"
    """Class imbalance: ``none`` (every utterance counts the same) or ``balanced``: the training loss weights class c
    by N / (C * n_c) (n_c its training utterances, N all of them, C the classes; a class without training
    utterances weighs 1), so each class contributes as if the classes were equally frequent. The validation loss
    is never weighted."""
    optim: ClassificationOptimConfig = field(default_factory=ClassificationOptimConfig)
    """Optimizer and schedule."""
    checkpoint: CheckpointConfig = field(default_factory=_classification_checkpoint)
    """Saving, keep-last, resume, and the best model by validation ``accuracy`` (``best_metric``: accuracy,
    macro_f1 or loss; set ``maximize_best_metric`` to match)."""
    output_dir: str = "runs/classification"
    """Where config.yaml, metrics.jsonl, dict.lang.txt, confusion_matrix.png, checkpoints/ and model/ go."""
    task: str = "classification"
    """``classification`` (this config) or ``ctc`` (:class:`FineTuneConfig`), chosen on the command line."""

    def __post_init__(self) -> None:
        if self.task != "classification":
            raise ValueError(f"task={self.task!r}: this is the classification config; task must be one of "
                             f"{sorted(TASKS)}")
        if self.class_weighting not in ("none", "balanced"):
            raise ValueError(f"class_weighting must be 'none' or 'balanced', got {self.class_weighting!r}")


TASKS = {"ctc": ("finetune", FineTuneConfig), "classification": ("finetune_classification",
                                                                   ClassificationFineTuneConfig)}
"""``task=`` on the command line -> (``xlsr/conf/<name>.yaml``, its schema)."""


def register_configs() -> None:
    """Register the schemas with hydra so ``xlsr/conf/finetune*.yaml`` are validated against them."""
    for config_name, schema in TASKS.values():
        ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)


def task_of(arguments: list[str] | None) -> str:
    """The ``task=`` of command-line overrides ("ctc" without one); ValueError for an unknown task."""
    task = "ctc"
    for argument in arguments or []:
        key, _, value = argument.partition("=")
        if key.lstrip("+") == "task":
            task = value
    if task not in TASKS:
        raise ValueError(f"task={task!r}: must be one of {', '.join(sorted(TASKS))}")
    return task


def compose_config(overrides: list[str] | None = None) -> FineTuneConfig | ClassificationFineTuneConfig:
    """The config ``python -m xlsr.finetune`` would use with these command-line overrides (``task=`` picks which)."""
    register_configs()
    config_name, schema = TASKS[task_of(overrides)]
    return compose_app_config(config_name, schema, overrides)
