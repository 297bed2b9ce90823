#!/usr/bin/env python
"""Speed and memory of xlsr against Hugging Face transformers' Wav2Vec2 and fairseq, on the XLS-R 300M architecture.

One command:

    python benchmarks/bench.py                 # CPU, every workload, writes benchmarks/RESULTS.md
    python benchmarks/bench.py --quick         # fewer repetitions (still writes RESULTS.md unless --no-write)
    python benchmarks/bench.py --workloads train-fp32,infer-bf16 --reps 9
    python benchmarks/bench.py --device cuda   # GPU: MFU of the bf16 train step, 15 s crops, batch that fills memory

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
    step inside backward, ``optim.step_in_backward=true`` of the trainer; HF with checkpointing). All use the same
    optimiser (``--optim``: fused AdamW by default, which is also HF Trainer's default).

    The machine may be shared: before each repetition the parent waits (up to ``--max-wait`` s) until other
    processes use less than ``--quiet`` of a core, and it records how much CPU others used during the
    repetition ("noise" column, in cores). Medians are over the repetitions.

GPU mode (``--device cuda``)
    Model FLOPs utilisation of the bf16-autocast train step with ``--crop`` s crops at the largest batch that fits
    (found by doubling then bisection, or ``--batch``), ours and (``--impls``) HF, against the device's peak bf16
    dense FLOP/s (a table of known devices, or ``--peak-tflops``) and against a measured bf16 matmul ceiling.
    ``--device cpu --mfu`` runs the same code on the CPU (use ``--preset tiny`` to keep it short).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

WORKLOADS = {
    # name: (kind, batch, seconds, bf16, checkpointing, our optimizer step inside backward)
    "infer-fp32": ("infer", 1, 10.0, False, False, False),
    "infer-bf16": ("infer", 1, 10.0, True, False, False),
    "train-fp32": ("train", 2, 4.0, False, False, False),
    "train-bf16": ("train", 2, 4.0, True, False, False),
    "train-fp32-ckpt": ("train", 2, 4.0, False, True, False),
    "train-fp32-lowmem": ("train", 2, 4.0, False, True, True),
}
DEFAULT_WORKLOADS = list(WORKLOADS)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
]


# ---------------------------------------------------------------------------------------------------- FLOPs
def conv_frames(conv_layers, samples: int) -> int:
    length = samples
    for _, kernel, stride in conv_layers:
        length = (length - kernel) // stride + 1
    return length


def forward_flops(cfg, batch: int, samples: int, masked: int = 0, head: bool = False) -> float:
    """Model FLOPs of one forward (multiply-add = 2): conv stack, projection, positional conv, layers[, head]."""
    flops = 0.0
    length, in_dim = samples, 1
    for dim, kernel, stride in cfg.conv_layers:
        length = (length - kernel) // stride + 1
        flops += 2.0 * in_dim * dim * kernel * length * batch
        in_dim = dim
    frames, d, f = length, cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
    flops += 2.0 * cfg.conv_dim * d * frames * batch  # feature projection
    flops += 2.0 * d * (d // cfg.conv_pos_groups) * cfg.conv_pos * frames * batch  # positional conv
    flops += cfg.encoder_layers * (8.0 * d * d + 4.0 * d * f) * frames * batch  # qkv, out, ffn
    flops += cfg.encoder_layers * 4.0 * d * frames * frames * batch  # scores and weighted sum
    if head:  # only the masked frames enter the contrastive head
        p, c = cfg.proj_dim, cfg.codebook_dim
        flops += 2.0 * cfg.conv_dim * cfg.num_codevectors * masked  # quantizer logits
        flops += 2.0 * c * p * masked + 2.0 * d * p * masked  # project_q, final_proj
        flops += 2.0 * (1 + cfg.num_negatives) * p * masked  # similarities
    return flops


def workload_flops(cfg, kind: str, batch: int, samples: int, masked: int) -> float:
    if kind == "infer":
        return forward_flops(cfg, batch, samples)
    return 3.0 * forward_flops(cfg, batch, samples, masked, head=True)


# ---------------------------------------------------------------------------------------------------- machine
def machine_description(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = "not installed"
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get("Model name", model)
        info["cpus"] = fields.get("CPU(s)", "?")
        flags = fields.get("Flags", "").split()
        info["isa"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags)
    except (OSError, subprocess.CalledProcessError):
        pass
    info["cpu"] = model
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


# ---------------------------------------------------------------------------------------------------- models
def hf_config(cfg):
    """The transformers ``Wav2Vec2Config`` with the same architecture as our ``cfg`` (our HF exporter's mapping)."""
    from transformers import Wav2Vec2Config as HFConfig

    from xlsr.checkpoints.huggingface import config_to_huggingface

    return HFConfig.from_dict(config_to_huggingface(cfg))


def make_inputs(cfg, batch: int, samples: int, seed: int = 0) -> dict:
    """Audio, a fixed span mask (cfg.mask_prob x cfg.mask_length) and HF-sampled negatives, shared by both."""
    import torch

    import xlsr

    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, samples, generator=gen)
    source = torch.nn.functional.layer_norm(source, (samples,))
    frames = conv_frames(cfg.conv_layers, samples)
    mask = xlsr.compute_mask_indices(
        (batch, frames), None, cfg.mask_prob, cfg.mask_length, cfg.min_masks, generator=gen
    )
    try:
        from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices

        import numpy as np

        np.random.seed(seed)
        negatives = torch.from_numpy(_sample_negative_indices((batch, frames), cfg.num_negatives, mask.numpy()))
    except ImportError:  # no transformers: our own sampler (same distribution)
        negatives = xlsr.sample_negatives(mask, cfg.num_negatives, generator=gen)
    return {"source": source, "mask": mask, "negatives": negatives.long()}


