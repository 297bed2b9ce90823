"""The demo's third step: language ID over the demo corpus's real-speech languages, on held-out files.

:func:`build_lid_data` writes fairseq's classification layout (``train.tsv`` + ``train.lang``, ``valid.tsv`` +
``valid.lang``) from the corpus manifests: the language of a file is its folder (``en/...``), the synthetic
``tts_*`` speech is left out, and the held-out files are the corpus's own ``valid.tsv`` rows, which pretraining
never trained on. :func:`lid_and_report` trains the same classifier twice with the same time budget, once from the
pretrained tiny model and once from a random initialisation of the same architecture, and prints both held-out
accuracies side by side, whatever they are, with the confusion matrix PNG of each run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from xlsr.finetune.config import compose_config
from xlsr.manifest import read_manifest, write_manifest_file
from xlsr.model import Wav2Vec2Model
from xlsr.tasks.classification import CONFUSION_PNG, ClassificationTask
from xlsr.training.trainer import Trainer

__all__ = ["build_lid_data", "lid_overrides", "lid_and_report"]


def _language(relative_path: str) -> str | None:
    """The language of a corpus file (its top folder), None for synthetic speech (``tts_*``) or a file at the root."""
    parts = Path(relative_path).parts
    if len(parts) < 2 or parts[0].startswith("tts_"):
        return None
    return parts[0]


def build_lid_data(corpus: Path, dest: Path) -> dict[str, tuple[int, int]]:
    """Write ``dest/{train,valid}.{tsv,lang}`` for language ID from ``corpus/{train,valid}.tsv``: real speech only,
    labelled by folder; the corpus's valid files are the held-out set. Returns ``{language: (train, valid)}``
    file counts. Raises ValueError when a language has no held-out or no training file."""
    corpus, dest = Path(corpus), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    counts: dict[str, list[int]] = {}
    for column, split in enumerate(("train", "valid")):
        root, entries = read_manifest(corpus / f"{split}.tsv")
        rows = [(rel, size, lang) for rel, size in entries if (lang := _language(rel)) is not None]
        write_manifest_file(dest / f"{split}.tsv", root, [(rel, size) for rel, size, _ in rows])
        (dest / f"{split}.lang").write_text("".join(f"{lang}\n" for _, _, lang in rows), encoding="utf-8")
        for _, _, lang in rows:
            counts.setdefault(lang, [0, 0])[column] += 1
    missing = sorted(lang for lang, (train, valid) in counts.items() if not train or not valid)
    if missing or not counts:
        raise ValueError(f"{corpus}: language ID needs training and held-out files of every language; "
                         f"missing for {missing or 'all'}")
    return {lang: (train, valid) for lang, (train, valid) in sorted(counts.items())}


def lid_overrides(data_dir: Path, init_from: Path, output_dir: Path, minutes: float) -> list[str]:
    """The demo's language-ID settings (hydra overrides of ``python -m xlsr.finetune task=classification``): a
    time budget, 2 s training crops, no masks or LayerDrop, a high learning rate for the tiny model."""
    return [
        "task=classification", f"model.init_from={init_from}", f"data.manifest={data_dir / 'train.tsv'}",
        f"data.valid_manifest={data_dir / 'valid.tsv'}", f"output_dir={output_dir}", f"max_time_minutes={minutes}",
        "optim.max_update=100000", "optim.phase_ratio=[0.01,0.99,0.0]", "optim.lr=0.002", "model.mask_prob=0.0",
        "model.encoder_layerdrop=0.0", "model.use_weighted_layer_sum=true", "data.max_sample_size=32000",
        "data.max_tokens=320000", "validate_interval_updates=200", "log_interval=50", "checkpoint.resume=never",
        "checkpoint.save_interval_updates=100000", "tensorboard=false", "progress_bar=false",
    ]


def _train(overrides: Sequence[str]) -> dict:
    cfg = compose_config(list(overrides))
    trainer = Trainer(cfg, ClassificationTask(cfg))
    trainer.train()
    record = trainer.validate()
    return {"updates": trainer.num_updates, "valid": record, "png": trainer.output_dir / CONFUSION_PNG,
            "labels": trainer.task.labels}


def lid_and_report(corpus: Path, pretrained: Path, output_dir: Path, minutes: float) -> dict:
    """Language ID from ``pretrained`` and from a random initialisation of its architecture, ``minutes`` each;
    prints the held-out accuracies side by side. Returns ``{"pretrained": run, "random": run, "counts"}``."""
    output_dir = Path(output_dir)
    data_dir = output_dir / "data"
    counts = build_lid_data(corpus, data_dir)
    random_init = output_dir / "random_init"
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Model.from_pretrained(pretrained).cfg).save_pretrained(random_init)  # same architecture
    runs = {name: _train(lid_overrides(data_dir.resolve(), Path(init).resolve(), output_dir / name, minutes))
            for name, init in (("pretrained", pretrained), ("random", random_init))}
    print()
    print(f"language ID over {len(counts)} languages ({', '.join(counts)}), "
          f"{sum(t for t, _ in counts.values())} training files, {sum(v for _, v in counts.values())} held-out "
          f"files (never seen in pretraining), {minutes:g} min of training each:")
    print(f"  {'initialisation':<16} {'updates':>8} {'accuracy':>9} {'macro-F1':>9}")
    for name, run in runs.items():
        valid = run["valid"]
        print(f"  {name:<16} {run['updates']:>8} {valid['accuracy']:>9.3f} {valid.get('macro_f1', 0.0):>9.3f}")
    pngs = [str(run["png"]) for run in runs.values() if os.path.isfile(run["png"])]
    print(f"  chance: {1 / len(counts):.3f} (uniform guess); confusion matrices: "
          + (", ".join(pngs) if pngs else "in the log above (pip install -e '.[plot]' for PNGs)"))
    return {**runs, "counts": counts}
