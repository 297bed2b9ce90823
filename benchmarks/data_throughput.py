"""Data loading throughput: audio seconds per second per loader worker, against what one GPU consumes.

    python benchmarks/data_throughput.py                 # ~3 min of audio per source, workers 0 and 1
    python benchmarks/data_throughput.py --minutes 1 --no-write --profile

Each source is built in a temporary folder from the same audio (``~/.cache/xlsr/demo_corpus`` when the demo has
made it, else ``tests/fixtures/speech``), repeated to ``--minutes`` of audio, and read by the training code itself
(``build_dataloader`` / ``build_hf_dataloader``: decode, resample, normalise, crop, length-bucketed batches) with
XLS-R's pretraining data settings, for one epoch, with ``num_workers`` 0 (the main process does the work) and 1 (one
worker process). "Audio s/s" counts the audio of the batches handed out (after cropping): what the GPU trains on.

Sources (``SOURCES``: name -> factory): ``manifest-flac`` (a manifest of 16 kHz FLAC files), ``manifest-flac-48k``
(the same at 48 kHz, resampled to 16 kHz while loading), ``hf-bytes`` (a Hugging Face dataset with the FLAC bytes
embedded, ``save_to_disk``), ``shar`` (Lhotse Shar shards of the 16 kHz FLAC manifest, written by
``xlsr.manifest.write_shar``, the code of ``python -m xlsr.manifest train.tsv --to-shar DIR``, and streamed by
``xlsr.data.lhotse_source.pretraining_shar_loader``). A factory takes ``(folder, files, minutes)`` and returns a
function ``loader(num_workers) -> iterable of batches``. For ``shar``, ``num_workers`` is the number of decoding
threads of the stream (0: the main thread decodes, as a DataLoader with 0 workers; 1: one thread decodes while the
main thread reads the tars); their CPU time is in the process's own, which the measurement counts.

The GPU's need: XLS-R 300M training at 45 % model FLOPs utilisation of an H100's dense bf16 peak (989.4 TFLOP/s,
``xlsr.flops.PEAK_BF16_TFLOPS``), FLOPs per audio second from ``xlsr.flops.workload_flops`` (15 s crops, the span mask of the
preset); workers per GPU = ceil(need / per-worker throughput). ``--write`` (default) puts the table into
benchmarks/RESULTS.md, between markers, replacing an earlier one.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import glob
import math
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from machine import machine_description  # noqa: E402

from xlsr.flops import conv_stack_flops, peak_bf16_tflops, workload_flops  # noqa: E402

H100_BF16_TFLOPS = peak_bf16_tflops("H100")  # dense bf16 peak (989.4)
TARGET_MFU = 0.45
MARKS = "<!-- data_throughput{}: begin -->", "<!-- data_throughput{}: end -->"  # one section per utterance length


# ---------------------------------------------------------------------- the GPU's need


def gpu_need(preset: str = "xlsr-300m", crop_s: float = 15.0, mfu: float = TARGET_MFU,
             peak_tflops: float = H100_BF16_TFLOPS, draws: int = 20) -> dict:
    """Audio seconds per second one GPU trains on at ``mfu`` of ``peak_tflops``."""
    import torch

    import xlsr

    cfg = xlsr.Wav2Vec2Config.from_preset(preset)
    samples = int(crop_s * cfg.sample_rate)
    _, frames = conv_stack_flops(cfg, 1, samples)
    gen = torch.Generator().manual_seed(0)
    masked = sum(int(xlsr.compute_mask_indices((1, frames), None, cfg.mask_prob, cfg.mask_length, cfg.min_masks,
                                               generator=gen).sum()) for _ in range(draws)) / draws
    flops_per_audio_s = workload_flops(cfg, "train", 1, samples, int(round(masked))) / crop_s
    need = mfu * peak_tflops * 1e12 / flops_per_audio_s
    return {"preset": preset, "crop_s": crop_s, "masked_fraction": masked / frames, "mfu": mfu,
            "peak_tflops": peak_tflops, "gflop_per_audio_s": flops_per_audio_s / 1e9, "audio_s_per_s": need}


# ---------------------------------------------------------------------- sources


def source_audio() -> list[str]:
    demo = Path(os.environ.get("XLSR_CACHE", Path.home() / ".cache" / "xlsr")) / "demo_corpus"
    for folder in (demo, HERE.parent / "tests" / "fixtures" / "speech"):
        files = sorted(glob.glob(str(folder / "**" / "*.flac"), recursive=True)) + \
            sorted(glob.glob(str(folder / "**" / "*.wav"), recursive=True))
        if files:
            return files
    raise SystemExit("no audio found (tests/fixtures/speech is missing)")


UTTERANCE_SECONDS = 0.0  # --utterance-seconds: join consecutive recordings into utterances at least this long


def write_flac_copies(files: list[str], dest: Path, minutes: float, rate: int) -> list[str]:
    """``files`` decoded (joined into utterances of at least ``UTTERANCE_SECONDS``) and written as FLAC at ``rate``
    into ``dest``, repeated until ``minutes`` of audio."""
    import numpy as np
    import soundfile as sf
    import soxr

    dest.mkdir(parents=True)
    decoded, pending = [], []
    for path in files:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
        pending.append(wav.mean(axis=1) if sr == rate else soxr.resample(wav.mean(axis=1), sr, rate))
        if sum(len(w) for w in pending) >= UTTERANCE_SECONDS * rate:
            decoded.append(np.concatenate(pending))
            pending = []
    if pending:
        decoded.append(np.concatenate(pending))
    total, out, copy = 0.0, [], 0
    while total < minutes * 60:
        for i, wav in enumerate(decoded):
            path = dest / f"{copy:04d}_{i:04d}.flac"
            sf.write(path, wav, rate)
            out.append(str(path))
            total += len(wav) / rate
        copy += 1
    return out


def data_config(num_workers: int, resample: bool, **source):
    from xlsr.data.audio_dataset import DataConfig

    # XLS-R's pretraining settings (crops of up to 20 s, 1.2M samples per batch), 1 s minimum for short prompts
    return DataConfig(**source, max_sample_size=320000, min_sample_size=16000, max_tokens=1_200_000,
                      num_workers=num_workers, resample=resample)


def manifest_source(rate: int) -> Callable:
    def make(folder: Path, files: list[str], minutes: float) -> Callable:
        from xlsr.data.audio_dataset import build_dataloader
        from xlsr.manifest import write_manifest

        audio = folder / f"flac{rate}"
        write_flac_copies(files, audio, minutes, rate)
        write_manifest(audio, folder / f"manifest{rate}", valid_percent=0.0, progress=False)
        manifest = str(folder / f"manifest{rate}" / "train.tsv")
        return lambda workers: build_dataloader(data_config(workers, rate != 16000, manifest=manifest), manifest, normalize=True,
                                                seed=0, epoch=1)
    return make


def hf_bytes_source(folder: Path, files: list[str], minutes: float) -> Callable:
    import datasets

    from xlsr.data.hf_dataset import build_hf_dataloader

    paths = write_flac_copies(files, folder / "hf_flac", minutes, 16000)
    features = datasets.Features({"audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}})
    rows = {"audio": [{"bytes": Path(p).read_bytes(), "path": os.path.basename(p)} for p in paths]}
    table = datasets.Dataset.from_dict(rows, features=features).cast_column("audio", datasets.Audio())
    table.save_to_disk(str(folder / "hf"))
    shutil.rmtree(folder / "hf_flac")

    def loader(workers: int):
        cfg = data_config(workers, False, hf_dataset=str(folder / "hf"), hf_split=None)
        return build_hf_dataloader(cfg, None, normalize=True, seed=0, epoch=1)
    return loader


SHAR_SHARD_SIZE = 1000  # cuts per shard: the default of ``python -m xlsr.manifest ... --to-shar``


def shar_source(folder: Path, files: list[str], minutes: float) -> Callable:
    from xlsr.data.lhotse_source import pretraining_shar_loader
    from xlsr.manifest import write_manifest, write_shar

    write_flac_copies(files, folder / "shar_flac", minutes, 16000)
    write_manifest(folder / "shar_flac", folder / "manifest", valid_percent=0.0, progress=False)
    write_shar(folder / "manifest" / "train.tsv", folder / "shar", shard_size=SHAR_SHARD_SIZE, progress=False)
    shutil.rmtree(folder / "shar_flac")

    def loader(workers: int):
        cfg = data_config(workers, False)  # the same settings as the other sources; workers = decoding threads
        return pretraining_shar_loader(str(folder / "shar"), max_tokens=cfg.max_tokens,
                                       max_sample_size=cfg.max_sample_size, min_sample_size=cfg.min_sample_size,
                                       sample_rate=cfg.sample_rate, resample=cfg.resample, normalize=True,
                                       pad=cfg.pad, num_workers=cfg.num_workers,
                                       buffer_size=cfg.lhotse_shuffle_buffer, seed=0, epoch=1)
    return loader


SOURCES: dict[str, Callable] = {
    "manifest-flac": manifest_source(16000),
    "manifest-flac-48k": manifest_source(48000),
    "hf-bytes": hf_bytes_source,
    "shar": shar_source,
}


# ---------------------------------------------------------------------- measuring


def one_epoch(loader, profiler=None) -> dict:
    """Iterate ``loader`` once: audio seconds handed out, wall seconds, CPU seconds of this process and its loader
    workers, and the machine's 1-minute load average at the end."""
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own0, start = time.process_time(), time.perf_counter()
    audio_s, batches = 0.0, 0
    if profiler:
        profiler.enable()
    iterator = iter(loader)
    for batch in iterator:
        if batch is not None:
            audio_s += batch.source.numel() / 16000
            batches += 1
    if profiler:
        profiler.disable()
    wall, own1 = time.perf_counter() - start, time.process_time()
    del iterator  # joins the workers, so their CPU time is counted
    gc.collect()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own1 - own0 + (children1.ru_utime + children1.ru_stime
                                        - children0.ru_utime - children0.ru_stime)
    return {"audio_s": audio_s, "batches": batches, "wall_s": wall, "cpu_s": cpu, "load": os.getloadavg()[0]}


