"""Convolutional feature encoder: raw 16 kHz waveform -> one 512-d frame every 20 ms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as fairseq's ``Fp32LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last axis (same numbers as ``forward``).

        Without autograd on the CPU, a bf16/fp16 input goes straight into the kernel with float32 weights: it
        computes in float32 and rounds once, as the ``.float()`` round trip does, minus two copies. With autograd the
        round trip stays, so that the weight and bias gradients are summed in float32 as in the original.
        """
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.device.type != "cpu" or x.dtype == torch.float32 or needs_grad:
            return Fp32LayerNorm.forward(self, x)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as fairseq's ``Fp32GroupNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type_as(x)


class ChannelLayerNorm(Fp32LayerNorm):
    """LayerNorm over the channel axis of a (B, C, T) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvLayer(nn.Module):
    """Conv1d -> optional norm -> GELU.  (B, C_in, S) -> (B, C_out, S')."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, bias: bool, norm: nn.Module | None):
        super().__init__()
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, stride=stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.gelu(x)


class FeatureEncoder(nn.Module):
    """The 7-layer conv stack of wav2vec 2.0.

    ``group_norm`` mode (wav2vec 2.0 base): GroupNorm(C, C) after the first conv only.
    ``layer_norm`` mode (XLS-R, large): LayerNorm over channels after every conv.
    Norms run in float32, as in the original.

    ``forward_frames`` returns (B, T, C). In ``layer_norm`` mode on the CPU it runs channels-last: each conv is a
    few matrix products over strided views of the (batch x time, channels) activations (``strided_conv``), so the
    norms need no transposes; ``channels_last = False`` forces the plain Conv1d path, ``True`` forces the
    channels-last one on any device.
    """

    def __init__(self, conv_layers: Sequence[tuple[int, int, int]], mode: str = "group_norm", conv_bias: bool = False):
        super().__init__()
        if mode not in ("group_norm", "layer_norm"):
            raise ValueError(f"unknown extractor mode {mode!r}")
        layers = []
        in_dim = 1
        for i, (dim, kernel, stride) in enumerate(conv_layers):
            if mode == "layer_norm":
                norm: nn.Module | None = ChannelLayerNorm(dim)
            elif i == 0:
                norm = Fp32GroupNorm(dim, dim)
            else:
                norm = None
            layers.append(ConvLayer(in_dim, dim, kernel, stride, conv_bias, norm))
            in_dim = dim
        self.conv_layers = nn.ModuleList(layers)
        self.mode = mode
        self.channels_last: bool | None = None  # None = automatic (CPU, layer_norm mode)
        self.gradient_checkpointing = False  # keep only the audio for backward; recompute the stack there

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        """source (B, S) waveform -> features (B, C, T)."""
        return self.forward_frames(source).transpose(1, 2)

    def forward_frames(self, source: torch.Tensor) -> torch.Tensor:
        """source (B, S) waveform -> features (B, T, C)."""
        if source.dim() != 2:
            raise ValueError(f"expected audio of shape (batch, samples), got a tensor of shape {tuple(source.shape)}")
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._stack, source, use_reentrant=False)
        return self._stack(source)

    def _stack(self, source: torch.Tensor) -> torch.Tensor:
        use_channels_last = self.channels_last
        if use_channels_last is None:
            use_channels_last = source.device.type == "cpu"
        if use_channels_last and self.mode == "layer_norm":
            return self._forward_channels_last(source)
        x = source.unsqueeze(1)
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)

    def _forward_channels_last(self, source: torch.Tensor) -> torch.Tensor:
        """The layer_norm-mode stack on (batch x rows, channels) activations.

        Every utterance gets ``rows`` rows, a multiple of each layer's stride (the audio is zero-padded to a
        multiple of the product of the strides), so one matrix product per kernel block serves the whole batch.
        The rows past an utterance's last frame hold finite junk that no real frame reads; they are cut at the end
        (so their gradient is zero).
        """
        batch, samples = source.shape
        total_stride = 1
        for layer in self.conv_layers:
            total_stride *= layer.conv.stride[0]
        rows = -(-samples // total_stride) * total_stride
        x = F.pad(source, (0, rows - samples)) if rows != samples else source
        x = x.reshape(batch * rows, 1)
        length = samples
        for layer in self.conv_layers:
            conv = layer.conv
            kernel, stride = conv.kernel_size[0], conv.stride[0]
            rows //= stride
            length = (length - kernel) // stride + 1
            x = strided_conv(x, conv.weight, conv.bias, stride)
            x = F.gelu(layer.norm.forward_channels_last(x))
        return x.view(batch, rows, -1)[:, :length]

    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Number of frames produced from ``input_lengths`` samples (any integer tensor shape)."""
        lengths = input_lengths
        for layer in self.conv_layers:
            kernel, stride = layer.conv.kernel_size[0], layer.conv.stride[0]
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths


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


class FeatureProjection(nn.Module):
    """LayerNorm over conv channels, then Linear to the model dimension.

    forward returns both: the normed features (B, T, C) (quantizer input) and the projection (B, T, D).
    """

    def __init__(self, conv_dim: int, embed_dim: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(conv_dim)
        self.projection = nn.Linear(conv_dim, embed_dim) if conv_dim != embed_dim else None

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = self.layer_norm(features)
        projected = self.projection(normed) if self.projection is not None else normed
        return normed, projected


class GradMultiply(torch.autograd.Function):
    """Identity forward; scales the gradient by ``scale`` (fairseq's feature_grad_mult)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None
