"""Span masks and negatives: the original's statistics and invariants."""

import json

import pytest
import torch

import xlsr
from conftest import GOLDEN

STATS = json.loads((GOLDEN / "compute_mask_stats.json").read_text())
PARAMS = dict(mask_prob=0.65, mask_length=10, min_masks=2)
BATCH = STATS["batch_size"]
NUM_BATCHES = 200  # 12,800 rows per length


def masked_fractions(time: int, padded_length: int | None = None, require_same_masks: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    padding = None
    if padded_length is not None:
        padding = torch.zeros(BATCH, time, dtype=torch.bool)
        padding[BATCH // 2 :, padded_length:] = True
    fractions = []
    for _ in range(NUM_BATCHES):
        mask = xlsr.compute_mask_indices(
            (BATCH, time), padding, require_same_masks=require_same_masks, generator=generator, **PARAMS
        )
        if padding is not None:
            assert not (mask & padding).any(), "a mask touched padding"
            valid = (~padding).sum(1)
        else:
            valid = torch.full((BATCH,), time)
        if require_same_masks:
            assert (mask.sum(1) == mask.sum(1)[0]).all()
        fractions.append(mask.sum(1) / valid)
    return torch.stack(fractions)  # (batches, B)


@pytest.mark.parametrize("time", sorted(int(t) for t in STATS["no_padding"]))
def test_masked_fraction_matches_fairseq(time):
    expected = STATS["no_padding"][str(time)]["masked_fraction_mean"]
    assert abs(masked_fractions(time).mean().item() - expected) < 0.01


@pytest.mark.parametrize("time", [50, 200, 1000])
def test_masked_fraction_without_same_masks(time):
    expected = STATS["no_padding_require_same_masks_false"][str(time)]["masked_fraction_mean"]
    assert abs(masked_fractions(time, require_same_masks=False).mean().item() - expected) < 0.01


@pytest.mark.parametrize("time", sorted(int(t) for t in STATS["half_padded_to_60pct"]))
def test_masked_fraction_with_padding_matches_fairseq(time):
    stats = STATS["half_padded_to_60pct"][str(time)]
    fractions = masked_fractions(time, padded_length=stats["valid_len_padded_rows"])
    full, padded = fractions[:, : BATCH // 2], fractions[:, BATCH // 2 :]
    assert abs(full.mean().item() - stats["masked_fraction_over_valid_mean_full_rows"]) < 0.01
    assert abs(padded.mean().item() - stats["masked_fraction_over_valid_mean_padded_rows"]) < 0.01


@pytest.mark.parametrize("time", [0, 1, 2, 5, 9, 10, 11])
def test_short_inputs_do_not_crash(time):
    """As fairseq's sampler: below ~2 spans, min_masks=2 span starts are drawn from the first 3 frames, so at least
    T - 1 of T frames are masked (T >= 2), and require_same_masks gives every row the same count."""
    for seed in range(30):
        mask = xlsr.compute_mask_indices((3, time), **PARAMS, generator=torch.Generator().manual_seed(seed))
        assert mask.shape == (3, time) and mask.dtype == torch.bool
        counts = mask.sum(1)
        assert (counts == counts[0]).all(), counts
        if time == 0:
            assert counts.sum() == 0
        elif time == 1:
            assert counts[0] <= 1
        else:
            assert counts[0] >= time - 1, (seed, counts)


def test_no_overlap_spans_keep_min_space():
    gen = torch.Generator().manual_seed(0)
    mask = xlsr.compute_mask_indices((8, 400), None, 0.3, 10, 2, require_same_masks=False, no_overlap=True,
                                     min_space=2, generator=gen)
    for row in mask:
        runs = torch.diff(torch.cat([torch.tensor([0]), row.int(), torch.tensor([0])]))
        starts, ends = (runs == 1).nonzero().flatten(), (runs == -1).nonzero().flatten()
        assert ((ends - starts) % 10 == 0).all()
        assert ((ends - starts) == 10).all(), "spans merged: no_overlap must keep them apart"
        assert (starts[1:] - ends[:-1] >= 2).all()


def random_masks(seed: int, batch: int = 6, time: int = 80):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(time // 3, time + 1, (batch,), generator=gen)
    padding = torch.arange(time)[None, :] >= lengths[:, None]
    mask = xlsr.compute_mask_indices((batch, time), padding, 0.65, 5, 2, require_same_masks=False, generator=gen)
    return mask, padding, gen


@pytest.mark.parametrize("seed", range(20))
def test_negatives_are_other_masked_frames_of_same_row(seed):
    mask, padding, gen = random_masks(seed)
    batch, time = mask.shape
    negatives = xlsr.sample_negatives(mask, 10, padding, generator=gen)
    assert negatives.shape == (batch, time, 10) and negatives.dtype == torch.int64
    flat_mask = mask.flatten()
    flat_padding = padding.flatten()
    for b in range(batch):
        for t in mask[b].nonzero().flatten().tolist():
            idx = negatives[b, t]
            assert (idx // time == b).all(), "negative from another utterance"
            assert flat_mask[idx].all(), "negative is not a masked frame"
            assert not flat_padding[idx].any(), "negative is padding"
            if mask[b].sum() > 1:
                assert (idx != b * time + t).all(), "negative is the frame itself"


def test_negatives_close_to_uniform():
    mask = torch.zeros(1, 50, dtype=torch.bool)
    mask[0, 10:30] = True  # 20 masked frames
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(50)
    for _ in range(300):
        negatives = xlsr.sample_negatives(mask, 100, generator=gen)
        counts += torch.bincount(negatives[0, 10].flatten(), minlength=50)
    others = counts[11:30]
    assert counts[10] == 0 and counts[:10].sum() == 0 and counts[30:].sum() == 0
    expected = 300 * 100 / 19
    assert (others - expected).abs().max() < 5 * expected**0.5  # within 5 sigma of uniform


def test_negatives_with_fewer_masked_frames_than_negatives():
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, [3, 7]] = True
    mask[1, 5] = True  # a single masked frame: nothing else to draw from
    negatives = xlsr.sample_negatives(mask, 10, generator=torch.Generator().manual_seed(0))
    assert set(negatives[0, 3].tolist()) == {7} and set(negatives[0, 7].tolist()) == {3}
    assert set(negatives[1, 5].tolist()) == {25}


def test_cross_sample_negatives_come_from_other_masked_frames():
    mask, padding, gen = random_masks(3)
    negatives = xlsr.sample_negatives(mask, 4, padding, cross_sample_negatives=6, generator=gen)
    flat_mask = mask.flatten()
    for flat in flat_mask.nonzero().flatten().tolist():
        cross = negatives.view(-1, 10)[flat, 4:]
        assert flat_mask[cross].all() and (cross != flat).all()


@pytest.mark.parametrize("before", [False, True])
def test_channel_mask_before_or_after_the_time_mask(before):
    """fairseq's mask_channel_before: zero the channels first (masked frames then hold the whole mask embedding),
    or after the time mask (the mask embedding loses those channels too)."""
    cfg = xlsr.Wav2Vec2Config.from_preset("tiny", mask_channel_prob=0.5, mask_channel_length=4,
                                          mask_channel_before=before)
    torch.manual_seed(0)
    model = xlsr.Wav2Vec2Model(cfg).eval()
    seen = {}
    model.encoder.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].detach()))
    source = torch.randn(2, 16000)
    with torch.no_grad():
        out = model(source)
    x, time_mask = seen["x"], out.mask_indices
    embedding = model.mask_embedding.detach()
    for row in range(2):
        unmasked = x[row][~time_mask[row]]
        zeroed = (unmasked == 0).all(0)  # (D,) the channels masked in this row
        assert 0 < int(zeroed.sum()) < cfg.encoder_embed_dim
        masked = x[row][time_mask[row]]
        if before:
            assert torch.equal(masked, embedding.expand_as(masked))
        else:
            assert torch.equal(masked, embedding.masked_fill(zeroed, 0.0).expand_as(masked))
