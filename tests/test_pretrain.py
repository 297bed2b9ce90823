"""The training program: a real run, exact resume, DDP equivalence, crash-safe checkpoints, init_from."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import xlsr
from conftest import GOLDEN
from xlsr.manifest import write_manifest
from xlsr.pretrain.config import compose_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 short 'utterances': a few formant-like AM tones + noise, 1 to 3 s, 16 kHz."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(24):
        seconds = rng.uniform(1.0, 3.0)
        t = np.arange(int(seconds * 16000)) / 16000
        pitch = rng.uniform(90, 250)
        wav = sum(np.sin(2 * np.pi * pitch * k * t + rng.uniform(0, 6)) / k for k in range(1, 8))
        wav *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)  # syllable-rate envelope
        wav = wav + 0.05 * rng.standard_normal(len(t))
        sf.write(root / f"utt{i:02d}.wav", (0.3 * wav / np.abs(wav).max()).astype(np.float32), 16000)
    write_manifest(root, root / "manifest", valid_percent=0.0, progress=False)
    return root / "manifest" / "train.tsv"


def overrides(corpus, out, *extra):
    return [
        "model=tiny",
        f"data.manifest={corpus}",
        f"output_dir={out}",
        "data.num_workers=0",
        "data.max_tokens=96000",
        "data.max_sample_size=32000",
        "optim.warmup_updates=10",
        "log_interval=1",
        "progress_bar=false",
        "tensorboard=false",
        *extra,
    ]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {r["update"]: r["loss"] for r in read_metrics(out) if r["split"] == "train"}


def test_command_line_run_learns_and_writes_outputs(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "xlsr.pretrain", *overrides(corpus, out, "optim.max_update=60",
                                                              "checkpoint.save_interval_updates=30")]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    losses = list(train_losses(out).values())
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_30.pt", "checkpoint_60.pt"]
    record = read_metrics(out)[-1]
    for key in ("loss", "loss_0", "loss_1", "loss_2", "accuracy", "code_perplexity", "prob_perplexity", "temp", "lr",
                "grad_norm", "loss_scale", "audio_sec_per_sec", "masked_fraction"):
        assert key in record, key
    model = xlsr.Wav2Vec2Model.from_pretrained(out / "model")
    assert model.cfg == xlsr.Wav2Vec2Config.from_preset("tiny")
    assert (out / "config.yaml").is_file()


def run_in_process(cfg):
    from xlsr.pretrain.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def test_resume_reproduces_uninterrupted_run(corpus, tmp_path):
    straight = run_in_process(compose_config(overrides(corpus, tmp_path / "a", "optim.max_update=14",
                                                        "checkpoint.save_interval_updates=5")))
    first = run_in_process(compose_config(overrides(corpus, tmp_path / "b", "optim.max_update=14",
                                                     "checkpoint.save_interval_updates=5", "stop_at_update=5")))
    assert first.num_updates == 5
    resumed = run_in_process(compose_config(overrides(corpus, tmp_path / "b", "optim.max_update=14",
                                                       "checkpoint.save_interval_updates=5")))
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert a == b  # exact: same floats at every update, before and after the restart
    assert resumed.num_updates == straight.num_updates == 14
    assert resumed.epoch == straight.epoch > 1  # the run crossed epoch boundaries
    assert resumed.model.quantizer.curr_temp == straight.model.quantizer.curr_temp
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def final_parameters(out: Path, update: int) -> dict:
    return torch.load(out / "checkpoints" / f"checkpoint_{update}.pt", weights_only=False)["model"]


def test_two_process_ddp_matches_gradient_accumulation(corpus, tmp_path):
    common = ("optim.max_update=5", "checkpoint.save_interval_updates=5", "model.encoder_layerdrop=0.0",
              "distributed.backend=gloo", "device=cpu", "threads=1")
    single = tmp_path / "single"
    run_in_process(compose_config(overrides(corpus, single, *common, "optim.update_freq=2")))
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "xlsr.pretrain", *overrides(corpus, ddp, *common, "optim.update_freq=1")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_parameters(single, 5), final_parameters(ddp, 5)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    assert train_losses(single)[5] == pytest.approx(train_losses(ddp)[5], rel=1e-5)


def test_ddp_with_layerdrop_runs(corpus, tmp_path):
    """LayerDrop under DDP: synchronised decisions + zero gradients for skipped layers, no unused-parameter error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
           "-m", "xlsr.pretrain", *overrides(corpus, tmp_path / "ld", "optim.max_update=6", "model.encoder_layerdrop=0.5",
                                             "distributed.backend=gloo", "device=cpu", "threads=1")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


KILLER = """
import sys, torch
from xlsr.pretrain.checkpointing import save_atomic
path = sys.argv[1]
save_atomic({"step": 1, "weights": torch.zeros(10)}, path)
print("first saved", flush=True)
while True:
    save_atomic({"step": 2, "weights": torch.randn(60_000_000)}, path)
"""


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "checkpoint_1.pt"
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "first saved"
    tmp = path.with_name(path.name + ".tmp")
    deadline = time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 1_000_000) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp.exists(), "the kill did not land during a write"
    state = torch.load(path, weights_only=True)
    assert state["step"] in (1, 2) and state["weights"].numel() in (10, 60_000_000)


