"""GELU for bf16/fp16 activations that keeps only the half-precision input for backward.

Equals ``xlsr.modules.transformer.gelu_fp32`` (fairseq's ``F.gelu(x.float()).type_as(x)``) bitwise, forward and
backward, on every CPU (``tests/test_fast_paths.py``). Switch: ``FeedForward.memory_saving_gelu`` (default True).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _HalfGeluFp32(torch.autograd.Function):
    """``F.gelu(x.float()).to(x.dtype)`` for a bf16/fp16 ``x`` that keeps ``x`` itself for backward.

    Forward and backward run exactly the float32 ops of the round trip (the same float32 kernels on the same,
    exactly widened values, one rounding each), so the numbers are by construction bitwise those of the round
    trip on any CPU or device. What it saves is memory: autograd keeps the half-precision input (2 bytes a value)
    instead of the round trip's float32 copy (4 bytes a value) of the (B, T, F) FFN activation.

    Not the native half-precision ``F.gelu`` kernel: its numbers depend on the CPU's vector ISA (on AVX2 its bf16
    backward differs from the float32 kernel's in ~10 % of values, mostly x < -5; without vector kernels its
    forward differs too, by 1-3 ulp) and without vector kernels it is ~6x slower than the float32 kernel.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.gelu(x.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad.float(), x.float()).to(x.dtype)


def gelu_fp32_saving_memory(x: torch.Tensor) -> torch.Tensor:
    """``gelu_fp32(x)`` for a bf16/fp16 ``x`` (same numbers), keeping ``x`` rather than its float32 copy for backward."""
    return _HalfGeluFp32.apply(x)
