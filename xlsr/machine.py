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
