"""What this machine is and what it holds: the CPU's model, core count and vector-ISA flags (``cpu_description``),
and the largest batch that fits in memory (``largest_batch``). Used by ``python -m xlsr.doctor`` and benchmarks/."""

from __future__ import annotations

import platform
import subprocess
from typing import Callable

# the ISA flags that decide CPU matmul speed and bf16 rounding (lscpu's names)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> dict[str, str]:
    """``{"cpu": model name, "cpus": logical CPU count, "isa": the ISA_FLAGS this CPU has, space-separated}``
    from ``lscpu`` (only ``cpu`` from ``platform`` where lscpu is missing)."""
    info = {"cpu": platform.processor() or platform.machine()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    info["cpu"] = fields.get("Model name", info["cpu"])
    info["cpus"] = fields.get("CPU(s)", "?")
    flags = fields.get("Flags", "").split()
    info["isa"] = " ".join(flag for flag in ISA_FLAGS if flag in flags)
    return info


def largest_batch(fits: Callable[[int], bool], max_batch: int) -> int:
    """The largest batch in 1..max_batch with ``fits(batch)``, by doubling then bisection; 0 when none fits."""
    low, high = 0, 1
    while high <= max_batch and fits(high):
        low, high = high, high * 2
    high = min(high, max_batch + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def matmul_gflops(n: int, dtype, device, reps: int = 5, inner: int = 1) -> float:
    """GFLOP/s of ``torch.matmul`` on two n x n matrices of ``dtype`` on ``device``: the median over ``reps`` timings
    (after 2 untimed) of ``inner`` products each (2 n^3 FLOPs a product)."""
    import statistics
    import time

    import torch

    device = torch.device(device)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append((time.perf_counter() - start) / inner)
    return 2.0 * n**3 / statistics.median(times) / 1e9
