"""Fast paths against the plain computations they replace: same numbers up to float rounding, same gradients."""

import pytest
import torch
import torch.nn.functional as F

import xlsr
from xlsr.kernels.channels_last_conv import strided_conv
from xlsr.modules.feature_encoder import FeatureEncoder


def grads(params):
    return [p.grad.clone() for p in params]


def assert_close_list(ours, theirs, rtol=1e-5, atol=1e-5):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def rel(a, b):
    """Relative error of a against b, in norm (for sums over many rows, where single entries may cancel)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------------ conv stack
@pytest.mark.parametrize(
    "in_dim,kernel,stride,bias",
    [(1, 10, 5, True), (8, 3, 2, True), (8, 3, 2, False), (8, 2, 2, True), (4, 5, 2, True), (3, 4, 4, True)],
)
def test_strided_conv_matches_conv1d(in_dim, kernel, stride, bias):
    gen = torch.Generator().manual_seed(0)
    rows = 10 * stride
    x = torch.randn(rows, in_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, in_dim, kernel, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    params = [x, weight] + ([b] if bias else [])

    out = strided_conv(x, weight, b, stride)  # (rows // stride, 6)
    ref = F.conv1d(x.t()[None], weight, b, stride=stride)[0].t()  # (valid, 6)
    valid = ref.shape[0]
    assert out.shape == (rows // stride, 6)
    torch.testing.assert_close(out[:valid], ref)
    assert torch.equal(out[valid:], torch.zeros_like(out[valid:]))  # windows past the end: zero rows

    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    upstream[valid:] = 0  # as in the encoder, nothing reads the rows past the end
    (out * upstream).sum().backward()
    ours = grads(params)
    for p in params:
        p.grad = None
    (ref * upstream[:valid]).sum().backward()
    assert_close_list(ours, grads(params), rtol=1e-10, atol=1e-10)


def test_strided_conv_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: strided_conv(*a, 2)[:5], (x, weight, b))


def layer_norm_encoder(seed=0):
    torch.manual_seed(seed)
    cfg = xlsr.Wav2Vec2Config.from_preset("tiny")
    encoder = FeatureEncoder(cfg.conv_layers, cfg.extractor_mode, cfg.conv_bias)
    for layer in encoder.conv_layers:  # non-trivial norm parameters and biases
        torch.nn.init.normal_(layer.conv.bias, std=0.1)
        torch.nn.init.normal_(layer.norm.weight, 1.0, 0.1)
        torch.nn.init.normal_(layer.norm.bias, 0.0, 0.1)
    return encoder


def run_encoder(encoder, source, channels_last, upstream=None, autocast=False):
    encoder.channels_last = channels_last
    encoder.zero_grad(set_to_none=True)
    source = source.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = encoder.forward_frames(source)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out.float() * upstream).sum().backward()
    return out.detach().float(), [source.grad] + grads(encoder.parameters()), upstream


@pytest.mark.parametrize("samples", [3200, 4321])  # 4321: not a multiple of the total stride (padding inside)
def test_channels_last_encoder_matches_conv1d(samples):
    encoder = layer_norm_encoder()
    source = torch.randn(3, samples, generator=torch.Generator().manual_seed(3))
    plain, plain_grads, upstream = run_encoder(encoder, source, channels_last=False)
    fast, fast_grads, _ = run_encoder(encoder, source, channels_last=True, upstream=upstream)
    assert fast.shape == plain.shape == (3, int(encoder.output_lengths(torch.tensor(samples))), 64)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(fast_grads, plain_grads):
        assert rel(ours, theirs) < 1e-5
    assert torch.equal(encoder(source), encoder.forward_frames(source).transpose(1, 2))  # (B, C, T) API


def test_channels_last_encoder_bf16_autocast_matches_conv1d():
    encoder = layer_norm_encoder()
    source = torch.randn(2, 4000, generator=torch.Generator().manual_seed(4))
    reference, reference_grads, upstream = run_encoder(encoder, source, channels_last=False)  # fp32
    plain, plain_grads, _ = run_encoder(encoder, source, False, upstream, autocast=True)
    fast, fast_grads, _ = run_encoder(encoder, source, True, upstream, autocast=True)

    assert rel(fast, reference) < 2 * rel(plain, reference) + 1e-3
    for ours, theirs, ref in zip(fast_grads, plain_grads, reference_grads):  # no worse than the bf16 conv1d path
        assert rel(ours, ref) < 1.5 * rel(theirs, ref) + 1e-3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference: mixed-dtype layer norm
        encoder.channels_last = True
        fast_infer = encoder.forward_frames(source)
        encoder.channels_last = False
        plain_infer = encoder.forward_frames(source)
    assert fast_infer.dtype == plain_infer.dtype == torch.bfloat16
    torch.testing.assert_close(fast_infer.float(), plain_infer.float(), rtol=0.02, atol=0.05)


def test_group_norm_encoder_keeps_conv1d_path():
    cfg = xlsr.Wav2Vec2Config.from_preset("base")
    encoder = FeatureEncoder(cfg.conv_layers[:2], cfg.extractor_mode, cfg.conv_bias)
    source = torch.randn(2, 800)
    encoder.channels_last = True  # ignored: the channels-last path is for layer_norm mode only
    out = encoder.forward_frames(source)
    ref = encoder.conv_layers[1](encoder.conv_layers[0](source[:, None])).transpose(1, 2)
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------ contrastive logits
def logits_case(counts, cross=False, seed=0, dim=16, negatives=7):
    """Masked-frame rows grouped by utterance (``counts`` per utterance), negatives drawn within the utterance
    (or anywhere when ``cross``), with a few duplicated target rows so that some negatives equal their positive."""
    gen = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    group = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    starts = torch.tensor([0] + counts[:-1]).cumsum(0)
    context = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    targets = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    targets[1] = targets[0]  # same code twice: a negative equal to the positive gets -inf
    targets[3] = -0.0 * targets[2].abs() if counts[0] > 3 else targets[3]
    targets[2] = 0.0 * targets[2].abs()  # +0.0 and -0.0 rows are equal under ==
    if cross:
        index = torch.randint(0, rows, (rows, negatives), generator=gen)
    else:
        sizes = torch.tensor(counts)[group]
        index = (torch.rand(rows, negatives, generator=gen) * sizes[:, None]).long() + starts[group][:, None]
    index[0, 0], index[1, 0] = 1, 0
    return context.requires_grad_(), targets.requires_grad_(), index, group


@pytest.mark.parametrize("counts,cross", [([6, 6, 6], False), ([5, 9, 1, 4], False), ([5, 9, 4], True)])
def test_indexed_contrastive_logits_match_gathered_cosines(counts, cross):
    from xlsr.kernels.contrastive import indexed_contrastive_logits
    from xlsr.model import contrastive_logits

    context, targets, index, group = logits_case(counts, cross)
    for groups in (group, None):
        ours = indexed_contrastive_logits(context, targets, index, 0.1, groups)
        reference = contrastive_logits(context, targets, targets[index], 0.1)
        assert ours.dtype == torch.float32
        assert torch.equal(torch.isinf(ours), torch.isinf(reference))
        assert int(torch.isinf(ours).sum()) >= 2 + (counts[0] > 3)
        finite = torch.isfinite(reference)
        torch.testing.assert_close(ours[finite], reference[finite], rtol=1e-6, atol=1e-6)

        upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(5)).masked_fill(~finite, 0)
        (torch.where(finite, ours, 0) * upstream).sum().backward()
        ours_grads = grads([context, targets])
        context.grad = targets.grad = None
        (torch.where(finite, reference, 0) * upstream).sum().backward()
        context_grad, targets_grad = grads([context, targets])
        # A zero target row's gradient is scaled by 1 / eps (1e8) and sums float32 terms of up to ~1e9 that cancel,
        # in an order that depends on the matmul kernel (so on the CPU): compare those rows to their largest entry.
        # Measured on AVX2 and ATEN_CPU_CAPABILITY=default: <= 3e-7 of it; elsewhere well inside rtol 1e-5, atol 1e-6.
        zero = targets.detach().norm(dim=1) == 0
        assert int(zero.sum()) == 1 + (counts[0] > 3)
        torch.testing.assert_close(ours_grads[0], context_grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_grads[1][~zero], targets_grad[~zero], rtol=1e-5, atol=1e-6)
        scale = targets_grad[zero].abs().max().item()
        torch.testing.assert_close(ours_grads[1][zero], targets_grad[zero], rtol=0, atol=1e-6 * scale)
        context.grad = targets.grad = None


def test_indexed_contrastive_logits_are_fp32_under_autocast():
    from xlsr.kernels.contrastive import indexed_contrastive_logits
    from xlsr.model import contrastive_logits

    context, targets, index, group = logits_case([8, 8])
    context, targets = context.detach().bfloat16(), targets.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = indexed_contrastive_logits(context, targets, index, 0.1, group)
        reference = contrastive_logits(context, targets, targets[index], 0.1)
    assert ours.dtype == reference.dtype == torch.float32
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(ours))
    torch.testing.assert_close(ours[finite], reference[finite], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ fp32 GELU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gelu_equals_float32_round_trip(dtype):
    """Bitwise the round trip ``F.gelu(x.float()).to(dtype)``, forward and backward, on any CPU: the same float32
    kernels run on the same widened values (the native half-precision kernel is not: its result depends on the
    vector ISA). And only the half-precision input is kept for backward, not a float32 copy."""
    from xlsr.kernels.gelu import gelu_fp32_saving_memory

    values = torch.randn(65536, generator=torch.Generator().manual_seed(0)) * 4  # tails: where kernels differ most
    x = torch.cat([values, torch.tensor([-10.0, -6.0, -0.75, -0.0, 0.0, 3.0, 300.0])])
    x = x.to(dtype).requires_grad_()
    x32 = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = gelu_fp32_saving_memory(x)
    reference = F.gelu(x32.float()).to(dtype)  # the original: float32 GELU, rounded once
    assert ours.dtype == dtype and torch.equal(ours, reference)
    assert [(t.dtype, t.shape) for t in saved] == [(dtype, x.shape)]
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours.backward(upstream)
    reference.backward(upstream)
    assert torch.equal(x.grad, x32.grad)


# ------------------------------------------------------------------------------------------------ attention
def reference_attention(attention, x, padding_mask):
    """Separate q/k/v projections (slices of the fused weight), explicit scaled scores, -inf at padded keys,
    softmax, weighted sum, output projection: the textbook computation the fused SDPA path replaces."""
    batch, time, dim = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    w_q, w_k, w_v = attention.qkv_proj.weight.chunk(3, dim=0)
    b_q, b_k, b_v = attention.qkv_proj.bias.chunk(3, dim=0)

    def split(t):
        return t.view(batch, time, heads, head_dim).transpose(1, 2)  # (B, H, T, Dh)

    q, k, v = split(F.linear(x, w_q, b_q)), split(F.linear(x, w_k, b_k)), split(F.linear(x, w_v, b_v))
    scores = q @ k.transpose(-1, -2) / head_dim**0.5
    if padding_mask is not None:
        scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return attention.out_proj(out.transpose(1, 2).reshape(batch, time, dim))


@pytest.mark.parametrize("padded", [False, True])
def test_fused_attention_matches_separate_projections(padded):
    from xlsr.modules.transformer import SelfAttention

    torch.manual_seed(0)
    attention = SelfAttention(32, 4).double()
    for p in attention.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 11, 32, dtype=torch.float64, requires_grad=True)
    padding_mask = None
    if padded:
        padding_mask = torch.arange(11)[None, :] >= torch.tensor([11, 7, 3])[:, None]  # True = padded frame
    attn_mask = None if padding_mask is None else (~padding_mask)[:, None, None, :]

    ours = attention(x, attn_mask)
    reference = reference_attention(attention, x, padding_mask)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(ours.shape, dtype=torch.float64)
    params = [x, *attention.parameters()]
    (ours * upstream).sum().backward()
    ours_grads = grads(params)
    for p in params:
        p.grad = None
    (reference * upstream).sum().backward()
    assert_close_list(ours_grads, grads(params), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------------ whole model
def tiny_training_model(seed=0, dropout=0.1, extractor_mode="layer_norm"):
    torch.manual_seed(seed)
    cfg = xlsr.Wav2Vec2Config.from_preset("tiny", encoder_layerdrop=0.0, dropout=dropout, extractor_mode=extractor_mode)
    return xlsr.Wav2Vec2Model(cfg).train()


def tiny_inputs(model, batch=2, samples=8000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, samples, generator=gen)
    padding_mask = torch.zeros(batch, samples, dtype=torch.bool)
    padding_mask[1, samples * 3 // 4 :] = True
    frames = int(model.feature_extractor.output_lengths(torch.tensor(samples)))
    frame_padding = model.frame_padding_mask(padding_mask, frames)
    mask = xlsr.compute_mask_indices((batch, frames), frame_padding, 0.65, 4, 2, generator=gen)
    negatives = xlsr.sample_negatives(mask, model.cfg.num_negatives, frame_padding, generator=gen)
    return source, padding_mask, mask, negatives


def loss_and_grads(model, inputs, seed=0):
    from xlsr.pretrain.loss import compute_loss

    source, padding_mask, mask, negatives = inputs
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout and Gumbel noise
    out = model(source, padding_mask, mask_indices=mask, negative_indices=negatives)
    loss = compute_loss(out, (0.1, 10.0)).total
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extractor_mode", ["layer_norm", "group_norm"])
def test_activation_checkpointing_matches_plain(extractor_mode):
    model = tiny_training_model(extractor_mode=extractor_mode)  # dropout: the recomputation replays the same draws
    inputs = tiny_inputs(model)
    plain_loss, plain_grads = loss_and_grads(model, inputs)
    model.set_activation_checkpointing(True)
    ckpt_loss, ckpt_grads = loss_and_grads(model, inputs)
    assert plain_loss.item() == pytest.approx(ckpt_loss.item(), rel=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert len(plain_grads) == len(list(model.parameters()))
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def _compile_usable() -> bool:
    try:
        torch.compile(lambda t: t * 2, backend="eager")(torch.ones(2))
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _compile_usable(), reason="torch.compile is not usable here")
def test_compiled_encoder_matches_eager():
    model = tiny_training_model(dropout=0.0)  # compiled dropout draws other random numbers
    inputs = tiny_inputs(model)
    eager_loss, eager_grads = loss_and_grads(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.compile_encoder(backend=COMPILE_BACKEND)
    assert {k: v for k, v in model.state_dict().items()}.keys() == state.keys()  # keys unchanged
    compiled_loss, compiled_grads = loss_and_grads(model, inputs)
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # inference through the compiled layers, padded batch
        model.eval()
        compiled = model.extract_features(inputs[0], inputs[1]).x
        eager = xlsr.Wav2Vec2Model(model.cfg).eval()
        eager.load_state_dict(state)
        torch.testing.assert_close(compiled, eager.extract_features(inputs[0], inputs[1]).x, rtol=1e-4, atol=1e-5)


COMPILE_BACKEND = "inductor"


def saved_for_backward_bytes(model, source) -> int:
    """Bytes autograd keeps from the forward (the activations that activation checkpointing avoids)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.extract_features(source).x.sum()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_activation_checkpointing_keeps_little_for_backward():
    """Conv stack and transformer layers: only their inputs are kept (the conv stack's is the audio)."""
    model = tiny_training_model(dropout=0.0)
    source = torch.randn(2, 32000)
    plain = saved_for_backward_bytes(model, source)
    model.set_activation_checkpointing(True)
    checkpointed = saved_for_backward_bytes(model, source)
    assert checkpointed < 0.2 * plain, (checkpointed, plain)


