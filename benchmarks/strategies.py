#!/usr/bin/env python
"""DDP against FSDP with the real trainer: peak memory per rank, frames per second and MFU.

    python benchmarks/bench.py --strategy ddp,fsdp                   # CPU: XLS-R 300M, 2 ranks, peak RSS per rank
    python benchmarks/bench.py --strategy fsdp --preset xlsr-1b --updates 2
    python benchmarks/bench.py --device cuda --strategy fsdp --nproc 8 --preset xlsr-2b --crop 15 --batch 4
    python benchmarks/strategies.py ...                              # the same, this file alone

Each strategy is one ``torchrun --nproc_per_node=N benchmarks/strategies.py --rank-worker ...``: every rank runs the
real trainer (random weights, ``--updates`` updates on the real speech of tests/fixtures/speech, cropped to
``--crop`` s, ``--batch`` utterances per rank and update; a checkpoint and the final ``model/`` at the end). Reported
per rank: peak RSS (``getrusage``: the most resident host memory the process ever had), also after set-up, after the
updates, after the checkpoint and after the final model; on a GPU the peak allocated device memory. From rank 0's
``metrics.jsonl``: frames per second of the updates after the first (20 ms frames; each step's time is its audio
over its ``audio_sec_per_sec``), and MFU against the device's dense bf16 peak (``mfu.PEAK_BF16_TFLOPS``, or
``--peak-tflops``; the train step's model FLOPs of xlsr/flops.py for utterances of ``--crop`` s, half the frames masked).
The fixtures are 1.0-2.4 s long: on a GPU, longer crops need a manifest of longer audio (``--manifest``).
Not a test: the numbers depend on the machine, the allocator and what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

SPEECH = ROOT / "tests" / "fixtures" / "speech"


def peak_rss_gib() -> float:
    """The process's peak resident memory so far (``getrusage``; KiB on Linux), GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rank_worker(overrides: list[str], report: Path) -> None:
    """One rank: train, then append its measurements as a JSON line to ``report``."""
    import torch
    import torch.distributed as dist

    from xlsr.pretrain.config import compose_config
    from xlsr.pretrain.trainer import Trainer

    trainer = Trainer(compose_config(overrides))
    phases = {"setup": peak_rss_gib()}
    save_checkpoint, save_final_model = trainer.save_checkpoint, trainer.save_final_model

    def checkpoint_then_note():  # the peak of the updates before each save, then that of the save
        phases.setdefault("training", peak_rss_gib())
        save_checkpoint()
        phases["checkpoint"] = peak_rss_gib()

    def final_model_then_note():
        save_final_model()
        phases["final model"] = peak_rss_gib()

    trainer.save_checkpoint, trainer.save_final_model = checkpoint_then_note, final_model_then_note
    start = time.monotonic()
    trainer.train()
    seconds = (time.monotonic() - start) / max(trainer.num_updates, 1)
    row = {"rank": trainer.rank, "peak_rss_gib": round(peak_rss_gib(), 2), "phases": phases,
           "seconds_per_update_incl_save": round(seconds, 1), "updates": trainer.num_updates}
    if trainer.device.type == "cuda":
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(trainer.device) / 2**30, 2)
    if trainer.is_main:
        records = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if r["split"] == "train"][1:]  # the first update warms up
        seconds_of_steps = sum(r["audio_seconds"] / r["audio_sec_per_sec"] for r in steps)
        if seconds_of_steps > 0:
            row["audio_seconds_per_second"] = sum(r["audio_seconds"] for r in steps) / seconds_of_steps
    line = json.dumps(row)
    with open(report, "a") as handle:
        handle.write(line + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()


def run_strategy(args, strategy: str, manifest: Path, work: Path) -> list[dict]:
    report = work / f"{strategy}.jsonl"
    report.unlink(missing_ok=True)
    samples = int(args.crop * 16000)
    on_gpu = args.device == "cuda"
    overrides = [
        f"model={args.preset}", f"data.manifest={manifest}", f"output_dir={work / strategy}", "data.num_workers=0",
        f"data.max_sample_size={samples}", f"data.min_sample_size={min(samples, 16000)}",
        f"data.max_tokens={args.batch * samples}", f"optim.max_update={args.updates}", "optim.warmup_updates=1",
        "log_interval=1", "progress_bar=false", "tensorboard=false", "checkpoint.resume=never",
        f"distributed.strategy={strategy}", f"distributed.backend={'nccl' if on_gpu else 'gloo'}",
        f"device={args.device}", "threads=1", *(["precision=bf16"] if on_gpu else []), *args.extra,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={args.port}", __file__, "--rank-worker", str(report), "--", *overrides]
    started = time.monotonic()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"{strategy}: failed (exit {result.returncode})\n{result.stderr[-4000:]}", file=sys.stderr)
        return []
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    for row in rows:
        row.update(strategy=strategy, wall_s=round(time.monotonic() - started))
    return sorted(rows, key=lambda r: r["rank"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this benchmark (bench.py shares ``--device``, ``--preset``, ``--crop``, ``--batch``,
    ``--peak-tflops`` with its other modes)."""
    parser.add_argument("--nproc", type=int, default=2, help="ranks (processes) per run")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--port", type=int, default=29650)
    parser.add_argument("--manifest", default=None, help="audio manifest (default: tests/fixtures/speech)")
    parser.add_argument("--work", default=None, help="folder for runs (default: a temporary one)")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for the trainer")


def strategies_mode(args) -> int:
    """Run each of ``args.strategy`` (comma list) and print a Markdown table."""
    from machine import machine_description
    from mfu import PEAK_BF16_TFLOPS

    import xlsr
    from xlsr.flops import workload_flops
    from xlsr.manifest import write_manifest

    machine = machine_description(args.device)
    print(f"# {machine.get('cpu', '?')}, flags: {machine.get('isa', '?')}, {machine.get('gpu', 'no GPU')}, "
          f"{args.nproc} ranks, torch {machine['torch']}, {machine['date']}")
    work = Path(args.work or tempfile.mkdtemp(prefix="xlsr-strategies-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = Path(args.manifest) if args.manifest else work / "manifest" / "train.tsv"
    if not args.manifest:
        write_manifest(SPEECH, work / "manifest", valid_percent=0.0, progress=False)
    cfg = xlsr.Wav2Vec2Config.from_preset(args.preset)
    samples = int(args.crop * cfg.sample_rate)
    frames = samples // 320
    flops_per_audio_second = workload_flops(cfg, "train", 1, samples, frames // 2) / args.crop
    peak = args.peak_tflops
    if peak is None and args.device == "cuda":
        peak = next((p for key, p in PEAK_BF16_TFLOPS if key in machine.get("gpu", "")), None)
    print("| preset | strategy | ranks | crop s x batch | rank | peak RSS GiB | after set-up / updates / checkpoint / "
          "final model | peak GPU GiB | frames/s | MFU | s/update (incl. saves) | run wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    peaks = {}
    for strategy in args.strategy.split(","):
        rows = run_strategy(args, strategy, manifest, work)
        for row in rows:
            phases = " / ".join(f"{row['phases'].get(k, float('nan')):.2f}"
                                for k in ("setup", "training", "checkpoint", "final model"))
            speed = row.get("audio_seconds_per_second")
            fps = f"{50 * speed:.0f}" if speed else ""
            mfu = f"{100 * speed * flops_per_audio_second / (peak * 1e12 * args.nproc):.1f}%" if speed and peak else ""
            print(f"| {args.preset} | {strategy} | {args.nproc} | {args.crop:g} x {args.batch} | {row['rank']} | "
                  f"{row['peak_rss_gib']:.2f} | {phases} | {row.get('peak_gpu_gib', '')} | {fps} | {mfu} | "
                  f"{row['seconds_per_update_incl_save']} | {row['wall_s']} |", flush=True)
        if rows:
            peaks[strategy] = max(r["peak_rss_gib"] for r in rows)
    if "ddp" in peaks and "fsdp" in peaks:
        print(f"\nfsdp / ddp peak RSS per rank (largest rank): {peaks['fsdp'] / peaks['ddp']:.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="ddp,fsdp")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="xlsr-300m")
    parser.add_argument("--crop", type=float, default=2.0, help="seconds per utterance")
    parser.add_argument("--batch", type=int, default=2, help="utterances per rank and update")
    parser.add_argument("--peak-tflops", type=float, default=None)
    add_arguments(parser)
    parser.add_argument("--rank-worker", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.rank_worker:
        rank_worker([a for a in rest if a != "--"], Path(args.rank_worker))
        return 0
    return strategies_mode(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