def measure(make_loader: Callable, workers: int, reps: int, profile: bool = False) -> dict:
    """``reps`` epochs of ``make_loader(workers)`` (each a new loader, built outside the timing): the median's
    audio seconds per wall second, and per CPU second of the loading processes."""
    runs = []
    for rep in range(reps):
        profiler = cProfile.Profile() if profile and workers == 0 and rep == 0 else None
        runs.append(one_epoch(make_loader(workers), profiler))
        if profiler:
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime")
    runs.sort(key=lambda r: r["wall_s"])
    result = {"workers": workers, **runs[len(runs) // 2], "min_wall_s": runs[0]["wall_s"],
              "max_wall_s": runs[-1]["wall_s"]}
    result["audio_s_per_s"] = result["audio_s"] / result["wall_s"]
    result["audio_s_per_cpu_s"] = result["audio_s"] / max(result["cpu_s"], 1e-9)
    if profile and workers == 0:
        result["profile"] = stats
    return result


def table(results: dict[str, list[dict]], need: float) -> list[str]:
    lines = ["| source | workers | audio s | batches | wall s, median (min-max) | audio s/s | per worker | "
             "per CPU s | load average | workers per H100 (by wall / by CPU s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for r in runs:
            per_worker = r["audio_s_per_s"] / max(r["workers"], 1)
            lines.append(f"| {name} | {r['workers']} | {r['audio_s']:.0f} | {r['batches']} | {r['wall_s']:.2f} "
                         f"({r['min_wall_s']:.2f}-{r['max_wall_s']:.2f}) | {r['audio_s_per_s']:.0f} | "
                         f"{per_worker:.0f} | {r['audio_s_per_cpu_s']:.0f} | {r['load']:.1f} | "
                         f"{math.ceil(need / per_worker)} / {math.ceil(need / r['audio_s_per_cpu_s'])} |")
    return lines


def write_results(section: str, key: str) -> None:
    """Put ``section`` into RESULTS.md between the markers of ``key``, replacing what was there."""
    mark_begin, mark_end = (m.format(key) for m in MARKS)
    path = HERE / "RESULTS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    block = f"{mark_begin}\n{section.rstrip()}\n{mark_end}\n"
    if mark_begin in text and mark_end in text:
        head, rest = text.split(mark_begin, 1)
        tail = rest.split(mark_end, 1)[1]
        text = head + block + (tail[1:] if tail.startswith("\n") else tail)  # what followed, blank lines kept
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="audio per source (default 3)")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {list(SOURCES)}")
    parser.add_argument("--workers", default="0,1", help="num_workers values (default 0,1)")
    parser.add_argument("--reps", type=int, default=3, help="epochs per row, the median reported (default 3)")
    parser.add_argument("--utterance-seconds", type=float, default=0.0,
                        help="join consecutive recordings into utterances of at least this many seconds")
    parser.add_argument("--profile", action="store_true", help="cProfile the num_workers=0 runs (top functions)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md")
    args = parser.parse_args(argv)
    global UTTERANCE_SECONDS
    UTTERANCE_SECONDS = args.utterance_seconds
    import torch

    torch.set_num_threads(1)  # a loader worker is one core
    info = machine_description("cpu")
    print(f"machine: {info.get('cpu')} ({info.get('cpus')} CPUs, flags: {info.get('isa') or 'none'}), "
          f"torch {info['torch']}, Python {info['python']}")
    need = gpu_need()
    print(f"need: XLS-R 300M at {need['mfu']:.0%} MFU of {need['peak_tflops']} TFLOP/s (H100 bf16): "
          f"{need['gflop_per_audio_s']:.0f} GFLOP per audio s (train step, {need['crop_s']:.0f} s crops, "
          f"{need['masked_fraction']:.0%} masked) -> {need['audio_s_per_s']:.0f} audio s/s per GPU")
    files = source_audio()
    workers = [int(w) for w in args.workers.split(",")]
    results: dict[str, list[dict]] = {}
    profiles = []
    with tempfile.TemporaryDirectory(prefix="xlsr_data_bench_") as tmp:
        for name in args.sources.split(","):
            folder = Path(tmp) / name
            folder.mkdir()
            make_loader = SOURCES[name](folder, files, args.minutes)
            results[name] = []
            for w in workers:
                r = measure(make_loader, w, args.reps, profile=args.profile)
                results[name].append(r)
                print(f"{name:18s} workers={w}: {r['audio_s']:.0f} audio s in {r['wall_s']:.2f} s = "
                      f"{r['audio_s_per_s']:.0f} audio s/s ({r['audio_s_per_cpu_s']:.0f} per CPU s; load average "
                      f"{r['load']:.1f})")
                if "profile" in r:
                    profiles.append((name, r.pop("profile")))
    lines = table(results, need["audio_s_per_s"])
    print("\n".join(lines))
    for name, stats in profiles:
        print(f"\nprofile of {name}, num_workers=0 (top 12 by own time):")
        stats.stream = sys.stdout
        stats.print_stats(12)
    if not args.no_write:
        command = "python benchmarks/data_throughput.py" + " ".join(
            [""] + [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--profile"])
        section = "\n".join([
            f"## Data loading throughput (`benchmarks/data_throughput.py`), {info['date']}", "",
            f"Command: `{command}`. Machine: {info.get('cpu')} ({info.get('cpus')} CPUs, {info.get('isa') or 'none'}); "
            f"torch {info['torch']}, one torch thread. INDICATIVE: the CPU was shared with other jobs while it ran.",
            f"Audio: {len(files)} recordings of {Path(files[0]).parent.parent.name}"
            + (f" joined into utterances of >= {args.utterance_seconds:g} s" if args.utterance_seconds else "")
            + f", repeated to {args.minutes:g} min per source; XLS-R pretraining data settings (crops <= 20 s, batches of 1.2M samples, normalised); one epoch "
            f"per repetition, median of {args.reps}; audio s = the audio of the batches handed out (after cropping); "
            "per CPU s = per second of CPU time of the loading processes (main + workers); load average: the "
            "machine's 1-minute load average after the row's median run (2 CPUs: above 2, others were waiting).",
            f"Need per GPU: XLS-R 300M train step at {need['mfu']:.0%} MFU of an H100's {need['peak_tflops']} bf16 "
            f"TFLOP/s = {need['audio_s_per_s']:.0f} audio s/s ({need['gflop_per_audio_s']:.0f} GFLOP per audio s, "
            f"xlsr/flops.py, {need['crop_s']:.0f} s crops, {need['masked_fraction']:.0%} of frames masked).",
            "", *lines, ""])
        write_results(section, f" utterances>={args.utterance_seconds:g}s" if args.utterance_seconds else "")
        print(f"written to {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