class Runner:
    """One implementation on one workload: build, then ``step()`` runs one timed repetition."""

    def __init__(self, impl: str, spec: dict, inputs: dict):
        import torch

        self.torch = torch
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.bf16 = spec["bf16"]
        self.kind = spec["kind"]
        torch.manual_seed(0)
        import xlsr

        cfg = xlsr.Wav2Vec2Config.from_preset(spec["preset"])
        self.source = inputs["source"].to(self.device)
        self.mask = inputs["mask"].to(self.device)
        self.negatives = inputs["negatives"].to(self.device)
        train = self.kind == "train"
        if impl.startswith("ours"):
            from xlsr.pretrain.loss import compute_loss

            model = xlsr.Wav2Vec2Model(cfg)
            model.set_activation_checkpointing(spec["checkpointing"])
            if "compile" in impl:
                model.compile_encoder()
            self._compute_loss = compute_loss
            self.fn = self._ours_train if train else self._ours_infer
        elif impl == "fairseq":
            model = fairseq_model(cfg, spec.get("fairseq_path", ""))
            model.set_num_updates(0)
            self.fn = self._fairseq_train if train else self._fairseq_infer
            if spec["checkpointing"]:
                raise ValueError("fairseq's wav2vec 2.0 has no activation checkpointing option")
        elif impl == "hf":
            from transformers import Wav2Vec2ForPreTraining
            from transformers import Wav2Vec2Model as HFModel

            hf_cfg = hf_config(cfg)
            hf_cfg._attn_implementation = "sdpa"
            model = (Wav2Vec2ForPreTraining if train else HFModel)(hf_cfg)
            if spec["checkpointing"]:
                if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.fn = self._hf_train if train else self._hf_infer
        else:
            raise ValueError(f"unknown implementation {impl!r}")
        self.model = model.to(self.device).train(train)
        self.optimizer = None
        self.step_in_backward = None
        if train:
            self.optimizer = make_optimizer(model.parameters(), spec["optim"], self.device)
            if spec.get("step_in_backward"):  # as the trainer sets it up
                from xlsr.pretrain.step_in_backward import attach_step_in_backward

                self.step_in_backward = attach_step_in_backward(self.optimizer, model.parameters(), self.device)

    def _autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.bf16)

    def _ours_infer(self):
        with self.torch.inference_mode(), self._autocast():
            return self.model.extract_features(self.source).x

    def _hf_infer(self):
        with self.torch.inference_mode(), self._autocast():
            return self.model(self.source).last_hidden_state

    def _fairseq_infer(self):
        with self.torch.inference_mode(), self._autocast():
            return self.model(self.source, mask=False, features_only=True)["x"]

    def _fairseq_train(self):
        # fairseq's wav2vec criterion: cross entropy summed over masked frames (target 0 = the positive), plus
        # 0.1 x diversity x sample size. fairseq draws its own 100 negatives per masked frame.
        F = self.torch.nn.functional
        with self._autocast():
            out = self.model(self.source, mask_indices=self.mask)
            logits = self.model.get_logits(out).float()
            target = logits.new_zeros(logits.size(0), dtype=self.torch.long)
            loss = F.cross_entropy(logits, target, reduction="sum")
            loss = loss + 0.1 * self.model.get_extra_losses(out)[0].float() * target.numel()
        return self._update(loss)

    def _ours_train(self):
        with self._autocast():
            out = self.model(self.source, mask_indices=self.mask, negative_indices=self.negatives)
            loss = self._compute_loss(out, (0.1, 0.0)).total  # XLS-R weights: contrastive + 0.1 diversity
        return self._update(loss)

    def _hf_train(self):
        with self._autocast():
            loss = self.model(self.source, mask_time_indices=self.mask, sampled_negative_indices=self.negatives).loss
        return self._update(loss)

    def _update(self, loss):
        loss.backward()
        if self.step_in_backward is None:  # else the backward pass has updated every parameter already
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def step(self) -> dict:
        torch = self.torch
        gc.collect()  # no collector pause inside the timed region (same for every implementation)
        gc.disable()
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            cpu0, t0 = time.process_time(), time.perf_counter()
            out = self.fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            else:
                float(out.float().sum())
            wall = time.perf_counter() - t0
        finally:
            gc.enable()
        return {"time": wall, "cpu": time.process_time() - cpu0}


