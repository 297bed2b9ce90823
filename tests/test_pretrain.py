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


SPEECH = Path(__file__).parent / "fixtures" / "speech"


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """20 real utterances (5 languages, 1.0 to 2.4 s, all of different lengths): tests/fixtures/speech."""
    dest = tmp_path_factory.mktemp("speech_manifest")
    write_manifest(SPEECH, dest, valid_percent=0.0, progress=False)
    return dest / "train.tsv"


# with these sizes the speech corpus makes 7 batches per epoch: odd, so 2 ranks end an epoch on an uneven round
SPEECH_BATCHING = ("data.max_tokens=80000", "data.max_sample_size=32000", "data.min_sample_size=16000")


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """4 tone 'utterances' of 1.0 to 1.3 s, uncropped: a corpus the tiny model learns within 60 updates."""
    root = tmp_path_factory.mktemp("few")
    rng = np.random.default_rng(0)
    for i in range(4):
        t = np.arange(int((1.0 + 0.1 * i) * 16000)) / 16000
        pitch = rng.uniform(90, 250)
        wav = sum(np.sin(2 * np.pi * pitch * k * t + rng.uniform(0, 6)) / k for k in range(1, 8))
        wav *= 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)
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


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if r["split"] == "train"]


def train_losses(out: Path) -> dict[int, float]:
    return {r["update"]: r["loss"] for r in train_records(out)}


def chance_accuracy(preset: str = "tiny") -> float:
    return 1 / (1 + xlsr.Wav2Vec2Config.from_preset(preset).num_negatives)


def not_collapsed(preset: str = "tiny") -> float:
    """A code perplexity above this uses a tenth of the codebook or more: no collapse."""
    return 0.1 * xlsr.Wav2Vec2Config.from_preset(preset).num_codevectors


def test_command_line_run_learns_and_writes_outputs(few, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "xlsr.pretrain", *overrides(few, out, "optim.max_update=60",
                                                              "checkpoint.save_interval_updates=30")]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    losses = list(train_losses(out).values())
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    # a collapsed codebook makes negatives equal the positive and the loss falls anyway: check both
    last = train_records(out)[-10:]
    accuracy = np.mean([r["accuracy"] for r in last])
    assert accuracy > 4 * chance_accuracy(), accuracy
    perplexity = np.mean([r["code_perplexity"] for r in last])
    assert perplexity > not_collapsed(), perplexity
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_30.pt", "checkpoint_60.pt"]
    record = train_records(out)[-1]
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


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch(speech, tmp_path):
    """Saved after the epoch's last batch, before the epoch ended: the resumed run goes on to the next epoch (it once
    stopped with "no batch could be loaded") and equals the uninterrupted run."""
    common = ("optim.max_update=10", "checkpoint.save_interval_updates=7", "device=cpu", *SPEECH_BATCHING)
    straight = run_in_process(compose_config(overrides(speech, tmp_path / "straight", *common)))
    out = tmp_path / "stopped"
    run_in_process(compose_config(overrides(speech, out, *common, "stop_at_update=7")))  # 7 batches = 1 epoch
    resumed = run_in_process(compose_config(overrides(speech, out, *common)))
    assert resumed.num_updates == 10 and resumed.epoch == 2
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def final_parameters(out: Path, update: int) -> dict:
    return torch.load(out / "checkpoints" / f"checkpoint_{update}.pt", weights_only=False)["model"]


