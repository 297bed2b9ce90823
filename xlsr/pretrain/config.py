"""Typed configuration of ``python -m xlsr.pretrain`` (hydra structured configs: a typo is an error)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, List, Optional

from xlsr.config import Wav2Vec2Config, parse_conv_layers
from xlsr.pretrain.data import DataConfig


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
    """Which model: a preset, optionally a checkpoint to start from, and per-field overrides."""

    preset: str = "tiny"
    init_from: Optional[str] = None  # any checkpoint from_pretrained reads: continue pretraining from it
    loss_weights: List[float] = field(default_factory=lambda: [0.1, 0.0])  # (diversity, feature penalty)
    activation_checkpointing: bool = False
    compile: bool = False

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
class OptimConfig:
    """Adam with decoupled weight decay, linear warm-up then polynomial decay (fairseq's polynomial_decay)."""

    lr: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_updates: int = 32000
    max_update: int = 400000  # length of the schedule and of the run
    end_lr: float = 0.0
    power: float = 1.0
    clip_norm: float = 0.0  # 0 = no clipping
    update_freq: int = 1  # gradient accumulation: micro-batches per update
    fp16_init_scale: float = 128.0  # precision=fp16: the loss scale to start from (fairseq's fp16_init_scale)
    # memory saver: update each parameter inside backward and free its gradient at once (the same updates; no
    # gradient for every weight held). One process, update_freq 1, no clipping, not fp16. step_in_backward.py
    step_in_backward: bool = False


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU. World size and ranks come from torchrun's environment.
    timeout_minutes: int = 30


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"  # relative to output_dir
    save_interval_updates: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto: newest checkpoint in dir if any; never; or a path


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: str = "runs/pretrain"
    seed: int = 1
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: str = "fp32"  # fp32 | bf16 | fp16
    max_epoch: int = 0  # 0 = no limit (stop at optim.max_update)
    max_time_minutes: float = 0.0  # 0 = no limit; stops cleanly with a checkpoint
    stop_at_update: int = 0  # stop cleanly (with a checkpoint) here without changing the LR schedule; 0 = no
    log_interval: int = 10  # updates between log lines
    validate_interval_updates: int = 0  # 0 = at the end of every epoch only
    max_valid_batches: int = 0  # 0 = whole valid set
    tensorboard: bool = True  # when tensorboard is installed
    progress_bar: bool = True
    threads: int = 0  # torch.set_num_threads on CPU; 0 = leave torch's default


def register_configs() -> None:
    """Register the schema with hydra so ``xlsr/conf/pretrain.yaml`` is validated against it."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="pretrain_schema", node=PretrainConfig)


# Package data (declared in pyproject.toml), so a wheel install finds it too; shared by the package's hydra apps.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str] | None = None) -> PretrainConfig:
    """The config ``python -m xlsr.pretrain`` would use with these command-line overrides (for scripts and tests)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="pretrain", overrides=list(overrides or []), return_hydra_config=True)
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(cfg)
        output_dir = cfg.output_dir  # resolves ${hydra:...}
        values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra")
    values["output_dir"] = output_dir
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PretrainConfig), values))
