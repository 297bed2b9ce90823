"""A run's bookkeeping: metrics.jsonl on resume (lines after the resumed update, a half-written last line), the
output_dir lock of ``python -m xlsr.pretrain`` / ``xlsr.finetune``, and the GPU choices checked without a GPU
(``device=cuda:N``, CUDA RNG states resumed on fewer GPUs), with torch.cuda's functions replaced."""

import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

import xlsr
from xlsr.manifest import read_transcript_table, write_manifest
from xlsr.training import checkpointing
from xlsr.pretrain.config import compose_config
from xlsr.training.metrics import MetricsLog
from xlsr.pretrain.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DIGITS = Path(__file__).parent / "fixtures" / "digits"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 tone 'utterances' of 1.0 to 1.5 s."""
    root = tmp_path_factory.mktemp("tones")
    rng = np.random.default_rng(0)
    for i in range(6):
        t = np.arange(int((1.0 + 0.1 * i) * 16000)) / 16000
        wav = np.sin(2 * np.pi * rng.uniform(90, 250) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(root / f"utt{i}.wav", (0.3 * wav).astype(np.float32), 16000)
    write_manifest(root, root / "manifest", valid_percent=0.0, progress=False)
    return root / "manifest" / "train.tsv"


def overrides(corpus, out, *extra):
    return ["model=tiny", f"data.manifest={corpus}", f"output_dir={out}", "data.num_workers=0",
            "data.max_tokens=32000", "data.max_sample_size=16000", "log_interval=1", "progress_bar=false",
            "tensorboard=false", "optim.max_update=4", "checkpoint.save_interval_updates=2", *extra]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(records: list[dict]) -> list[tuple[int, float]]:
    return [(r["update"], r["loss"]) for r in records if r["split"] == "train"]


@pytest.fixture(scope="module")
def killed_run(corpus, tmp_path_factory):
    """A run that logged updates 1 to 4 and whose newest checkpoint is update 2 (checkpoint_4 removed: killed
    after logging update 4, before saving it)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    Trainer(compose_config(overrides(corpus, out))).train()
    (out / "checkpoints" / "checkpoint_4.pt").unlink()
    assert not (out / ".lock").exists()  # the finished run removed its lock
    return out


def resume(corpus, run: Path, tmp_path, caplog) -> Path:
    """A copy of ``run`` resumed (to update 4); returns its folder."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    caplog.set_level("INFO", logger="xlsr")
    Trainer(compose_config(overrides(corpus, out))).train()
    assert "resumed from" in caplog.text and "update 2" in caplog.text
    assert not (out / "previous_runs").exists()  # resumed, not started again
    return out


# ------------------------------------------------------------------------------------------- metrics.jsonl


def test_resume_drops_metrics_after_the_resumed_update(corpus, killed_run, tmp_path, caplog):
    before = read_metrics(killed_run)
    after = read_metrics(resume(corpus, killed_run, tmp_path, caplog))
    assert [u for u, _ in train_losses(before)] == [1, 2, 3, 4]
    assert [u for u, _ in train_losses(after)] == [1, 2, 3, 4]  # 3 and 4 once each: the old lines were dropped
    assert train_losses(after) == train_losses(before)  # ... and logged again, identically (exact resume)
    pairs = [(r["split"], r["update"]) for r in after]
    assert len(pairs) == len(set(pairs))


def test_resume_after_a_torn_last_metrics_line(corpus, killed_run, tmp_path, caplog):
    torn = tmp_path / "torn"
    shutil.copytree(killed_run, torn)
    with open(torn / "metrics.jsonl", "a") as handle:
        handle.write('{"split": "train", "update": 5, "time": 17')  # a kill mid-write
    out = resume(corpus, torn, tmp_path, caplog)
    assert "last line was cut short" in caplog.text
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    after = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    assert train_losses(after) == train_losses(read_metrics(killed_run)) and len(train_losses(after)) == 4


def test_drop_after_ends_the_file_with_a_line_end(tmp_path, caplog):
    """A record whose line end was not written: kept, the line end added, so the next line does not glue on."""
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False)
    log.path.write_text('{"split": "train", "update": 1}\n{"split": "train", "update": 2}')
    log.drop_after(5)
    log.log("train", 3, {"loss": 1.0})
    assert [json.loads(line)["update"] for line in log.path.read_text().splitlines()] == [1, 2, 3]
    log.path.write_text('{"update": 1}\nnot json\n{"update": 2}\n')  # damaged inside: dropped and named, no error
    with caplog.at_level("WARNING", logger="xlsr"):
        log.drop_after(5)
    assert "1 line(s) that are not JSON records (lines 2)" in caplog.text
    assert log.path.read_text() == '{"update": 1}\n{"update": 2}\n'


# ------------------------------------------------------------------------------------------- output_dir lock


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A labelled manifest of the digits recordings and a tiny 'pretrained' model, for xlsr.finetune."""
    dest = tmp_path_factory.mktemp("digits")
    write_manifest(DIGITS, dest / "manifest", valid_percent=0.0, progress=False,
                   transcripts=read_transcript_table(DIGITS / "transcripts.tsv"))
    xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny")).save_pretrained(dest / "pretrained")
    return dest / "manifest" / "train.tsv", dest / "pretrained"


def command(program: str, corpus, digits, out: Path, *extra) -> list[str]:
    if program == "xlsr.pretrain":
        settings = overrides(corpus, out, "optim.max_update=1", *extra)
    else:
        manifest, pretrained = digits
        settings = [f"model.init_from={pretrained}", f"data.manifest={manifest}", f"output_dir={out}",
                    "data.num_workers=0", "progress_bar=false", "tensorboard=false", "optim.max_update=1", *extra]
    return [sys.executable, "-m", program, *settings]


