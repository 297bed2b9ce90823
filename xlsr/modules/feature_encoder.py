"""Convolutional feature encoder: raw 16 kHz waveform -> one 512-d frame every 20 ms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from xlsr.kernels.channels_last_conv import channels_last_conv_stack


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as fairseq's ``Fp32LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


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

    ``forward_frames`` returns (B, T, C). Fast path: in ``layer_norm`` mode on the CPU the stack runs channels-last
    (``xlsr/kernels/channels_last_conv.py``: each conv as matrix products over strided views, norms without
    transposes; same outputs and gradients, tested). ``channels_last = False`` turns it off (the plain Conv1d
    reference below runs), ``True`` forces it on any device.
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
        if self.uses_channels_last(source):  # the CPU fast path: xlsr/kernels/channels_last_conv.py
            return channels_last_conv_stack(self, source)
        x = source.unsqueeze(1)  # the reference: Conv1d -> norm -> GELU per layer, (B, C, S) throughout
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)

    def uses_channels_last(self, source: torch.Tensor) -> bool:
        """Whether ``forward_frames`` takes the channels-last kernel: ``channels_last`` if set, else on the CPU; only
        in layer_norm mode (group-norm's GroupNorm needs the whole (C, T) plane)."""
        wanted = self.channels_last if self.channels_last is not None else source.device.type == "cpu"
        return wanted and self.mode == "layer_norm"

    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Number of frames produced from ``input_lengths`` samples (any integer tensor shape)."""
        return conv_output_length(input_lengths, self.layer_shapes)

    @property
    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """(dim, kernel, stride) of each conv layer."""
        return [(layer.conv.out_channels, layer.conv.kernel_size[0], layer.conv.stride[0]) for layer in self.conv_layers]


def conv_output_length(length, conv_layers: Sequence[tuple[int, int, int]]):
    """Frames the conv stack makes from ``length`` samples (int or integer tensor); conv_layers [(dim, kernel, stride)].

    Each layer: floor((length - kernel) / stride) + 1 (no padding).
    """
    for _, kernel, stride in conv_layers:
        if isinstance(length, torch.Tensor):
            length = torch.div(length - kernel, stride, rounding_mode="floor") + 1
        else:
            length = (length - kernel) // stride + 1
    return length


def receptive_field(conv_layers: Sequence[tuple[int, int, int]]) -> int:
    """Samples that make one output frame."""
    field, jump = 1, 1
    for _, kernel, stride in conv_layers:
        field += (kernel - 1) * jump
        jump *= stride
    return field


class FeatureProjection(nn.Module):
    """LayerNorm over conv channels, then Linear to the model dimension.

    forward returns both: the normed features (B, T, C) (quantizer input) and the projection (B, T, D).
    """

    def __init__(self, conv_dim: int, embed_dim: int, keep_projection: bool = False):
        """keep_projection: a Linear even when ``conv_dim == embed_dim`` (Hugging Face's layout); without it
        there is none then (fairseq's)."""
        super().__init__()
        self.layer_norm = nn.LayerNorm(conv_dim)
        self.projection = nn.Linear(conv_dim, embed_dim) if conv_dim != embed_dim or keep_projection else None

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
