"""The command line: ``python -m xlsr.doctor [--device cpu|cuda|auto] [--bench] [--json OUT]``.

Prints the environment, then one table row per check as it finishes, then (``--bench``) the timed steps; writes
everything to ``--json OUT``. Exit code: 0 when no check (and no bench workload) failed, 1 otherwise, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from xlsr.doctor import environment
from xlsr.doctor.checks import CHECKS, FAULTS, CheckResult, Context, run_check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m xlsr.doctor",
        description="Is this machine ready for xlsr, and how fast is it? Versions, devices, then short checks of "
                    "the real code paths (PASS / FAIL / SKIP with the reason); exit code 1 if any check fails.")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--bench", action="store_true",
                        help="also time the XLS-R 300M pretraining and CTC fine-tuning steps: audio-s/s, TFLOP/s, MFU")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write everything to this JSON file")
    parser.add_argument("--workers", type=int, default=2, help="data loader worker processes of the data check")
    parser.add_argument("--only", default="", metavar="NAMES",
                        help="comma-separated check names or their first words (e.g. forward,train); none = no checks")
    parser.add_argument("--compile-timeout", type=float, default=50.0, metavar="S",
                        help="on a CPU, give up the compile check (SKIP) after this many seconds; 0 = wait for it")
    parser.add_argument("--bench-preset", default="xlsr-300m", help="the architecture --bench times (a preset name)")
    parser.add_argument("--inject-fault", choices=sorted(FAULTS), help=argparse.SUPPRESS)  # tests: plant a fault
    return parser.parse_args(argv)


def selected_checks(only: str) -> list:
    """The checks ``--only`` names (all when empty): a name, or a prefix of names (``forward``)."""
    if not only:
        return list(CHECKS)
    wanted = [word.strip() for word in only.split(",") if word.strip() and word.strip() != "none"]
    chosen = [check for check in CHECKS if any(check.name.startswith(word) for word in wanted)]
    unknown = [word for word in wanted if not any(check.name.startswith(word) for check in CHECKS)]
    if unknown:
        names = ", ".join(check.name for check in CHECKS)
        raise ValueError(f"--only: no check is called {', '.join(unknown)} (checks: {names})")
    return chosen


def print_environment(info: dict) -> None:
    v = info["versions"]
    print(f"xlsr doctor  {info['date']}")
    print(f"versions     python {v['python']}, torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, "
          f"NCCL {v['nccl']}")
    packages = ", ".join(f"{name} {version}" for name, version in info["packages"].items())
    print(f"packages     {packages}")
    cpu = info["cpu"]
    print(f"cpu          {cpu.get('cpu', '?')}: {cpu.get('cpus', '?')} CPUs, flags: {cpu.get('isa') or '-'}, "
          f"{cpu.get('memory_gb', '?')} GB, torch threads {cpu['torch_threads']}")
    for gpu in info["gpus"]:
        print(f"gpu {gpu['index']}        {gpu['name']}: {gpu['memory_gb']} GB, compute capability "
              f"{gpu['capability']}, bf16 {'yes' if gpu['bf16'] else 'no'}, {gpu['multiprocessors']} SMs")
    print(f"device       {info['device']} (the checks run here)")
    print()


def format_row(result: CheckResult) -> str:
    return f"{result.name:<18} {result.status:<4} {result.seconds:6.1f}  {result.detail}"


def format_bench(row: dict) -> str:
    head = f"{row['workload']:<9} {row['preset']} {row['precision']}"
    if "error" in row:
        return f"{head}  FAIL  {row['error']}"
    return (f"{head}  batch {row['batch']} x {row['crop_seconds']:g} s: {row['step_seconds']:.3f} s/step, "
            f"{row['audio_seconds_per_second']:.1f} audio-s/s, {row['model_tflops']:.2f} TFLOP/s, "
            f"MFU {100 * row['mfu']:.1f} %, peak memory {row['peak_memory_gb']:.1f} GB")


def checked(args: argparse.Namespace) -> tuple[torch.device, list]:
    """The device and the checks the arguments ask for; ValueError naming the argument that is wrong."""
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    if args.compile_timeout < 0:
        raise ValueError(f"--compile-timeout must be 0 (no limit) or more, got {args.compile_timeout:g}")
    return environment.pick_device(args.device), selected_checks(args.only)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        device, checks = checked(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    start = time.perf_counter()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": environment.versions(),
        "packages": environment.package_versions(),
        "cpu": environment.cpu(),
        "gpus": environment.gpus(),
        "device": str(device),
    }
    if args.inject_fault:
        info["injected_fault"] = args.inject_fault
    print_environment(info)
    threads = torch.get_num_threads()
    if device.type == "cpu":  # the checks' models are tiny: more threads only add waiting (a lot on a busy machine)
        torch.set_num_threads(1)
    results: list[CheckResult] = []
    bench_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="xlsr-doctor-") as workdir:
        ctx = Context(device, Path(workdir), num_workers=args.workers, fault=args.inject_fault,
                      compile_timeout=args.compile_timeout)
        if checks:
            print(f"{'check':<18} {'':<4} {'s':>6}  detail", flush=True)
        for check in checks:
            results.append(run_check(check, ctx))
            print(format_row(results[-1]), flush=True)
        if args.bench:
            from xlsr.doctor.bench import run_bench

            torch.set_num_threads(threads)
            print(f"\nbench ({args.bench_preset} on {device}; finding the batch that fits takes a while)", flush=True)
            bench_rows = run_bench(device, args.bench_preset, lambda row: print(format_bench(row), flush=True))
    failed = [r.name for r in results if r.status == "FAIL"] + [f"bench {r['workload']}" for r in bench_rows
                                                                   if "error" in r]
    seconds = time.perf_counter() - start
    counts = {status: sum(r.status == status for r in results) for status in ("PASS", "SKIP", "FAIL")}
    print(f"\n{counts['PASS']} passed, {counts['SKIP']} skipped, {counts['FAIL']} failed in {seconds:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json:
        report = {**info, "checks": [r.to_dict() for r in results], "bench": bench_rows, "seconds": seconds,
                  "ok": not failed}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    code = 1 if failed else 0
    if dist.is_initialized():  # the DDP / FSDP checks made a process group: end as the training commands do
        from xlsr.training.trainer import _exit_process

        _exit_process(code)
    raise SystemExit(code)
