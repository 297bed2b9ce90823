"""The fine-tuning recipe as fairseq users expect it: the best model by a validation metric in ``best/`` (and across
a resume), validation from update M every N updates, the blank-plateau warning, and ``freeze_finetune_updates``
under DDP and FSDP equal to one process."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xlsr
import test_pretrain
from test_finetune import digits, overrides, records, run  # noqa: F401 (digits: fixture)
from test_pretrain import few  # noqa: F401 (fixture)
from xlsr.finetune.config import compose_config
from xlsr.checkpoints import safe_torch_load
from xlsr.finetune.labels import Dictionary
from xlsr.checkpoints.sharded import read_sharded_model

REPO = Path(__file__).resolve().parents[1]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model of a ``from_pretrained`` folder (as a user reads it), or of a training checkpoint (``.pt`` or
    sharded folder)."""
    if path.suffix == ".pt":
        return safe_torch_load(path)["model"]
    if (path / "trainer_state.pt").is_file():
        return read_sharded_model(path)[1]
    return xlsr.Wav2Vec2ForCTC.from_pretrained(path).state_dict()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def best_record(out: Path) -> dict:
    return json.loads((out / "best" / "best.json").read_text())


def with_valid(digits, *extra):  # noqa: F811
    """Validation on the training manifest every 2 updates, checkpoints every 2 (all kept)."""
    return (f"data.valid_manifest={digits[0]}", "validate_interval_updates=2", "checkpoint.save_interval_updates=2",
            "checkpoint.keep_last=0", *extra)


