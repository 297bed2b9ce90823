"""The CPU channels-last conv stack: equals ``FeatureEncoder``'s Conv1d -> LayerNorm -> GELU layers (reference in
``xlsr/modules/feature_encoder.py``), outputs and gradients (``tests/test_fast_paths.py``).

Switch: ``model.feature_extractor.channels_last`` (None: on the CPU in layer_norm mode; False: never; True: always).

Why: on the CPU, ``Conv1d`` + a LayerNorm over channels costs two transposes of (B, C, T) per layer and a contiguous
copy of each conv input. Here the activations stay (batch x time, channels) rows; each conv is a few matrix products
over strided views of them (a custom autograd function whose backward is again plain matrix products), and the
LayerNorm runs over the contiguous last axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channels_last_conv_stack(encoder, source: torch.Tensor) -> torch.Tensor:
    """``encoder``'s layer_norm-mode conv stack on (batch x rows, channels) activations: source (B, S) -> (B, T, C).

    Every utterance gets ``rows`` rows, a multiple of each layer's stride (the audio is zero-padded to a multiple
    of the product of the strides), so one matrix product per kernel block serves the whole batch. The rows past
    an utterance's last frame hold finite junk that no real frame reads; they are cut at the end (so their
    gradient is zero).
    """
    batch, samples = source.shape
    total_stride = 1
    for layer in encoder.conv_layers:
        total_stride *= layer.conv.stride[0]
    rows = -(-samples // total_stride) * total_stride
    x = F.pad(source, (0, rows - samples)) if rows != samples else source
    x = x.reshape(batch * rows, 1)
    length = samples
    for layer in encoder.conv_layers:
        conv = layer.conv
        kernel, stride = conv.kernel_size[0], conv.stride[0]
        rows //= stride
        length = (length - kernel) // stride + 1
        x = strided_conv(x, conv.weight, conv.bias, stride)
        x = F.gelu(layer_norm_rows(layer.norm, x))
    return x.view(batch, rows, -1)[:, :length]


def layer_norm_rows(norm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` (an ``Fp32LayerNorm``) over the last axis of (M, C) rows: the same numbers as ``norm.forward``.

    Without autograd on the CPU, a bf16/fp16 input goes straight into the kernel with float32 weights: it computes
    in float32 and rounds once, as the ``.float()`` round trip does, minus two copies. With autograd the round trip
    stays, so that the weight and bias gradients are summed in float32 as in the original.
    """
    weight = norm.weight.float() if norm.weight is not None else None
    bias = norm.bias.float() if norm.bias is not None else None
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad)
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or needs_grad:
        return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).type_as(x)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


def _tap_blocks(kernel: int, stride: int) -> list[tuple[int, int]]:
    """Split a kernel into blocks of at most ``stride`` consecutive taps: [(first tap, number of taps)]."""
    return [(first, min(stride, kernel - first)) for first in range(0, kernel, stride)]


def _block_view(x: torch.Tensor, rows: int, first: int, taps: int, stride: int) -> torch.Tensor:
    """Rows ``r * stride + first ... + taps - 1`` of x (M, C) side by side: a (rows, taps * C) strided view."""
    channels = x.shape[1]
    return x.as_strided((rows, taps * channels), (stride * channels, 1), x.storage_offset() + first * channels)


class _StridedConv(torch.autograd.Function):
    """Conv1d on (M, C_in) rows -> (M // stride, C_out) rows; row r reads input rows r*stride ... r*stride+k-1.

    The kernel is cut into blocks of ``stride`` taps; a block's input is a strided view whose row length is at
    most its row step, so forward and both gradients are plain matrix products with no copy of the activations.
    Output rows whose window runs past the input are zero. All tensors in one dtype (autocast is done outside).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride):  # type: ignore[override]
        rows_in, in_dim = x.shape
        out_dim, _, kernel = weight.shape
        rows_out = rows_in // stride
        valid = (rows_in - kernel) // stride + 1 if rows_in >= kernel else 0
        out = x.new_empty(rows_out, out_dim)
        out[valid:].zero_()
        if valid > 0:
            if kernel * in_dim <= 64:  # tiny window (first layer, one channel): one product on a small copy
                blocks = [(0, kernel)]
                views = [x.as_strided((valid, kernel * in_dim), (stride * in_dim, 1), x.storage_offset()).contiguous()]
            else:
                blocks = _tap_blocks(kernel, stride)
                views = [_block_view(x, valid, first, taps, stride) for first, taps in blocks]
            for i, ((first, taps), view) in enumerate(zip(blocks, views)):
                w = weight[:, :, first : first + taps].permute(0, 2, 1).reshape(out_dim, taps * in_dim)
                if i == 0:
                    if bias is not None:
                        torch.addmm(bias, view, w.t(), out=out[:valid])
                    else:
                        torch.mm(view, w.t(), out=out[:valid])
                else:
                    out[:valid].addmm_(view, w.t())
        ctx.stride, ctx.valid, ctx.has_bias = stride, valid, bias is not None
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, valid = ctx.stride, ctx.valid
        rows_in, in_dim = x.shape
        out_dim, _, kernel = weight.shape
        grad = grad[:valid].contiguous()
        grad_x = grad_w = grad_b = None
        blocks = _tap_blocks(kernel, stride)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            for first, taps in blocks:
                block = grad.t() @ _block_view(x, valid, first, taps, stride)  # (C_out, taps * C_in)
                grad_w[:, :, first : first + taps] = block.view(out_dim, taps, in_dim).permute(0, 2, 1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty(rows_in, in_dim)
            for i, (first, taps) in enumerate(blocks):
                w = weight[:, :, first : first + taps].permute(0, 2, 1).reshape(out_dim, taps * in_dim)
                if i == 0 and taps == stride:  # the first block tiles rows [0, valid * stride) exactly once
                    torch.mm(grad, w, out=grad_x[: valid * stride].view(valid, stride * in_dim))
                    grad_x[valid * stride :].zero_()
                else:
                    if i == 0:
                        grad_x.zero_()
                    _block_view(grad_x, valid, first, taps, stride).addmm_(grad, w)
        return grad_x, grad_w, grad_b, None


def strided_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """``F.conv1d`` on channels-last rows: x (M, C_in) -> (M // stride, C_out), output row r = window at r*stride.

    Under autocast the product runs in the autocast dtype, as ``F.conv1d`` would.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    with torch.autocast(device_type, enabled=False):
        return _StridedConv.apply(x.contiguous(), weight, bias, stride)
