"""The pretraining objective against fairseq's criterion on the golden data, and its training behaviour."""

import pytest
import torch

import xlsr
from xlsr.pretrain import compute_loss

REL = 1e-5


def pinned_forward(model, inputs):
    return model(
        inputs["source"],
        inputs["padding_mask"],
        mask_indices=inputs["mask_time_indices"],
        negative_indices=inputs["sampled_negative_indices_hf"],
    )


def close(ours, theirs, rel=REL):
    return abs(float(ours) - float(theirs)) <= rel * max(1.0, abs(float(theirs)))


def test_criterion_matches_fairseq(golden):
    checkpoint, inputs, expected = golden
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    with torch.no_grad():
        out = pinned_forward(model, inputs)
        loss = compute_loss(out, tuple(expected["loss_weights"]))
        alt = compute_loss(out, tuple(expected["alt_loss_weights"]))
    assert close(loss.total, expected["loss"])
    assert close(loss.contrastive, expected["contrastive_loss"])
    assert close(loss.diversity, expected["diversity"])
    assert close(loss.features_penalty, expected["features_pen"])
    assert loss.sample_size == expected["sample_size"]
    assert loss.correct == expected["correct"]
    assert loss.count == expected["count"]
    assert close(alt.total, expected["alt_loss"])
    assert close(out.prob_perplexity, expected["prob_perplexity"])
    assert close(out.code_perplexity, expected["code_perplexity"])
    assert out.num_vars == expected["num_vars"]
    assert int(torch.isinf(out.logits).sum()) == expected["num_neg_is_pos"]


def test_logits_match_fairseq_per_frame(golden):
    """fairseq orders rows (m, b); we order masked frames row-major (b, m)."""
    checkpoint, inputs, expected = golden
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    with torch.no_grad():
        out = pinned_forward(model, inputs)
    batch, masked = expected["neg_idxs_fairseq_bmn"].shape[:2]
    theirs = expected["logits_raw"].permute(1, 2, 0).reshape(batch * masked, -1)
    finite = torch.isfinite(theirs)
    assert torch.equal(finite, torch.isfinite(out.logits))
    assert (out.logits[finite] - theirs[finite]).abs().max().item() <= 1e-4


def test_bf16_autocast_keeps_logits_and_loss_fp32(golden):
    checkpoint, inputs, expected = golden
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = pinned_forward(model, inputs)
        loss = compute_loss(out, tuple(expected["loss_weights"]))
    assert out.logits.dtype == torch.float32
    assert out.features_pen.dtype == torch.float32 and out.prob_perplexity.dtype == torch.float32
    assert loss.total.dtype == torch.float32 and torch.isfinite(loss.total)
    assert torch.isfinite(out.logits[:, 0]).all()
    assert abs(loss.contrastive.item() - expected["contrastive_loss"]) < 0.05 * expected["contrastive_loss"]


def tiny_batch(seed=0, batch=2, samples=16000):
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    freqs = torch.randint(100, 2000, (batch, 4), generator=gen).float()
    wav = torch.sin(2 * torch.pi * freqs[..., None] * t).sum(1) + 0.1 * torch.randn(batch, samples, generator=gen)
    return torch.nn.functional.layer_norm(wav, (samples,))


def test_one_training_step_updates_every_part():
    torch.manual_seed(0)
    model = xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny", encoder_layerdrop=0.0)).train()
    groups = {
        "codebook": [model.quantizer.codebook],
        "weight_proj": list(model.quantizer.weight_proj.parameters()),
        "project_q": list(model.project_q.parameters()),
        "final_proj": list(model.final_proj.parameters()),
        "encoder": list(model.encoder.layers.parameters()),
        "conv": list(model.feature_extractor.parameters()),
    }
    before = {k: [p.detach().clone() for p in ps] for k, ps in groups.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = compute_loss(model(tiny_batch()), (0.1, 10.0))
    loss.total.backward()
    for name, params in groups.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"no gradient reached {name}"
    optimizer.step()
    for name, params in groups.items():
        assert any(not torch.equal(p, b) for p, b in zip(params, before[name])), f"{name} did not change"


def test_overfit_single_batch():
    torch.manual_seed(0)
    cfg = xlsr.Wav2Vec2Config.from_preset("tiny", encoder_layerdrop=0.0, dropout=0.0)
    model = xlsr.Wav2Vec2Model(cfg).train()
    source = tiny_batch(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    mask = xlsr.compute_mask_indices((2, 49), None, 0.65, 10, 2, generator=gen)
    negatives = xlsr.sample_negatives(mask, cfg.num_negatives, generator=gen)
    losses = []
    for _ in range(40):
        out = model(source, mask_indices=mask, negative_indices=negatives)
        loss = compute_loss(out, (0.1, 0.0))
        optimizer.zero_grad()
        (loss.total / loss.sample_size).backward()
        optimizer.step()
        losses.append(loss.contrastive.item() / loss.sample_size)
    assert losses[-1] < 0.5 * losses[0], losses
    # learnt, not collapsed: a collapsed codebook makes the negatives equal the positive and the loss fall anyway
    chance = 1 / (1 + cfg.num_negatives)
    assert loss.correct / loss.count > 10 * chance, loss.correct / loss.count
    assert float(out.code_perplexity) > 0.25 * cfg.num_codevectors, float(out.code_perplexity)


def test_temperature_schedule():
    model = xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny"))
    q = model.quantizer
    model.set_num_updates(0)
    assert q.curr_temp == 2.0
    model.set_num_updates(1000)
    assert q.curr_temp == pytest.approx(2.0 * 0.999995**1000)
    model.set_num_updates(10**8)
    assert q.curr_temp == 0.1


def test_unmasked_negative_entries_are_ignored(golden):
    checkpoint, inputs, expected = golden
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    negatives = inputs["sampled_negative_indices_hf"].clone()
    negatives[~inputs["mask_time_indices"]] = 12345  # garbage where no frame is masked
    with torch.no_grad():
        out = model(inputs["source"], inputs["padding_mask"], inputs["mask_time_indices"], negatives)
    assert close(compute_loss(out, tuple(expected["loss_weights"])).total, expected["loss"])


def test_sampling_masks_and_negatives_itself():
    torch.manual_seed(0)
    model = xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny")).train()
    out = model(tiny_batch())
    assert out.logits.shape == (int(out.mask_indices.sum()), 1 + model.cfg.num_negatives)
    assert torch.isfinite(compute_loss(out).total)
