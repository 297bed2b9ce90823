"""The linear probe of pretraining (``probe.*``, xlsr/probe.py): the fit itself, the probe in a tiny pretraining run
(one process, and FSDP), and errors naming a bad label file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_pretrain import SPEECH, SPEECH_BATCHING, overrides, read_metrics, run_in_process  # noqa: F401
from xlsr.manifest import read_manifest, write_manifest
from xlsr.pretrain.config import compose_config
from xlsr.finetune.classification_data import read_class_labels
from xlsr.probe import extract_pooled_features, fit_linear_probe, probe_layer

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- the fit
def clusters(num_classes: int, per_class: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around random centres (norm ~ sqrt(dim)), ``spread`` their deviation."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[targets] + spread * torch.randn(len(targets), dim, generator=gen), targets


def test_fit_separates_separable_classes():
    train_x, train_y = clusters(5, 20, 32, spread=0.3, seed=1)
    test_x, test_y = clusters(5, 10, 32, spread=0.3, seed=2)
    fit = fit_linear_probe(train_x, train_y, 5, steps=300, lr=0.01)
    assert fit.accuracy(train_x, train_y) == 1.0
    assert fit.accuracy(test_x, test_y) == 1.0


def test_fit_on_shuffled_labels_stays_near_chance():
    train_x, train_y = clusters(5, 40, 32, spread=0.3, seed=1)
    test_x, test_y = clusters(5, 100, 32, spread=0.3, seed=2)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(3))]
    fit = fit_linear_probe(train_x, shuffled, 5, steps=300, lr=0.01)
    assert fit.accuracy(test_x, test_y) < 0.2 + 0.15  # chance is 0.2 (500 held-out rows: sd ~0.02)


def test_fit_ignores_the_callers_no_grad_and_is_deterministic():
    train_x, train_y = clusters(3, 10, 8, spread=1.0, seed=1)
    with torch.no_grad():  # as inside the trainer's validation
        a = fit_linear_probe(train_x, train_y, 3, steps=50)
    b = fit_linear_probe(train_x, train_y, 3, steps=50)
    assert a.weight.abs().sum() > 0
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_probe_layer_defaults_to_the_middle_and_refuses_others():
    assert [probe_layer(None, n) for n in (1, 2, 12, 24)] == [1, 1, 6, 12]
    assert probe_layer(24, 24) == 24
    for bad in (0, 25):
        with pytest.raises(ValueError, match="probe.layer must be in 1..24"):
            probe_layer(bad, 24)


# ---------------------------------------------------------------------------------------------------- the probe set
@pytest.fixture(scope="module")
def probe_set(tmp_path_factory):
    """The 20 real utterances of tests/fixtures/speech as a language-ID probe set: per language 3 train clips, 1
    held out; ``train.tsv`` + ``train.lang``, ``valid.tsv`` + ``valid.lang``."""
    dest = tmp_path_factory.mktemp("probe")
    write_manifest(SPEECH, dest / "all", valid_percent=0.0, progress=False)
    root, entries = read_manifest(dest / "all" / "train.tsv")
    parts = {"train": [], "valid": []}
    seen: dict[str, int] = {}
    for rel_path, size in sorted(entries):
        language = Path(rel_path).parts[0]
        seen[language] = seen.get(language, 0) + 1
        parts["valid" if seen[language] == 4 else "train"].append((rel_path, size, language))
    for split, rows in parts.items():
        (dest / f"{split}.tsv").write_text(root + "\n" + "".join(f"{p}\t{n}\n" for p, n, _ in rows))
        (dest / f"{split}.lang").write_text("".join(f"{language}\n" for _, _, language in rows))
    return dest


def probe_overrides(speech_manifest, probe_dir, out, *extra):
    return overrides(speech_manifest, out, *SPEECH_BATCHING, "optim.max_update=4", "validate_interval_updates=2",
                     f"data.valid_manifest={speech_manifest}", f"probe.manifest={probe_dir / 'train.tsv'}",
                     f"probe.valid_manifest={probe_dir / 'valid.tsv'}", "probe.max_seconds=1.5", *extra)


@pytest.fixture(scope="module")
def speech_manifest(probe_set):
    return probe_set / "all" / "train.tsv"


def test_read_class_labels(probe_set):
    labels = read_class_labels(probe_set / "train.tsv")
    assert len(labels) == 15 and sorted(set(labels)) == ["en", "es", "fr", "it", "ru"]


def test_pretraining_run_logs_probe_accuracy(speech_manifest, probe_set, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="xlsr"):
        trainer = run_in_process(compose_config(probe_overrides(speech_manifest, probe_set, out)))
    valid = [r for r in read_metrics(out) if r["split"] == "valid"]
    assert [r["update"] for r in valid] == [2, 4]
    for record in valid:
        assert 0.0 <= record["probe_accuracy"] <= 1.0 and 0.0 <= record["probe_train_accuracy"] <= 1.0
        assert record["probe_seconds"] > 0
    assert "probe accuracy %.3f" % valid[-1]["probe_accuracy"] in caplog.text  # the valid log line
    assert "probe: layer 1 of 2, 15 train / 5 held-out clips, 5 classes" in caplog.text  # the middle layer

    # the logged numbers are the final model's, recomputed here from its features of layer 1
    probe = trainer.task.probe
    model = trainer.model.eval()
    train_x, train_ids = extract_pooled_features(model, probe.train.dataset, 1, trainer.cfg.data, torch.device("cpu"))
    valid_x, valid_ids = extract_pooled_features(model, probe.valid.dataset, 1, trainer.cfg.data, torch.device("cpu"))
    assert sorted(train_ids.tolist()) == list(range(15)) and sorted(valid_ids.tolist()) == list(range(5))
    classes = sorted(set(read_class_labels(probe_set / "train.tsv")))
    train_y = torch.tensor([classes.index(probe.train.labels[i]) for i in train_ids])
    valid_y = torch.tensor([classes.index(probe.valid.labels[i]) for i in valid_ids])
    fit = fit_linear_probe(train_x, train_y, 5, steps=trainer.cfg.probe.steps, lr=trainer.cfg.probe.lr)
    assert valid[-1]["probe_accuracy"] == fit.accuracy(valid_x, valid_y)
    assert valid[-1]["probe_train_accuracy"] == fit.accuracy(train_x, train_y)
    # the features are layer 1's output (0-based layer_results[0]), mean-pooled, as one clip alone gives it
    clip = probe.valid.dataset[0]["source"]
    with torch.no_grad():
        alone = model.extract_features(clip[None]).layer_results[0].mean(dim=1)[0]
    torch.testing.assert_close(valid_x[valid_ids.tolist().index(0)], alone, rtol=1e-4, atol=1e-4)
    # the labels follow the clips: each held-out clip's label is its language folder
    for i in range(5):
        assert Path(probe.valid.dataset.path(i)).parent.name == probe.valid.labels[i]


FSDP_SCRIPT = """
import json, sys
import torch
from xlsr.pretrain.config import compose_config
from xlsr.pretrain.trainer import Trainer
from xlsr.probe import extract_pooled_features