def fairseq_model(cfg, fairseq_path: str):
    """fairseq's own Wav2Vec2Model with our config's architecture (fairseq and our config share field names).

    ``fairseq_path``: extra import locations (os.pathsep-separated), appended to sys.path, e.g. an unpacked
    fairseq source tree and a ``pip install --target`` folder with what it imports (bitarray, sacrebleu, sklearn).
    """
    import dataclasses

    for entry in filter(None, fairseq_path.split(os.pathsep)):
        sys.path.append(entry)
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config as FairseqConfig
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model as FairseqModel

    from xlsr.checkpoints.fairseq import config_to_fairseq

    fields = {f.name for f in dataclasses.fields(FairseqConfig)}
    values = {key: value for key, value in config_to_fairseq(cfg).items() if key in fields}
    return FairseqModel(FairseqConfig(**values))


def make_optimizer(params, name: str, device):
    import torch

    if name == "fused":
        try:
            return torch.optim.AdamW(params, lr=1e-5, fused=True)
        except (RuntimeError, TypeError, ValueError):
            name = "foreach"
    if name == "foreach":
        return torch.optim.AdamW(params, lr=1e-5, foreach=True)
    return torch.optim.AdamW(params, lr=1e-5, foreach=False)


PROFILE_GROUPS = [  # (group, predicate on the op name), first match wins; self CPU time of each op
    ("matmul", lambda n: n in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")),
    ("attention (SDPA)", lambda n: "scaled_dot_product" in n),
    ("conv (oneDNN)", lambda n: n in ("aten::mkldnn_convolution", "aten::convolution_backward")),
    ("norms", lambda n: "norm" in n and n.startswith("aten::")),
    ("gelu", lambda n: n.startswith("aten::gelu")),
    ("copies and casts", lambda n: n in ("aten::copy_", "aten::cat", "aten::index", "aten::_index_put_impl_")),
    ("optimizer kernels", lambda n: n in ("aten::_fused_adamw_", "aten::lerp_", "aten::addcdiv_", "aten::addcmul_",
                                          "aten::_foreach_lerp_", "aten::_foreach_addcdiv_", "aten::_foreach_sqrt",
                                          "aten::_foreach_mul_", "aten::_foreach_add_", "aten::_foreach_div_",
                                          "aten::_foreach_addcmul_", "aten::sqrt")),
    ("elementwise", lambda n: n in ("aten::mul", "aten::div", "aten::add", "aten::mul_", "aten::add_", "aten::sum",
                                    "aten::fill_", "aten::neg", "aten::masked_fill_", "aten::where", "aten::pow")),
]


def profile_step(runner) -> dict:
    """One repetition under torch.profiler: self CPU seconds per op group, and the heaviest ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.fn()
    groups: dict[str, float] = {}
    ops = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        group = next((g for g, match in PROFILE_GROUPS if match(event.key)), "other")
        groups[group] = groups.get(group, 0.0) + seconds
        ops.append((seconds, event.key, event.count))
    ops.sort(reverse=True)
    return {"groups": groups, "top": ops[:8], "total": sum(groups.values())}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


# ---------------------------------------------------------------------------------------------------- workers
def worker_main(spec: dict) -> None:
    """Child process: build, warm up, then run one repetition per 'run' line on stdin; 'stop' reports memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(ROOT))
    rss_start = current_rss_mb()
    inputs = torch.load(spec["inputs"], weights_only=True)
    runner = Runner(spec["impl"], spec, inputs)
    rss_built = current_rss_mb()
    for _ in range(spec["warmup"]):
        runner.step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            print(json.dumps(runner.step()), flush=True)
        elif command == "profile":
            print(json.dumps(profile_step(runner)), flush=True)
        elif command == "stop":
            break
    print(
        json.dumps({"peak_rss_mb": peak_rss_mb(), "rss_start_mb": rss_start, "rss_built_mb": rss_built}), flush=True
    )


