"""What the benchmark prints and writes: the console lines, the Markdown tables, RESULTS.md and results.json.

CPU mode: ``format_row_text`` (one console line per workload), ``results_table`` (the timing table, the issue's
targets and, with ``--profile``, the op-group profiles), ``write_results`` (benchmarks/RESULTS.md, and every
repetition's time in benchmarks/results.json). MFU mode: ``MFU_HEADER``, ``mfu_row`` and ``write_mfu_results``
(benchmarks/RESULTS_<device>.md).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

from workers import environment_settings

HERE = Path(__file__).resolve().parent

SPEED_TARGETS = {"train-fp32": 1.4, "train-bf16": 1.6, "infer-fp32": 1.05, "infer-bf16": 1.3,  # ours vs HF (issue 5)
                 "finetune-fp32": 1.3}  # CTC fine-tuning step
FAIRSEQ_SPEED_TARGETS = {"train-fp32": 1.25}
MEMORY_TARGETS = {"train-fp32": 1.0, "train-fp32-ckpt": 0.7, "train-fp32-lowmem": 0.7}  # of HF's train-fp32 peak

MFU_HEADER = [
    "| impl | batch x crop | median step s | TFLOP/step | TFLOP/s | MFU (peak) | of matmul ceiling | peak mem GiB | audio s/s |",
    "|---|---|---|---|---|---|---|---|---|",
]


def command_line() -> str:
    """How this run was started, as the reports quote it."""
    return "python benchmarks/bench.py " + " ".join(sys.argv[1:])


def paired_speedup(reference: list[float], ours: list[float]) -> float:
    """Median over repetitions of reference_i / ours_i: each pair ran back to back, so slow drifts of a shared
    machine cancel (less noisy than the ratio of the medians)."""
    return statistics.median(r / o for r, o in zip(reference, ours))


# ---------------------------------------------------------------------------------------------------- CPU mode
def format_row_text(row: dict, ceiling: dict) -> str:
    parts = [row["workload"]]
    for impl, times in row["times"].items():
        med = statistics.median(times)
        parts.append(f"{impl} {med:.3f} s ({row['flops'] / med / 1e9:.0f} GFLOP/s, "
                     f"{row['memory'][impl]['peak_rss_mb'] / 1024:.2f} GiB)")
    if "ours" in row["times"] and "hf" in row["times"]:
        parts.append(f"speed-up {paired_speedup(row['times']['hf'], row['times']['ours']):.2f}x")
    return " | ".join(parts)


def markdown_table(rows: list[dict], ceiling: dict, args) -> str:
    lines = [
        "| workload | impl | median s (min-max) | GFLOP | GFLOP/s | of ceiling | peak RSS GiB | noise (cores) "
        "| speed-up vs HF | memory vs HF |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peak = ceiling["bf16" if row["bf16"] else "fp32"]
        hf_time = statistics.median(row["times"]["hf"]) if "hf" in row["times"] else None

        hf_mem = row["memory"]["hf"]["peak_rss_mb"] if "hf" in row["memory"] else None
        for impl, times in row["times"].items():
            med = statistics.median(times)
            rate = row["flops"] / med / 1e9
            mem = row["memory"][impl]["peak_rss_mb"]
            speed = f"{paired_speedup(row['times']['hf'], times):.2f}x" if hf_time and impl != "hf" else ""
            memory = f"{mem / hf_mem:.0%}" if hf_mem and impl != "hf" else ""
            lines.append(
                f"| {row['workload']} | {impl} | {med:.3f} ({min(times):.3f}-{max(times):.3f}) | {row['flops'] / 1e9:.0f} "
                f"| {rate:.0f} | {rate / peak:.0%} | {mem / 1024:.2f} | {statistics.median(row['noise'][impl]):.2f} "
                f"| {speed} | {memory} |"
            )
    return "\n".join(lines)


def targets_table(rows: list[dict]) -> str:
    """The issue's targets against this run: speed-ups vs HF, and our peak RSS over HF's plain train-fp32 peak."""
    by_name = {row["workload"]: row for row in rows}
    lines = ["| target | this run | met |", "|---|---|---|"]
    for reference, targets, versus in (("hf", SPEED_TARGETS, ""), ("fairseq", FAIRSEQ_SPEED_TARGETS, " vs fairseq")):
        for name, target in targets.items():
            row = by_name.get(name)
            if row and {"ours", reference} <= row["times"].keys():
                speed = paired_speedup(row["times"][reference], row["times"]["ours"])
                lines.append(f"| {name} speed-up{versus} >= {target}x | {speed:.2f}x "
                             f"| {'yes' if speed >= target else 'no'} |")
    reference = by_name.get("train-fp32", {}).get("memory", {}).get("hf")
    for name, target in MEMORY_TARGETS.items():
        row = by_name.get(name)
        if reference and row and "ours" in row["memory"]:
            share = row["memory"]["ours"]["peak_rss_mb"] / reference["peak_rss_mb"]
            lines.append(f"| {name} peak RSS <= {target:.0%} of HF train-fp32 | {share:.0%} "
                         f"| {'yes' if share <= target else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def profile_tables(rows: list[dict]) -> str:
    """Where the time goes: self CPU seconds per op group for each implementation (one profiled repetition)."""
    out = ["### Profile (torch.profiler, one repetition, self CPU time per op group)", ""]
    for row in rows:
        profiles = row.get("profiles") or {}
        if not profiles:
            continue
        impls = list(profiles)
        names = sorted({g for p in profiles.values() for g in p["groups"]},
                       key=lambda g: -max(p["groups"].get(g, 0.0) for p in profiles.values()))
        out.append(f"**{row['workload']}**")
        out.append("")
        out.append("| op group | " + " | ".join(f"{i} s (share)" for i in impls) + " |")
        out.append("|---|" + "---|" * len(impls))
        for name in names + ["total"]:
            cells = []
            for impl in impls:
                p = profiles[impl]
                value = p["total"] if name == "total" else p["groups"].get(name, 0.0)
                cells.append(f"{value:.2f} ({value / p['total']:.0%})")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        for impl in impls:
            top = ", ".join(f"{key} {sec:.2f} s x{count}" for sec, key, count in profiles[impl]["top"][:5])
            out.append(f"\n{impl} heaviest ops: {top}")
        out.append("")
    return "\n".join(out)


def results_table(rows: list[dict], ceiling: dict, args) -> str:
    """The Markdown of a CPU run: timing table, then the targets and (``--profile``) the profiles."""
    table = markdown_table(rows, ceiling, args)
    targets = targets_table(rows)
    if targets:
        table += "\n\nTargets (issue 5):\n\n" + targets
    if args.profile:
        table += "\n\n" + profile_tables(rows)
    return table


def fairseq_description(args) -> str:
    """Which fairseq ran (the source folder's name, e.g. fairseq_fixed-0.12.3.1), or '' when it did not."""
    if "fairseq" not in args.impls:
        return ""
    folders = [Path(p).name for p in args.fairseq_path.split(os.pathsep) if (Path(p) / "fairseq").is_dir()]
    return f"its own Wav2Vec2Model, source {', '.join(folders) or 'installed package'} (benchmarks/README.md)"


def write_results(args, machine: dict, ceiling: dict, ceiling_after: dict, table: str, rows: list[dict]) -> None:
    """benchmarks/RESULTS.md (setup, ``table``, how to read it) and benchmarks/results.json (all raw numbers)."""
    reps_text = str(args.reps) if args.reps else ("3" if args.quick else "9 (inference) / 5 (train)")
    text = f"""# Benchmark results

Written by `{command_line().strip()}` on {machine['date']}.

Machine: {machine['cpu']} ({machine.get('cpus', '?')} CPUs, {machine.get('isa', '')}), {args.threads} threads;
torch {machine['torch']}, transformers {machine['transformers']}, Python {machine['python']}.
Model: `{args.preset}` preset, random weights; HF: `Wav2Vec2Model` (inference) / `Wav2Vec2ForPreTraining` (train)
/ `Wav2Vec2ForCTC` (finetune: ours `Wav2Vec2ForCTC`, both with a frozen conv stack) / `Wav2Vec2ForSequenceClassification`
(classify: ours `Wav2Vec2ForSequenceClassification`, the same weights, frozen conv stack) with the same architecture,
SDPA attention. Optimiser: AdamW ({args.optim}) for all; in train-fp32-lowmem ours
applies it inside backward (`optim.step_in_backward=true`: the same updates), the others after backward.
Worker environment settings (the same for all): {', '.join(environment_settings(args.env)) or 'none'}.
fairseq: {fairseq_description(args) or 'not run'}.
{reps_text} interleaved repetitions per implementation after {args.warmup} warm-up; each implementation and workload
in its own process (peak RSS = that process's peak, imports and model included).

Matmul ceiling ({ceiling['n']}x{ceiling['n']}, torch.matmul): fp32 {ceiling['fp32']:.0f} GFLOP/s, bf16 {ceiling['bf16']:.0f}
GFLOP/s before the runs; {ceiling_after['fp32']:.0f} / {ceiling_after['bf16']:.0f} GFLOP/s after.

{table}

GFLOP: analytic model FLOPs (multiply-add = 2), the same for both implementations: conv stack, feature projection,
positional conv, 24 x (8 d^2 + 4 d F) T + 24 x 4 d T^2 per utterance, plus the contrastive head on the masked
frames for training; a train step counts 3 x forward; a fine-tuning step the conv stack once, the projection twice,
the rest (lm_head, or the classification head) 3 times. "of ceiling": GFLOP/s over the matmul ceiling of the same
dtype. "noise": CPU cores used by other processes during the timed repetitions (the machine may be shared).
"speed-up vs HF": median over repetitions of HF time / our time, each pair run back to back. Every repetition's
time is in `benchmarks/results.json`.
"""
    path = HERE / "RESULTS.md"
    path.write_text(text)
    print(f"wrote {path}")
    raw = {"machine": machine, "ceiling": ceiling, "ceiling_after": ceiling_after,
           "rows": [{k: v for k, v in row.items() if k != "profiles"} for row in rows]}
    (HERE / "results.json").write_text(json.dumps(raw, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------- MFU mode
def mfu_failed_row(impl: str, why: str) -> str:
    return f"| {impl} | {why} | | | | | | | |"


def mfu_row(result: dict, crop: float, peak: float | None, ceiling: dict) -> str:
    """One implementation's MFU line from its worker's ``result`` (batch, times, flops, peak_mem_gb)."""
    med = statistics.median(result["times"])
    rate = result["flops"] / med / 1e12
    mfu = f"{rate / peak:.1%}" if peak else "n/a"
    return (
        f"| {result['impl']} | {result['batch']} x {crop:g} s | {med:.3f} | {result['flops'] / 1e12:.2f} | {rate:.1f} "
        f"| {mfu} | {rate * 1000 / ceiling['bf16']:.0%} | {result['peak_mem_gb']:.1f} "
        f"| {result['batch'] * crop / med:.0f} |"
    )


def write_mfu_results(args, machine: dict, name: str, ceiling: dict, peak: float | None, table: str) -> None:
    """benchmarks/RESULTS_<device>.md: the MFU table with the device, torch, ceiling and peak used."""
    path = HERE / f"RESULTS_{args.device}.md"
    path.write_text(
        f"# MFU: bf16 train step, {args.preset}\n\nWritten by `{command_line()}`"
        f" on {machine['date']}; {name}, torch {machine['torch']}. bf16 matmul ceiling "
        f"({ceiling['n']}^2) {ceiling['bf16'] / 1000:.1f} TFLOP/s; peak used for MFU: {peak} TFLOP/s.\n\n{table}\n"
    )
    print(f"wrote {path}")
