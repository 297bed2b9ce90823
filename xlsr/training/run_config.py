"""The run sections every task's config shares (hydra structured configs): process group, checkpoints, the
optimiser's common fields; and how a hydra app's config is composed (``xlsr/conf/<name>.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


@dataclass
class DistributedConfig:
    """Process-group settings; world size and ranks come from torchrun's environment."""

    backend: str = "auto"
    """torch.distributed backend; auto: nccl on GPU, gloo on CPU. fairseq ``distributed_training.distributed_backend``
    (XLS-R: nccl)."""

    timeout_minutes: int = 30
    """Timeout of collective operations (``init_process_group``'s ``timeout``), in minutes."""

    strategy: str = "ddp"
    """ddp: every rank holds the whole model, optimizer state and gradients (DistributedDataParallel); fsdp: each
    rank holds 1/N of them (FSDP2 ``fully_shard`` per transformer layer, xlsr/training/sharding.py) and writes only
    its shard of each checkpoint. For XLS-R 1B / 2B. fairseq: ``distributed_training.ddp_backend`` (fully_sharded)."""

    shard_group_size: int = 0
    """With ``strategy=fsdp``: shard within groups of this many consecutive ranks (one node: its GPU count) and
    replicate across groups (hybrid sharding); 0 = shard over all ranks."""


@dataclass
class CheckpointConfig:
    """Training checkpoints (``checkpoint_<update>.pt``: model, optimizer, RNG and data position)."""

    dir: str = "checkpoints"
    """Folder of the training checkpoints, relative to ``output_dir``. fairseq ``checkpoint.save_dir``."""

    save_interval_updates: int = 1000
    """Save every this many updates (and at the end of the run). XLS-R: 25000. fairseq has the same name."""

    keep_last: int = 3
    """Keep only the newest this many checkpoints; 0 = keep all. fairseq ``checkpoint.keep_interval_updates``
    (XLS-R: 1)."""

    resume: str = "auto"
    """auto: continue from the newest readable checkpoint in ``dir`` if any; never: start a new run; or a path to
    start from. A new run first moves an earlier run's outputs to ``output_dir/previous_runs/``."""

    best_metric: str = ""
    """Keep the model of the best validation so far in ``output_dir/best/`` (a ``from_pretrained`` folder with
    ``best.json`` naming the metric, its value and the update), by this value of the valid line: ``loss`` (and for
    fine-tuning ``wer`` or ``cer``); "" = none. ``model/`` stays the final model. The best value so far is part of
    every training checkpoint, so a resumed run compares with it. Pretraining's default: "" (a copy of the model
    at each improvement costs time and disk); fine-tuning's: ``wer``, as fairseq's XLS-R ``finetune.yaml``.
    fairseq ``checkpoint.best_checkpoint_metric`` (it writes ``checkpoint_best.pt``)."""

    maximize_best_metric: bool = False
    """Higher is better for ``best_metric`` (false for loss, WER, CER). fairseq
    ``checkpoint.maximize_best_checkpoint_metric``."""


@dataclass
class RunOptimConfig:
    """The ``optim`` fields every task has: AdamW, the run's length, clipping, accumulation, the fp16 loss scale.
    A task's ``optim`` subclasses it with its schedule's fields (and its recipe's defaults): pretraining's
    polynomial decay (:class:`xlsr.pretrain.config.OptimConfig`), CTC's tri-stage
    (:class:`xlsr.finetune.config.FineTuneOptimConfig`). fairseq keeps these in ``optimization`` / ``optimizer``."""

    lr: float = 5e-4
    """Peak learning rate. fairseq ``optimization.lr`` (a one-element list there)."""

    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    """Adam ``(beta1, beta2)``. XLS-R and BASE: [0.9, 0.98]. fairseq ``optimizer.adam_betas``."""

    eps: float = 1e-6
    """Adam epsilon. fairseq ``optimizer.adam_eps``."""

    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay, on every parameter as fairseq's Adam."""

    max_update: int = 400000
    """Length of the schedule and of the run. fairseq ``optimization.max_update``."""

    clip_norm: float = 0.0
    """Clip the gradient's global L2 norm to this; 0 = no clipping (XLS-R). fairseq ``optimization.clip_norm``."""

    update_freq: int = 1
    """Gradient accumulation: micro-batches per update. XLS-R: 1 (on 128 GPUs). fairseq ``optimization.update_freq``
    (a one-element list there)."""

    fp16_init_scale: float = 128.0
    """With ``precision=fp16``: the loss scale to start from. XLS-R: 128. fairseq ``common.fp16_init_scale``."""

    step_in_backward: bool = False
    """Memory saver: update each parameter inside backward and free its gradient at once (the same updates; no
    gradient for every weight held). One process, update_freq 1, no clipping, not fp16. See xlsr/training/optim.py."""