def write_lock(out: Path, pid: int) -> dict:
    out.mkdir(parents=True)
    record = {"host": socket.gethostname(), "pid": pid, "started": "2026-01-01T00:00:00+00:00", "command": "test"}
    (out / ".lock").write_text(json.dumps(record))
    return record


@pytest.mark.parametrize("program", ["xlsr.pretrain", "xlsr.finetune"])
def test_second_run_into_a_live_runs_output_dir_stops_naming_it(program, corpus, digits, tmp_path):
    out = tmp_path / "run"
    record = write_lock(out, os.getpid())  # this test's process: alive, and not the command's
    result = subprocess.run(command(program, corpus, digits, out), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    log = result.stdout + result.stderr  # (hydra logs to stdout)
    assert result.returncode == 2, log
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in log
    assert json.loads((out / ".lock").read_text()) == record  # the other run's lock is left alone
    assert not any((out / name).exists() for name in ("checkpoints", "metrics.jsonl", "config.yaml", "model"))


def test_live_lock_under_torchrun_stops_every_rank(corpus, digits, tmp_path):
    """Rank 0 finds the lock; every rank stops with its error (exit 2), none waits for the others."""
    out = tmp_path / "run"
    write_lock(out, os.getpid())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29581",
           *command("xlsr.pretrain", corpus, digits, out, "distributed.backend=gloo", "device=cpu", "threads=1")[1:]]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log
    assert log.count(f"pid {os.getpid()} on host {socket.gethostname()}") >= 2, log  # both ranks say why
    assert not (out / "checkpoints").exists()


def test_stale_lock_is_taken_over_with_a_warning_and_removed_at_the_end(corpus, digits, tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)
    out = tmp_path / "run"
    write_lock(out, dead_pid)
    result = subprocess.run(command("xlsr.pretrain", corpus, digits, out), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert f"the run that held this folder is gone (pid {dead_pid} on host {socket.gethostname()}" in log
    assert (out / "model" / "config.json").is_file()
    assert not (out / ".lock").exists()


def test_lock_is_removed_when_the_run_fails(corpus, digits, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(command("xlsr.pretrain", corpus, digits, out, f"data.valid_manifest={tmp_path}/no.tsv"),
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 2 and "no.tsv" in log, log
    assert out.is_dir() and not (out / ".lock").exists()


def test_lock_in_one_process_and_for_another_run(tmp_path):
    """A lock this process took earlier is taken again (a second Trainer after the first); after release, the folder
    is free; a live other run's lock stops it."""
    from xlsr.training import run_lock

    first = run_lock.acquire(tmp_path)
    assert json.loads(first.read_text())["pid"] == os.getpid()
    assert run_lock.acquire(tmp_path) == first
    run_lock.release(first)
    assert not first.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path / "other", sleeper.pid)
        with pytest.raises(run_lock.OutputDirLockedError, match=f"pid {sleeper.pid} on host"):
            run_lock.acquire(tmp_path / "other")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_lock.acquire(tmp_path / "other").is_file()  # now gone: taken over
    run_lock.release_all()
    assert not (tmp_path / "other" / ".lock").exists()


# ------------------------------------------------------------------------------------------- GPUs, without one


class FakeCuda:
    """torch.cuda's device functions for ``count`` devices; records set_device and set_rng_state."""

    def __init__(self, monkeypatch, count: int):
        self.count, self.current, self.rng = count, None, {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)

    def check(self, index):
        if not 0 <= index < self.count:  # what torch does: default_generators[index] / cudaSetDevice fail
            raise IndexError(f"no CUDA device {index}")

    def set_device(self, index):
        self.check(index)
        self.current = index

    def set_rng_state(self, state, device="cuda"):
        self.check(device)
        self.rng[device] = state


def pick(device: str, local_rank: int = 0):
    return Trainer._pick_device(SimpleNamespace(cfg=SimpleNamespace(device=device)), local_rank)


def test_device_cuda_n_sets_that_device(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=2)
    assert pick("cuda:1") == torch.device("cuda", 1) and cuda.current == 1
    assert pick("cuda", local_rank=1) == torch.device("cuda", 1) and cuda.current == 1  # torchrun: LOCAL_RANK
    assert pick("cuda") == torch.device("cuda", 0) and cuda.current == 0
    assert pick("auto") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="cuda:2 does not exist, 2 CUDA device"):
        pick("cuda:2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="every process of this node on one GPU"):
        pick("cuda:1")
    assert pick("cuda", local_rank=1) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick("cuda:0")
    with pytest.raises(ValueError, match="not a device"):
        pick("gpu1")


def checkpoint_rng(num_cuda_states: int) -> dict:
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
           "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(num_cuda_states)]}
    return {"scaler": scaler.state_dict(), "rng": rng, "num_updates": 7, "epoch": 2, "batches_done_in_epoch": 3}


@pytest.mark.parametrize("saved, visible", [(4, 2), (2, 4), (2, 2)])
def test_cuda_rng_states_restored_on_another_number_of_gpus(monkeypatch, caplog, saved, visible):
    cuda = FakeCuda(monkeypatch, count=visible)
    state = checkpoint_rng(saved)
    with caplog.at_level(logging.WARNING, logger="xlsr"):
        assert checkpointing.restore_progress(state, torch.amp.GradScaler("cpu", enabled=False)) == (7, 2, 3)
    restored = min(saved, visible)
    assert sorted(cuda.rng) == list(range(restored))
    assert all(torch.equal(cuda.rng[i], state["rng"]["cuda"][i]) for i in range(restored))
    warned = f"CUDA RNG states of {saved} device(s), {visible} are visible" in caplog.text
    assert warned == (saved != visible)
