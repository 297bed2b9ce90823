"""Transformer encoder of wav2vec 2.0: pre-LN (XLS-R, large) or post-LN (base) layers, with LayerDrop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from xlsr.kernels.gelu import gelu_fp32_saving_memory
from xlsr.modules.positional import PositionalConvEmbedding


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    One fused (D -> 3D) input projection; the checkpoint loaders split/join it into the original
    ``q_proj``/``k_proj``/``v_proj`` keys.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); attn_mask (B, 1, 1, T) bool, True = may attend (None: all) -> (B, T, D)."""
        batch, time, dim = x.shape
        qkv = self.qkv_proj(x).view(batch, time, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, time, dim))


def gelu_fp32(x: torch.Tensor) -> torch.Tensor:
    """GELU computed in float32, result in x's dtype (fairseq's ``gelu``: ``F.gelu(x.float()).type_as(x)``)."""
    return F.gelu(x.float()).type_as(x)


class FeedForward(nn.Module):
    """Linear -> GELU (in float32, as the original) -> dropout -> Linear.  (B, T, D) -> (B, T, D).

    ``memory_saving_gelu`` (default True): in bf16/fp16 the GELU is ``xlsr.kernels.gelu.gelu_fp32_saving_memory``,
    bitwise ``gelu_fp32`` forward and backward (tested), which keeps the half-precision input for backward instead
    of a float32 copy. False: ``gelu_fp32`` as written.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, activation_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.activation_dropout = nn.Dropout(activation_dropout)
        self.memory_saving_gelu = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        if self.memory_saving_gelu and hidden.dtype in (torch.bfloat16, torch.float16):
            hidden = gelu_fp32_saving_memory(hidden)
        else:
            hidden = gelu_fp32(hidden)
        return self.fc2(self.activation_dropout(hidden))


class TransformerLayer(nn.Module):
    """One encoder layer. Pre-LN: x + Attn(LN(x)), then + FFN(LN(x)). Post-LN: LN(x + Attn(x)), LN(x + FFN(x))."""

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_heads: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        layer_norm_first: bool,
    ):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.attention = SelfAttention(embed_dim, num_heads, attention_dropout)
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.feed_forward = FeedForward(embed_dim, ffn_dim, activation_dropout)
        self.ffn_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.attention(self.attention_norm(x), attn_mask))
            return x + self.dropout(self.feed_forward(self.ffn_norm(x)))
        x = self.attention_norm(x + self.dropout(self.attention(x, attn_mask)))
        return self.ffn_norm(x + self.dropout(self.feed_forward(x)))


class TransformerEncoder(nn.Module):
    """Positional conv + N transformer layers (+ final LayerNorm, placed per layout).

    forward(x (B, T, D), padding_mask (B, T) bool True = pad) -> (x (B, T, D), per-layer outputs [(B, T, D)]).
    """

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_layers: int,
        num_heads: int,
        conv_pos: int,
        conv_pos_groups: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.0,
        layerdrop: float = 0.0,
        layer_norm_first: bool = False,
    ):
        super().__init__()
        self.layer_norm_first = layer_norm_first
        self.layerdrop = layerdrop
        self.pos_conv = PositionalConvEmbedding(embed_dim, conv_pos, conv_pos_groups)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(
                embed_dim, ffn_dim, num_heads, dropout, attention_dropout, activation_dropout, layer_norm_first
            )
            for _ in range(num_layers)
        )
        self.gradient_checkpointing = False
        self.apply(_init_linear)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        layer: int | None = None,
        layer_keep: Sequence[bool] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder.

        layer: stop after layer index ``layer`` (0-based) and return its output (no final LayerNorm).
        layer_keep: per-layer LayerDrop decisions (True = run); default: drawn here when training.
        """
        attn_mask = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            attn_mask = (~padding_mask)[:, None, None, :]
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)

        if layer_keep is None:
            layer_keep = self.sample_layer_keep()
        layer_results: list[torch.Tensor] = []
        for index, (block, keep) in enumerate(zip(self.layers, layer_keep)):
            if keep:
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, attn_mask, use_reentrant=False)
                else:
                    x = block(x, attn_mask)
                layer_results.append(x)
            if index == layer:
                return x, layer_results
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x, layer_results

    def sample_layer_keep(self, generator: torch.Generator | None = None) -> list[bool]:
        """LayerDrop decisions for one forward: every layer in eval, each kept with prob 1 - layerdrop in training."""
        if not self.training or self.layerdrop <= 0:
            return [True] * len(self.layers)
        draws = torch.rand(len(self.layers), generator=generator)
        return (draws > self.layerdrop).tolist()


def _init_linear(module: nn.Module) -> None:
    """BERT-style init used by fairseq's wav2vec 2.0 encoder: N(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