@dataclass
class RunConfig:
    """The fields every task's run config has: process group, checkpoints, output, seed, device, precision,
    stopping, logging, validation schedule. A task's config subclasses it and adds its own sections (``model``,
    ``data``, ``optim``, ...)."""

    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Distributed group: backend and timeout."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training checkpoints: where, how often, how many, resuming."""

    output_dir: str = "runs/train"
    """Where the run writes config.yaml, metrics.jsonl, tensorboard/, checkpoints and the final ``model/`` (also
    hydra's run dir); each task's config sets its own default."""

    seed: int = 1
    """Seed of the initial weights and of every batch's RNG (from seed, epoch and batch index). XLS-R: 1.
    fairseq ``common.seed``."""

    device: str = "auto"
    """auto: cuda if available, else cpu; or a torch device name (on cuda each rank takes its LOCAL_RANK's GPU)."""

    precision: str = "fp32"
    """fp32 | bf16 | fp16: autocast dtype of the forward (weights stay fp32; fp16 adds loss scaling). The XLS-R run
    used fairseq's fp16 (``common.fp16``)."""

    max_epoch: int = 0
    """Stop after this many epochs; 0 = no limit (stop at ``optim.max_update``). fairseq ``optimization.max_epoch``."""

    max_time_minutes: float = 0.0
    """Stop cleanly, with a checkpoint, after this much wall time; 0 = no limit. (fairseq's
    ``optimization.stop_time_hours``, in hours.)"""

    stop_at_update: int = 0
    """Stop cleanly (with a checkpoint) at this update without changing the LR schedule; 0 = no."""

    log_interval: int = 10
    """Updates between "train" log lines (the first and last update are always logged). XLS-R: 200.
    fairseq ``common.log_interval``."""

    validate_interval_updates: int = 0
    """Validate every this many updates (then not at epoch ends); 0 = at the end of every epoch only.
    fairseq ``dataset.validate_interval_updates``."""

    validate_after_updates: int = 0
    """No validation before this update (neither at the interval nor at epoch ends).
    fairseq ``dataset.validate_after_updates``."""

    max_valid_batches: int = 0
    """Validate on at most this many batches per rank; 0 = the whole valid set.
    (fairseq ``dataset.max_valid_steps``.)"""

    tensorboard: bool = True
    """Also write tensorboard event files to ``output_dir/tensorboard`` (when tensorboard is installed)."""

    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0 (fairseq: ``common.no_progress_bar``, inverted)."""

    threads: int = 0
    """torch.set_num_threads (CPU intra-op threads); 0 = leave torch's default."""


# Package data (declared in pyproject.toml), so a wheel install finds it too; shared by the package's hydra apps.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_app_config(config_name: str, schema: type, overrides: list[str] | None = None) -> Any:
    """The typed config a hydra app of ``xlsr/conf/<config_name>.yaml`` would use with these overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        output_dir = cfg.output_dir  # resolves ${hydra:...}
        values = OmegaConf.to_container(cfg, resolve=False)
    values.pop("hydra")
    values["output_dir"] = output_dir
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
