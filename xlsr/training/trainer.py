"""The training engine: one process on a CPU up to many GPUs and nodes with ``torchrun`` (DDP or FSDP).

Every batch of every epoch trains, in every layout. The epoch's batch list is the same on every rank; rank r of K
takes batches r, r + K, ...; when K does not divide the batch count, the ranks left without one in the last round
run a zero-weight "dummy" pass (as fairseq does) so that all ranks take part in the gradient all-reduce.

Randomness is tied to the data, not to the process layout: before each micro-batch the RNGs are seeded from
(seed, epoch, global batch index), and LayerDrop decisions are drawn once per update (the same for every
micro-batch and rank). So one process with ``optim.update_freq=K`` and K ranks train the same batches with the
same masks, negatives, dropout and layers, and a resumed run continues exactly.

``distributed.strategy=fsdp`` shards parameters, gradients and optimizer state over the ranks (``sharding.py``) and
writes sharded checkpoints (``xlsr/checkpoints/sharded.py``); the loop is the same.

What is particular to a task (model, data, loss, logged values, schedule) comes from its
:class:`~xlsr.training.task.Task`; this module imports no task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, NoReturn

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from xlsr.checkpoints.sharded import load_full_into, load_sharded_into, save_sharded
from xlsr.config import Wav2Vec2Config
from xlsr.data.batch import AudioBatch
from xlsr.data.source import training_data, validation_data
from xlsr.files import write_text_atomic
from xlsr.model import Wav2Vec2Model
from xlsr.training import checkpointing, run_lock
from xlsr.training.metrics import MetricsLog
from xlsr.training.task import Task, task_for
from xlsr.training.sharding import (
    STRATEGIES,
    build_on_rank0,
    device_mesh,
    gather_full_state_dict,
    load_from_rank0,
    shard_model,
    unsharded_copy,
)
from xlsr.training.optim import (
    StepInBackward,
    attach_step_in_backward,
    build_optimizer,
    gradient_scale,
    optimizer_step,
    return_large_blocks_to_os,
    set_lr,
    step_in_backward_conflicts,
)

logger = logging.getLogger("xlsr.training")

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _batch_seed(seed: int, epoch: int, batch_index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + batch_index) % (2**63 - 1)


def run_command(trainer_class: type["Trainer"], cfg, log: logging.Logger) -> None:
    """``trainer_class(cfg).train()`` (the task registered for ``cfg``'s class) for a command line (``python -m xlsr.pretrain`` / ``xlsr.finetune``).

    Bad input found while setting up (a missing manifest, label or checkpoint file, an unreadable file, a wrong
    setting, an ``output_dir`` another live run writes) ends the program with its one-line message (exit code 2)
    instead of a traceback; an error during training is logged with its traceback (exit code 1). The run's
    ``output_dir/.lock`` is removed however the program ends.

    A process that made a process group (torchrun, or FSDP in one process) ends in :func:`_exit_process`, not in
    the interpreter's shut-down: gloo's worker threads release the tensors of the last collective after the caller
    has its result, and a worker that needs the GIL for that while Python 3.11 shuts down is stopped inside a C++
    destructor, which aborts the process ("terminate called without an active exception", exit code 134, whatever
    the run's outcome; seen in 1 of ~40 error exits right after a collective on a loaded machine)."""
    trainer = None
    try:
        try:
            trainer = trainer_class(cfg)
        except (OSError, ValueError) as err:  # FileNotFoundError, CheckpointError, LabelError, AudioError, ...
            logger.error("%s", err)
            raise SystemExit(2) from None
        if trainer.is_main:
            log.info("writing to %s", trainer.output_dir.resolve())
        trainer.train()
    except BaseException as err:  # every way out must reach _exit_process once a group exists
        run_lock.release_all()
        if not dist.is_initialized():
            raise
        _exit_process(_exit_code(err), trainer, err)
    run_lock.release_all()
    if dist.is_initialized():
        _exit_process(0, trainer)


def _exit_process(code: int, *keep_alive: object) -> NoReturn:
    """Destroy the process group, flush logs and streams, and end the process with ``code`` (``os._exit``).

    ``keep_alive``: what may hold the group's last references (the trainer, an exception's frames); they are
    not freed before the exit, so the group is never destructed here (that would join its worker threads while
    this thread holds the GIL they may be waiting for)."""
    world = dist.group.WORLD  # noqa: F841 (kept, as keep_alive is: the default group outlives its destruction)
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_code(err: BaseException) -> int:
    """The exit code the interpreter would give ``err``; an error's traceback goes to the log."""
    if isinstance(err, SystemExit):
        if err.code is None or isinstance(err.code, int):
            return err.code or 0
        print(err.code, file=sys.stderr)
        return 1
    if isinstance(err, KeyboardInterrupt):
        logger.error("interrupted")
        return 130
    logger.error("training failed", exc_info=err)
    return 1


class Trainer:
    """Builds everything from a run config and runs ``train()``: the loop, DDP / FSDP, mixed precision,
    checkpoints and exact resume, for any task.

    Args:
        cfg: the run config (``PretrainConfig``, ``FineTuneConfig``, ...).
        task: what to train; by default the task registered for ``cfg``'s class
            (:func:`xlsr.training.task.register_task`).
    """

    def __init__(self, cfg: Any, task: Task | None = None):
        self.cfg = cfg
        self.train_data = training_data(cfg.data)  # a manifest path, or a name like lhotse-shar:DIR
        self.valid_data = validation_data(cfg.data)
        self.task = task if task is not None else task_for(cfg)
        if cfg.distributed.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {cfg.distributed.strategy!r}")
        self.sharded = cfg.distributed.strategy == "fsdp"
        if cfg.precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {cfg.precision!r}")
        self.autocast_dtype = _DTYPES[cfg.precision]
        self._check_best_metric()
        self.rank, self.world_size, local_rank = self._init_distributed()
        self.is_main = self.rank == 0
        self.device = self._pick_device(local_rank)
        self.num_updates = 0
        self.task.bind(self)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_dir = self.output_dir / cfg.checkpoint.dir
        self.output_lock: Path | None = self._lock_output_dir()  # before anything is written there

        torch.manual_seed(cfg.seed)
        self.model: torch.nn.Module
        self.model_cfg: Wav2Vec2Config
        self.ddp_model: DistributedDataParallel | None = None
        if self.sharded:
            self._build_sharded_model()
        else:
            self._build_replicated_model(local_rank)
        self.forward_model = self.ddp_model if self.ddp_model is not None else self.model
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, self.device)
        self.step_in_backward = self._attach_step_in_backward()
        scaler_class = ShardedGradScaler if self.sharded else torch.amp.GradScaler  # sharded: inf checks all-reduced
        self.scaler = scaler_class(
            self.device.type, init_scale=cfg.optim.fp16_init_scale, enabled=cfg.precision == "fp16"
        )

        self.num_updates = 0
        self.epoch = 1
        self._resume_position: dict[str, int] | None = None  # the training loader's position in a checkpoint
        self.layerdrop_generator = torch.Generator()
        self.metrics = MetricsLog(self.output_dir, enabled=self.is_main, tensorboard=cfg.tensorboard,
                                  headline=self.task.HEADLINE)
        self._saved_update = -1  # the update of the newest checkpoint on disk for this run
        self._logged_update = -1  # the update of the newest "train" line
        self.best: dict[str, Any] | None = None  # checkpoint.best_metric: the best validation so far (best.json)
        self._resume_or_start_fresh()
        if self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.structured(cfg), self.output_dir / "config.yaml")
        self.metrics.open()
        self.model.set_num_updates(self.num_updates)

        self.train_loader = self.task.build_loader(self.train_data, epoch=self.epoch)
        if self._resume_position is not None:
            self.train_loader.load_state_dict(self._resume_position)
        self.valid_loader = None
        if self.valid_data is not None:
            self.valid_loader = self.task.build_loader(self.valid_data, epoch=1, shuffle=False)
        self._dummy_batch: AudioBatch | None = None  # what a rank without a batch runs at zero weight (DDP, FSDP)
        self.epoch_totals = self.task.new_totals()  # this epoch's updates, for the end-of-epoch line
        self._epoch_updates = 0
        self._epoch_data_batches = 0  # batches with data this rank ran in this pass over the epoch
        self.task.output_ready()

    # ------------------------------------------------------------------ setup
    def _init_distributed(self) -> tuple[int, int, int]:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1 and not self.sharded:
            return 0, 1, 0
        backend = self.cfg.distributed.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and self.cfg.device != "cpu" else "gloo"
        if not dist.is_initialized():
            timeout = timedelta(minutes=self.cfg.distributed.timeout_minutes)
            if "MASTER_ADDR" in os.environ:  # torchrun
                dist.init_process_group(backend, timeout=timeout)
            else:  # FSDP in one process without torchrun: a group of one, its store in memory
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))

    def _build_replicated_model(self, local_rank: int) -> None:
        """DDP (or one process): the whole model on every rank."""
        self.model = self.task.build_model().to(self.device)
        self.model_cfg = self.encoder_model().cfg
        if self.cfg.model.compile:
            self.encoder_model().compile_encoder(dynamic=True)  # batch lengths vary: one graph for all of them
        if self.world_size > 1:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.task.find_unused_parameters(self.model),
            )

    def _build_sharded_model(self) -> None:
        """FSDP: the model built on rank 0 (the others on the meta device), sharded, rank 0's weights sent out."""
        cfg = self.cfg
        if self.device.type == "cpu":  # layers' parameters and gradients are gathered and freed all the time
            return_large_blocks_to_os()
        self.model, full_state = build_on_rank0(self.task.build_model, self.task.model_recipe, self.rank)
        self._recipe = self.task.model_recipe(self.model)
        self.model_cfg = self.encoder_model().cfg
        encoder = self.encoder_model()
        encoder.set_activation_checkpointing(cfg.model.activation_checkpointing)
        if cfg.model.compile:
            encoder.compile_encoder(dynamic=True)
        mesh = device_mesh(self.world_size, cfg.distributed.shard_group_size, self.device.type)
        shard_model(self.model, encoder.encoder.layers, mesh, self.autocast_dtype)
        load_from_rank0(self.model, full_state, self.device)
        if self.is_main:
            shards = "all ranks" if mesh.ndim == 1 else f"groups of {mesh.size(1)}, replicated {mesh.size(0)}x"
            logger.info("fsdp: %d ranks, sharded over %s", self.world_size, shards)

    def _pick_device(self, local_rank: int) -> torch.device:
        """``device``: auto (cuda if available, else cpu), cpu, cuda (this rank's GPU: cuda:LOCAL_RANK under
        torchrun, cuda:0 alone) or cuda:N (that GPU, made the current device; one process per node only)."""
        choice = self.cfg.device
        if choice == "auto":
            choice = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(choice)
        except RuntimeError:
            raise ValueError(f"device={choice!r} is not a device: auto, cpu, cuda or cuda:N") from None
        if device.type != "cuda":
            return device
        if not torch.cuda.is_available():
            raise ValueError(f"device={choice}: CUDA is not available here (device=cpu, or device=auto)")
        if device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ValueError(f"device={choice} would put every process of this node on one GPU; use device=cuda (each "
                             "process takes cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose the GPUs")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={choice}: cuda:{index} does not exist, {torch.cuda.device_count()} CUDA "
                             "device(s) are visible (CUDA_VISIBLE_DEVICES numbers them from 0)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def _lock_output_dir(self) -> Path | None:
        """Rank 0 takes ``output_dir/.lock`` (:mod:`xlsr.training.run_lock`); returns its path (None on the other
        ranks). If another live run holds it, every rank raises rank 0's error (decided before any other
        collective, so no rank waits for the others)."""
        lock, error = None, None
        if self.is_main:
            try:
                lock = run_lock.acquire(self.output_dir)
            except run_lock.OutputDirLockedError as err:
                error = str(err)
        if self.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise run_lock.OutputDirLockedError(error)
        return lock

    def _attach_step_in_backward(self) -> StepInBackward | None:
        if not self.cfg.optim.step_in_backward:
            return None
        o = self.cfg.optim
        conflicts = step_in_backward_conflicts(self.world_size, o.update_freq, o.clip_norm, self.cfg.precision)
        if self.sharded:
            conflicts.append("distributed.strategy=fsdp")
        if conflicts:
            raise ValueError("optim.step_in_backward=true cannot be combined with " + "; ".join(conflicts))
        return attach_step_in_backward(self.optimizer, self.model.parameters(), self.device)

    def encoder_model(self) -> Wav2Vec2Model:
        """The ``Wav2Vec2Model`` inside the trained model (the task says which)."""
        return self.task.encoder(self.model)

    def _check_best_metric(self) -> None:
        metric = self.cfg.checkpoint.best_metric
        allowed = self.task.BEST_METRICS
        if metric and metric not in allowed:
            raise ValueError(f"checkpoint.best_metric={metric!r}: must be one of {', '.join(allowed)} "
                             "(a value of the valid line), or empty for none")

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The training checkpoint (layout in ``checkpointing.py``)."""
        return checkpointing.training_state(self.model, self.optimizer, self._progress_state())

    def _progress_state(self) -> dict[str, Any]:
        """Everything in a checkpoint but model and optimizer (a sharded checkpoint's ``trainer_state.pt``)."""
        return checkpointing.progress_state(
            self.model.cfg.to_dict(), self.scaler, num_updates=self.num_updates, epoch=self.epoch,
            batches_done_in_epoch=self.train_loader.position,
            epoch_offset=self.train_loader.state_dict()["epoch_offset"],
            config=OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True), best=self.best,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint of either kind (``.pt`` or sharded folder) into this run's model, of either strategy."""
        if "sharded_path" in state:  # torch.distributed.checkpoint reshards to this run's layout
            load_sharded_into(self.model, self.optimizer, state["sharded_path"])
        elif self.sharded:  # a full checkpoint (memory-mapped on every rank): each rank keeps its shards
            load_full_into(self.model, self.optimizer, state["model"], state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.num_updates, self.epoch, batches_done = checkpointing.restore_progress(state, self.scaler)
        self._resume_position = self._loader_position(batches_done, state)
        best = state.get("best")
        self.best = best if best is not None and best["metric"] == self.cfg.checkpoint.best_metric else None

    def _loader_position(self, batches_done: int, state: dict[str, Any]) -> dict[str, int]:
        """The training loader's position (:meth:`BatchLoader.load_state_dict`) in a checkpoint written by
        ``state["world_size"]`` ranks: with another number of ranks the loader continues the epoch at its first
        global batch not yet trained, every rank from there."""
        saved_world = int(state.get("world_size", self.world_size))
        saved_strategy = state.get("strategy", "ddp")
        offset = int(state.get("epoch_offset", 0))
        if (saved_world, saved_strategy) != (self.world_size, self.cfg.distributed.strategy) and self.is_main:
            logger.warning("resuming a checkpoint of %d rank(s) (%s) on %d rank(s) (%s): epoch %d continues at its "
                           "batch %d", saved_world, saved_strategy, self.world_size, self.cfg.distributed.strategy,
                           self.epoch, offset + batches_done * saved_world)
        return {"epoch": self.epoch, "batches_done_in_epoch": batches_done, "epoch_offset": offset,
                "num_replicas": saved_world}

    def save_checkpoint(self) -> Path | None:
        if self.sharded:
            return self._save_sharded_checkpoint()
        path = None
        if self.is_main:
            path = checkpointing.save_atomic(
                self.state_dict(), checkpointing.checkpoint_path(self.checkpoint_dir, self.num_updates)
            )
            checkpointing.prune(self.checkpoint_dir, self.cfg.checkpoint.keep_last)
            logger.info("saved %s", path)
        self._saved_update = self.num_updates
        self._barrier()
        return path

    def _save_sharded_checkpoint(self) -> Path:
        path = checkpointing.sharded_checkpoint_path(self.checkpoint_dir, self.num_updates)
        state = self._progress_state() if self.is_main else {}
        save_sharded(self.model, self.optimizer, state, path, self.rank)
        if self.is_main:
            checkpointing.prune(self.checkpoint_dir, self.cfg.checkpoint.keep_last)
            logger.info("saved %s (%d shards)", path, self.world_size)
        self._saved_update = self.num_updates
        self._barrier()
        return path

    def save_final_model(self) -> None:
        """``output_dir/model``: a ``save_pretrained`` folder (FSDP: gathered on rank 0, a tensor at a time)."""
        self._save_model_folder(self.output_dir / "model")

    def _save_model_folder(self, out: Path, record: dict[str, Any] | None = None) -> None:
        """The model as a ``save_pretrained`` folder at ``out``, written as ``out.tmp`` and renamed (rank 0 writes;
        FSDP: every rank takes part in gathering the full state dict). ``record``: also ``best.json`` inside."""
        full_state = gather_full_state_dict(self.model) if self.sharded else None
        if self.is_main:
            tmp = out.with_name(out.name + ".tmp")
            checkpointing.remove_path(tmp)
            model = unsharded_copy(self._recipe, full_state) if self.sharded else self.model
            model.save_pretrained(tmp)
            if record is not None:
                write_text_atomic(tmp / checkpointing.BEST_RECORD, json.dumps(record, indent=1) + "\n")
            checkpointing.replace_directory(tmp, out)
        self._barrier()

    def _keep_if_best(self, record: dict[str, Any]) -> None:
        """``checkpoint.best_metric``: if this validation beats the best so far, its model goes to ``best/``."""
        metric = self.cfg.checkpoint.best_metric
        if not metric or metric not in record:
            return
        better = checkpointing.is_better(float(record[metric]), self.best, self.cfg.checkpoint.maximize_best_metric)
        if self.world_size > 1:  # one decision for all ranks (FSDP gathers the weights collectively)
            decision = torch.tensor([float(better)], device=self.device)
            dist.broadcast(decision, src=0)
            better = bool(decision.item())
        if not better:
            return
        self.best = {"metric": metric, "value": float(record[metric]), "update": self.num_updates}
        self._save_model_folder(self.output_dir / checkpointing.BEST_DIR, self.best)
        if self.is_main:
            logger.info("best %s so far: %g at update %d -> %s", metric, self.best["value"], self.num_updates,
                        self.output_dir / checkpointing.BEST_DIR)

    def _resume_or_start_fresh(self) -> None:
        """``checkpoint.resume``: auto = continue this output_dir's run from its newest readable checkpoint;
        never = start a new run; a path = start from that checkpoint. A new run first moves an earlier run's
        outputs in output_dir to ``previous_runs/<time>/`` (checkpointing.archive_previous_run)."""
        choice = self.cfg.checkpoint.resume
        state, path, unreadable = None, None, []
        if choice == "auto":
            state, path, unreadable = checkpointing.newest_readable_checkpoint(self.checkpoint_dir, logger.warning)
        elif choice != "never":
            path = Path(choice)
            state = checkpointing.load_training_checkpoint(path)
        if state is not None:
            self.load_state_dict(state)
            del state
        if choice != "auto":  # a new run (earlier outputs archived): its own best/
            self.best = None
        self._barrier()  # every rank has read the checkpoint before rank 0 moves files
        if self.is_main:
            for bad in unreadable:  # kept for inspection, never picked again
                bad.rename(bad.with_name(bad.name + ".unreadable"))
            if choice == "auto" and path is not None:
                self.metrics.drop_after(self.num_updates)  # lines after the checkpoint are logged again
            else:
                archive = checkpointing.archive_previous_run(self.output_dir, self.checkpoint_dir)
                if archive is not None:
                    logger.warning("%s held an earlier run: moved its outputs to %s", self.output_dir, archive)
            if path is not None:
                logger.info("resumed from %s at update %d (epoch %d, batch %d)", path, self.num_updates,
                            self.epoch, self._resume_position["batches_done_in_epoch"])
        if choice == "auto" and path is not None:
            self._saved_update = self.num_updates
        self._barrier()

    # ------------------------------------------------------------------ training
    def _update_groups(self) -> Iterator[list[tuple[int, AudioBatch | None]]]:
        """This rank's rest of the epoch as updates: lists of ``update_freq`` (global batch index, batch or None)."""
        loader = self.train_loader
        group: list[tuple[int, AudioBatch | None]] = []
        for batch in loader:
            group.append((loader.global_index(loader.position - 1), batch))
            if len(group) == self.cfg.optim.update_freq:
                yield group
                group = []
        if group:
            yield group

    def _stop_reason(self, start_time: float) -> str | None:
        cfg = self.cfg
        if self.num_updates >= cfg.optim.max_update:
            return f"optim.max_update={cfg.optim.max_update} reached"
        if 0 < cfg.stop_at_update <= self.num_updates:
            return f"stop_at_update={cfg.stop_at_update} reached"
        if cfg.max_epoch and self.epoch > cfg.max_epoch:
            return f"max_epoch={cfg.max_epoch} done"
        if cfg.max_time_minutes > 0 and time.monotonic() - start_time > 60 * cfg.max_time_minutes:
            return f"max_time_minutes={cfg.max_time_minutes:g} used"
        return None

    def train(self) -> dict[str, Any]:
        """Train until a stop condition; log, validate and checkpoint at their intervals. Returns the last record."""
        cfg = self.cfg
        start_time = time.monotonic()
        progress = self._progress_bar()
        last: dict[str, Any] = {}
        while (reason := self._stop_reason(start_time)) is None:  # one pass = (the rest of) one epoch
            self._epoch_data_batches = 0
            batches_left = self.train_loader.position < self.train_loader.total_batches
            for group in self._update_groups():
                # 1. forward + backward of each micro-batch, then the optimizer update
                record = self.train_step(group)  # the loader's position has moved past the group
                if record is None:  # fp16 overflow, or no data in the whole update: no update was made
                    continue
                last = record
                self._show_progress(progress, record)
                # 2. log, validate, checkpoint at their intervals
                if self.num_updates % cfg.log_interval == 0 or self.num_updates == 1:
                    self._log_train(record)
                if cfg.validate_interval_updates and self.num_updates % cfg.validate_interval_updates == 0:
                    self._scheduled_validation()
                if self.num_updates % cfg.checkpoint.save_interval_updates == 0:
                    self.save_checkpoint()
                if self._stop_reason(start_time) is not None:
                    break
            # 3. the epoch's summary line; the next epoch if this one is done
            complete = self.train_loader.position >= self.train_loader.total_batches
            loaded_none = self._epoch_data_batches == 0 and not self.epoch_totals.values["num_batches"]
            if batches_left and complete and loaded_none:
                raise RuntimeError(f"epoch {self.epoch}: no batch of {self.train_data} could be loaded")
            self._end_epoch(complete)
        # 4. the end: last update logged, a checkpoint of it, the final model
        if progress is not None:
            progress.close()
        if last and self._logged_update != self.num_updates:
            self._log_train(last)
        if self._saved_update != self.num_updates:
            self.save_checkpoint()
        if self.is_main:
            logger.info("stopped at update %d: %s", self.num_updates, reason)
        self.save_final_model()
        self.metrics.close()
        if self.output_lock is not None:
            run_lock.release(self.output_lock)
        return last

    def _show_progress(self, progress, record: dict[str, Any]) -> None:
        if progress is not None:
            progress.update(1)
            progress.set_postfix({name: fmt.format(record[key]) for key, name, fmt in (*self.task.PROGRESS, ("audio_sec_per_sec", "aps", "{:.0f}"))
                                  if key in record})

    def _progress_bar(self):
        if not (self.is_main and self.cfg.progress_bar):
            return None
        cfg = self.cfg
        total = cfg.stop_at_update or (None if cfg.max_time_minutes else cfg.optim.max_update)
        return tqdm(total=total, initial=self.num_updates, unit="upd", dynamic_ncols=True)

    def _log_train(self, record: dict[str, Any]) -> None:
        self.metrics.log("train", self.num_updates, record)
        self._logged_update = self.num_updates

    def _end_epoch(self, complete: bool) -> None:
        """The end-of-epoch line (fairseq's "end of epoch N"), then, if the epoch is done, the next epoch."""
        if self.epoch_totals.values["num_batches"] > 0:
            record = self.task.record(self.epoch_totals.values)
            record.update(epoch=self.epoch, complete=complete, updates=self._epoch_updates,
                          skipped_files=self.train_loader.num_skipped)
            self.metrics.log("epoch", self.num_updates, record)
        self.epoch_totals = self.task.new_totals()
        self._epoch_updates = 0
        if not complete:
            return
        if self.valid_loader is not None and not self.cfg.validate_interval_updates:
            self._scheduled_validation()
        self.epoch += 1
        self.train_loader.set_epoch(self.epoch)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _layer_keep(self) -> list[bool]:
        """LayerDrop decisions of this update, the same for every micro-batch and rank (seeded by the update)."""
        self.layerdrop_generator.manual_seed(_batch_seed(self.cfg.seed + 7, self.num_updates, 0))
        return self.encoder_model().encoder.sample_layer_keep(self.layerdrop_generator)

    def _dummy(self) -> AudioBatch:
        """A batch for a rank that has none (run at zero weight): the first it trained, else seeded noise, made
        valid for the task (:meth:`Task.dummy_batch`)."""
        if self._dummy_batch is None:
            data = self.cfg.data
            length = max(data.min_sample_size, 16000)
            if data.max_sample_size:
                length = min(length, data.max_sample_size)
            noise = torch.randn(1, length, generator=torch.Generator().manual_seed(0))
            self._dummy_batch = AudioBatch(source=noise, padding_mask=None, ids=torch.zeros(1, dtype=torch.long))
        return self.task.dummy_batch(self._dummy_batch)

    def train_step(self, group: list[tuple[int, AudioBatch | None]]) -> dict[str, float] | None:
        """One optimizer update over ``update_freq`` micro-batches (gradients summed, then normalised by the
        number of masked frames of all of them on all ranks). Returns the update's record, or None when no update
        was made (fp16 overflow, or not one usable batch on any rank)."""
        cfg = self.cfg
        self.model.train()
        step_start = time.monotonic()
        totals = self.task.new_totals()
        lr = self.task.learning_rate(self.num_updates + 1)
        set_lr(self.optimizer, lr)
        layer_keep = self._layer_keep()
        # forward + backward of each micro-batch; gradients add up (DDP all-reduces them on the last one)
        for micro_step, (global_index, batch) in enumerate(group):
            weight = 1.0
            if batch is None:  # an empty padding batch, or every file of the batch was unreadable
                if self.world_size == 1:
                    continue
                batch, weight = self._dummy(), 0.0  # this rank must still join the collectives (DDP, FSDP)
            else:
                self._epoch_data_batches += 1
                if self._dummy_batch is None:
                    self._dummy_batch = batch
            torch.manual_seed(_batch_seed(cfg.seed, self.epoch, global_index))
            last_micro = micro_step == len(group) - 1
            sync = contextlib.nullcontext() if (self.ddp_model is None or last_micro) else self.ddp_model.no_sync()
            batch = batch.to(self.device, non_blocking=True)
            with sync:
                with self._autocast():
                    out, loss = self.task.forward_and_loss(self.forward_model, batch, layer_keep)
                if self.step_in_backward is not None:  # one micro-batch, one process: its sample size is final
                    self.step_in_backward.grad_scale = gradient_scale(self.world_size, loss.sample_size)
                self.scaler.scale(loss.total * weight).backward()
            if weight:
                totals.add(loss, out, audio_seconds=batch.audio_seconds(self.model_cfg.sample_rate))

        # the update: normalised by the masked frames of all micro-batches on all ranks
        stats = totals.all_reduce(self.world_size, self.device)
        if stats["sample_size"] == 0:
            self.optimizer.zero_grad(set_to_none=True)
            if self.is_main:
                logger.warning("update %d had no usable batch on any rank: skipped", self.num_updates + 1)
            return None
        if self.step_in_backward is not None:  # the backward pass has already updated every parameter
            grad_norm, scale_before, overflow = self.step_in_backward.pop_grad_norm(), 1.0, False
        else:
            grad_norm, scale_before, overflow = optimizer_step(
                list(self.model.parameters()), self.optimizer, self.scaler,
                gradient_scale(self.world_size, stats["sample_size"]), cfg.optim.clip_norm,
            )
        if overflow:
            if self.is_main:
                logger.warning("fp16 gradient overflow at update %d: step skipped, loss scale -> %g",
                               self.num_updates + 1, self.scaler.get_scale())
            return None
        self.num_updates += 1
        self.model.set_num_updates(self.num_updates)
        self.epoch_totals.merge(stats)
        self._epoch_updates += 1

        elapsed = time.monotonic() - step_start
        record = self.task.record(stats)
        record.update(lr=lr, grad_norm=grad_norm, loss_scale=scale_before, epoch=self.epoch,
                      audio_sec_per_sec=stats["audio_seconds"] / max(elapsed, 1e-9))
        self.task.check_health(record)
        return record

    def _scheduled_validation(self) -> None:
        """A validation the schedule asks for (interval or epoch end): none before ``validate_after_updates``;
        its model kept in ``best/`` when it is the best so far."""
        if self.num_updates < self.cfg.validate_after_updates:
            return
        self._keep_if_best(self.validate())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss on the valid manifest in eval mode (masking still applied, as the original), fixed RNG per batch."""
        if self.valid_loader is None:
            return {}
        self.task.start_validation()
        self.model.eval()
        totals = self.task.new_totals()
        for index, batch in enumerate(self.valid_loader):
            if self.cfg.max_valid_batches and index >= self.cfg.max_valid_batches:
                break
            if batch is None:
                if self.sharded:  # the other ranks' forwards all-gather parameters with this one
                    with self._autocast():
                        self.task.forward_and_loss(self.model, self._dummy().to(self.device), None)
                continue
            torch.manual_seed(_batch_seed(self.cfg.seed, 0, index * self.world_size + self.rank))
            batch = batch.to(self.device, non_blocking=True)
            with self._autocast():
                out, loss = self.task.forward_and_loss(self.model, batch, None)
            totals.add(loss, out, audio_seconds=batch.audio_seconds(self.model_cfg.sample_rate))
            self.task.validation_batch_done(batch, out)
        stats = totals.all_reduce(self.world_size, self.device)
        record = self.task.record(stats)
        record.update(self.task.validation_extras())
        self.metrics.log("valid", self.num_updates, record)
        self.model.train()
        return record