INHERITED_SETTINGS = ("THP_MEM_ALLOC_ENABLE", "MALLOC_", "GLIBC_TUNABLES", "OMP_", "KMP_", "LD_PRELOAD")


def environment_settings(settings: list[str]) -> list[str]:
    """The worker settings that change speed or memory: inherited ones (e.g. from the shell) and ``--env``."""
    given = {item.partition("=")[0] for item in settings}
    inherited = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(INHERITED_SETTINGS) and k not in given]
    return inherited + list(settings)


def worker_env(settings: list[str]) -> dict:
    """This process's environment plus ``--env KEY=VALUE`` settings (the same for every implementation)."""
    env = dict(os.environ)
    for item in settings:
        key, _, value = item.partition("=")
        env[key] = value
    return env


class Worker:
    def __init__(self, spec: dict, env: dict | None = None):
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
            env=env,
        )

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"worker {self.spec['impl']}/{self.spec['workload']} died (exit {self.proc.returncode})")
        return json.loads(line)

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def finish(self) -> dict:
        self.send("stop")
        result = self.read()
        self.proc.wait()
        return result


def ceiling_main(spec: dict) -> None:
    """Child process: matmul GFLOP/s (median of repetitions) for fp32 and bf16 on n x n matrices."""
    import torch

    torch.set_num_threads(spec["threads"])
    device, n, reps = torch.device(spec["device"]), spec["n"], spec["reps"]
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        times = []
        for i in range(reps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(spec["inner"]):
                torch.matmul(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) / spec["inner"])
        out[name] = 2.0 * n**3 / statistics.median(times) / 1e9
    print(json.dumps(out), flush=True)


def measure_ceiling(args) -> dict:
    n = args.ceiling_n or (8192 if args.device == "cuda" else 4096)
    spec = {"device": args.device, "threads": args.threads, "n": n, "reps": 5, "inner": 10 if args.device == "cuda" else 1}
    if args.device == "cpu":
        LoadMeter.wait_quiet(args.quiet, args.max_wait, [])
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--ceiling-worker", json.dumps(spec)],
        capture_output=True, text=True, check=True, cwd=str(ROOT),
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["n"] = n
    return result


# ---------------------------------------------------------------------------------------------------- CPU mode
def run_workload(args, name: str, inputs_path: str) -> dict:
    workers: dict[str, Worker] = {}
    try:
        return _run_workload(args, name, inputs_path, workers)
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()


