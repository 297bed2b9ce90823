"""The doctor's checks: short runs of the real code paths on one device, each PASS, FAIL or SKIP with its reason.

A check is a function ``(Context) -> str``: it returns what it found (PASS; or ``(str, dict)``: the dict goes to
the JSON report as the row's ``data``), raises :class:`Skip` with the reason
(SKIP) or :class:`CheckFailed` / any other exception (FAIL). Every check runs the same device-agnostic code on a CPU
and on a GPU; only what exists on CUDA alone (fused attention kernels, NCCL, pinned memory, TF32) branches on the
device, and :data:`CHECKS` marks the checks that are CUDA-only (SKIP on a CPU, with the reason).

Hidden ``--inject-fault NAME`` (:data:`FAULTS`) plants a fault in one path, to show that its check detects it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from xlsr.config import Wav2Vec2Config
from xlsr.model import Wav2Vec2Model
from xlsr.modules.masking import compute_mask_indices, sample_negatives

FAULTS = {
    "forward-cast": "the fp32 forward on the device gets its audio rounded to bf16 (a wrong dtype cast)",
    "resume-drift": "each resumed training run nudges a weight after loading its checkpoint (a resume that is "
                    "not exact)",
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# largest error of the device's forward against the float64 reference, as a fraction of the reference's largest
# value (fp32 with TF32 off; half precision: autocast, weights fp32). Seen on a CPU: fp32 1e-6, bf16 1.5e-2, fp16 2e-3.
FORWARD_TOLERANCE = {"fp32": 1e-5, "bf16": 5e-2, "fp16": 1e-2}

TRAIN_STEPS = 6
SAMPLE_RATE = 16000


class Skip(Exception):
    """The check does not apply here; the message says why."""


class CheckFailed(Exception):
    """The check ran and found something wrong; the message says what."""


@dataclass
class Context:
    """What the checks share: the device, a scratch folder, the data loader's worker count, a planted fault, and
    what one check makes for others (the synthetic corpus, the SDPA findings)."""

    device: torch.device
    workdir: Path
    num_workers: int = 2
    fault: str | None = None
    compile_timeout: float = 0.0  # seconds the CPU compile check may take (0: no limit; see compile_check)
    shared: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def corpus(self) -> Path:
        """train.tsv of 12 synthetic FLAC files (1.0 to 2.1 s, tones and noise), written once."""
        if "corpus" not in self.shared:
            self.shared["corpus"] = write_synthetic_corpus(self.workdir / "corpus")
        return self.shared["corpus"]


@dataclass
class CheckResult:
    """One row of the doctor's table."""

    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str  # what was found, the reason of a SKIP, or what failed
    seconds: float
    cuda_only: bool
    data: dict = field(default_factory=dict)  # what a check found besides its one line (JSON only)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Check:
    """A named check; ``cuda_only``: SKIP on a CPU (what it checks exists on CUDA only)."""

    name: str
    run: Callable[[Context], str | tuple[str, dict]]
    cuda_only: bool = False


def run_check(check: Check, ctx: Context) -> CheckResult:
    """Run ``check`` on ``ctx`` and time it; an exception is a FAIL with its type and message."""
    start = time.perf_counter()
    if check.cuda_only and not ctx.cuda:
        return CheckResult(check.name, "SKIP", "CUDA only (this run is on the CPU)", 0.0, True)
    data: dict = {}
    try:
        status, detail = "PASS", check.run(ctx)
        if isinstance(detail, tuple):
            detail, data = detail
    except Skip as why:
        status, detail = "SKIP", str(why)
    except CheckFailed as err:
        status, detail = "FAIL", str(err)
    except Exception as err:  # noqa: BLE001 (a check that crashes has found a fault: report it and go on)
        status, detail = "FAIL", f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if ctx.cuda:
        try:
            torch.cuda.synchronize(ctx.device)
            torch.cuda.empty_cache()
        except RuntimeError as err:  # an asynchronous CUDA error of this check's kernels
            status, detail = "FAIL", f"{detail}; then CUDA reported: {str(err).strip().splitlines()[0]}"
    return CheckResult(check.name, status, detail, time.perf_counter() - start, check.cuda_only, data)