# ------------------------------------------------------------------------------------------------ the switches
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_model_switches_give_the_reference_numbers(dtype):
    """Each fast path's flag on the model: off runs the readable reference; outputs and gradients agree.

    In bf16 the conv stack stays on one path: its products round in another order on the two paths, a difference
    as large as bf16's own error here (test_channels_last_encoder_bf16_autocast_matches_conv1d measures both
    against float32); the GELU switch is bitwise and the logits are float32 on both paths.
    """
    torch.manual_seed(0)
    model = xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny", encoder_layerdrop=0.0)).eval()
    source = torch.randn(2, 16000, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(1)
    mask = xlsr.compute_mask_indices((2, 49), None, 0.65, 10, 2, generator=gen)
    negatives = xlsr.sample_negatives(mask, model.cfg.num_negatives, generator=gen)

    def run(fast: bool):
        model.indexed_logits = fast
        model.feature_extractor.channels_last = fast if dtype == "fp32" else False
        for layer in model.encoder.layers:
            layer.feed_forward.memory_saving_gelu = fast
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(source, mask_indices=mask, negative_indices=negatives)
        out.logits.masked_fill(~torch.isfinite(out.logits), 0).sum().backward()
        return out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    fast_logits, fast_grads = run(True)
    ref_logits, ref_grads = run(False)
    assert torch.equal(torch.isfinite(fast_logits), torch.isfinite(ref_logits))
    finite = torch.isfinite(ref_logits)
    torch.testing.assert_close(fast_logits[finite], ref_logits[finite], rtol=1e-4, atol=1e-4)
    assert fast_grads.keys() == ref_grads.keys()
    tolerance = 1e-3 if dtype == "fp32" else 2e-2  # bf16: the gradients reaching bf16 tensors round to 8 bits
    for key in ref_grads:
        scale = ref_grads[key].abs().max().item()
        assert (fast_grads[key] - ref_grads[key]).abs().max().item() <= tolerance * scale + 1e-6, key