def _run_workload(args, name: str, inputs_path: str, workers: dict) -> dict:
    kind, batch, seconds, bf16, checkpointing, step_in_backward = WORKLOADS[name]
    # fairseq has no activation checkpointing, and its train forward fails under autocast on current torch
    # (apply_mask index_puts the fp32 mask embedding into bf16 features)
    impls = [i for i in args.impls if not (i == "fairseq" and (checkpointing or (bf16 and kind == "train")))]
    for impl in impls:
        spec = {
            "impl": impl, "workload": name, "kind": kind, "bf16": bf16, "checkpointing": checkpointing,
            "step_in_backward": step_in_backward and impl.startswith("ours"), "device": args.device,
            "threads": args.threads, "preset": args.preset, "optim": args.optim, "warmup": args.warmup,
            "inputs": inputs_path, "fairseq_path": args.fairseq_path,
        }
        workers[impl] = Worker(spec, worker_env(args.env))
        workers[impl].read()  # built and warmed up (one at a time: the other worker is not running yet)
    pids = [w.proc.pid for w in workers.values()]
    reps = args.reps or (3 if args.quick else 9 if kind == "infer" else 5)
    times = {impl: [] for impl in impls}
    noise = {impl: [] for impl in impls}
    util = {impl: [] for impl in impls}
    waited = 0.0
    for rep in range(reps):
        order = impls if rep % 2 == 0 else impls[::-1]
        for impl in order:
            waited += LoadMeter.wait_quiet(args.quiet, args.max_wait, pids)
            pid = workers[impl].proc.pid
            b0, p0 = LoadMeter.busy_seconds(), LoadMeter.process_seconds(pid) + time.process_time()
            workers[impl].send("run")
            result = workers[impl].read()
            b1, p1 = LoadMeter.busy_seconds(), LoadMeter.process_seconds(pid) + time.process_time()
            times[impl].append(result["time"])
            noise[impl].append(max(0.0, (b1 - b0) - (p1 - p0)) / result["time"])
            util[impl].append(result["cpu"] / (result["time"] * args.threads))
    profiles = {}
    if args.profile:
        for impl, worker in workers.items():
            worker.send("profile")
            profiles[impl] = worker.read()
    memory = {impl: w.finish() for impl, w in workers.items()}
    return {"times": times, "noise": noise, "util": util, "memory": memory, "waited": waited, "profiles": profiles}


