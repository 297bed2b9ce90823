#!/usr/bin/env python
"""Speed and memory of xlsr against Hugging Face transformers' Wav2Vec2 and fairseq, on the XLS-R 300M architecture.

One command:

    python benchmarks/bench.py                 # CPU, every workload, writes benchmarks/RESULTS.md
    python benchmarks/bench.py --quick         # fewer repetitions (still writes RESULTS.md unless --no-write)
    python benchmarks/bench.py --workloads train-fp32,infer-bf16 --reps 9
    python benchmarks/bench.py --device cuda   # GPU: MFU of the bf16 train step, 15 s crops, batch that fills memory
    python benchmarks/bench.py --strategy ddp,fsdp [--device cuda] [--nproc N]   # the trainer: memory per rank, MFU

CPU mode
    1. A matmul ceiling: torch.matmul on large square matrices, fp32 and bf16, at ``--threads`` threads.
    2. Per workload, one fresh worker process per implementation (ours, HF, and fairseq's own model where it
       imports: ``--fairseq-path``, benchmarks/README.md); each builds its model on the same
       inputs (audio, mask, negatives written once by this process), then the repetitions are INTERLEAVED:
       ours, hf, hf, ours, ours, hf, ... so that drifts in machine speed hit both alike. Peak memory is the
       worker's own peak RSS (``getrusage``), so each number covers one implementation and one workload.
    3. A table: median time, achieved GFLOP/s from the analytic FLOP count (the same count for both: model FLOPs,
       multiply-add = 2, train step = 3 x forward), ratio to the matmul ceiling, peak RSS, our speed-up.

    Workloads: infer-fp32 / infer-bf16 (1 x 10 s, no grad, bf16 = autocast), train-fp32 / train-bf16 (2 x 4 s:
    forward with a fixed 0.65 x 10 span mask and 100 negatives, loss, backward, AdamW step), train-fp32-ckpt
    (the same with activation checkpointing in both), train-fp32-lowmem (ours with checkpointing and the optimizer
    step inside backward, ``optim.step_in_backward=true`` of the trainer; HF with checkpointing), finetune-fp32
    (CTC fine-tuning, 2 x 4 s: xlsr.Wav2Vec2ForCTC against HF's Wav2Vec2ForCTC, frozen conv stack, 0.05 x 10 time
    masks drawn by each model, CTC loss on random targets, 32 symbols, ~50 per utterance; not fairseq),
    classify-fp32 (classification, 2 x 4 s: xlsr.Wav2Vec2ForSequenceClassification against HF's, the same random
    weights written once by this process, 107 classes, the CTC workload's encoder settings, cross entropy; their
    eval-mode losses must agree before anything is timed; not fairseq). All use the
    same optimiser (``--optim``: fused AdamW by default, which is also HF Trainer's default).

    The machine may be shared: before each repetition the parent waits (up to ``--max-wait`` s) until other
    processes use less than ``--quiet`` of a core, and it records how much CPU others used during the
    repetition ("noise" column, in cores). Medians are over the repetitions.

GPU mode (``--device cuda``)
    Model FLOPs utilisation of the bf16-autocast train step with ``--crop`` s crops at the largest batch that fits
    (found by doubling then bisection, or ``--batch``), ours and (``--impls``) HF, against the device's peak bf16
    dense FLOP/s (a table of known devices, or ``--peak-tflops``) and against a measured bf16 matmul ceiling.
    ``--device cpu --mfu`` runs the same code on the CPU (use ``--preset tiny`` to keep it short).

Code: this file is the command line and the CPU mode's loop (workloads, interleaved repetitions); beside it
    machine.py     machine description, load meter (quiet waits, noise), matmul ceiling
    workers.py     the worker-process protocol (children of this file, JSON lines), worker environment, RSS
    impls.py       the implementations: model builders, inference / train step, optimiser
    op_profile.py  ``--profile``: torch.profiler self CPU time per op group
    report.py      console lines, Markdown tables, RESULTS.md / results.json / RESULTS_<device>.md
    mfu.py         GPU mode: batch search, MFU worker and table
    strategies.py  ``--strategy``: the real trainer under DDP / FSDP on N ranks (torchrun), memory per rank, MFU
and in the package (shared with ``python -m xlsr.doctor --bench``): xlsr/flops.py (the analytic FLOP model, the GPU
bf16 peaks), xlsr/workloads.py (the shared inputs, the CTC workload), xlsr/machine.py (CPU flags, batch search,
matmul timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Run as a script (``python benchmarks/bench.py`` from the repo root, or ``python bench.py`` inside benchmarks/):
# put this folder (the sibling modules below) and the repo root (the xlsr package) on the import path.
# The worker processes run this file too, so they get the same path.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from xlsr.flops import workload_flops  # noqa: E402
from xlsr.workloads import CTC_VOCAB, make_inputs  # noqa: E402
from impls import fairseq_importable, save_classifier  # noqa: E402
from machine import LoadMeter, ceiling_main, machine_description, measure_ceiling  # noqa: E402
from mfu import mfu_mode, mfu_worker_main  # noqa: E402
from strategies import add_arguments as add_strategy_arguments  # noqa: E402
from strategies import strategies_mode  # noqa: E402
from report import format_row_text, results_table, write_results  # noqa: E402
from workers import Worker, worker_env, worker_main  # noqa: E402

WORKLOADS = {
    # name: (kind, batch, seconds, bf16, checkpointing, our optimizer step inside backward)
    "infer-fp32": ("infer", 1, 10.0, False, False, False),
    "infer-bf16": ("infer", 1, 10.0, True, False, False),
    "train-fp32": ("train", 2, 4.0, False, False, False),
    "train-bf16": ("train", 2, 4.0, True, False, False),
    "train-fp32-ckpt": ("train", 2, 4.0, False, True, False),
    "train-fp32-lowmem": ("train", 2, 4.0, False, True, True),
    "finetune-fp32": ("finetune", 2, 4.0, False, False, False),  # CTC fine-tuning step, frozen conv stack
    "classify-fp32": ("classify", 2, 4.0, False, False, False),  # classification step (107 classes), frozen conv
}
DEFAULT_WORKLOADS = list(WORKLOADS)


# ---------------------------------------------------------------------------------------------------- CPU mode
def run_workload(args, name: str, inputs_path: str, weights: dict | None = None) -> dict:
    """One workload: a worker per implementation, interleaved timed repetitions, then profiles and memory.
    ``weights``: the classifier folders of each implementation (classification: both load the same weights, and
    their eval-mode losses must agree before anything is timed)."""
    kind, batch, seconds, bf16, checkpointing, step_in_backward = WORKLOADS[name]
    # fairseq has no activation checkpointing, its train forward fails under autocast on current torch
    # (apply_mask index_puts the fp32 mask embedding into bf16 features), and it has no CTC runner here
    impls = [i for i in args.impls
             if not (i == "fairseq" and (checkpointing or (bf16 and kind == "train") or kind in ("finetune", "classify")))]
    workers: dict[str, Worker] = {}
    check_losses: dict[str, float] = {}
    try:
        for impl in impls:
            spec = {
                "impl": impl, "workload": name, "kind": kind, "bf16": bf16, "checkpointing": checkpointing,
                "step_in_backward": step_in_backward and impl.startswith("ours"), "device": args.device,
                "threads": args.threads, "preset": args.preset, "optim": args.optim, "warmup": args.warmup,
                "inputs": inputs_path, "fairseq_path": args.fairseq_path, "weights": weights,
            }
            workers[impl] = Worker(spec, worker_env(args.env))
            # built and warmed up (one at a time: the other worker is not running yet)
            ready = workers[impl].read()
            if "check_loss" in ready:
                check_losses[impl] = ready["check_loss"]
        if check_losses:
            check_same_loss(name, check_losses)
        pids = [w.proc.pid for w in workers.values()]
        reps = args.reps or (3 if args.quick else 9 if kind == "infer" else 5)  # train and finetune: 5
        times = {impl: [] for impl in impls}
        noise = {impl: [] for impl in impls}
        util = {impl: [] for impl in impls}
        waited = 0.0
        for rep in range(reps):
            order = impls if rep % 2 == 0 else impls[::-1]
            for impl in order:
                waited += LoadMeter.wait_quiet(args.quiet, args.max_wait, pids)
                b0, p0 = LoadMeter.snapshot(workers[impl].proc.pid)
                result = workers[impl].request("run")
                b1, p1 = LoadMeter.snapshot(workers[impl].proc.pid)
                times[impl].append(result["time"])
                noise[impl].append(max(0.0, (b1 - b0) - (p1 - p0)) / result["time"])
                util[impl].append(result["cpu"] / (result["time"] * args.threads))
        profiles = {impl: worker.request("profile") for impl, worker in workers.items()} if args.profile else {}
        memory = {impl: w.finish() for impl, w in workers.items()}
        return {"times": times, "noise": noise, "util": util, "memory": memory, "waited": waited, "profiles": profiles,
                "check_loss": check_losses}
    finally:
        for worker in workers.values():
            worker.kill()


def check_same_loss(name: str, losses: dict[str, float], rtol: float = 1e-4) -> None:
    """Stop unless every implementation's eval-mode loss on the same weights and batch agrees with ours within
    ``rtol`` (fp32 rounding of two orders of the same sums)."""
    reference = losses.get("ours", next(iter(losses.values())))
    print(f"{name}: eval-mode loss, same weights and batch: "
          + ", ".join(f"{impl} {value:.7f}" for impl, value in losses.items())
          + f" (largest relative difference {max(abs(v - reference) for v in losses.values()) / abs(reference):.1e})",
          flush=True)
    for impl, value in losses.items():
        if abs(value - reference) > rtol * abs(reference):
            raise SystemExit(f"{name}: {impl}'s loss {value} differs from {reference} by more than {rtol:g} "
                             "(relative): the implementations do not compute the same thing; nothing timed")


def load_average() -> str:
    """``uptime``'s load averages (1, 5, 15 min): how busy the shared machine was."""
    return "load average %.2f, %.2f, %.2f" % os.getloadavg()


