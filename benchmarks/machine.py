"""The machine the benchmark runs on: what it is, how busy others keep it, and its matmul ceiling.

    machine_description  CPU model, core count and ISA flags (xlsr.machine.cpu_description), GPU name, torch / transformers / Python
    LoadMeter            CPU use of other processes from /proc/stat: wait for a quiet machine, measure the noise
    measure_ceiling      torch.matmul GFLOP/s on large square matrices, fp32 and bf16, in a child process
                         (``--ceiling-worker``, ``ceiling_main``)
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

from workers import last_reply, reply, run_child

from xlsr.machine import cpu_description, matmul_gflops


def machine_description(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = "not installed"
    info.update(cpu_description())
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class LoadMeter:
    """CPU use of the whole machine from /proc/stat, to see what other processes take (Linux only)."""

    available = Path("/proc/stat").exists()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @classmethod
    def busy_seconds(cls) -> float:
        if not cls.available:
            return 0.0
        parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in parts]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        steal = values[7] if len(values) > 7 else 0
        return (sum(values[:8]) - idle - steal) / cls.hz

    @staticmethod
    def process_seconds(pid: int) -> float:
        """utime + stime of a process (all its threads), seconds."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / LoadMeter.hz

    @classmethod
    def snapshot(cls, pid: int) -> tuple[float, float]:
        """CPU seconds so far: (the whole machine, process ``pid`` plus this one)."""
        return cls.busy_seconds(), cls.process_seconds(pid) + time.process_time()

    @classmethod
    def foreign_load(cls, seconds: float, exclude: list[int]) -> float:
        """Cores used by processes other than ``exclude`` (and this one) over ``seconds``."""
        own = [os.getpid(), *exclude]
        b0, p0 = cls.busy_seconds(), sum(cls.process_seconds(p) for p in own)
        time.sleep(seconds)
        b1, p1 = cls.busy_seconds(), sum(cls.process_seconds(p) for p in own)
        return max(0.0, (b1 - b0) - (p1 - p0)) / seconds

    @classmethod
    def wait_quiet(cls, threshold: float, max_wait: float, exclude: list[int]) -> float:
        """Wait until others use less than ``threshold`` cores (or ``max_wait`` s pass); return the seconds waited."""
        if not cls.available or max_wait <= 0:
            return 0.0
        start = time.monotonic()
        while time.monotonic() - start < max_wait:
            if cls.foreign_load(0.5, exclude) < threshold:
                break
        return time.monotonic() - start


def ceiling_main(spec: dict) -> None:
    """Child process: matmul GFLOP/s (median of repetitions) for fp32 and bf16 on n x n matrices."""
    import torch

    torch.set_num_threads(spec["threads"])
    device, reps = torch.device(spec["device"]), spec["reps"]
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        n = spec["n"]
        if device.type == "cpu":  # without a vector kernel for the dtype (bf16 on plain AVX2: torch's scalar
            # fallback, ~1 GFLOP/s) one n^3 product takes minutes: probe at 512 and shrink n to ~10 s a product
            probe = torch.randn(512, 512, dtype=dtype)
            torch.matmul(probe, probe)
            t0 = time.perf_counter()
            torch.matmul(probe, probe)
            per_flop = (time.perf_counter() - t0) / (2.0 * 512**3)
            while n > 512 and 2.0 * n**3 * per_flop > 10.0:
                n //= 2
            out[f"n_{name}"] = n
        out[name] = matmul_gflops(n, dtype, device, reps, spec["inner"])
    reply(out)


def measure_ceiling(args) -> dict:
    """The matmul ceiling, GFLOP/s: {"fp32", "bf16", "n"} (on a CPU after waiting for a quiet machine)."""
    n = args.ceiling_n or (8192 if args.device == "cuda" else 4096)
    spec = {"device": args.device, "threads": args.threads, "n": n, "reps": 5, "inner": 10 if args.device == "cuda" else 1}
    if args.device == "cpu":
        LoadMeter.wait_quiet(args.quiet, args.max_wait, [])
    out = run_child("--ceiling-worker", spec)
    out.check_returncode()
    result = last_reply(out.stdout)
    result["n"] = n
    return result