# ---------------------------------------------------------------------------------------------- shared pieces
def tiny_config(**overrides) -> Wav2Vec2Config:
    """The tests' tiny architecture (2 layers of width 128) with every dropout and LayerDrop off."""
    settings = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0,
                    dropout_features=0.0, encoder_layerdrop=0.0)
    return Wav2Vec2Config.from_preset("tiny", **{**settings, **overrides})


def synthetic_wave(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A voice-like signal: harmonics of a random pitch under a syllable-rate envelope, plus noise; peak 0.3."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = rng.uniform(90, 250)
    wave = sum(np.sin(2 * np.pi * pitch * k * t + rng.uniform(0, 6)) / k for k in range(1, 8))
    wave = wave * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)) + 0.05 * rng.standard_normal(len(t))
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def example_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(source (2, 16000) normalised per utterance, padding_mask (2, 16000) bool): the second utterance is 0.75 s,
    zero-padded."""
    rng = np.random.default_rng(seed)
    source = torch.zeros(2, SAMPLE_RATE)
    padding = torch.zeros(2, SAMPLE_RATE, dtype=torch.bool)
    for row, seconds in enumerate((1.0, 0.75)):
        wave = torch.from_numpy(synthetic_wave(seconds, rng))
        source[row, : len(wave)] = (wave - wave.mean()) / wave.std()
        padding[row, len(wave):] = True
    return source, padding


def fixed_targets(model: Wav2Vec2Model, padding: torch.Tensor, device: torch.device, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A span mask (B, T) and negatives (B, T, N) on ``device`` for ``model`` on a batch with this ``padding``
    (B, S), drawn once from ``seed`` on the CPU, so that repeated steps differ only by their weights."""
    cfg = model.cfg
    lengths = model.feature_extractor.output_lengths((~padding).sum(-1))
    frames = int(model.feature_extractor.output_lengths(torch.tensor([padding.shape[1]]))[0])
    frame_padding = torch.arange(frames)[None, :] >= lengths[:, None]
    generator = torch.Generator().manual_seed(seed)
    mask = compute_mask_indices((padding.shape[0], frames), frame_padding, cfg.mask_prob, cfg.mask_length,
                                cfg.min_masks, generator=generator)
    negatives = sample_negatives(mask, cfg.num_negatives, frame_padding, generator=generator)
    return mask.to(device), negatives.to(device)