def run_torchrun(args: list[str], port: int, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "-m", "xlsr.pretrain", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("layerdrop", [0.0, 0.5])
def test_two_process_ddp_matches_gradient_accumulation(speech, tmp_path, layerdrop):
    """2 ranks == 1 process with update_freq=2 across an epoch boundary with an odd batch count (7): the rank left
    without a batch runs a zero-weight pass, so every batch trains; LayerDrop makes the same decisions."""
    common = ("optim.max_update=6", "checkpoint.save_interval_updates=6", f"model.encoder_layerdrop={layerdrop}",
              "distributed.backend=gloo", "device=cpu", "threads=1", *SPEECH_BATCHING)
    single_out = tmp_path / "single"
    single = run_in_process(compose_config(overrides(speech, single_out, *common, "optim.update_freq=2")))
    assert single.train_loader.batch_sampler.total_batches == 7
    assert single.epoch == 2  # 4 updates in epoch 1 (the last one a single batch), 2 in epoch 2
    ddp = tmp_path / "ddp"
    run_torchrun(overrides(speech, ddp, *common, "optim.update_freq=1"), port=29517 + int(10 * layerdrop))
    # every update logged (log_interval=1): the same loss and gradient norm. The norm shows a wrong normalisation
    # over the ranks (a gradient 2x too large or too small) at once; the weights show it only weakly, since a
    # uniform gradient scale changes AdamW's step only through eps
    for x, y in zip(train_records(single_out), train_records(ddp), strict=True):
        assert x["update"] == y["update"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5), (x["update"], x["grad_norm"], y["grad_norm"])
    assert [r["update"] for r in train_records(ddp)] == [1, 2, 3, 4, 5, 6]
    a, b = final_parameters(single_out, 6), final_parameters(ddp, 6)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    epochs = [r for r in read_metrics(ddp) if r["split"] == "epoch" and r["complete"]]
    assert [(r["epoch"], r["update"], r["num_batches"]) for r in epochs] == [(1, 4, 7)]  # every batch trained
    if layerdrop:  # the decisions of those 6 updates did skip layers (else this case would test nothing)
        single.model.train()
        decisions = []
        for update in range(6):
            single.num_updates = update
            decisions.extend(single._layer_keep())
        assert not all(decisions) and any(decisions), decisions


KILLER = """
import sys, torch
from xlsr.training.checkpointing import save_atomic
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
    from xlsr.tasks.pretraining import build_model

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
    """One update from the golden weights: AdamW's first step moves each weight by at most the learning rate
    (|m / sqrt(v)| <= 1 after bias correction), so the result lies within lr of the checkpoint's weights."""
    checkpoint = GOLDEN / "xlsr_mini" / "checkpoint.pt"
    out = tmp_path / "cont"
    trainer = run_in_process(compose_config(overrides(
        corpus, out, f"model.init_from={checkpoint}", "optim.max_update=100", "stop_at_update=1",
        "optim.warmup_updates=0", "optim.lr=1e-3", "optim.weight_decay=0")))
    assert len(train_losses(out)) == 1
    start = xlsr.Wav2Vec2Model.from_pretrained(checkpoint).state_dict()
    moved = {k: (v - start[k]).abs().max().item() for k, v in trainer.model.state_dict().items()
             if v.is_floating_point()}
    assert max(moved.values()) <= 1e-3 * (1 + 1e-4), max(moved.items(), key=lambda kv: kv[1])
    assert sum(m > 0 for m in moved.values()) > len(moved) // 2  # and it did train


def test_training_checkpoint_loads_with_from_pretrained(corpus, tmp_path):
    trainer = run_in_process(compose_config(overrides(corpus, tmp_path / "ck", "optim.max_update=2")))
    model = xlsr.Wav2Vec2Model.from_pretrained(tmp_path / "ck" / "checkpoints" / "checkpoint_2.pt")
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert model.quantizer.curr_temp == trainer.model.quantizer.curr_temp


@pytest.fixture(scope="module")
def fp32_reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    run_in_process(compose_config(overrides(corpus, out, "optim.max_update=3")))
    return train_records(out)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(corpus, tmp_path, precision, fp32_reference):
    out = tmp_path / precision
    run_in_process(compose_config(overrides(corpus, out, "optim.max_update=3", f"precision={precision}")))
    records = train_records(out)
    assert all(np.isfinite(r["loss"]) for r in records)
    # update 1 sees the same batch, masks and weights as in fp32: only the rounding differs
    assert records[0]["loss"] == pytest.approx(fp32_reference[0]["loss"], rel=0.02)
    assert records[0]["accuracy"] == pytest.approx(fp32_reference[0]["accuracy"], abs=0.05)
    assert [r["update"] for r in records] == [1, 2, 3]
    if precision == "fp16":
        assert records[0]["loss_scale"] == 128.0  # the scaler is active, from optim.fp16_init_scale


def test_validation_is_logged(corpus, tmp_path):
    from xlsr.pretrain.loss import compute_loss
    from xlsr.training.trainer import _batch_seed

    out = tmp_path / "val"
    trainer = run_in_process(compose_config(overrides(corpus, out, "optim.max_update=4", f"data.valid_manifest={corpus}",
                                                      "validate_interval_updates=2")))
    valid = [r for r in read_metrics(out) if r["split"] == "valid"]
    assert [r["update"] for r in valid] == [2, 4]
    assert valid[0]["loss"] > 0 and 0 <= valid[0]["accuracy"] <= 1
    # the logged numbers are the final model's loss over the whole valid set, in bits per masked frame
    model = trainer.model.eval()
    total = frames = correct = 0.0
    with torch.no_grad():
        for index, batch in enumerate(trainer.valid_loader):
            torch.manual_seed(_batch_seed(trainer.cfg.seed, 0, index))
            loss = compute_loss(model(batch.source, batch.padding_mask), tuple(trainer.cfg.model.loss_weights))
            total, frames, correct = total + float(loss.total), frames + loss.sample_size, correct + loss.correct
    assert valid[-1]["loss"] == pytest.approx(total / frames / np.log(2), rel=1e-6)
    assert valid[-1]["accuracy"] == pytest.approx(correct / frames)
    assert valid[-1]["loss"] == pytest.approx(valid[-1]["loss_0"] + valid[-1]["loss_1"] + valid[-1]["loss_2"])
    assert valid[0]["loss"] != valid[1]["loss"]  # the model changed between the two


def test_polynomial_decay_schedule():
    from xlsr.pretrain.config import OptimConfig
    from xlsr.training.optim import polynomial_decay_lr

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

    caplog.set_level("INFO", logger="xlsr")
    with pytest.warns(AudioWarning, match="broken.wav: cannot decode"):
        trainer = run_in_process(compose_config(overrides(corpus, out, f"data.manifest={manifest}", "max_epoch=1",
                                                          "optim.max_update=1000")))
    assert trainer.train_loader.dataset.num_skipped == 1
    assert any("1 unreadable files skipped" in r.getMessage() for r in caplog.records)
    good_items = sum(len(b.ids) for b in trainer.train_loader if b is not None)
    assert good_items == len(lines) - 1  # every good file is still trained on


def test_step_in_backward_gives_the_same_updates(corpus, tmp_path):
    """The optimizer applied per parameter inside backward: same losses and weights as the normal step."""
    common = ("optim.max_update=6", "checkpoint.save_interval_updates=6", "threads=1", "optim.clip_norm=0")
    normal = run_in_process(compose_config(overrides(corpus, tmp_path / "a", *common)))
    inline = run_in_process(compose_config(overrides(corpus, tmp_path / "b", *common, "optim.step_in_backward=true")))
    a, b = ([r for r in read_metrics(tmp_path / name) if r["split"] == "train"] for name in "ab")
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


def test_last_update_is_logged_and_each_epoch_ends_with_a_summary(corpus, tmp_path, caplog):
    caplog.set_level("INFO", logger="xlsr")
    out = tmp_path / "run"
    trainer = run_in_process(compose_config(overrides(corpus, out, "optim.max_update=13", "log_interval=10")))
    assert [r["update"] for r in train_records(out)] == [1, 10, 13]  # the last update of a run is always logged
    batches = trainer.train_loader.batch_sampler.total_batches
    epochs = [r for r in read_metrics(out) if r["split"] == "epoch"]
    complete = [r for r in epochs if r["complete"]]
    assert [r["update"] for r in complete] == [batches * (i + 1) for i in range(13 // batches)]
    assert all(r["num_batches"] == batches and r["updates"] == batches for r in complete)
    assert epochs[-1]["update"] == 13 and epochs[-1]["complete"] == (13 % batches == 0)
    assert sum(r["num_batches"] for r in epochs) == 13  # every batch of every epoch, once
    assert sum("end of epoch 1 at update" in r.getMessage() for r in caplog.records) == 1


def test_fp16_overflow_makes_no_update_and_no_checkpoint_or_log_for_it(corpus, tmp_path, caplog):
    """An overflowing fp16 step is skipped; logging, validation and saving fire only on real updates."""
    caplog.set_level("WARNING", logger="xlsr")
    out = tmp_path / "fp16"
    trainer = run_in_process(compose_config(overrides(
        corpus, out, "precision=fp16", "optim.fp16_init_scale=262144", "optim.max_update=2", "data.max_tokens=32000",
        "checkpoint.save_interval_updates=1", "validate_interval_updates=1", f"data.valid_manifest={corpus}",
        "max_valid_batches=1")))
    overflows = [r for r in caplog.records if "fp16 gradient overflow" in r.getMessage()]
    assert overflows, "the loss scale did not overflow: the test checks nothing"
    # each overflow halves the scale (GradScaler's backoff), and an update logs the scale it ran at
    halved_before = [int(r.getMessage().split(" at update ")[1].split(":")[0]) for r in overflows]
    assert [r["loss_scale"] for r in train_records(out)] == [
        262144 / 2 ** sum(u <= update for u in halved_before) for update in (1, 2)]
    assert trainer.num_updates == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_1.pt", "checkpoint_2.pt"]
    assert [(r["split"], r["update"]) for r in read_metrics(out) if r["split"] != "epoch"] == [
        ("train", 1), ("valid", 1), ("train", 2), ("valid", 2)]


def test_resume_never_starts_clean_and_keeps_the_earlier_run(corpus, tmp_path):
    out = tmp_path / "run"
    run_in_process(compose_config(overrides(corpus, out, "optim.max_update=6", "checkpoint.save_interval_updates=3")))
    run_in_process(compose_config(overrides(corpus, out, "optim.max_update=2", "checkpoint.resume=never",
                                            "checkpoint.save_interval_updates=1", "checkpoint.keep_last=1")))
    assert [r["update"] for r in train_records(out)] == [1, 2]  # not appended to the old run's lines
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint_2.pt"]  # keep_last kept the new one
    (archive,) = (out / "previous_runs").iterdir()
    assert sorted(p.name for p in (archive / "checkpoints").iterdir()) == ["checkpoint_3.pt", "checkpoint_6.pt"]
    assert [r["update"] for r in train_records(archive)] == [1, 2, 3, 4, 5, 6]
    assert (archive / "model" / "config.json").is_file()


def test_resume_from_a_path_continues_that_checkpoint_exactly(corpus, tmp_path):
    first = tmp_path / "first"
    run_in_process(compose_config(overrides(corpus, first, "optim.max_update=8", "checkpoint.save_interval_updates=4")))
    second = tmp_path / "second"
    resumed = run_in_process(compose_config(overrides(
        corpus, second, "optim.max_update=8", f"checkpoint.resume={first / 'checkpoints' / 'checkpoint_4.pt'}")))
    assert resumed.num_updates == 8
    assert train_losses(second) == {u: x for u, x in train_losses(first).items() if u > 4}
    a, b = final_parameters(first, 8), final_parameters(second, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(corpus, tmp_path, caplog):
    out = tmp_path / "run"
    run_in_process(compose_config(overrides(corpus, out, "optim.max_update=4", "checkpoint.save_interval_updates=2",
                                            "stop_at_update=4")))
    newest = out / "checkpoints" / "checkpoint_4.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a damaged file
    caplog.set_level("WARNING", logger="xlsr")
    trainer = run_in_process(compose_config(overrides(corpus, out, "optim.max_update=4",
                                                      "checkpoint.save_interval_updates=2", "stop_at_update=3")))
    assert any("checkpoint_4.pt" in r.getMessage() for r in caplog.records)
    assert trainer.num_updates == 3  # resumed at 2
    assert (out / "checkpoints" / "checkpoint_4.pt.unreadable").is_file()


def test_keep_last_rotation(corpus, tmp_path):
    out = tmp_path / "run"
    run_in_process(compose_config(overrides(corpus, out, "optim.max_update=7", "checkpoint.save_interval_updates=2",
                                            "checkpoint.keep_last=2")))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_6.pt", "checkpoint_7.pt"]


def test_max_time_minutes_stops_cleanly_with_a_checkpoint(corpus, tmp_path, caplog):
    caplog.set_level("INFO", logger="xlsr")
    out = tmp_path / "run"
    trainer = run_in_process(compose_config(overrides(corpus, out, "optim.max_update=100000", "max_time_minutes=0.02",
                                                      "checkpoint.save_interval_updates=100000")))
    assert 0 < trainer.num_updates < 100000
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"checkpoint_{trainer.num_updates}.pt"]
    assert train_records(out)[-1]["update"] == trainer.num_updates
    assert any("max_time_minutes=0.02 used" in r.getMessage() for r in caplog.records)


def test_tensorboard_output(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_in_process(compose_config(overrides(corpus, out, "optim.max_update=3", "tensorboard=true")))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx(list(train_losses(out).values()), rel=1e-6)


def test_wrong_type_in_config_is_an_error(corpus, tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="optim.lr"):
        compose_config(overrides(corpus, tmp_path, "optim.lr=fast"))


def test_pad_true_trains_every_sample_of_every_file(speech, tmp_path):
    """data.pad=true: one epoch trains exactly the (cropped) audio of every file, padding not counted."""
    out = tmp_path / "run"
    trainer = run_in_process(compose_config(overrides(speech, out, "data.pad=true", "max_epoch=1",
                                                      "optim.max_update=1000", *SPEECH_BATCHING)))
    expected = trainer.train_loader.dataset.sizes.sum() / 16000
    records = train_records(out)
    assert sum(r["audio_seconds"] for r in records) == pytest.approx(expected, rel=1e-9)
    assert len(records) == trainer.train_loader.batch_sampler.total_batches == 7
    assert all(0.2 < r["masked_fraction"] < 0.7 for r in records)  # of valid frames (padded rows: fewer spans)


def test_clip_norm_clips_the_gradient(corpus, tmp_path, monkeypatch):
    from xlsr.pretrain.trainer import Trainer

    norms = []
    original = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    out = tmp_path / "run"
    Trainer(compose_config(overrides(corpus, out, "optim.max_update=3", "optim.clip_norm=0.01"))).train()
    logged = [r["grad_norm"] for r in train_records(out)]
    assert len(norms) == 3 and all(n == pytest.approx(0.01, rel=1e-4) for n in norms), norms
    assert all(g > 0.01 for g in logged)  # the logged norm is the one before clipping, as fairseq's


def test_collapse_and_saturation_warnings(tmp_path, caplog):
    from xlsr.tasks.pretraining import CodebookHealth

    caplog.set_level("WARNING", logger="xlsr")
    log = CodebookHealth(enabled=True)
    log.check_health(500, {"code_perplexity": 40.0, "accuracy": 0.4}, num_codevectors=640)
    assert not caplog.records
    log.check_health(50, {"code_perplexity": 1.0, "accuracy": 1.0}, num_codevectors=640)  # too early to judge
    assert not caplog.records
    for update in (500, 600):
        log.check_health(update, {"code_perplexity": 3.0, "accuracy": 0.995}, num_codevectors=640)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # once each
    assert "collapsed" in messages[0] and "3.00 of 640" in messages[0]
    assert "trivial" in messages[1]


def test_tri_stage_schedule():
    """fairseq's tri_stage: 10 % linear warm-up from 1 % of the peak, 40 % hold, 50 % exponential decay to 5 %."""
    from types import SimpleNamespace

    from xlsr.training.optim import tri_stage_lr

    cfg = SimpleNamespace(lr=3e-4, max_update=1000, phase_ratio=[0.1, 0.4, 0.5], init_lr_scale=0.01,
                          final_lr_scale=0.05)
    assert tri_stage_lr(0, cfg) == pytest.approx(3e-6)
    assert tri_stage_lr(50, cfg) == pytest.approx(3e-6 + (3e-4 - 3e-6) * 0.5)
    assert tri_stage_lr(100, cfg) == tri_stage_lr(499, cfg) == pytest.approx(3e-4)
    assert tri_stage_lr(750, cfg) == pytest.approx(3e-4 * 0.05**0.5)
    assert tri_stage_lr(1000, cfg) == pytest.approx(3e-4 * 0.05)
    assert tri_stage_lr(5000, cfg) == pytest.approx(3e-4 * 0.05)
