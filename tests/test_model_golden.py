"""Equivalence with the original fairseq code on its golden outputs (xlsr_mini and base_mini)."""

import torch

import xlsr

TOL = 1e-5


def max_diff_on_valid(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    return (a - b)[valid].abs().max().item()


def test_extract_features_matches_fairseq(golden):
    checkpoint, inputs, expected = golden
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    valid = ~expected["frame_padding_mask"]
    assert valid.sum(1).tolist() == [49, 34]  # the second row is padded
    with torch.no_grad():
        feats = model.extract_features(inputs["source"], inputs["padding_mask"])
        conv = model.feature_extractor(inputs["source"])
    assert torch.equal(feats.padding_mask, expected["frame_padding_mask"])
    assert (conv - expected["conv_features"]).abs().max().item() <= TOL
    assert max_diff_on_valid(feats.features, expected["features_ln"], valid) <= TOL
    assert max_diff_on_valid(feats.x, expected["encoder_out"], valid) <= TOL
    layer_outputs = expected["layer_outputs"]  # (L, B, T, D)
    assert len(feats.layer_results) == layer_outputs.shape[0]
    for ours, theirs in zip(feats.layer_results, layer_outputs):
        assert max_diff_on_valid(ours, theirs, valid) <= TOL


def test_layer_k_stops_early(golden):
    checkpoint, inputs, expected = golden
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    valid = ~expected["frame_padding_mask"]
    with torch.no_grad():
        feats = model.extract_features(inputs["source"], inputs["padding_mask"], layer=0)
    assert len(feats.layer_results) == 1
    assert max_diff_on_valid(feats.x, expected["layer_outputs"][0], valid) <= TOL


def test_quantizer_eval_targets_and_perplexities(golden):
    checkpoint, inputs, expected = golden
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    features = expected["features_ln"]
    with torch.no_grad():
        q = model.quantizer(features.reshape(-1, features.shape[-1]))
        projected = model.project_q(q.quantized)
    batch, time = features.shape[:2]
    assert torch.equal(q.targets.view(batch, time, -1), expected["quant_targets"])
    assert (q.quantized.view(batch, time, -1) - expected["quant_x"]).abs().max().item() <= TOL
    assert (projected.view(batch, time, -1) - expected["quant_x_projected"]).abs().max().item() <= TOL
    assert abs(q.prob_perplexity.item() - expected["quant_prob_perplexity"]) <= TOL
    assert abs(q.code_perplexity.item() - expected["quant_code_perplexity"]) <= TOL
    assert q.num_vars == expected["quant_num_vars"]


def test_temperature_restored_from_checkpoint(golden):
    checkpoint, _, expected = golden
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    assert abs(model.quantizer.curr_temp - expected["temp"]) < 1e-9


def test_padded_batch_matches_single_utterance_layer_norm_model():
    """Layer-norm models: a short utterance padded in a batch gives the same valid frames as alone."""
    from conftest import load_golden

    checkpoint, inputs, expected = load_golden("xlsr_mini")
    model = xlsr.Wav2Vec2Model.from_pretrained(checkpoint)
    length = int(inputs["lengths"][1])
    with torch.no_grad():
        batched = model.extract_features(inputs["source"], inputs["padding_mask"])
        alone = model.extract_features(inputs["source"][1:2, :length])
    frames = alone.x.shape[1]
    assert frames == int((~batched.padding_mask[1]).sum())
    assert (batched.x[1, :frames] - alone.x[0]).abs().max().item() <= TOL
    for b, a in zip(batched.layer_results, alone.layer_results):
        assert (b[1, :frames] - a[0]).abs().max().item() <= TOL
