"""The optimizer step inside the backward pass: each parameter is updated as soon as its gradient is ready.

A normal step keeps a gradient for every parameter until ``optimizer.step()``: for XLS-R 300M in fp32 that is
1.2 GiB on top of the weights (1.2 GiB) and AdamW's two moments (2.4 GiB). Here a hook on each parameter scales
its gradient, applies the optimizer to that one parameter and frees the gradient, so at most a few gradients
exist at a time. The update is the same as the normal step's (the optimizer's per-parameter arithmetic is
elementwise), and the optimizer and its state dict are the ordinary ones, so checkpoints do not change.

What it cannot do, because no parameter waits for the others: gradient clipping by the global norm, fp16 loss
scaling (an overflow is found only after some parameters have moved), gradient accumulation over micro-batches
and DDP (whose all-reduce comes after the local gradient). ``step_in_backward_conflicts`` names them.
"""

from __future__ import annotations

from typing import Iterable

import torch


class StepInBackward:
    """Attach ``optimizer`` to ``params`` so that ``loss.backward()`` also performs the update.

    Before each backward set ``grad_scale`` (gradients are multiplied by it before the step, as the trainer's
    1 / sample_size) and the optimizer's learning rate. ``pop_grad_norm()`` after the backward gives the L2 norm
    of the scaled gradients of the parameters that received one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]):
        self.optimizer = optimizer
        self.grad_scale = 1.0
        self._norms: list[torch.Tensor] = []
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in params if p.requires_grad]

    def _step(self, param: torch.Tensor) -> None:
        grad = param.grad
        if self.grad_scale != 1.0:
            grad.mul_(self.grad_scale)
        self._norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))
        # every other parameter has no gradient now (already stepped and freed, or not yet computed),
        # so the optimizer updates this one only
        self.optimizer.step()
        param.grad = None

    def pop_grad_norm(self) -> float:
        """L2 norm of the gradients applied since the last call (0.0 if none)."""
        if not self._norms:
            return 0.0
        norm = float(torch.linalg.vector_norm(torch.stack(self._norms)))
        self._norms = []
        return norm

    def remove(self) -> None:
        """Detach the hooks: ``backward()`` leaves gradients in ``.grad`` again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def step_in_backward_conflicts(world_size: int, update_freq: int, clip_norm: float, precision: str) -> list[str]:
    """The settings that the optimizer step inside backward cannot honour (empty when it applies)."""
    conflicts = []
    if world_size > 1:
        conflicts.append(f"DDP ({world_size} processes): the all-reduce comes after the local gradient")
    if update_freq > 1:
        conflicts.append(f"optim.update_freq={update_freq}: gradients must be complete after one backward")
    if clip_norm > 0:
        conflicts.append(f"optim.clip_norm={clip_norm}: clipping needs the norm of all gradients first")
    if precision == "fp16":
        conflicts.append("precision=fp16: an overflow would be found after some parameters had moved (use bf16)")
    return conflicts