overrides, out = json.loads(sys.argv[1]), sys.argv[2]
plain = Trainer(compose_config(overrides + [f"output_dir={out}/plain"]))
sharded = Trainer(compose_config(overrides + [f"output_dir={out}/fsdp", "distributed.strategy=fsdp",
                                              "distributed.backend=gloo", "device=cpu"]))
dataset = sharded.task.probe.valid.dataset
# before any forward of the sharded model: only extract_features' own hooks gather the root group's parameters
a, ids_a = extract_pooled_features(plain.model, dataset, 1, plain.cfg.data, torch.device("cpu"))
b, ids_b = extract_pooled_features(sharded.model, dataset, 1, sharded.cfg.data, torch.device("cpu"))
assert torch.equal(ids_a, ids_b)
print(json.dumps({"difference": float((a - b).abs().max()), "scale": float(a.abs().max())}))
sharded.train()
"""


def test_probe_runs_under_fsdp(speech_manifest, probe_set, tmp_path):
    """FSDP (a process group of one): the same probe features as without sharding, and the probe in the records."""
    args = probe_overrides(speech_manifest, probe_set, tmp_path / "unused")
    result = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, json.dumps(args), str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    features = next(json.loads(line) for line in result.stdout.splitlines() if line.startswith("{\"difference"))
    assert features["difference"] <= 1e-5 * features["scale"], features
    records = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["update"] for r in valid] == [2, 4]
    assert all(0.0 <= r["probe_accuracy"] <= 1.0 for r in valid)


@pytest.mark.parametrize("damage", ["short", "missing", "unseen"])
def test_bad_label_file_is_named_before_training(speech_manifest, probe_set, tmp_path, damage):
    bad = tmp_path / "probe"
    bad.mkdir()
    for name in ("train.tsv", "train.lang", "valid.tsv", "valid.lang"):
        (bad / name).write_text((probe_set / name).read_text())
    if damage == "short":
        lines = (bad / "train.lang").read_text().splitlines()
        (bad / "train.lang").write_text("\n".join(lines[:-2]) + "\n")
        expected = f"{bad / 'train.lang'} has 13 line(s) but its manifest {bad / 'train.tsv'} has 15 row(s)"
    elif damage == "missing":
        (bad / "valid.lang").unlink()
        expected = f"{bad / 'valid.lang'}: no such label file (one lang label per row of {bad / 'valid.tsv'}"
    else:
        (bad / "valid.lang").write_text((bad / "valid.lang").read_text().replace("ru", "cs"))
        expected = f"{bad / 'valid.lang'}: label(s) ['cs'] do not occur in the train part"
    from xlsr.pretrain.trainer import Trainer

    out = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        Trainer(compose_config(probe_overrides(speech_manifest, bad, out)))
    assert expected in str(error.value)
    assert not list(out.glob("checkpoints/*.pt"))