def cpu_mode(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    import xlsr

    cfg = xlsr.Wav2Vec2Config.from_preset(args.preset)
    machine = machine_description("cpu")
    print(f"# {machine['cpu']}, {args.threads} threads, torch {machine['torch']}, {machine['date']}", flush=True)
    ceiling = measure_ceiling(args)
    print(f"matmul ceiling ({ceiling['n']}^2): fp32 {ceiling['fp32']:.0f} GFLOP/s, bf16 {ceiling['bf16']:.0f} GFLOP/s",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            kind, batch, seconds, bf16 = WORKLOADS[name][:4]
            samples = int(seconds * cfg.sample_rate)
            inputs = make_inputs(cfg, batch, samples)
            path = os.path.join(tmp, f"{name}.pt")
            torch.save(inputs, path)
            flops = workload_flops(cfg, kind, batch, samples, int(inputs["mask"].sum()))
            t0 = time.time()
            result = run_workload(args, name, path)
            row = {"workload": name, "flops": flops, "bf16": bf16, **result}
            rows.append(row)
            print(format_row_text(row, ceiling), f"[{time.time() - t0:.0f} s]", flush=True)
    ceiling_after = measure_ceiling(args)
    print(f"matmul ceiling after: fp32 {ceiling_after['fp32']:.0f}, bf16 {ceiling_after['bf16']:.0f} GFLOP/s")
    table = markdown_table(rows, ceiling, args)
    targets = targets_table(rows)
    if targets:
        table += "\n\nTargets (issue 5):\n\n" + targets
    if args.profile:
        table += "\n\n" + profile_tables(rows)
    print()
    print(table)
    if args.write:
        write_results(args, machine, ceiling, ceiling_after, table)
        raw = {"machine": machine, "ceiling": ceiling, "ceiling_after": ceiling_after,
               "rows": [{k: v for k, v in row.items() if k != "profiles"} for row in rows]}
        (HERE / "results.json").write_text(json.dumps(raw, indent=1) + "\n")


def format_row_text(row: dict, ceiling: dict) -> str:
    parts = [row["workload"]]
    for impl, times in row["times"].items():
        med = statistics.median(times)
        parts.append(f"{impl} {med:.3f} s ({row['flops'] / med / 1e9:.0f} GFLOP/s, "
                     f"{row['memory'][impl]['peak_rss_mb'] / 1024:.2f} GiB)")
    if "ours" in row["times"] and "hf" in row["times"]:
        parts.append(f"speed-up {paired_speedup(row['times']['hf'], row['times']['ours']):.2f}x")
    return " | ".join(parts)


def paired_speedup(reference: list[float], ours: list[float]) -> float:
    """Median over repetitions of reference_i / ours_i: each pair ran back to back, so slow drifts of a shared
    machine cancel (less noisy than the ratio of the medians)."""
    return statistics.median(r / o for r, o in zip(reference, ours))


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


SPEED_TARGETS = {"train-fp32": 1.4, "train-bf16": 1.6, "infer-fp32": 1.05, "infer-bf16": 1.3}  # ours vs HF (issue 5)
FAIRSEQ_SPEED_TARGETS = {"train-fp32": 1.25}
MEMORY_TARGETS = {"train-fp32": 1.0, "train-fp32-ckpt": 0.7, "train-fp32-lowmem": 0.7}  # of HF's train-fp32 peak


def targets_table(rows: list[dict]) -> str:
    """The issue's targets against this run: speed-ups vs HF, and our peak RSS over HF's plain train-fp32 peak."""
    by_name = {row["workload"]: row for row in rows}
    lines = ["| target | this run | met |", "|---|---|---|"]
    for name, target in SPEED_TARGETS.items():
        row = by_name.get(name)
        if row and {"ours", "hf"} <= row["times"].keys():
            speed = paired_speedup(row["times"]["hf"], row["times"]["ours"])
            lines.append(f"| {name} speed-up >= {target}x | {speed:.2f}x | {'yes' if speed >= target else 'no'} |")
    for name, target in FAIRSEQ_SPEED_TARGETS.items():
        row = by_name.get(name)
        if row and {"ours", "fairseq"} <= row["times"].keys():
            speed = paired_speedup(row["times"]["fairseq"], row["times"]["ours"])
            lines.append(f"| {name} speed-up vs fairseq >= {target}x | {speed:.2f}x "
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


def write_results(args, machine: dict, ceiling: dict, ceiling_after: dict, table: str) -> None:
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:])
    reps_text = str(args.reps) if args.reps else ("3" if args.quick else "9 (inference) / 5 (train)")
    text = f"""# Benchmark results

Written by `{command.strip()}` on {machine['date']}.

Machine: {machine['cpu']} ({machine.get('cpus', '?')} CPUs, {machine.get('isa', '')}), {args.threads} threads;
torch {machine['torch']}, transformers {machine['transformers']}, Python {machine['python']}.
Model: `{args.preset}` preset, random weights; HF: `Wav2Vec2Model` (inference) / `Wav2Vec2ForPreTraining` (train)
with the same architecture, SDPA attention. Optimiser: AdamW ({args.optim}) for all; in train-fp32-lowmem ours
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
frames for training; a train step counts 3 x forward. "of ceiling": GFLOP/s over the matmul ceiling of the same
dtype. "noise": CPU cores used by other processes during the timed repetitions (the machine may be shared).
"speed-up vs HF": median over repetitions of HF time / our time, each pair run back to back. Every repetition's
time is in `benchmarks/results.json`.
"""
    path = HERE / "RESULTS.md"
    path.write_text(text)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------- MFU mode
def mfu_worker_main(spec: dict) -> None:
    """Child: find the largest batch that fits (or use spec['batch']), then time train steps."""
    import torch

    sys.path.insert(0, str(ROOT))
    import xlsr

    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(spec["threads"])
    cfg = xlsr.Wav2Vec2Config.from_preset(spec["preset"])
    samples = int(spec["crop"] * cfg.sample_rate)

    def build(batch):
        inputs = make_inputs(cfg, batch, samples)
        run_spec = {**spec, "kind": "train", "bf16": True, "checkpointing": spec["checkpointing"]}
        return Runner(spec["impl"], run_spec, inputs), int(inputs["mask"].sum())

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

    batch = spec["batch"]
    if not batch:
        low, high = 0, 1
        while high <= spec["max_batch"] and fits(high):
            low, high = high, high * 2
        high = min(high, spec["max_batch"] + 1)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        batch = low
        if batch == 0:
            print(json.dumps({"error": "even batch 1 does not fit"}), flush=True)
            return
    runner, masked = build(batch)
    for _ in range(spec["warmup"]):
        runner.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [runner.step()["time"] for _ in range(spec["reps"])]
    result = {
        "impl": spec["impl"], "batch": batch, "masked": masked, "times": times,
        "flops": workload_flops(cfg, "train", batch, samples, masked),
        "peak_mem_gb": (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_mb() * 2**20) / 2**30,
    }
    print(json.dumps(result), flush=True)


def mfu_mode(args) -> None:
    import torch

    machine = machine_description(args.device)
    name = machine.get("gpu", machine["cpu"])
    ceiling = measure_ceiling(args)
    peak = args.peak_tflops
    if peak is None and args.device == "cuda":
        peak = next((p for key, p in PEAK_BF16_TFLOPS if key in name), None)
    print(f"# {name}, torch {machine['torch']}; bf16 matmul ceiling {ceiling['bf16'] / 1000:.1f} TFLOP/s"
          + (f", peak {peak:.0f} TFLOP/s" if peak else ""), flush=True)
    lines = [
        "| impl | batch x crop | median step s | TFLOP/step | TFLOP/s | MFU (peak) | of matmul ceiling | peak mem GiB | audio s/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for impl in args.impls:
        spec = {
            "impl": impl, "device": args.device, "threads": args.threads, "preset": args.preset, "crop": args.crop,
            "batch": args.batch, "max_batch": args.max_batch, "optim": args.optim, "checkpointing": args.checkpointing,
            "warmup": args.warmup, "reps": args.reps,
        }
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--mfu-worker", json.dumps(spec)],
            capture_output=True, text=True, cwd=str(ROOT), env=worker_env(args.env),
        )
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            lines.append(f"| {impl} | failed (exit {out.returncode}) | | | | | | | |")
            continue
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if "error" in result:
            lines.append(f"| {impl} | {result['error']} | | | | | | | |")
            continue
        med = statistics.median(result["times"])
        rate = result["flops"] / med / 1e12
        mfu = f"{rate / peak:.1%}" if peak else "n/a"
        lines.append(
            f"| {impl} | {result['batch']} x {args.crop:g} s | {med:.3f} | {result['flops'] / 1e12:.2f} | {rate:.1f} "
            f"| {mfu} | {rate * 1000 / ceiling['bf16']:.0%} | {result['peak_mem_gb']:.1f} "
            f"| {result['batch'] * args.crop / med:.0f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print()
    print(table)
    if args.write:
        path = HERE / f"RESULTS_{args.device}.md"
        path.write_text(
            f"# MFU: bf16 train step, {args.preset}\n\nWritten by `python benchmarks/bench.py {' '.join(sys.argv[1:])}`"
            f" on {machine['date']}; {name}, torch {machine['torch']}. bf16 matmul ceiling "
            f"({ceiling['n']}^2) {ceiling['bf16'] / 1000:.1f} TFLOP/s; peak used for MFU: {peak} TFLOP/s.\n\n{table}\n"
        )
        print(f"wrote {path}")
    del torch


# ---------------------------------------------------------------------------------------------------- main
def fairseq_description(args) -> str:
    """Which fairseq ran (the source folder's name, e.g. fairseq_fixed-0.12.3.1), or '' when it did not."""
    if "fairseq" not in args.impls:
        return ""
    folders = [Path(p).name for p in args.fairseq_path.split(os.pathsep) if (Path(p) / "fairseq").is_dir()]
    return f"its own Wav2Vec2Model, source {', '.join(folders) or 'installed package'} (benchmarks/README.md)"


def fairseq_importable(fairseq_path: str) -> bool:
    """Whether fairseq's wav2vec 2.0 model imports (in a child process: its import is slow and noisy)."""
    code = ("import os, sys; sys.path += [p for p in sys.argv[1].split(os.pathsep) if p]; "
            "import fairseq.models.wav2vec.wav2vec2")
    result = subprocess.run([sys.executable, "-c", code, fairseq_path], capture_output=True, text=True)
    return result.returncode == 0


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
    parser.add_argument("--crop", type=float, default=15.0, help="MFU mode: crop length, s")
    parser.add_argument("--batch", type=int, default=0, help="MFU mode: batch size (0 = largest that fits)")
    parser.add_argument("--max-batch", type=int, default=512, help="MFU mode: upper bound of the batch search")
    parser.add_argument("--checkpointing", action="store_true", help="MFU mode: activation checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="MFU mode: device peak bf16 TFLOP/s")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-worker", help=argparse.SUPPRESS)
    parser.add_argument("--mfu-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.ceiling_worker:
        return ceiling_main(json.loads(args.ceiling_worker))
    if args.mfu_worker:
        return mfu_worker_main(json.loads(args.mfu_worker))

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
