"""A linear probe of frozen features: how well one transformer layer's output separates the classes of a small
labelled set (language, speaker, ...), measured at every validation of a pretraining run (``probe.*`` of
``python -m xlsr.pretrain``, docs/probing.md).

labelled clips (``train.tsv`` + ``train.lang``, ``valid.tsv`` + ``valid.lang``; seeded crops of <= max_seconds)
  -> the model in eval mode, no gradient, stopped after transformer layer ``layer``      (B, T, D)
  -> mean over each clip's valid frames (:func:`xlsr.classification.masked_mean`)        (B, D)
  -> standardised with the train part's mean and deviation
  -> multinomial logistic regression on the train part: zero init, full batch, ``steps`` Adam steps
  -> accuracy on the held-out part (``probe_accuracy``) and on the train part (``probe_train_accuracy``)

Everything is deterministic (fixed crops, zero init, full batch), so two validations differ only through the
model's weights.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xlsr.classification import masked_mean
from xlsr.data.audio_dataset import AudioDataConfig, AudioDataset, batched_loader
from xlsr.finetune.classification_data import read_class_labels
from xlsr.finetune.labels import label_path

__all__ = ["probe_layer", "ProbeSplit", "LinearProbe", "LinearProbeFit", "fit_linear_probe",
           "extract_pooled_features"]

logger = logging.getLogger(__name__)


def probe_layer(layer: int | None, num_layers: int) -> int:
    """The transformer layer to probe, 1..num_layers: ``layer``, or the middle one (``num_layers // 2``, at least 1)
    when None. ValueError when out of range."""
    if layer is None:
        return max(1, num_layers // 2)
    if not 1 <= layer <= num_layers:
        raise ValueError(f"probe.layer must be in 1..{num_layers} (the model's transformer layers), got {layer}")
    return layer


class ProbeSplit:
    """One part of the probe set: its clips (an :class:`~xlsr.data.audio_dataset.AudioDataset`: seeded crops, the
    same at every call) and the class label of each.

    Args:
        manifest: ``train.tsv`` / ``valid.tsv``; labels from the file beside it (:func:`read_class_labels`).
        labels: the label files' extension ("lang").
        max_samples: crop length (samples); min_samples: shorter clips are dropped (with a warning).
        Others: as :class:`~xlsr.data.audio_dataset.AudioDataset`.
    """

    def __init__(self, manifest: str, labels: str, *, sample_rate: int, max_samples: int, min_samples: int,
                 normalize: bool, seed: int, skip_bad: bool = True):
        self.manifest = manifest
        self.label_file = label_path(manifest, labels)
        row_labels = read_class_labels(manifest, labels)
        self.dataset = AudioDataset(
            [manifest], sample_rate=sample_rate, min_sample_size=min_samples, max_sample_size=max_samples,
            pad=True, normalize=normalize, skip_bad=skip_bad, seed=seed,
        )
        rows = self.dataset.manifest_row_of(np.arange(len(self.dataset)))
        self.labels: list[str] = [row_labels[row] for row in rows]  # of each dataset item


@torch.no_grad()
def extract_pooled_features(model: torch.nn.Module, dataset: AudioDataset, layer: int, batch_config: AudioDataConfig,
                            device: torch.device, autocast_dtype: torch.dtype | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled output of transformer layer ``layer`` (1-based; no final LayerNorm) for every clip of
    ``dataset``, in eval mode without gradient, in length-bucketed batches of ``batch_config.max_tokens`` samples.

    ``model``: a :class:`~xlsr.model.Wav2Vec2Model` (under FSDP its ``extract_features`` must be registered as a
    forward method, ``torch.distributed.fsdp.register_fsdp_forward_method``). Every process that calls this runs
    the same forwards. Returns (features (N, D) float32 on the CPU, dataset indices (N,)); unreadable clips are
    left out.
    """
    batch_config = dataclasses.replace(batch_config, num_workers=0,
                                       max_tokens=max(batch_config.max_tokens, int(dataset.sizes.max())))
    loader = batched_loader(dataset, batch_config, seed=0, epoch=0, rank=0, world_size=1, start_batch=0,
                            shuffle=False)
    was_training = model.training
    model.eval()
    features, ids = [], []
    try:
        for batch in loader:
            if batch is None:  # every clip of the batch unreadable (skip_bad)
                continue
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model.extract_features(batch.source, batch.padding_mask, layer=layer - 1)
            features.append(masked_mean(out.x.float(), out.padding_mask).cpu())
            ids.append(batch.ids.cpu())
    finally:
        model.train(was_training)
    if not features:
        raise RuntimeError("no clip of the probe set could be read")
    return torch.cat(features), torch.cat(ids)


@dataclasses.dataclass
class LinearProbeFit:
    """A fitted multinomial logistic regression on standardised features."""

    mean: torch.Tensor  # (D,) of the train features
    scale: torch.Tensor  # (D,) their standard deviation (a floor for constant features)
    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor  # (C,)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C)."""
        return ((features - self.mean) / self.scale) @ self.weight + self.bias

    def accuracy(self, features: torch.Tensor, targets: torch.Tensor) -> float:
        """Share of rows (N, D) whose most likely class is ``targets`` (N,)."""
        return float((self.logits(features).argmax(-1) == targets).float().mean())


def fit_linear_probe(features: torch.Tensor, targets: torch.Tensor, num_classes: int, *, steps: int = 300,
                     lr: float = 0.01) -> LinearProbeFit:
    """Multinomial logistic regression (softmax + cross entropy) fitted by ``steps`` full-batch Adam steps from
    zero weights on standardised ``features`` (N, D); ``targets`` (N,) class indices. Deterministic, on the CPU
    in float32, whatever the caller's gradient mode; on one thread (the products are small: with several threads,
    on a busy machine, each of the ~3000 small ops waited for every thread: 24 s instead of 0.45 s for 100 x 32
    features on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_linear_probe(features, targets, num_classes, steps, lr)
    finally:
        torch.set_num_threads(threads)


def _fit_linear_probe(features: torch.Tensor, targets: torch.Tensor, num_classes: int, steps: int,
                      lr: float) -> LinearProbeFit:
    features = features.detach().float().cpu()
    targets = targets.cpu()
    mean = features.mean(dim=0)
    scale = features.std(dim=0, unbiased=False).clamp_min(1e-6)
    x = (features - mean) / scale
    weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr, foreach=False)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(x @ weight + bias, targets).backward()
            optimizer.step()
    return LinearProbeFit(mean, scale, weight.detach(), bias.detach())


class LinearProbe:
    """The probe of a run: a labelled train and held-out part, the layer, and the fit's settings.

    Args:
        manifest, valid_manifest: the two parts (labels beside each, extension ``labels``); every held-out label
            must occur in the train part.
        layer: transformer layer, 1-based (:func:`probe_layer` resolves None).
        steps, lr: of :func:`fit_linear_probe`.
        max_samples, min_samples, sample_rate, normalize, seed, skip_bad: of each :class:`ProbeSplit`.

    Raises (at construction, before any training): the errors of :func:`read_class_labels`, and ValueError for a
    held-out label the train part lacks or a train part of fewer than 2 classes (the label file named).
    """

    def __init__(self, manifest: str, valid_manifest: str, *, labels: str, layer: int, steps: int, lr: float,
                 max_samples: int, min_samples: int, sample_rate: int, normalize: bool, seed: int,
                 skip_bad: bool = True):
        if not valid_manifest:
            raise ValueError("probe.valid_manifest is required with probe.manifest (the accuracy is held-out)")
        split = dict(sample_rate=sample_rate, max_samples=max_samples, min_samples=min_samples, normalize=normalize,
                     seed=seed, skip_bad=skip_bad)
        self.train = ProbeSplit(manifest, labels, **split)
        self.valid = ProbeSplit(valid_manifest, labels, **split)
        self.classes = sorted(set(self.train.labels))
        if len(self.classes) < 2:
            raise ValueError(f"{self.train.label_file}: the probe needs at least 2 classes, found {self.classes}")
        unseen = sorted(set(self.valid.labels) - set(self.classes))
        if unseen:
            raise ValueError(f"{self.valid.label_file}: label(s) {unseen} do not occur in the train part "
                             f"{self.train.label_file}; a linear probe cannot predict them")
        self.layer, self.steps, self.lr = layer, steps, lr

    def _targets(self, split: ProbeSplit, ids: torch.Tensor) -> torch.Tensor:
        index = {label: i for i, label in enumerate(self.classes)}
        return torch.tensor([index[split.labels[int(i)]] for i in ids], dtype=torch.long)

    def evaluate(self, model: torch.nn.Module, batch_config: AudioDataConfig, device: torch.device,
                 autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
        """Features of both parts from ``model`` (:func:`extract_pooled_features`), the fit on the train part, and
        ``{"probe_accuracy": held-out accuracy, "probe_train_accuracy": train accuracy, "probe_seconds": time}``."""
        start = time.monotonic()
        train_x, train_ids = extract_pooled_features(model, self.train.dataset, self.layer, batch_config, device,
                                                     autocast_dtype)
        valid_x, valid_ids = extract_pooled_features(model, self.valid.dataset, self.layer, batch_config, device,
                                                     autocast_dtype)
        train_y = self._targets(self.train, train_ids)
        fit = fit_linear_probe(train_x, train_y, len(self.classes), steps=self.steps, lr=self.lr)
        return {
            "probe_accuracy": fit.accuracy(valid_x, self._targets(self.valid, valid_ids)),
            "probe_train_accuracy": fit.accuracy(train_x, train_y),
            "probe_seconds": time.monotonic() - start,
        }