def test_best_model_is_the_checkpoint_of_the_lowest_wer(digits, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run(compose_config(overrides(digits, out, "optim.max_update=6", *with_valid(digits))))
    valid = records(out, "valid")
    assert [r["update"] for r in valid] == [2, 4, 6]
    first_lowest = min(valid, key=lambda r: r["wer"])  # min keeps the first of equal values: ties do not replace
    assert best_record(out) == {"metric": "wer", "value": first_lowest["wer"], "update": first_lowest["update"]}
    best = weights(out / "best")
    assert same_weights(best, weights(out / "checkpoints" / f"checkpoint_{first_lowest['update']}.pt"))
    assert same_weights(weights(out / "model"), weights(out / "checkpoints" / "checkpoint_6.pt"))
    assert not (out / "best.tmp").exists() and not (out / "best.old").exists()


def test_resumed_run_keeps_an_earlier_better_best(digits, tmp_path):  # noqa: F811
    """Highest valid loss = best (maximize): the model of update 2; a run stopped at update 4 and resumed must not
    replace it by update 6's, as it would if the best so far were not in the checkpoint."""
    common = ("optim.max_update=6", *with_valid(digits, "checkpoint.best_metric=loss",
                                                "checkpoint.maximize_best_metric=true"))
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(compose_config(overrides(digits, whole, *common)))
    losses = [r["loss"] for r in records(whole, "valid")]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == 3, losses  # the premise: it learns
    run(compose_config(overrides(digits, parts, *common, "stop_at_update=4")))
    run(compose_config(overrides(digits, parts, *common)))
    assert best_record(parts) == best_record(whole) == {"metric": "loss", "value": losses[0], "update": 2}
    assert same_weights(weights(parts / "best"), weights(whole / "checkpoints" / "checkpoint_2.pt"))
    assert not same_weights(weights(parts / "best"), weights(parts / "model"))


def test_pretraining_keeps_the_best_validation_loss(few, tmp_path):  # noqa: F811
    from xlsr.pretrain.config import compose_config as compose_pretrain_config

    out = tmp_path / "pretrain"
    test_pretrain.run_in_process(compose_pretrain_config(test_pretrain.overrides(
        few, out, "optim.max_update=6", f"data.valid_manifest={few}", "validate_interval_updates=2",
        "checkpoint.save_interval_updates=2", "checkpoint.keep_last=0", "checkpoint.best_metric=loss")))
    valid = [r for r in test_pretrain.read_metrics(out) if r["split"] == "valid"]
    lowest = min(valid, key=lambda r: r["loss"])
    assert best_record(out) == {"metric": "loss", "value": lowest["loss"], "update": lowest["update"]}
    best = xlsr.Wav2Vec2Model.from_pretrained(out / "best").state_dict()
    assert same_weights(best, safe_torch_load(out / "checkpoints" / f"checkpoint_{lowest['update']}.pt")["model"])


def test_best_metric_must_be_a_validation_value(digits, tmp_path):  # noqa: F811
    from xlsr.finetune.trainer import FineTuner

    with pytest.raises(ValueError, match="checkpoint.best_metric='accuracy'"):
        FineTuner(compose_config(overrides(digits, tmp_path / "x", "checkpoint.best_metric=accuracy")))


@pytest.mark.parametrize("interval,after,expected", [(2, 3, [4, 6, 8]), (0, 8, [14])])
def test_validation_from_update_m_every_n(digits, tmp_path, interval, after, expected):  # noqa: F811
    """Every 2 updates from update 3; or (interval 0) at epoch ends (7 batches per epoch) from update 8."""
    out = tmp_path / "run"
    trainer = run(compose_config(overrides(
        digits, out, f"optim.max_update={max(expected) + 1}", f"data.valid_manifest={digits[0]}",
        f"validate_interval_updates={interval}", f"validate_after_updates={after}", "data.max_tokens=50000",
        "max_valid_batches=1", "checkpoint.save_interval_updates=100")))
    assert trainer.train_loader.batch_sampler.total_batches == 7
    assert [r["update"] for r in records(out, "valid")] == expected


@pytest.fixture(scope="module")
def biased_models(digits, tmp_path_factory):  # noqa: F811
    """Fine-tuned tiny models for the digits' dictionary whose greedy output is always blank, or always 'E'."""
    manifest, pretrained = digits
    symbols = list(Dictionary.load(manifest.parent / "dict.ltr.txt").symbols)
    dest = tmp_path_factory.mktemp("biased")
    paths = {}
    for name, symbol in (("blank", symbols[0]), ("letters", "E")):
        torch.manual_seed(0)
        model = xlsr.Wav2Vec2ForCTC.from_pretrained(pretrained, vocab=symbols)
        with torch.no_grad():
            model.lm_head.bias[symbols.index(symbol)] = 100.0
        paths[name] = model.save_pretrained(dest / name)
    return paths


@pytest.mark.parametrize("model,freeze,patience,warns", [
    ("blank", 1, 2, True),  # updates 2 and 3 after the frozen phase: every output blank
    ("blank", 1, 3, False),  # only 2 such updates
    ("blank", 100, 2, False),  # still frozen
    ("letters", 1, 2, False),
])
def test_blank_plateau_warning(digits, biased_models, tmp_path, caplog, monkeypatch,  # noqa: F811
                               model, freeze, patience, warns):
    from xlsr.tasks.ctc import CTCTask

    monkeypatch.setattr(CTCTask, "BLANK_PATIENCE", patience)
    cfg = compose_config(overrides(digits, tmp_path / "run", f"model.init_from={biased_models[model]}",
                                   f"model.freeze_finetune_updates={freeze}", "optim.lr=1e-9", "optim.max_update=3"))
    with caplog.at_level(logging.WARNING, logger="xlsr.finetune"):
        run(cfg)
    warnings = [r.getMessage() for r in caplog.records if "every greedy output is blank" in r.getMessage()]
    assert len(warnings) == int(warns), warnings
    assert {r["empty_outputs"] for r in records(tmp_path / "run", "train")} == {1.0 if model == "blank" else 0.0}
    if warns:
        assert "model.mask_prob=0" in warnings[0] and "optim.lr" in warnings[0] and "to update 3" in warnings[0]


# ----------------------------------------------------------------- freeze_finetune_updates under DDP and FSDP
FROZEN = ("optim.max_update=4", "model.freeze_finetune_updates=2", "checkpoint.save_interval_updates=2",
          "checkpoint.keep_last=0", "distributed.backend=gloo", "device=cpu", "threads=1", "data.max_tokens=50000",
          "validate_interval_updates=2")  # and best/ by WER (the default)


@pytest.fixture(scope="module")
def frozen_single(digits, tmp_path_factory):  # noqa: F811
    """The reference: one process, update_freq=2; (output_dir, the new head's initial weights)."""
    from xlsr.finetune.trainer import FineTuner

    out = tmp_path_factory.mktemp("frozen") / "single"
    trainer = FineTuner(compose_config(overrides(digits, out, *FROZEN, "optim.update_freq=2",
                                                 f"data.valid_manifest={digits[0]}")))
    initial_head = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    return out, initial_head


def encoder_moved(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith("wav2vec2."))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_frozen_phase_on_two_processes(digits, frozen_single, tmp_path, strategy):  # noqa: F811
    """2 gloo ranks with the encoder frozen for 2 of 4 updates == 1 process with update_freq=2 (1e-5); at update 2
    the encoder is the pretrained one exactly and the head has moved; by update 4 the encoder has moved too. The
    best model by WER (written by rank 0; FSDP: gathered from the shards) is the same as one process's."""
    single, initial_head = frozen_single
    reference = weights(single / "model")
    two = tmp_path / strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={29561 + (strategy == 'fsdp')}", "-m", "xlsr.finetune",
           *overrides(digits, two, *FROZEN, "optim.update_freq=1", f"distributed.strategy={strategy}",
                      f"data.valid_manifest={digits[0]}")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pretrained = {f"wav2vec2.{k}": v for k, v in xlsr.Wav2Vec2Model.from_pretrained(digits[1]).state_dict().items()
                  if f"wav2vec2.{k}" in reference}  # the encoder's weights (not the pretraining-only ones)
    final = weights(two / "model")
    at_2 = weights(two / "checkpoints" / ("checkpoint_2" if strategy == "fsdp" else "checkpoint_2.pt"))
    reference_at_2 = weights(single / "checkpoints" / "checkpoint_2.pt")
    assert best_record(two) == best_record(single)
    for mine, theirs in ((final, reference), (at_2, reference_at_2), (weights(two / "best"), weights(single / "best"))):
        assert max((mine[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-5
    assert not encoder_moved({k: at_2[k] for k in pretrained}, pretrained)
    assert not torch.equal(at_2["lm_head.weight"], initial_head)
    assert encoder_moved({k: final[k] for k in pretrained}, pretrained)
