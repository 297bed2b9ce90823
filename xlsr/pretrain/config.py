"""Typed configuration of ``python -m xlsr.pretrain`` (hydra structured configs: a typo is an error)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from xlsr.config import Wav2Vec2Config, parse_conv_layers
from xlsr.data.audio_dataset import DataConfig
from xlsr.training.run_config import (  # re-exported: the run sections, once defined here
    CONF_DIR,
    CheckpointConfig,
    DistributedConfig,
    RunConfig,
    RunOptimConfig,
    compose_app_config,
)


__all__ = ["PretrainConfig", "ModelConfig", "OptimConfig", "ProbeConfig", "DataConfig", "DistributedConfig", "CheckpointConfig",
           "RunConfig",            "CONF_DIR", "compose_app_config", "compose_config", "register_configs"]

def _optional_field_type(f: dataclasses.Field) -> Any:
    if f.name == "conv_layers":
        return Optional[str]  # fairseq's expression, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"
    if f.name == "latent_temp":
        return Optional[List[float]]
    return Optional[{"bool": bool, "int": int, "float": float}.get(str(f.type), str)]


# Every architecture field of Wav2Vec2Config, optional: None = take the preset's (or the init checkpoint's) value.
ArchitectureOverrides = dataclasses.make_dataclass(
    "ArchitectureOverrides",
    [(f.name, _optional_field_type(f), field(default=None)) for f in dataclasses.fields(Wav2Vec2Config)],
)


@dataclass
class ModelConfig(ArchitectureOverrides):  # type: ignore[misc, valid-type]
    """Which model: a preset, optionally a checkpoint to start from, and per-field overrides.

    Every ``Wav2Vec2Config`` field (documented in ``xlsr/config.py``) is also a field here, None by default = the
    preset's (or ``init_from``'s) value; ``conv_layers`` is then fairseq's expression string, e.g.
    ``model.conv_layers="[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2"``.
    """

    preset: str = "tiny"
    """Architecture to build: a name in ``xlsr.config.PRESETS`` (tiny, base, large-lv60, xlsr-300m, xlsr-1b,
    xlsr-2b). Ignored when ``init_from`` is set."""

    init_from: Optional[str] = None
    """Any checkpoint ``from_pretrained`` reads (fairseq ``.pt``, HF or our directory): continue pretraining from its
    architecture and weights (not its optimizer state or update count: the schedule starts at 0). None = fresh."""

    loss_weights: List[float] = field(default_factory=lambda: [0.1, 0.0])
    """``[diversity, feature penalty]`` weights of the criterion (fairseq ``criterion.loss_weights``).
    XLS-R and LARGE: [0.1, 0.0]; BASE: [0.1, 10.0]."""

    activation_checkpointing: bool = False
    """Recompute the conv stack and each transformer layer in backward instead of keeping their activations:
    same results, less memory, about 1/3 more compute there (fairseq's ``checkpoint_activations``)."""

    compile: bool = False
    """``torch.compile`` every transformer layer (``dynamic=True``: batch lengths vary)."""

    def overrides(self) -> dict[str, Any]:
        values = {}
        for f in dataclasses.fields(Wav2Vec2Config):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "conv_layers":
                value = parse_conv_layers(value)
            elif f.name == "latent_temp":
                value = tuple(value)
            values[f.name] = value
        return values


@dataclass
class OptimConfig(RunOptimConfig):
    """AdamW (the common fields of :class:`~xlsr.training.run_config.RunOptimConfig`), linear warm-up then
    polynomial decay (fairseq's polynomial_decay).

    fairseq keeps these in ``optimization`` / ``optimizer`` / ``lr_scheduler``; the names differ where noted.
    The class defaults are the BASE recipe (``lr`` 5e-4 reached at the end of warm-up, ``eps`` 1e-6,
    ``weight_decay`` 0.01, ``max_update`` 400k); ``optim=xlsr`` (``xlsr/conf/optim/xlsr.yaml``, the default group of
    ``python -m xlsr.pretrain``) is the XLS-R one, from the released ``xlsr2_300m.pt`` cfg (``lr`` 6e-4,
    ``max_update`` 1M). ``max_update`` is also fairseq's ``lr_scheduler.total_num_update`` (one value here).
    """

    warmup_updates: int = 32000
    """Updates of linear warm-up from 0 to ``lr``. XLS-R and BASE: 32000. fairseq ``lr_scheduler.warmup_updates``."""

    end_lr: float = 0.0
    """LR at ``max_update``. XLS-R: 0.0. fairseq ``lr_scheduler.end_learning_rate``."""

    power: float = 1.0
    """Exponent of the decay, ``(1 - progress) ** power``; 1 = linear. XLS-R: 1.0. fairseq ``lr_scheduler.power``."""


@dataclass
class ProbeConfig:
    """A linear probe at every validation (``xlsr/probe.py``): mean-pooled frozen features of one transformer layer
    for a small labelled set, a multinomial logistic regression fitted on its train part, its accuracy on the held-out
    part logged as ``probe_accuracy`` (and ``probe_train_accuracy``, ``probe_seconds``) in the valid record. It shows
    whether the representations get better for a downstream task, not only the contrastive loss. No fairseq field."""

    manifest: str = ""
    """Train manifest of the probe set (fairseq layout: ``train.tsv`` with the label file beside it, ``train.lang``,
    one label per manifest row). Empty = no probe (the default)."""

    valid_manifest: str = ""
    """Held-out manifest of the probe set (``valid.tsv`` + ``valid.lang``); its labels must all occur in the train
    part. Required with ``manifest``."""

    labels: str = "lang"
    """Extension of the label files: ``train.tsv`` -> ``train.<labels>`` (fairseq's ``task.labels``)."""

    layer: Optional[int] = None
    """Transformer layer whose output is pooled, 1..encoder_layers (HF's ``hidden_states[layer]``: no final
    LayerNorm). None = the middle one (encoder_layers // 2, at least 1): in pretrained wav2vec 2.0 / XLS-R the
    last layers specialise in the pretraining task and the middle ones carry most of what downstream tasks
    use, and the forward stops there (half the encoder's cost)."""

    steps: int = 300
    """Full-batch Adam steps of the logistic regression (zero init, standardised features: deterministic)."""

    lr: float = 0.01
    """Learning rate of those steps."""

    max_seconds: float = 4.0
    """Each clip is cropped to at most this many seconds (a seeded crop: the same at every validation)."""


@dataclass
class PretrainConfig(RunConfig):
    """Everything ``python -m xlsr.pretrain`` reads (``xlsr/conf/pretrain.yaml`` composes it): the run fields of
    :class:`~xlsr.training.run_config.RunConfig` and pretraining's ``model``, ``data``, ``optim`` and ``probe``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model group (``model=xlsr-300m`` etc.): preset, init checkpoint, architecture overrides, loss weights."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data group: manifests or a Hugging Face dataset (``data.hf_dataset``), crops, batch size
    (``xlsr.data.audio_dataset.DataConfig``)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optim group: optimizer and LR schedule."""

    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """A linear probe on a small labelled set at every validation (off unless ``probe.manifest`` is set)."""

    output_dir: str = "runs/pretrain"
    """``pretrain.yaml`` sets ``runs/pretrain-<model>``."""


def register_configs() -> None:
    """Register the schema with hydra so ``xlsr/conf/pretrain.yaml`` is validated against it."""
    store = ConfigStore.instance()
    store.store(name="pretrain_schema", node=PretrainConfig)


def compose_config(overrides: list[str] | None = None) -> PretrainConfig:
    """The config ``python -m xlsr.pretrain`` would use with these command-line overrides (for scripts and tests)."""
    register_configs()
    return compose_app_config("pretrain", PretrainConfig, overrides)
