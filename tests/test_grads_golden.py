"""Every parameter's gradient of the pretraining loss against the ORIGINAL fairseq's (``grads.pt``).

fairseq: ``model.eval()`` (no dropout; the quantizer picks its hard codes, no Gumbel noise, while the diversity
term keeps its softmax gradient), ``Wav2vecCriterion(infonce=True, loss_weights=[0.1, 10.0])`` on the fixture's
mask and recorded negatives, ``loss.backward()`` on the summed loss (not divided by sample_size).

Names: fairseq has separate q/k/v projections, we fuse them into ``qkv_proj``: our fused gradient is split into
q, k, v (``split_qkv``, the inverse of what loading does). The positional conv's weight norm is a torch
parametrization whose ``original0`` / ``original1`` are fairseq's ``weight_g`` / ``weight_v`` (same shapes, same
w = g * v / ||v|| over dims 0, 1), so their gradients are compared directly.
"""

from __future__ import annotations

import functools

import pytest
import torch

import xlsr
from conftest import GOLDEN, GOLDEN_MODELS
from xlsr.checkpoints.fairseq import FAIRSEQ_KEY_MAP
from xlsr.checkpoints.keymap import rename, split_qkv
from xlsr.pretrain import compute_loss

LOSS_WEIGHTS = (0.1, 10.0)
REL = 1e-4  # per parameter: ||ours - fairseq|| / max(||fairseq||, FLOOR * total gradient norm)
FLOOR = 1e-6  # the k_proj biases' true gradient is 0: fairseq's values are float noise
CHECKPOINTS = {"fgm1": "checkpoint.pt", "fgm01": "checkpoint_fgm01.pt"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@functools.lru_cache(maxsize=None)
def fairseq_grads(name: str) -> dict:
    return torch.load(GOLDEN / name / "grads.pt", weights_only=True)


@functools.lru_cache(maxsize=None)
def our_grads(name: str, fgm: str, dtype: str) -> tuple[dict[str, torch.Tensor], float, int, float]:
    """(our gradients under fairseq's names, loss, sample_size, feature_grad_mult) for one case."""
    inputs = torch.load(GOLDEN / name / "inputs.pt", weights_only=True)
    model = xlsr.Wav2Vec2Model.from_pretrained(GOLDEN / name / CHECKPOINTS[fgm]).to(DTYPES[dtype]).eval()
    out = model(
        inputs["source"].to(DTYPES[dtype]),
        inputs["padding_mask"],
        mask_indices=inputs["mask_time_indices"],
        negative_indices=inputs["sampled_negative_indices_hf"],  # == expected.pt's neg_idxs_fairseq, (B, T, N)
    )
    loss = compute_loss(out, LOSS_WEIGHTS)
    loss.total.backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    grads = split_qkv({k: p.grad.detach() for k, p in model.named_parameters()})

    # fairseq name -> ours through the loading key map (its forward direction is unambiguous; the reverse is
    # not: layer-norm and group-norm conv norms both become ``norm``)
    to_fairseq, unmatched = rename({k: k for k in fairseq_grads(name)[fgm][dtype]}, FAIRSEQ_KEY_MAP)
    assert not unmatched, f"fairseq parameters without a rule: {unmatched}"
    assert set(to_fairseq) == set(grads), f"unmapped: {sorted(set(to_fairseq) ^ set(grads))}"
    return {to_fairseq[k]: g for k, g in grads.items()}, loss.total.item(), loss.sample_size, model.cfg.feature_grad_mult


CASES = [
    pytest.param(name, fgm, dtype, id=f"{name}-{fgm}-{dtype}")
    for name in GOLDEN_MODELS
    for fgm in CHECKPOINTS
    for dtype in DTYPES
]


@pytest.mark.parametrize("name, fgm, dtype", CASES)
def test_gradients_match_fairseq(name, fgm, dtype):
    reference = fairseq_grads(name)[fgm]
    theirs, info = reference[dtype], reference["info"][dtype]
    ours, loss, sample_size, grad_mult = our_grads(name, fgm, dtype)

    assert grad_mult == info["feature_grad_mult"]
    assert sample_size == info["sample_size"]
    assert abs(loss - info["loss"]) <= 1e-5 * abs(info["loss"]), (loss, info["loss"])

    assert set(ours) == set(theirs), f"not compared: {sorted(set(ours) ^ set(theirs))}"
    total = torch.sqrt(sum(g.double().pow(2).sum() for g in theirs.values())).item()
    ratios = {}
    for key, ref in theirs.items():
        assert ours[key].shape == ref.shape and ours[key].dtype == ref.dtype, key
        err = (ours[key].double() - ref.double()).norm().item()
        ratios[key] = err / max(ref.double().norm().item(), FLOOR * total)
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= REL, f"worst: {worst} relative error {ratios[worst]:.3g} (limit {REL})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_feature_grad_mult_scales_only_the_conv_encoder(name, dtype):
    """feature_grad_mult 0.1: conv feature-encoder gradients are 0.1 x those with 1.0, every other is the same.

    Mathematically exact; numerically the conv stack's backward (its norms run in float32 even in a float64
    model, as in fairseq) rounds differently for a 0.1 x smaller incoming gradient: fairseq's own grads.pt
    differ from 0.1 x by up to 6e-6 (max-abs relative), so 1e-5 in both dtypes.
    """
    full, _, _, _ = our_grads(name, "fgm1", dtype)
    tenth, _, _, mult = our_grads(name, "fgm01", dtype)
    assert mult == 0.1
    conv = [k for k in full if k.startswith("feature_extractor.")]
    assert conv and len(conv) < len(full)
    ratios = {}
    for key in conv:
        ref = 0.1 * full[key].double()
        ratios[key] = (tenth[key].double() - ref).abs().max().item() / ref.abs().max().item()
    worst = max(ratios, key=ratios.get)
    assert ratios[worst] <= 1e-5, f"worst: {worst} relative error {ratios[worst]:.3g}"
    different = [k for k in full if k not in conv and not torch.equal(full[k], tenth[k])]
    assert not different, f"feature_grad_mult changed gradients outside the conv encoder: {different}"
