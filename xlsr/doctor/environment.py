"""What the doctor reports about the machine before its checks: versions, the CPU, the devices."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import torch

from xlsr.machine import cpu_description

# the distributions xlsr imports (required first), then its optional extras and what the GPU path uses
PACKAGES = ("numpy", "soundfile", "hydra-core", "omegaconf", "safetensors", "tqdm", "transformers", "datasets",
            "lhotse", "soxr", "kenlm", "pyctcdecode", "tensorboard", "triton")


def versions() -> dict[str, str]:
    """Python, torch, and torch's CUDA, cuDNN and NCCL versions ("-" where torch has none, e.g. a CPU build)."""
    cuda = torch.cuda.is_available()
    nccl = "-"
    if cuda and torch.distributed.is_nccl_available():
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "cudnn": str(cudnn) if cudnn else "-",
        "nccl": nccl,
    }


def package_versions() -> dict[str, str]:
    """``{distribution: version}`` of ``PACKAGES`` ("not installed" where missing)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu() -> dict[str, object]:
    """The CPU (:func:`xlsr.machine.cpu_description`), its memory and torch's intra-op threads."""
    info: dict[str, object] = dict(cpu_description())
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    info["torch_threads"] = torch.get_num_threads()
    return info


def gpus() -> list[dict[str, object]]:
    """Each visible CUDA device: index, name, memory, compute capability, native bf16 (capability >= 8.0)."""
    out = []
    if not torch.cuda.is_available():
        return out
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        out.append({
            "index": index,
            "name": props.name,
            "memory_gb": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "bf16": props.major >= 8,
            "multiprocessors": props.multi_processor_count,
        })
    return out


def pick_device(choice: str) -> torch.device:
    """``auto`` (cuda if available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``; ValueError naming what is wrong."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise ValueError(f"--device {choice!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {choice}: CUDA is not available here (torch {torch.__version__})")
        device = torch.device("cuda", device.index or 0)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {choice}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {choice}: the doctor checks cpu and cuda devices only")
    return device