@contextlib.contextmanager
def true_fp32():
    """float32 matmuls and convolutions without TF32 (CUDA's default for cuDNN convolutions), restored after."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def autocast(device: torch.device, precision: str):
    """Autocast to ``precision``'s dtype on ``device`` (fp32: none), as the training engine runs the forward."""
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def require_precision(ctx: Context, precision: str) -> None:
    """Skip when this device cannot run ``precision``: bf16 needs compute capability 8.0 on CUDA."""
    if precision == "bf16" and ctx.cuda and torch.cuda.get_device_capability(ctx.device)[0] < 8:
        raise Skip("this GPU has no native bf16 (compute capability < 8.0): use fp16 here")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """max |value - reference| / max |reference|, in float64 on the CPU."""
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return float((value - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- forward
def forward_check(precision: str) -> Callable[[Context], str]:
    """The encoder's output (``extract_features``) on the device in ``precision`` against the float64 CPU
    reference, on a batch with padding."""

    def run(ctx: Context) -> str:
        require_precision(ctx, precision)
        torch.manual_seed(0)
        model = Wav2Vec2Model(tiny_config(), pretraining_head=False).eval()
        source, padding = example_batch()
        with torch.no_grad():
            reference = copy.deepcopy(model).double().extract_features(source.double(), padding)
        valid = ~reference.padding_mask
        model.to(ctx.device)
        source = source.to(ctx.device)
        if ctx.fault == "forward-cast" and precision == "fp32":
            source = source.to(torch.bfloat16).float()
        with torch.no_grad(), true_fp32(), autocast(ctx.device, precision):
            out = model.extract_features(source, padding.to(ctx.device)).x
        if not torch.isfinite(out).all():
            raise CheckFailed("the output has NaN or inf")
        error = relative_error(out[valid.to(ctx.device)], reference.x[valid])
        limit = FORWARD_TOLERANCE[precision]
        if not error <= limit:
            raise CheckFailed(f"differs from the float64 reference by {error:.1e} of its scale (limit {limit:.0e})")
        return f"error {error:.1e} of the float64 reference's scale (limit {limit:.0e})"

    return run


# ---------------------------------------------------------------------------------------------- training
def train_check(precision: str) -> Callable[[Context], str]:
    """``TRAIN_STEPS`` pretraining updates of the tiny model on one fixed batch (fixed masks, negatives and Gumbel
    noise), through the engine's pieces: ``compute_loss``, AdamW (``build_optimizer``: fused on CUDA), the fp16
    GradScaler and ``optimizer_step``. Every loss and gradient norm must be finite (an fp16 step the scaler skips
    for an overflow excepted, at most 2) and the last loss below the first."""

    def run(ctx: Context) -> str:
        from xlsr.pretrain.loss import compute_loss
        from xlsr.training.optim import build_optimizer, optimizer_step
        from xlsr.training.run_config import RunOptimConfig

        require_precision(ctx, precision)
        torch.manual_seed(0)
        model = Wav2Vec2Model(tiny_config()).to(ctx.device).train()
        source, padding = example_batch()
        mask, negatives = fixed_targets(model, padding, ctx.device)
        source, padding = source.to(ctx.device), padding.to(ctx.device)
        params = list(model.parameters())
        optimizer = build_optimizer(params, RunOptimConfig(lr=2e-3, weight_decay=0.0), ctx.device)
        scaler = torch.amp.GradScaler(ctx.device.type, init_scale=128.0, enabled=precision == "fp16")
        losses, overflows = [], 0
        for _ in range(TRAIN_STEPS):
            torch.manual_seed(0)  # the same Gumbel noise in every step
            with autocast(ctx.device, precision):
                out = model(source, padding, mask_indices=mask, negative_indices=negatives)
            loss = compute_loss(out, (0.1, 0.0))
            scaler.scale(loss.total).backward()
            norm, _, overflow = optimizer_step(params, optimizer, scaler, 1.0 / loss.sample_size, 0.0)
            overflows += overflow
            losses.append(float(loss.total.detach()) / loss.sample_size)
            if not math.isfinite(losses[-1]) or not (overflow or math.isfinite(norm)):
                raise CheckFailed(f"step {len(losses)}: loss {losses[-1]}, gradient norm {norm}")
        shown = " ".join(f"{value:.3f}" for value in losses)
        if overflows > 2:
            raise CheckFailed(f"{overflows} of {TRAIN_STEPS} fp16 steps overflowed (loss scale)")
        if not losses[-1] < losses[0]:
            raise CheckFailed(f"the loss did not fall: {shown}")
        return f"loss per masked frame {shown}" + (f"; {overflows} fp16 overflow(s) skipped" if overflows else "")

    return run


# ---------------------------------------------------------------------------------------------- attention
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def kernel_of(ops: list[str]) -> str:
    """The SDPA kernel that ran, from the aten ops it dispatched (math: no fused op, its matmuls)."""
    for op in ops:
        if "flash_attention" in op:
            return "flash" + (" (cpu)" if "for_cpu" in op else "")
        if "efficient_attention" in op:
            return "memory-efficient"
        if "cudnn_attention" in op:
            return "cudnn"
    return "math"


def dispatched_ops(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """``fn()`` and the names of the aten ops it dispatched (a ``TorchDispatchMode`` that records them)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        out = fn()
    return out, recorder.ops


def sdpa_kernels(ctx: Context) -> dict:
    """What the model's attention (:class:`xlsr.modules.transformer.SelfAttention`, XLS-R's head size 64) runs on
    this device, in bf16 on a GPU with bf16 (else fp16 on CUDA, fp32 on a CPU), without and with a padding mask:
    ``{case: {"default": kernel, "kernels": {backend: "ok" | reason}, "error": max error against math}}``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from xlsr.modules.transformer import SelfAttention

    if "sdpa" in ctx.shared:
        return ctx.shared["sdpa"]
    dtype = torch.float32
    if ctx.cuda:
        dtype = torch.bfloat16 if torch.cuda.get_device_capability(ctx.device)[0] >= 8 else torch.float16
    torch.manual_seed(0)
    attention = SelfAttention(256, 4).to(ctx.device, dtype).eval()
    x = torch.randn(2, 64, 256, device=ctx.device, dtype=dtype)
    keep = torch.ones(2, 1, 1, 64, dtype=torch.bool, device=ctx.device)
    keep[1, ..., 48:] = False  # True = may attend: the second utterance's last 16 frames are padding
    found = {"dtype": str(dtype).replace("torch.", "")}
    for case, attn_mask in (("unpadded", None), ("padded", keep)):
        with torch.no_grad():
            out, ops = dispatched_ops(lambda: attention(x, attn_mask))
            with sdpa_kernel([SDPBackend.MATH]):
                reference = attention(x, attn_mask)
            kernels, worst = {}, relative_error(out, reference)
            for name in SDPA_BACKENDS:
                if not hasattr(SDPBackend, name):
                    kernels[name] = f"not in torch {torch.__version__}"
                    continue
                # a backend that cannot run warns why, then raises "no available kernel": keep the warning
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        with sdpa_kernel([getattr(SDPBackend, name)]):
                            restricted = attention(x, attn_mask)
                    except RuntimeError as err:
                        why = [str(w.message) for w in caught] + [str(err)]
                        kernels[name] = " ".join(why[0].split())[:120]
                        continue
                kernels[name] = "ok"
                worst = max(worst, relative_error(restricted, reference))
        found[case] = {"default": kernel_of(ops), "kernels": kernels, "error": worst}
    ctx.shared["sdpa"] = found
    return found


def sdpa_check(ctx: Context) -> tuple[str, dict]:
    """Which SDPA kernel the model's attention runs (unpadded and padded batches), and which others are available
    (the JSON has why the others are not); every kernel that runs must equal the math kernel."""
    found = sdpa_kernels(ctx)
    limit = 1e-5 if found["dtype"] == "float32" else 2e-2
    parts = []
    for case in ("unpadded", "padded"):
        info = found[case]
        if not info["error"] <= limit:
            raise CheckFailed(f"{case}: a kernel differs from the math kernel by {info['error']:.1e} (limit {limit:.0e})")
        available = [name.split("_")[0].lower() for name, state in info["kernels"].items() if state == "ok"]
        parts.append(f"{case}: {info['default']} (available: {', '.join(available)})")
    return f"{found['dtype']}; " + "; ".join(parts), found


def sdpa_fused_check(ctx: Context) -> str:
    """CUDA: the model's attention runs a fused kernel (flash, memory-efficient or cuDNN), not the math kernel
    (which stores the T x T scores: slower, and memory quadratic in the length), for padded batches too."""
    found = sdpa_kernels(ctx)
    slow = [case for case in ("unpadded", "padded") if found[case]["default"] == "math"]
    if slow:
        raise CheckFailed(f"{', '.join(slow)} attention runs the math kernel ({found['dtype']}): no fused SDPA "
                          f"kernel for this GPU / torch build ({found[slow[0]]['kernels']})")
    return f"unpadded: {found['unpadded']['default']}, padded: {found['padded']['default']} ({found['dtype']})"


# ---------------------------------------------------------------------------------------------- torch.compile
def compile_check(ctx: Context) -> str:
    """``torch.compile`` (inductor) of one transformer layer, as ``model.compile=true`` compiles each: its output
    and its input's gradient on a padded batch equal eager's (fp32, TF32 off).

    On a CPU with ``ctx.compile_timeout`` > 0 the check runs in a child doctor (``--only compile``) stopped after
    that many seconds: compiling a layer's forward and backward takes ~15 s with a warm inductor cache and over a
    minute with a cold one on a busy 2-core machine; a SKIP then says so."""
    if ctx.cuda:
        from torch.utils._triton import has_triton

        if not has_triton():
            raise Skip("torch.compile needs triton on CUDA, and it is not installed")
    elif not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        raise Skip("torch.compile's CPU code needs a C compiler (gcc or clang), and none is on PATH")
    if not ctx.cuda and ctx.compile_timeout > 0:
        return compile_in_child(ctx)
    return compile_layer(ctx)


def compile_in_child(ctx: Context) -> str:
    """The compile check in a child ``python -m xlsr.doctor --only compile`` (its own process group, ended with
    its compile workers after ``ctx.compile_timeout`` s); its result row becomes this check's."""
    import json
    import os
    import signal
    import subprocess
    import sys

    out = ctx.workdir / "compile.json"
    command = [sys.executable, "-m", "xlsr.doctor", "--device", "cpu", "--only", "compile", "--compile-timeout", "0",
               "--json", str(out)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        output, _ = child.communicate(timeout=ctx.compile_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise Skip(f"compiling took over {ctx.compile_timeout:g} s on this CPU (a cold inductor cache on a small or "
                   "busy machine; a second run is faster); --compile-timeout 0 waits for it") from None
    if not out.is_file():
        raise CheckFailed(f"the child doctor ended with exit code {child.returncode}: {output.strip()[-300:]}")
    row = json.loads(out.read_text())["checks"][0]
    if row["status"] == "SKIP":
        raise Skip(row["detail"])
    if row["status"] == "FAIL":
        raise CheckFailed(row["detail"])
    return row["detail"]


def compile_layer(ctx: Context) -> str:
    """Compile one transformer layer of the tiny model and compare it with eager, forward and backward."""
    torch.manual_seed(0)
    layer = Wav2Vec2Model(tiny_config(), pretraining_head=False).encoder.layers[0].to(ctx.device).train()
    compiled = copy.deepcopy(layer)
    compiled.compile()
    x = torch.randn(2, 49, layer.attention_norm.normalized_shape[0], device=ctx.device)
    keep = torch.ones(2, 1, 1, 49, dtype=torch.bool, device=ctx.device)
    keep[1, ..., 40:] = False
    results = []
    with true_fp32():
        for module in (layer, compiled):
            inputs = x.clone().requires_grad_(True)
            out = module(inputs, keep)
            (out * torch.linspace(-1, 1, out.shape[-1], device=ctx.device)).sum().backward()
            results.append((out.detach(), inputs.grad))
    error = max(relative_error(results[1][0], results[0][0]), relative_error(results[1][1], results[0][1]))
    if not error <= 1e-4:
        raise CheckFailed(f"compiled and eager differ by {error:.1e} of their scale (limit 1e-04)")
    return f"forward and backward equal eager's within {error:.1e} of their scale"


# ---------------------------------------------------------------------------------------------- distributed
def process_group(ctx: Context) -> str:
    """A process group of one (nccl on CUDA, gloo on a CPU), made once, its store in memory; returns the backend."""
    if not dist.is_initialized():
        backend = "nccl" if ctx.cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_backend()


def ddp_check(ctx: Context) -> str:
    """A 1-process DistributedDataParallel step of the tiny model (nccl on CUDA, gloo on a CPU): its gradients
    equal those of the same model without DDP, and the update is finite."""
    from torch.nn.parallel import DistributedDataParallel

    from xlsr.pretrain.loss import compute_loss
    from xlsr.training.optim import build_optimizer, optimizer_step
    from xlsr.training.run_config import RunOptimConfig

    backend = process_group(ctx)
    torch.manual_seed(0)
    model = Wav2Vec2Model(tiny_config()).to(ctx.device).train()
    plain = copy.deepcopy(model)
    wrapped = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.cuda else None)
    source, padding = example_batch()
    mask, negatives = fixed_targets(model, padding, ctx.device)
    source, padding = source.to(ctx.device), padding.to(ctx.device)
    with true_fp32():
        for module in (wrapped, plain):
            torch.manual_seed(0)
            out = module(source, padding, mask_indices=mask, negative_indices=negatives)
            compute_loss(out, (0.1, 0.0)).total.backward()
    worst = max(relative_error(a.grad, b.grad) for a, b in zip(model.parameters(), plain.parameters())
                if b.grad is not None)
    if not worst <= 1e-5:
        raise CheckFailed(f"DDP's gradients differ from the model's own by {worst:.1e} of their scale")
    optimizer = build_optimizer(list(model.parameters()), RunOptimConfig(lr=1e-3), ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=False)
    norm, _, _ = optimizer_step(list(model.parameters()), optimizer, scaler, 1.0, 0.0)
    if not math.isfinite(norm) or not all(torch.isfinite(p).all() for p in model.parameters()):
        raise CheckFailed(f"the update is not finite (gradient norm {norm})")
    return f"{backend}: gradients equal the plain model's within {worst:.1e}; gradient norm {norm:.3g}"


def resume_check(strategy: str) -> Callable[[Context], str]:
    """Through the training engine (``Trainer``, pretraining task, tiny model, the synthetic corpus): 4 updates with
    a checkpoint at update 2 (``strategy`` fsdp: FSDP2 and sharded checkpoints in a process group of one; ddp: one
    process and a ``.pt``), then a second run resumed from that checkpoint: updates 3 and 4 must log the same losses
    and end with the same weights (on CUDA: within its non-deterministic kernels' noise)."""

    def run(ctx: Context) -> str:
        from xlsr.pretrain.config import compose_config
        from xlsr.training import checkpointing
        from xlsr.pretrain.trainer import Trainer  # the engine, with the pretraining task registered

        if strategy == "fsdp":
            process_group(ctx)
        folder = ctx.workdir / f"resume-{strategy}"
        settings = [
            "model=tiny", f"data.manifest={ctx.corpus()}", "data.num_workers=0", "data.max_tokens=48000",
            "data.max_sample_size=16000", "data.min_sample_size=8000", "optim.max_update=4",
            "optim.warmup_updates=2", "checkpoint.save_interval_updates=2", "checkpoint.keep_last=0",
            "log_interval=1", "progress_bar=false", "tensorboard=false", f"device={ctx.device}",
            f"distributed.strategy={strategy}", f"distributed.backend={'nccl' if ctx.cuda else 'gloo'}",
        ]
        whole = Trainer(compose_config([*settings, f"output_dir={folder / 'whole'}"]))
        whole.train()
        saved = (checkpointing.sharded_checkpoint_path if strategy == "fsdp" else checkpointing.checkpoint_path)(
            folder / "whole" / "checkpoints", 2)
        with resume_fault(ctx):
            resumed = Trainer(compose_config([*settings, f"output_dir={folder / 'resumed'}",
                                              f"checkpoint.resume={saved}"]))
            resumed.train()
        return compare_runs(ctx, folder / "whole", folder / "resumed", resumed.cfg.optim.lr)

    return run


@contextlib.contextmanager
def resume_fault(ctx: Context):
    """With the ``resume-drift`` fault: ``Trainer.load_state_dict`` adds 0.05 to one weight after loading."""
    from xlsr.training.trainer import Trainer

    if ctx.fault != "resume-drift":
        yield
        return
    original = Trainer.load_state_dict

    def drifting(self, state):
        original(self, state)
        with torch.no_grad():
            next(self.model.parameters()).add_(0.05)

    Trainer.load_state_dict = drifting
    try:
        yield
    finally:
        Trainer.load_state_dict = original


def compare_runs(ctx: Context, whole: Path, resumed: Path, lr: float) -> str:
    """Updates 3 and 4 of the two runs (their metrics.jsonl) and their final ``model/`` folders."""
    import json

    def losses(run: Path) -> dict[int, float]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {r["update"]: r["loss"] for r in map(json.loads, lines) if r["split"] == "train" and r["update"] > 2}

    a, b = losses(whole), losses(resumed)
    if sorted(a) != [3, 4] or sorted(b) != [3, 4]:
        raise CheckFailed(f"expected updates 3 and 4 in both runs, got {sorted(a)} and {sorted(b)}")
    loss_limit = 1e-4 if ctx.cuda else 1e-6
    loss_error = max(abs(a[u] - b[u]) / abs(a[u]) for u in (3, 4))
    if not loss_error <= loss_limit:
        raise CheckFailed(f"resumed losses {b[3]:.6f} {b[4]:.6f} != {a[3]:.6f} {a[4]:.6f} (relative limit "
                          f"{loss_limit:.0e})")
    first = Wav2Vec2Model.from_pretrained(whole / "model").state_dict()
    second = Wav2Vec2Model.from_pretrained(resumed / "model").state_dict()
    # Adam moves a weight by at most about lr per update: on CUDA, gradients that are pure rounding noise may
    # flip a step's sign, so allow two steps there; a CPU run is deterministic
    weight_limit = 2 * lr if ctx.cuda else 1e-6
    weight_error = max(float((first[k] - second[k]).abs().max()) for k in first)
    if not weight_error <= weight_limit:
        raise CheckFailed(f"final weights differ by {weight_error:.1e} (limit {weight_limit:.0e})")
    return f"updates 3-4 resumed: losses within {loss_error:.0e}, weights within {weight_error:.0e}"


# ---------------------------------------------------------------------------------------------- data
def write_synthetic_corpus(root: Path, count: int = 12) -> Path:
    """``count`` FLAC files (16-bit, 1.0 to 2.1 s) under ``root`` and their manifest; returns train.tsv."""
    import soundfile as sf

    from xlsr.manifest import write_manifest

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        sf.write(root / f"utt{i:02d}.flac", synthetic_wave(1.0 + 0.1 * i, rng), SAMPLE_RATE)
    write_manifest(root, root / "manifest", valid_percent=0.0, progress=False)
    return root / "manifest" / "train.tsv"


def data_check(ctx: Context) -> str:
    """The training data loader (``build_dataloader``) over a manifest of FLAC files with ``--workers`` worker
    processes (pinned memory on CUDA): every utterance comes exactly once per epoch, equal to its file."""
    import soundfile as sf

    from xlsr.data.audio_dataset import DataConfig, build_dataloader

    manifest = ctx.corpus()
    cfg = DataConfig(manifest=str(manifest), num_workers=ctx.num_workers, max_tokens=96000, max_sample_size=48000,
                     min_sample_size=0, pad=True)
    loader = build_dataloader(cfg, str(manifest), normalize=False, seed=1, epoch=1)
    seen, batches, seconds, start = [], 0, 0.0, time.perf_counter()
    for batch in loader:
        batches += 1
        if ctx.cuda and not batch.source.is_pinned():
            raise CheckFailed("a batch is not in pinned memory on CUDA")
        batch = batch.to(ctx.device, non_blocking=True)
        seconds += batch.audio_seconds(SAMPLE_RATE)
        for row, item in enumerate(batch.ids.tolist()):
            path = loader.dataset.path(item)
            wave = torch.from_numpy(sf.read(path, dtype="float32")[0])
            got = batch.source[row].cpu()
            valid = len(wave) if batch.padding_mask is None else int((~batch.padding_mask[row]).sum())
            if valid != len(wave) or not torch.equal(got[:valid], wave) or got[valid:].abs().sum() > 0:
                raise CheckFailed(f"batch {batches} row {row} is not {path} as read by soundfile")
            seen.append(path)
    elapsed = time.perf_counter() - start
    expected = sum(1 for line in Path(manifest).read_text().splitlines()[1:] if line.strip())
    if len(seen) != expected or len(set(seen)) != expected:
        raise CheckFailed(f"{len(seen)} utterances ({len(set(seen))} distinct) loaded, the manifest has {expected}")
    pinned = ", pinned memory" if ctx.cuda else ""
    return (f"{expected} files in {batches} batches by {ctx.num_workers} worker(s){pinned}, each equal to its file; "
            f"{seconds / elapsed:.0f} audio-s/s")


CHECKS: list[Check] = [
    Check("forward fp32", forward_check("fp32")),
    Check("forward bf16", forward_check("bf16")),
    Check("forward fp16", forward_check("fp16")),
    Check("train fp32", train_check("fp32")),
    Check("train bf16", train_check("bf16")),
    Check("train fp16", train_check("fp16")),
    Check("sdpa kernels", sdpa_check),
    Check("sdpa fused", sdpa_fused_check, cuda_only=True),
    Check("compile layer", compile_check),
    Check("ddp step", ddp_check),
    Check("fsdp2 resume", resume_check("fsdp")),
    Check("checkpoint resume", resume_check("ddp")),
    Check("data loading", data_check),
]