def test_init_from_golden_checkpoint_starts_from_its_weights(corpus, tmp_path):
    from xlsr.pretrain.trainer import build_model

    checkpoint = GOLDEN / "xlsr_mini" / "checkpoint.pt"
    cfg = compose_config(overrides(corpus, tmp_path / "init", f"model.init_from={checkpoint}"))
    model = build_model(cfg).eval()
    reference = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    inputs = torch.load(GOLDEN / "xlsr_mini" / "inputs.pt", weights_only=True)
    with torch.no_grad():
        ours = model.extract_features(inputs["source"], inputs["padding_mask"])
        theirs = reference.extract_features(inputs["source"], inputs["padding_mask"])
    assert torch.equal(ours.x, theirs.x)
    assert model.cfg == reference.cfg


def test_init_from_continues_pretraining(corpus, tmp_path):
    checkpoint = GOLDEN / "xlsr_mini" / "checkpoint.pt"
    out = tmp_path / "cont"
    run_in_process(compose_config(overrides(corpus, out, f"model.init_from={checkpoint}", "optim.max_update=3")))
    assert len(train_losses(out)) == 3


def test_training_checkpoint_loads_with_from_pretrained(corpus, tmp_path):
    trainer = run_in_process(compose_config(overrides(corpus, tmp_path / "ck", "optim.max_update=2")))
    model = xlsr.Wav2Vec2Model.from_pretrained(tmp_path / "ck" / "checkpoints" / "checkpoint_2.pt")
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert model.quantizer.curr_temp == trainer.model.quantizer.curr_temp


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(corpus, tmp_path, precision):
    out = tmp_path / precision
    run_in_process(compose_config(overrides(corpus, out, "optim.max_update=3", f"precision={precision}")))
    records = [r for r in read_metrics(out) if r["split"] == "train"]
    assert all(np.isfinite(r["loss"]) for r in records)
    if precision == "fp16":
        assert records[0]["loss_scale"] > 1  # the scaler is active


def test_validation_is_logged(corpus, tmp_path):
    out = tmp_path / "val"
    run_in_process(compose_config(overrides(corpus, out, "optim.max_update=4", f"data.valid_manifest={corpus}",
                                            "validate_interval_updates=2")))
    valid = [r for r in read_metrics(out) if r["split"] == "valid"]
    assert [r["update"] for r in valid] == [2, 4]
    assert valid[0]["loss"] > 0 and 0 <= valid[0]["accuracy"] <= 1


def test_polynomial_decay_schedule():
    from xlsr.pretrain.config import OptimConfig
    from xlsr.pretrain.trainer import polynomial_decay_lr

    cfg = OptimConfig(lr=6e-4, warmup_updates=100, max_update=1100, end_lr=0.0, power=1.0)
    assert polynomial_decay_lr(0, cfg) == 0.0
    assert polynomial_decay_lr(50, cfg) == pytest.approx(3e-4)
    assert polynomial_decay_lr(100, cfg) == pytest.approx(6e-4)
    assert polynomial_decay_lr(600, cfg) == pytest.approx(3e-4)
    assert polynomial_decay_lr(1100, cfg) == 0.0 and polynomial_decay_lr(5000, cfg) == 0.0


def test_typo_in_config_is_an_error(corpus, tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="optim.lrr"):
        compose_config(overrides(corpus, tmp_path, "optim.lrr=1e-3"))


def test_bad_file_in_manifest_is_skipped_and_counted(corpus, tmp_path, caplog):
    root = tmp_path / "bad"
    root.mkdir()
    lines = corpus.read_text().splitlines()
    source_root = Path(lines[0])
    for line in lines[1:]:
        name = line.split("\t")[0]
        (root / name).symlink_to(source_root / name)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 2000)
    manifest = root / "train.tsv"
    manifest.write_text("\n".join([str(root), *lines[1:], "broken.wav\t40000"]) + "\n")
    out = tmp_path / "run"
    from xlsr.audio import AudioWarning

    caplog.set_level("INFO", logger="xlsr.pretrain")
    with pytest.warns(AudioWarning, match="broken.wav: cannot decode"):
        trainer = run_in_process(compose_config(overrides(corpus, out, f"data.manifest={manifest}", "max_epoch=1",
                                                          "optim.max_update=1000")))
    assert trainer.train_loader.dataset.num_skipped == 1
    assert any("1 unreadable files skipped" in r.getMessage() for r in caplog.records)
    good_items = sum(len(b["id"]) for b in trainer.train_loader if b is not None)
    assert good_items == len(lines) - 1  # every good file is still trained on


def test_step_in_backward_gives_the_same_updates(corpus, tmp_path):
    """The optimizer applied per parameter inside backward: same losses and weights as the normal step."""
    common = ("optim.max_update=6", "checkpoint.save_interval_updates=6", "threads=1", "optim.clip_norm=0")
    normal = run_in_process(compose_config(overrides(corpus, tmp_path / "a", *common)))
    inline = run_in_process(compose_config(overrides(corpus, tmp_path / "b", *common, "optim.step_in_backward=true")))
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    # the same elementwise update of each parameter, so the same floats (the grad norm is summed in another order)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-5)
    for key, value in normal.model.state_dict().items():
        assert torch.equal(inline.model.state_dict()[key], value), key
    assert inline.optimizer.state_dict()["state"].keys() == normal.optimizer.state_dict()["state"].keys()
    assert all(p.grad is None for p in inline.model.parameters())  # nothing held between updates
    assert inline.step_in_backward is not None and normal.step_in_backward is None


@pytest.mark.parametrize("setting", ["optim.update_freq=2", "optim.clip_norm=1.0", "precision=fp16"])
def test_step_in_backward_refuses_what_it_cannot_do(corpus, tmp_path, setting):
    cfg = compose_config(overrides(corpus, tmp_path, "optim.step_in_backward=true", setting))
    with pytest.raises(ValueError, match=setting.split("=")[0].replace(".", r"\.")):
        run_in_process(cfg)
