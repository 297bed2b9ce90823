"""Relative positional embedding: a wide grouped convolution over time, with weight norm."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class PositionalConvEmbedding(nn.Module):
    """Grouped Conv1d (kernel K, G groups, weight norm over dim 2) -> trim -> GELU.

    (B, T, D) -> (B, T, D): the positional term that the encoder adds to its input.
    For an even kernel the conv yields T + 1 frames; the last is dropped (fairseq's ``SamePad``).
    """

    def __init__(self, embed_dim: int, kernel_size: int, groups: int):
        super().__init__()
        conv = nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 / (kernel_size * embed_dim)))
        nn.init.zeros_(conv.bias)
        self.conv = weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y).transpose(1, 2)
