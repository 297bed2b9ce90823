"""``--bench``: the XLS-R 300M pretraining train step and the CTC fine-tuning step, timed on the device.

On CUDA: bf16 autocast (fp16 on a GPU without bf16), 15 s crops, the largest batch up to 1.2M samples (XLS-R's
``max_tokens`` per GPU) that fits, found by trying (:func:`xlsr.machine.largest_batch`). On a CPU: fp32, one 2 s
crop. Each workload reports seconds per step (median), audio seconds per second, model TFLOP/s
(:mod:`xlsr.flops`: the same count as benchmarks/), MFU against the device's peak and the peak memory.

The peak: on CUDA the dense bf16 peak of the GPU from :data:`xlsr.flops.PEAK_BF16_TFLOPS`, else (an unknown GPU,
or a CPU) a measured large matmul (:func:`xlsr.machine.matmul_gflops`), which the JSON names as its source.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from typing import Callable

import torch

from xlsr.config import Wav2Vec2Config
from xlsr.flops import peak_bf16_tflops, workload_flops
from xlsr.machine import largest_batch, matmul_gflops
from xlsr.workloads import CTC_VOCAB, ctc_config, make_inputs

MAX_BATCH_SAMPLES = 1_200_000
CUDA_CROP_SECONDS = 15.0
CPU_CROP_SECONDS = 2.0
WORKLOADS = ("train", "finetune")  # the pretraining step, the CTC fine-tuning step (xlsr.workloads)


class Step:
    """One workload built on the device: ``run()`` makes one timed optimizer step (forward under autocast, loss,
    backward, AdamW as the engine builds it) and returns its seconds; ``flops`` is its model FLOP count."""

    def __init__(self, kind: str, cfg: Wav2Vec2Config, device: torch.device, precision: str, batch: int,
                 samples: int):
        import xlsr
        from xlsr.training.optim import build_optimizer
        from xlsr.training.run_config import RunOptimConfig

        self.kind, self.device, self.precision = kind, device, precision
        inputs = make_inputs(cfg, batch, samples, ctc=kind == "finetune")
        torch.manual_seed(0)
        model = xlsr.Wav2Vec2ForCTC(ctc_config(cfg)) if kind == "finetune" else xlsr.Wav2Vec2Model(cfg)
        self.model = model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, RunOptimConfig(lr=1e-5), device)
        self.inputs = {key: value.to(device) for key, value in inputs.items()}
        self.flops = workload_flops(cfg, kind, batch, samples, int(inputs["mask"].sum()), CTC_VOCAB)

    def loss(self) -> torch.Tensor:
        from xlsr.pretrain.loss import compute_loss

        x = self.inputs
        if self.kind == "finetune":
            return self.model.ctc_loss(self.model(x["source"]), x["targets"], x["target_lengths"])
        out = self.model(x["source"], mask_indices=x["mask"], negative_indices=x["negatives"])
        return compute_loss(out, (0.1, 0.0)).total  # XLS-R's weights

    def run(self) -> float:
        from xlsr.doctor.checks import DTYPES

        synchronize(self.device)
        start = time.perf_counter()
        dtype = DTYPES[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.kind} step: the loss is {float(loss)}")
        return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def fitting_batch(kind: str, cfg: Wav2Vec2Config, device: torch.device, precision: str, samples: int,
                  max_batch: int) -> int:
    """The largest batch of ``samples``-long crops, up to ``max_batch``, that trains two steps without running out
    of memory (the optimizer state exists from the second step on); 0 when none does."""

    def fits(batch: int) -> bool:
        step = None
        try:
            step = Step(kind, cfg, device, precision, batch, samples)
            step.run()
            step.run()
            return True
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            return False
        finally:
            del step
            free_memory(device)

    return largest_batch(fits, max_batch)


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): the GPU's table entry, else a measured large matmul in ``precision``'s
    dtype (bf16 8192^2 on a GPU; fp32 1024^2 on a CPU, where the table has nothing)."""
    from xlsr.doctor.checks import DTYPES

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_bf16_tflops(name)
        if peak is not None:
            return peak, f"dense bf16 peak of {name} (xlsr.flops.PEAK_BF16_TFLOPS)"
        return matmul_gflops(8192, DTYPES[precision], device, reps=5, inner=10) / 1000, f"measured {precision} matmul 8192^2"
    return matmul_gflops(1024, torch.float32, device, reps=3) / 1000, "measured fp32 matmul 1024^2"


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: the most memory torch allocated since the last reset; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_bench(device: torch.device, preset: str, report: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Time both workloads of ``preset`` on ``device``; one dict per workload (``error`` set where it failed),
    each also passed to ``report`` as soon as it is done."""
    cfg = Wav2Vec2Config.from_preset(preset)
    cuda = device.type == "cuda"
    precision = "fp32"
    if cuda:
        precision = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    crop = CUDA_CROP_SECONDS if cuda else CPU_CROP_SECONDS
    samples = int(crop * cfg.sample_rate)
    peak, peak_source = device_peak(device, precision)
    warmup, reps = (3, 5) if cuda else (1, 2)
    rows = []
    for kind in WORKLOADS:
        row = {"workload": kind, "preset": preset, "precision": precision, "crop_seconds": crop,
               "peak_tflops": peak, "peak_source": peak_source}
        try:
            batch = fitting_batch(kind, cfg, device, precision, samples, MAX_BATCH_SAMPLES // samples) if cuda else 1
            if batch == 0:
                raise RuntimeError(f"even one {crop:g} s crop does not fit in memory")
            step = Step(kind, cfg, device, precision, batch, samples)
            for _ in range(warmup):
                step.run()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            seconds = statistics.median(step.run() for _ in range(reps))
            tflops = step.flops / seconds / 1e12
            row.update(batch=batch, step_seconds=seconds, audio_seconds_per_second=batch * crop / seconds,
                       model_tflops=tflops, mfu=tflops / peak, peak_memory_gb=peak_memory_gb(device))
            del step
        except Exception as err:  # noqa: BLE001 (a failed workload is a row of the report, the other still runs)
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        free_memory(device)
        rows.append(row)
        report(row)
    return rows