def cpu_mode(args) -> None:
    import torch

    import xlsr

    cfg = xlsr.Wav2Vec2Config.from_preset(args.preset)
    machine = machine_description("cpu")
    print(f"# {machine['cpu']}, flags: {machine.get('isa', '?')}, {args.threads} threads, torch {machine['torch']}, "
          f"{machine['date']}, {load_average()}", flush=True)
    ceiling = measure_ceiling(args)
    n_bf16 = ceiling.get("n_bf16", ceiling["n"])
    small = f" (bf16 at {n_bf16}^2: no fast bf16 kernel here)" if n_bf16 < ceiling["n"] else ""
    print(f"matmul ceiling ({ceiling['n']}^2): fp32 {ceiling['fp32']:.0f} GFLOP/s, bf16 {ceiling['bf16']:.0f} GFLOP/s"
          f"{small}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            kind, batch, seconds, bf16 = WORKLOADS[name][:4]
            samples = int(seconds * cfg.sample_rate)
            inputs = make_inputs(cfg, batch, samples, ctc=kind == "finetune", classify=kind == "classify")
            path = os.path.join(tmp, f"{name}.pt")
            torch.save(inputs, path)
            weights = save_classifier(cfg, os.path.join(tmp, name)) if kind == "classify" else None
            flops = workload_flops(cfg, kind, batch, samples, int(inputs["mask"].sum()), CTC_VOCAB)
            t0 = time.time()
            load_before = load_average()
            result = run_workload(args, name, path, weights)
            row = {"workload": name, "flops": flops, "bf16": bf16, **result,
                   "load_average": [load_before, load_average()]}
            rows.append(row)
            print(format_row_text(row, ceiling), f"[{time.time() - t0:.0f} s; before: {load_before}; "
                  f"after: {row['load_average'][1]}]", flush=True)
    ceiling_after = measure_ceiling(args)
    print(f"matmul ceiling after: fp32 {ceiling_after['fp32']:.0f}, bf16 {ceiling_after['bf16']:.0f} GFLOP/s")
    table = results_table(rows, ceiling, args)
    print()
    print(table)
    if args.write:
        write_results(args, machine, ceiling, ceiling_after, table, rows)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mfu", action="store_true", help="GPU-style MFU mode (implied by --device cuda)")
    parser.add_argument("--quick", action="store_true", help="3 repetitions, 1 warm-up")
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help=f"comma list of {list(WORKLOADS)}")
    parser.add_argument("--impls", default=None,
                        help="comma list of ours, ours+compile, hf, fairseq (default: ours,hf, and fairseq when it "
                             "imports)")
    parser.add_argument("--fairseq-path", default=os.environ.get("XLSR_BENCH_FAIRSEQ_PATH", ""),
                        help="where fairseq and what it needs can be imported from (os.pathsep-separated)")
    parser.add_argument("--preset", default="xlsr-300m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per implementation (default: inference 9, train 5; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions first (default 1; GPU 3)")
    parser.add_argument("--optim", default="fused", choices=["fused", "foreach", "plain"], help="AdamW variant")
    parser.add_argument("--quiet", type=float, default=0.15, help="wait until others use fewer cores than this")
    parser.add_argument("--max-wait", type=float, default=60.0, help="longest wait for a quiet machine, s")
    parser.add_argument("--ceiling-n", type=int, default=None, help="matrix size of the matmul ceiling")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment setting for every worker, e.g. MALLOC_TRIM_THRESHOLD_=68719476736")
    parser.add_argument("--profile", action="store_true", help="also profile one repetition of each (op groups)")
    parser.add_argument("--no-write", dest="write", action="store_false", help="don't write RESULTS.md")
    parser.add_argument("--strategy", default=None,
                        help="ddp, fsdp or ddp,fsdp: the trainer under each strategy on --nproc ranks (strategies.py)")
    parser.add_argument("--crop", type=float, default=None,
                        help="MFU mode: crop length, s (default 15); --strategy: seconds per utterance (default 2)")
    parser.add_argument("--batch", type=int, default=0,
                        help="MFU mode: batch size (0 = largest that fits); --strategy: per rank (0 = 2)")
    parser.add_argument("--max-batch", type=int, default=512, help="MFU mode: upper bound of the batch search")
    parser.add_argument("--checkpointing", action="store_true", help="MFU mode: activation checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU mode: device peak bf16 TFLOP/s")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-worker", help=argparse.SUPPRESS)
    parser.add_argument("--mfu-worker", help=argparse.SUPPRESS)
    add_strategy_arguments(parser.add_argument_group("--strategy mode"))
    args = parser.parse_args(argv)

    # a child process (workers.py): run its part and answer on stdout
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.ceiling_worker:
        return ceiling_main(json.loads(args.ceiling_worker))
    if args.mfu_worker:
        return mfu_worker_main(json.loads(args.mfu_worker))

    if args.strategy:
        args.crop = args.crop or 2.0
        args.batch = args.batch or 2
        return strategies_mode(args)
    args.crop = args.crop or 15.0
    if args.impls is None:
        args.impls = "ours,hf" + (",fairseq" if fairseq_importable(args.fairseq_path) else "")
    args.impls = [i for i in args.impls.split(",") if i]
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")
    mfu = args.mfu or args.device == "cuda"
    if mfu and args.reps is None:
        args.reps = 5 if args.quick else 10
    if args.warmup is None:
        args.warmup = 3 if mfu and args.device == "cuda" else 1
    if mfu:
        return mfu_mode(args)
    return cpu_mode(args)


if __name__ == "__main__":
    main()
