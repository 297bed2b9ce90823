"""GPU mode (``--device cuda``, or ``--mfu`` on the CPU): model FLOPs utilisation of the bf16 train step.

Per implementation, one child process (``--mfu-worker``, ``mfu_worker_main``) finds the largest batch of
``--crop`` s crops that trains (doubling, then bisection; or ``--batch``) and times ``--reps`` steps after
``--warmup``. The parent (``mfu_mode``) sets the achieved FLOP/s (xlsr/flops.py) against the device's dense bf16 peak
(``xlsr.flops.PEAK_BF16_TFLOPS`` or ``--peak-tflops``) and a measured bf16 matmul ceiling (machine.py).
"""

from __future__ import annotations

import gc
import sys

from xlsr.flops import peak_bf16_tflops, workload_flops
from xlsr.machine import largest_batch
from xlsr.workloads import make_inputs
from impls import make_runner
from machine import machine_description, measure_ceiling
from report import MFU_HEADER, mfu_failed_row, mfu_row, write_mfu_results
from workers import last_reply, peak_rss_mb, reply, run_child, worker_env

def mfu_worker_main(spec: dict) -> None:
    """Child: find the largest batch that fits (or use spec['batch']), then time train steps."""
    import torch

    import xlsr

    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    cfg = xlsr.Wav2Vec2Config.from_preset(spec["preset"])
    samples = int(spec["crop"] * cfg.sample_rate)

    def build(batch):
        inputs = make_inputs(cfg, batch, samples)
        run_spec = {**spec, "kind": "train", "bf16": True, "checkpointing": spec["checkpointing"]}
        return make_runner(spec["impl"], run_spec, inputs), int(inputs["mask"].sum())

    def fits(batch) -> bool:
        runner = None
        try:
            runner, _ = build(batch)
            runner.step()
            runner.step()  # the optimiser state exists from the second step on
            return True
        except RuntimeError as err:  # torch.OutOfMemoryError, or a library's allocation failure
            if not isinstance(err, torch.OutOfMemoryError) and "out of memory" not in str(err).lower():
                raise
            return False
        finally:
            del runner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    batch = spec["batch"] or largest_batch(fits, spec["max_batch"])
    if batch == 0:
        reply({"error": "even batch 1 does not fit"})
        return
    runner, masked = build(batch)
    for _ in range(spec["warmup"]):
        runner.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [runner.step()["time"] for _ in range(spec["reps"])]
    reply({
        "impl": spec["impl"], "batch": batch, "masked": masked, "times": times,
        "flops": workload_flops(cfg, "train", batch, samples, masked),
        "peak_mem_gb": (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_mb() * 2**20) / 2**30,
    })


def mfu_mode(args) -> None:
    """Parent: one MFU worker per implementation; prints the table and (unless ``--no-write``) writes it."""
    machine = machine_description(args.device)
    name = machine.get("gpu", machine["cpu"])
    ceiling = measure_ceiling(args)
    peak = args.peak_tflops
    if peak is None and args.device == "cuda":
        peak = peak_bf16_tflops(name)
    print(f"# {name}, torch {machine['torch']}; bf16 matmul ceiling {ceiling['bf16'] / 1000:.1f} TFLOP/s"
          + (f", peak {peak:.0f} TFLOP/s" if peak else ""), flush=True)
    lines = list(MFU_HEADER)
    for impl in args.impls:
        spec = {
            "impl": impl, "device": args.device, "threads": args.threads, "preset": args.preset, "crop": args.crop,
            "batch": args.batch, "max_batch": args.max_batch, "optim": args.optim, "checkpointing": args.checkpointing,
            "warmup": args.warmup, "reps": args.reps,
        }
        out = run_child("--mfu-worker", spec, env=worker_env(args.env))
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            lines.append(mfu_failed_row(impl, f"failed (exit {out.returncode})"))
            continue
        result = last_reply(out.stdout)
        if "error" in result:
            lines.append(mfu_failed_row(impl, result["error"]))
            continue
        lines.append(mfu_row(result, args.crop, peak, ceiling))
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print()
    print(table)
    if args.write:
        write_mfu_results(args, machine, name, ceiling, peak, table)
