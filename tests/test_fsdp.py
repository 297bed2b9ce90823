"""Fully sharded training (``distributed.strategy=fsdp``) on 2 gloo ranks: the same training as one process, exact
resume from sharded checkpoints, resuming at another world size and strategy, bf16 + activation checkpointing,
damaged shards."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import xlsr
from test_pretrain import (  # noqa: F401 (speech, few: fixtures)
    SPEECH_BATCHING,
    chance_accuracy,
    few,
    overrides,
    read_metrics,
    run_in_process,
    run_torchrun,
    speech,
    train_losses,
    train_records,
)
from xlsr.pretrain.config import compose_config

REPO = Path(__file__).resolve().parents[1]
COMMON = ("optim.max_update=6", "checkpoint.save_interval_updates=3", "checkpoint.keep_last=0", "optim.clip_norm=1.0",
          "distributed.backend=gloo", "device=cpu", "threads=1", *SPEECH_BATCHING)  # 7 batches per epoch
FSDP = "distributed.strategy=fsdp"


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The run's consolidated ``model/`` folder, read as a user would."""
    return xlsr.Wav2Vec2Model.from_pretrained(out / "model").state_dict()


def worst_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_updates(single: Path, sharded: Path) -> None:
    """The runs (or a run and its resumed copy) logged the same 6 updates (log_interval=1) with the same loss and gradient norm. The norm shows a
    wrong normalisation over the ranks (a gradient 2x too large or too small) at once; the weights show it only
    weakly: a uniform gradient scale changes AdamW's step only through eps, and clipping takes it out."""
    a, b = train_records(single), train_records(sharded)
    assert [r["update"] for r in a] == [r["update"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x["update"], x["loss"], y["loss"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5), (x["update"], x["grad_norm"], y["grad_norm"])


def run_module(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """``python -m xlsr.pretrain`` in one process (FSDP then makes a process group of one)."""
    result = subprocess.run([sys.executable, "-m", "xlsr.pretrain", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def fsdp_run(speech, tmp_path_factory):  # noqa: F811
    """6 updates with FSDP on 2 ranks across an epoch boundary, sharded checkpoints at updates 3 and 6."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    run_torchrun(overrides(speech, out, *COMMON, FSDP), port=29541)
    return out


@pytest.fixture(scope="module")
def single_run(speech, tmp_path_factory):  # noqa: F811
    """The same 6 updates in one process with update_freq=2 (DDP's and FSDP's reference), .pt checkpoints."""
    out = tmp_path_factory.mktemp("single") / "run"
    trainer = run_in_process(compose_config(overrides(speech, out, *COMMON, "optim.update_freq=2")))
    assert trainer.epoch == 2 and trainer.train_loader.batch_sampler.total_batches == 7
    return out


def test_fsdp_writes_one_shard_per_rank_and_a_consolidated_model(fsdp_run):
    folder = fsdp_run / "checkpoints" / "checkpoint_6"
    names = {p.name for p in folder.iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.pt", "shards.json"} <= names
    listed = json.loads((folder / "shards.json").read_text())["files"]
    assert set(listed) == names - {"shards.json"}
    # each rank wrote about half of the model + optimizer, not all of it
    sizes = [(folder / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
    total_params = sum(v.numel() for v in final_weights(fsdp_run).values())
    full_bytes = 3 * 4 * total_params  # fp32 weights + AdamW's two moments
    assert all(0.35 * full_bytes < size < 0.65 * full_bytes for size in sizes), (sizes, full_bytes)
    assert not list((fsdp_run / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("layerdrop,shard_group_size", [(0.0, 0), (0.5, 0), (0.0, 1)])
def test_fsdp_matches_one_process_with_gradient_accumulation(speech, single_run, fsdp_run, tmp_path,  # noqa: F811
                                                             layerdrop, shard_group_size):
    """Also with LayerDrop (the same layers skipped on both ranks), and hybrid sharding (a 2 x 1 mesh: shards of
    one rank, replicated twice). Gradient clipping acts on the norm of the sharded gradients."""
    if layerdrop or shard_group_size:
        extra = (f"model.encoder_layerdrop={layerdrop}",)
        single = tmp_path / "single"
        run_in_process(compose_config(overrides(speech, single, *COMMON, "optim.update_freq=2", *extra)))
        sharded = tmp_path / "fsdp"
        run_torchrun(overrides(speech, sharded, *COMMON, FSDP, *extra,
                               f"distributed.shard_group_size={shard_group_size}"), port=29543 + shard_group_size)
    else:
        single, sharded = single_run, fsdp_run
    assert_same_updates(single, sharded)
    assert worst_difference(final_weights(single), final_weights(sharded)) <= 1e-5
    assert any(r["grad_norm"] > 1.0 for r in train_records(sharded))  # clip_norm=1.0 did clip


def test_two_nodes_with_hybrid_sharding_match_one_process(speech, tmp_path):  # noqa: F811
    """README's multi-node command on one machine: 2 torchrun "nodes" x 2 processes meeting at a c10d rendezvous,
    shards within each node (``shard_group_size=2``), replicas across them: a 2 x 2 mesh, == 1 process with
    ``update_freq=4``."""
    single = tmp_path / "single"
    run_in_process(compose_config(overrides(speech, single, *COMMON, "optim.update_freq=4")))
    out = tmp_path / "nodes"
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:29556", "--rdzv-id=xlsr-test", "-m", "xlsr.pretrain",
            *overrides(speech, out, *COMMON, FSDP, "distributed.shard_group_size=2")]
    nodes = [subprocess.Popen(node, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "fsdp: 4 ranks, sharded over groups of 2, replicated 2x" in "".join(outputs)
    assert_same_updates(single, out)
    assert worst_difference(final_weights(single), final_weights(out)) <= 1e-5


def test_fsdp_resume_reproduces_the_uninterrupted_run(speech, fsdp_run, tmp_path):  # noqa: F811
    out = tmp_path / "stopped"
    run_torchrun(overrides(speech, out, *COMMON, FSDP, "stop_at_update=3"), port=29545)
    assert (out / "checkpoints" / "checkpoint_3").is_dir()
    run_torchrun(overrides(speech, out, *COMMON, FSDP), port=29546)  # resume=auto
    a, b = final_weights(fsdp_run), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), worst_difference(a, b)
    assert train_losses(out) == train_losses(fsdp_run)


def copy_run_until(run: Path, update: int, dest: Path) -> Path:
    """A copy of ``run`` as it was at ``update``: its checkpoints up to then and its metrics lines."""
    dest.mkdir(parents=True)
    (dest / "checkpoints").mkdir()
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1].split(".")[0]) <= update:
            (shutil.copytree if ckpt.is_dir() else shutil.copy)(ckpt, dest / "checkpoints" / ckpt.name)
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["update"] <= update]
    (dest / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return dest


def test_sharded_checkpoint_resumes_on_one_rank(speech, fsdp_run, tmp_path):  # noqa: F811
    """2 ranks (fsdp) -> 1 process (fsdp: a group of one, and ddp: no process group), update_freq=2."""
    for strategy in ("fsdp", "ddp"):
        out = copy_run_until(fsdp_run, 3, tmp_path / strategy)
        result = run_module(overrides(speech, out, *COMMON, f"distributed.strategy={strategy}", "optim.update_freq=2"))
        assert "resuming a checkpoint of 2 rank(s) (fsdp) on 1 rank(s)" in result.stdout + result.stderr
        assert_same_updates(fsdp_run, out)
        assert worst_difference(final_weights(fsdp_run), final_weights(out)) <= 1e-5


def test_sharded_checkpoint_resumes_with_ddp_and_ddp_checkpoint_with_fsdp(speech, single_run, fsdp_run,  # noqa: F811
                                                                          tmp_path):
    out = copy_run_until(fsdp_run, 3, tmp_path / "to_ddp")
    result = run_torchrun(overrides(speech, out, *COMMON, "distributed.strategy=ddp"), port=29547)
    assert "(fsdp) on 2 rank(s) (ddp)" in result.stdout + result.stderr
    assert_same_updates(fsdp_run, out)
    assert worst_difference(final_weights(fsdp_run), final_weights(out)) <= 1e-5
    assert (out / "checkpoints" / "checkpoint_6.pt").is_file()  # DDP writes its own kind from then on

    out = copy_run_until(single_run, 3, tmp_path / "to_fsdp")  # a .pt checkpoint of one process
    result = run_torchrun(overrides(speech, out, *COMMON, FSDP), port=29548)
    assert "checkpoint of 1 rank(s) (ddp) on 2 rank(s) (fsdp)" in result.stdout + result.stderr
    assert_same_updates(single_run, out)
    assert worst_difference(final_weights(single_run), final_weights(out)) <= 1e-5


def test_damaged_shard_is_named_and_auto_resume_takes_the_one_before(speech, fsdp_run, tmp_path):  # noqa: F811
    out = copy_run_until(fsdp_run, 6, tmp_path / "damaged")
    shard = out / "checkpoints" / "checkpoint_6" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    explicit = run_module(overrides(speech, tmp_path / "other", *COMMON, FSDP,
                                    f"checkpoint.resume={shard.parent}"), check=False)
    assert explicit.returncode == 2 and f"{shard}: damaged" in explicit.stdout + explicit.stderr
    missing = out / "checkpoints" / "checkpoint_3" / "__0_0.distcp"
    result = run_module(overrides(speech, out, *COMMON, FSDP, "optim.update_freq=2", "optim.max_update=7"))
    assert f"{shard}: damaged" in result.stdout + result.stderr and "resumed from" in result.stdout + result.stderr
    assert "checkpoint_3 at update 3" in result.stdout + result.stderr
    assert (out / "checkpoints" / "checkpoint_6.unreadable").is_dir()
    assert list(train_losses(out)) == [1, 2, 3, 4, 5, 6, 7]
    missing.unlink()
    shutil.rmtree(out / "checkpoints" / "checkpoint_7")
    shutil.rmtree(out / "checkpoints" / "checkpoint_6")
    again = run_module(overrides(speech, out, *COMMON, FSDP, f"checkpoint.resume={missing.parent}"), check=False)
    assert again.returncode == 2 and f"{missing}: missing" in again.stdout + again.stderr


FAILING_TRAINER = """
import logging, sys
from xlsr.pretrain.config import compose_config
from xlsr.pretrain.trainer import Trainer, run_command

class Failing(Trainer):
    def train(self):
        raise RuntimeError("a failure in the training loop")

run_command(Failing, compose_config(sys.argv[1:]), logging.getLogger("xlsr.pretrain"))
"""


def test_an_error_in_training_under_a_process_group_exits_1_with_its_traceback(speech, tmp_path):  # noqa: F811
    """run_command ends a process with a group by os._exit (no interpreter shut-down): the error still shows."""
    result = subprocess.run([sys.executable, "-c", FAILING_TRAINER, *overrides(speech, tmp_path, *COMMON, FSDP)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "training failed" in output and "Traceback" in output and "a failure in the training loop" in output
    assert "terminate called" not in output

def test_bf16_and_activation_checkpointing_train_under_fsdp(few, tmp_path):  # noqa: F811
    """The tone corpus the tiny model learns (test_pretrain's ``few``), 2 files per rank and update."""
    out = tmp_path / "bf16"
    run_torchrun(overrides(few, out, "distributed.backend=gloo", "device=cpu", "threads=1", FSDP, "precision=bf16",
                           "model.activation_checkpointing=true", "data.max_tokens=48000", "optim.max_update=50",
                           "checkpoint.save_interval_updates=100"), port=29549)
    losses = list(train_losses(out).values())
    assert len(losses) == 50 and all(map(math.isfinite, losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.1, losses
    accuracy = np.mean([r["accuracy"] for r in train_records(out)[-10:]])
    assert accuracy > 4 * chance_accuracy(), accuracy


def test_sharded_folders_are_listed_pruned_and_their_temporary_folders_ignored(tmp_path):
    from xlsr.training import checkpointing

    for update in (3, 6, 9):
        (tmp_path / f"checkpoint_{update}").mkdir()
        (tmp_path / f"checkpoint_{update}" / "shards.json").write_text("{}")
    (tmp_path / "checkpoint_12.tmp").mkdir()  # a save that crashed
    (tmp_path / "checkpoint_2.pt").write_bytes(b"x")  # an earlier DDP checkpoint of the same run
    (tmp_path / "checkpoint_5").write_bytes(b"x")  # neither kind: a file without .pt
    names = [p.name for p in checkpointing.list_checkpoints(tmp_path)]
    assert names == ["checkpoint_2.pt", "checkpoint_3", "checkpoint_6", "checkpoint_9"]
    checkpointing.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_5", "checkpoint_6", "checkpoint_9"]


def test_from_pretrained_reads_a_sharded_checkpoint_folder(fsdp_run):
    """A sharded folder is a pretrained checkpoint too (model.init_from, from_pretrained), read in one process."""
    model = xlsr.Wav2Vec2Model.from_pretrained(fsdp_run / "checkpoints" / "checkpoint_6")
    final = final_weights(fsdp_run)
    assert all(torch.equal(value, final[key]) for key, value in model.state_dict().items())
    assert model.checkpoint_info["num_updates"] == 6


OVERFLOW_ON_ONE_RANK = """
import json, logging, math, sys
import torch.distributed as dist
import xlsr.tasks.pretraining  # registers the task of PretrainConfig
from xlsr.pretrain.config import compose_config
from xlsr.training import trainer

real_step = trainer.optimizer_step
done = {"updated": False, "injected": False}

def step_with_an_inf_on_the_last_rank(params, optimizer, scaler, scale, clip_norm):
    # once, after the first update was made: an inf in the last gradient element of the first parameter, which
    # only the last rank holds under FSDP (its shard); in one process, the same element
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if done["updated"] and not done["injected"]:
        done["injected"] = True
        if rank == world - 1:
            grad = next(p.grad for p in params if p.grad is not None)
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local.view(-1)[-1] = math.inf
    result = real_step(params, optimizer, scaler, scale, clip_norm)
    done["updated"] = done["updated"] or not result[2]
    steps = max((int(s["step"]) for s in optimizer.state.values()), default=0)
    print(json.dumps({"rank": rank, "optimizer_steps": steps}), flush=True)
    return result

trainer.optimizer_step = step_with_an_inf_on_the_last_rank
trainer.run_command(trainer.Trainer, compose_config(sys.argv[1:]), logging.getLogger("xlsr.pretrain"))
"""


def overflows_and_optimizer_steps(output: str) -> tuple[list[tuple[int, float]], dict[int, int]]:
    """From a run of OVERFLOW_ON_ONE_RANK: rank 0's overflow warnings as (update, new loss scale), and each rank's
    count of AdamW steps made (at its last optimizer_step)."""
    overflows = [(int(update), float(scale)) for update, scale in
                 re.findall(r"fp16 gradient overflow at update (\d+): step skipped, loss scale -> (\S+)", output)]
    steps = {}  # the ranks' lines may interleave: found anywhere, each rank's in its order
    for rank, count in re.findall(r'\{"rank": (\d+), "optimizer_steps": (\d+)\}', output):
        steps[int(rank)] = int(count)
    return overflows, steps


def test_fp16_under_fsdp_backs_off_the_loss_scale_on_every_rank(speech, tmp_path):  # noqa: F811
    """fp16 with the sharded scaler: a loss scale too large for fp16 (65536) overflows and is halved until it fits,
    then an inf in one rank's gradient shard alone (injected) halves it again; no rank updates its shards for an
    overflowing step, training continues, and all of it as one process with update_freq=2 does (plain scaler)."""
    script = tmp_path / "overflow_on_one_rank.py"
    script.write_text(OVERFLOW_ON_ONE_RANK)
    init_scale = 65536.0
    settings = ("distributed.backend=gloo", "device=cpu", "threads=1", *SPEECH_BATCHING, "precision=fp16",
                "optim.max_update=3", "optim.clip_norm=1.0", f"optim.fp16_init_scale={init_scale}",
                "distributed.timeout_minutes=1")  # ranks that disagree on a step fail soon
    single = tmp_path / "single"
    result = subprocess.run([sys.executable, str(script), *overrides(speech, single, *settings, "optim.update_freq=2")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single_overflows, single_steps = overflows_and_optimizer_steps(result.stdout + result.stderr)
    out = tmp_path / "fp16"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29550",
                             str(script), *overrides(speech, out, *settings, FSDP)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    overflows, steps = overflows_and_optimizer_steps(result.stdout + result.stderr)

    natural = [scale for update, scale in overflows if update == 1]
    assert natural, "the loss scale did not overflow: the test checks nothing"
    assert natural == [init_scale / 2**i for i in range(1, len(natural) + 1)]  # halved at each overflow
    records = train_records(out)
    fitting = natural[-1]
    assert overflows == [(1, scale) for scale in natural] + [(2, fitting / 2)]  # and the injected one at update 2
    assert [(r["update"], r["loss_scale"]) for r in records] == [(1, fitting), (2, fitting / 2), (3, fitting / 2)]
    assert steps == {0: 3, 1: 3}  # 3 updates made, on both ranks: none for an overflowing step
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    # one process decides the same (its scaler sees the whole gradient) and starts from the same untouched weights
    assert (overflows, {0: 3}) == (single_overflows, single_steps)
    single_records = train_records(single)
    assert [r["loss_scale"] for r in records] == [r["loss_scale"] for r in single_records]
    assert records[0]["loss"] == pytest.approx(single_records[0]["loss"], rel=1e-4)


def test_another_number_of_ranks_continues_at_the_first_untrained_batch(speech, tmp_path):  # noqa: F811
    """1 process stopped after 3 of the epoch's 7 batches, resumed on 2 ranks: they take batches 3-6 (3 and 5, 4 and
    6), exactly what one process with update_freq=2 does from there; every batch of the epoch trains once."""
    first = tmp_path / "first"
    run_in_process(compose_config(overrides(speech, first, *COMMON, "stop_at_update=3")))  # update_freq=1
    two = copy_run_until(first, 3, tmp_path / "two")
    result = run_torchrun(overrides(speech, two, *COMMON, FSDP), port=29551)
    assert "epoch 1 continues at its batch 3" in result.stdout + result.stderr
    one = copy_run_until(first, 3, tmp_path / "one")
    run_in_process(compose_config(overrides(speech, one, *COMMON, "optim.update_freq=2")))
    assert_same_updates(one, two)
    assert worst_difference(final_weights(one), final_weights(two)) <= 1e-5
    epoch_1 = [r for r in read_metrics(two) if r["split"] == "epoch" and r["epoch"] == 1]
    assert epoch_1[-1]["complete"] and epoch_1[-1]["num_batches"] == 4  # + the first run's 3 = all 7, once each


def test_compiled_layers_with_layerdrop_and_checkpointing_under_fsdp(speech, tmp_path):  # noqa: F811
    """model.compile + LayerDrop + activation checkpointing + FSDP train as the same run without compile does
    (no dropout: compiled dropout draws other random numbers)."""
    settings = ("distributed.backend=gloo", "device=cpu", "threads=1", *SPEECH_BATCHING, FSDP, "optim.max_update=3",
                "model.encoder_layerdrop=0.3", "model.activation_checkpointing=true", "model.dropout=0.0",
                "model.attention_dropout=0.0", "model.activation_dropout=0.0")
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_torchrun(overrides(speech, eager, *settings), port=29552)
    run_torchrun(overrides(speech, compiled, *settings, "model.compile=true"), port=29553)
    a, b = train_records(eager), train_records(compiled)
    assert [r["update"] for r in a] == [r["update"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x["update"], x["loss"], y["loss"])
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5), (x["update"], x["grad_norm"], y["grad_norm"])
    assert worst_difference(final_weights(eager), final_weights(compiled)) <= 1e-4
