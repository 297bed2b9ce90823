"""Classification training on the engine (``python -m xlsr.finetune task=classification``): language ID on the real
speech of tests/fixtures/speech (held-out files), exact resume, fairseq's label layout and its errors, the saved
model in transformers, and two DDP ranks against one process."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

import xlsr
from xlsr.finetune.classification_data import read_label_dictionary
from xlsr.finetune.config import compose_config
from xlsr.vocabulary import LabelError

SPEECH = Path(__file__).parent / "fixtures" / "speech"
REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_fairseq.py"


def write_split(dest: Path, split: str, items: list[tuple[Path, str]]) -> Path:
    """``{split}.tsv`` + ``{split}.lang`` (fairseq's layout) of ``(file, label)`` pairs."""
    rows = "".join(f"{path.relative_to(SPEECH)}\t{sf.info(path).frames}\n" for path, _ in items)
    (dest / f"{split}.tsv").write_text(f"{SPEECH.resolve()}\n{rows}")
    (dest / f"{split}.lang").write_text("".join(f"{label}\n" for _, label in items))
    return dest / f"{split}.tsv"


@pytest.fixture(scope="module")
def lid(tmp_path_factory):
    """Per language (en es fr it ru, one speaker each): 3 files to train on and the 4th held out; a tiny random
    'pretrained' model."""
    dest = tmp_path_factory.mktemp("lid")
    train, valid = [], []
    for language in sorted(p.name for p in SPEECH.iterdir() if p.is_dir()):
        files = sorted((SPEECH / language).glob("*.flac"))
        train += [(f, language) for f in files[:3]]
        valid += [(f, language) for f in files[3:]]
    assert not {f for f, _ in train} & {f for f, _ in valid}
    torch.manual_seed(0)
    xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny")).save_pretrained(dest / "pretrained")
    return write_split(dest, "train", train), write_split(dest, "valid", valid), dest / "pretrained"


def overrides(lid, out, *extra):
    """The tests' command line; ``extra`` adds settings or replaces the defaults here (key=value)."""
    train, _, pretrained = lid
    settings = ["task=classification", f"model.init_from={pretrained}", f"data.manifest={train}", f"output_dir={out}",
                "data.num_workers=0", "data.max_tokens=100000", "log_interval=1", "progress_bar=false",
                "tensorboard=false", "threads=1", *extra]
    return list({setting.split("=")[0]: setting for setting in settings}.values())


def records(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def run(cfg):
    from xlsr.tasks.classification import ClassificationTask  # noqa: F401 (registers the task)
    from xlsr.training.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def test_the_task_key_picks_the_config():
    base = ["model.init_from=some.pt", "data.manifest=train.tsv"]
    ctc, classification = compose_config(base), compose_config(["task=classification", *base])
    assert type(ctc).__name__ == "FineTuneConfig" and ctc.task == "ctc"
    assert type(classification).__name__ == "ClassificationFineTuneConfig"
    assert classification.model.mask_prob == 0.5 and classification.optim.lr == 1e-4
    assert classification.data.max_sample_size == 160000 and classification.model.pooling_activation == "identity"
    assert classification.checkpoint.best_metric == "accuracy" and classification.checkpoint.maximize_best_metric
    with pytest.raises(ValueError, match="task='speaker'"):
        compose_config(["task=speaker", *base])


@pytest.mark.slow
def test_language_id_learns_on_held_out_files(lid, tmp_path):
    """4-fold cross-validation over the 20 files of 5 languages (one speaker each): each fold holds out one file per
    language, so every file is held out exactly once, and trains a fresh classifier on the other 15 (from the same
    tiny random encoder: 2 layers, width 128; its convolutions trained too, feature_grad_mult 1; layer-weighted
    pooling; random 1 s crops; lr 3e-3; 100 updates). The 20 held-out whole-file predictions, counted from each
    fold's confusion matrix, must be right at least 8 times (chance: 4 of 20; P(>= 8 | chance) = 0.03).
    Measured (per fold, total): seed 1 [2, 2, 4, 4] 12, seed 2 [2, 2, 3, 3] 10, seed 3 [2, 3, 2, 4] 11,
    seed 4 [3, 2, 4, 4] 13, seed 5 [3, 4, 3, 5] 15 of 20. The data caps it: with one speaker per language the
    held-out file differs mostly in its words (a nearest-centroid classifier on mean log-mel spectra, measured
    once by hand, got 11 of 20)."""
    per_language = {language: sorted((SPEECH / language).glob("*.flac"))
                    for language in sorted(p.name for p in SPEECH.iterdir() if p.is_dir())}
    held_out, right = [], []
    for fold in range(4):
        data = tmp_path / f"fold{fold}"
        data.mkdir()
        train = write_split(data, "train", [(f, language) for language, files in per_language.items()
                                            for i, f in enumerate(files) if i != fold])
        valid = write_split(data, "valid", [(files[fold], language) for language, files in per_language.items()])
        held_out += [files[fold] for files in per_language.values()]
        out = data / "run"
        trainer = run(compose_config(overrides(
            lid, out, f"data.manifest={train}", f"data.valid_manifest={valid}", "optim.max_update=100",
            "validate_interval_updates=100", "optim.lr=3e-3", "model.mask_prob=0", "model.encoder_layerdrop=0",
            "model.feature_grad_mult=1.0", "model.use_weighted_layer_sum=true", "data.max_sample_size=16000",
            "log_interval=10")))
        last = records(out, "valid")[-1]
        counts = last["confusion_matrix"]["counts"]
        assert last["update"] == 100 and last["sample_size"] == 5 and sum(map(sum, counts)) == 5
        assert last["confusion_matrix"]["labels"] == trainer.task.labels == ["en", "es", "fr", "it", "ru"]
        right.append(sum(counts[i][i] for i in range(5)))
    assert sorted(held_out) == sorted(f for files in per_language.values() for f in files)  # each file once
    assert sum(right) >= 8, right  # chance: 4 of 20
    assert (out / "best" / "best.json").is_file()
    model = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(out / "model")
    assert model.labels == ["en", "es", "fr", "it", "ru"]


def test_resume_reproduces_the_uninterrupted_run(lid, tmp_path):
    """Random 1 s training crops, an epoch boundary, a stop at update 3 and a resume: the same losses and the same
    final weights as a run straight through. The saved model keeps the label names, and transformers loads it
    after ``tools/convert_fairseq.py model --to hf``."""
    common = ("optim.max_update=7", "checkpoint.save_interval_updates=3", "data.max_sample_size=16000",
              "data.max_tokens=50000", "optim.lr=1e-3", "model.encoder_layerdrop=0.5")  # 5 batches per epoch
    run(compose_config(overrides(lid, tmp_path / "a", *common)))
    run(compose_config(overrides(lid, tmp_path / "b", *common, "stop_at_update=3")))
    resumed = run(compose_config(overrides(lid, tmp_path / "b", *common)))
    assert resumed.epoch > 1
    a, b = records(tmp_path / "a", "train"), records(tmp_path / "b", "train")
    assert [r["update"] for r in a] == [r["update"] for r in b] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # exact, across the restart
    assert max(r["audio_seconds"] / r["sample_size"] for r in a) <= 1.0  # cropped to 1 s
    final_a = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(tmp_path / "a" / "model").state_dict()
    final_b = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(tmp_path / "b" / "model").state_dict()
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    # the labels: dict.lang.txt (built from the training labels, saved with their counts) and the model's
    assert read_label_dictionary(tmp_path / "a" / "dict.lang.txt") == ["en", "es", "fr", "it", "ru"]
    assert (tmp_path / "a" / "dict.lang.txt").read_text().splitlines()[0] == "en 3"
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("convert_fairseq_training", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path / "a" / "model"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.AutoModelForAudioClassification.from_pretrained(tmp_path / "hf")
    assert [hf.config.id2label[i] for i in range(5)] == ["en", "es", "fr", "it", "ru"]


def test_a_classification_init_from_keeps_its_head_and_labels(lid, tmp_path):
    """A classification ``init_from`` keeps its head and label order even when dict.lang.txt beside the manifest
    lists the classes in another order (with a warning)."""
    train, _, _ = lid
    first = tmp_path / "first"
    run(compose_config(overrides(lid, first, "optim.max_update=1")))
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.tsv").write_text(train.read_text())
    (other / "train.lang").write_text(train.with_suffix(".lang").read_text())
    (other / "dict.lang.txt").write_text("ru 3\nit 3\nfr 3\nes 3\nen 3\n")
    trainer = run(compose_config(overrides(lid, tmp_path / "second", f"data.manifest={other / 'train.tsv'}",
                                           f"model.init_from={first / 'model'}", "optim.max_update=0")))
    assert trainer.task.labels == ["en", "es", "fr", "it", "ru"]
    start = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(first / "model").state_dict()
    kept = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(tmp_path / "second" / "model").state_dict()
    assert all(torch.equal(start[k], kept[k]) for k in start)  # no update: the same head and encoder


def test_bad_labels_are_named_by_file_and_line(lid, tmp_path):
    train, _, _ = lid
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text(train.read_text())
    lines = train.with_suffix(".lang").read_text().splitlines()
    lines[4] = "de"
    (data / "train.lang").write_text("\n".join(lines) + "\n")
    (data / "dict.lang.txt").write_text("en 3\nes 3\nfr 3\nit 3\nru 3\n")
    with pytest.raises(LabelError, match=r"train\.lang:5: label 'de' is not in .*dict\.lang\.txt"):
        run(compose_config(overrides(lid, tmp_path / "out", f"data.manifest={data / 'train.tsv'}")))


def test_a_missing_label_file_is_a_one_line_error_of_the_command(lid, tmp_path):
    """The command line picks the classification task by ``task=`` and names the missing ``train.lang``."""
    train, _, _ = lid
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text(train.read_text())
    result = subprocess.run([sys.executable, "-m", "xlsr.finetune",
                             *overrides(lid, tmp_path / "out", f"data.manifest={data / 'train.tsv'}")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert str(data / "train.lang") in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_sum_the_validation_counts(lid, tmp_path, strategy):
    """2 gloo ranks (DDP, or FSDP: sharded) == 1 process with update_freq=2: the same training losses, and the same
    validation (5 held-out files over 2 ranks: one rank scores 3, the other 2, and the confusion matrix sums
    them)."""
    _, valid, _ = lid
    common = ("optim.max_update=3", "checkpoint.save_interval_updates=3", "distributed.backend=gloo", "device=cpu",
              "data.max_sample_size=16000", f"data.valid_manifest={valid}",
              "data.max_tokens=40000", "validate_interval_updates=3", "optim.lr=1e-3")
    run(compose_config(overrides(lid, tmp_path / "single", *common, "optim.update_freq=2")))
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={29561 + (strategy == 'fsdp')}", "-m", "xlsr.finetune",
           *overrides(lid, two, *common, "optim.update_freq=1", f"distributed.strategy={strategy}")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    train_single, train_two = records(tmp_path / "single", "train"), records(two, "train")
    assert [r["update"] for r in train_single] == [r["update"] for r in train_two] == [1, 2, 3]
    for x, y in zip(train_single, train_two):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x["update"], x["loss"], y["loss"])
    load = lambda out: xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(out / "model").state_dict()  # noqa: E731
    a, b = load(tmp_path / "single"), load(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    (valid_single,), (valid_two,) = records(tmp_path / "single", "valid"), records(two, "valid")
    assert valid_two["sample_size"] == 5
    assert valid_two["confusion_matrix"] == valid_single["confusion_matrix"]
    assert valid_two["loss"] == pytest.approx(valid_single["loss"], rel=1e-5)
    assert valid_two["accuracy"] == valid_single["accuracy"] and valid_two["macro_f1"] == valid_single["macro_f1"]


def test_balanced_class_weighting(lid, tmp_path):
    """``class_weighting=balanced`` on balanced labels changes nothing (every weight 1: the same losses as
    ``none``); on imbalanced labels a class's weight is inversely proportional to its training utterances (1 for a class
    without any), and the training loss changes."""
    train, _, _ = lid
    common = ("optim.max_update=2", "data.max_sample_size=16000", "data.max_tokens=50000", "optim.lr=1e-3")
    plain = run(compose_config(overrides(lid, tmp_path / "none", *common)))
    balanced = run(compose_config(overrides(lid, tmp_path / "balanced", *common, "class_weighting=balanced")))
    assert torch.equal(balanced.task.class_weights, torch.ones(5))
    assert [r["loss"] for r in records(tmp_path / "none", "train")] == \
        [r["loss"] for r in records(tmp_path / "balanced", "train")]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text(train.read_text())
    labels = train.with_suffix(".lang").read_text().splitlines()
    labels[3:6] = ["en"] * 3  # en: 6 files, es: none, the others 3
    (data / "train.lang").write_text("\n".join(labels) + "\n")
    (data / "dict.lang.txt").write_text("en 6\nes 0\nfr 3\nit 3\nru 3\n")
    skewed = [f"data.manifest={data / 'train.tsv'}"]
    runs = {weighting: run(compose_config(overrides(lid, tmp_path / f"skewed_{weighting}", *common, *skewed,
                                                    f"class_weighting={weighting}")))
            for weighting in ("none", "balanced")}
    weights = runs["balanced"].task.class_weights
    assert weights[0] * 6 == pytest.approx(weights[2] * 3) and weights[1] == 1.0  # es: no training file
    first = {w: records(tmp_path / f"skewed_{w}", "train")[0]["loss"] for w in runs}
    assert first["none"] != first["balanced"]


def test_help_shows_the_config_of_the_chosen_task():
    """``--help`` works for both tasks and shows the chosen task's keys and defaults."""
    shown = {}
    for task in ("ctc", "classification"):
        result = subprocess.run([sys.executable, "-m", "xlsr.finetune", f"task={task}", "--help"], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        shown[task] = result.stdout
    assert "class_weighting: none" in shown["classification"] and "task: classification" in shown["classification"]
    assert "class_weighting" not in shown["ctc"] and "task: ctc" in shown["ctc"]
