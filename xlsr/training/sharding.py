"""Fully sharded data parallel (``distributed.strategy=fsdp``): PyTorch's FSDP2 (``fully_shard``) over the model.

What is sharded, and how (fairseq2 and torchtitan do the same):

- each transformer layer is one FSDP group: its parameters are all-gathered just before its forward (and again for
  its backward) and freed after; the last layer keeps its full parameters from forward to backward
  (``reshard_after_forward=False``), since backward needs them at once;
- the root group holds the rest: conv stack, feature projection, positional conv, quantizer and heads;
- gradients are reduce-scattered after each micro-batch's backward (averaged over ranks, as DDP's all-reduce), so a
  rank holds only its shard of every gradient and of the AdamW state;
- ``precision=bf16``: parameters are cast to bf16 for compute, gradients are reduced in fp32 and the optimizer
  updates fp32 master shards;
- ``distributed.shard_group_size=N``: shard within groups of N ranks (one node, say) and replicate across groups
  (hybrid sharding, HSDP): all-gathers stay inside a node, only the gradient all-reduce crosses nodes.

The model is built once, on rank 0 (fresh, or with ``model.init_from``'s weights); the other ranks build the same
architecture on the meta device (no memory) and receive their shards from rank 0, so N ranks never hold N full
copies. The full model is gathered for ``save_pretrained`` on rank 0 only, shard by shard (``full_state_dict``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

STRATEGIES = ("ddp", "fsdp")


def device_mesh(world_size: int, shard_group_size: int, device_type: str) -> DeviceMesh:
    """1-D mesh of all ranks (``shard_group_size`` 0 or = world size), else a 2-D (replicate, shard) mesh of
    ``world_size / shard_group_size`` groups of ``shard_group_size`` consecutive ranks (hybrid sharding)."""
    if shard_group_size <= 0 or shard_group_size == world_size:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if world_size % shard_group_size:
        raise ValueError(f"distributed.shard_group_size={shard_group_size} does not divide the {world_size} ranks")
    return init_device_mesh(device_type, (world_size // shard_group_size, shard_group_size),
                            mesh_dim_names=("replicate", "shard"))


def shard_model(model: nn.Module, layers: nn.ModuleList, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
    """``fully_shard`` each of ``layers`` (the last one not resharded after forward), then ``model`` (the root
    group: everything else). ``param_dtype``: compute dtype of the parameters (None = as stored, fp32);
    gradients are reduced in fp32. Modifies ``model`` in place (its parameters become DTensor shards)."""
    # inputs keep their dtype: autocast decides each op's, as without sharding
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for index, layer in enumerate(layers):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def build_on_meta(recipe: tuple[type, tuple]) -> nn.Module:
    """``recipe`` = (class, constructor args) built on the meta device: the architecture, no memory."""
    model_class, args = recipe
    with torch.device("meta"):
        return model_class(*args)


def build_on_rank0(
    build: Callable[[], nn.Module], recipe: Callable[[nn.Module], tuple[type, tuple]], rank: int
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model on every rank, its weights only on rank 0.

    Rank 0 runs ``build()`` and sends ``recipe(model)`` = (class, constructor args) to the others, which construct
    the same architecture on the meta device. Returns (model, rank 0's full state dict; empty elsewhere): shard the
    model, then :func:`load_from_rank0` the state.
    """
    if rank == 0:
        model = build()
        message: list[Any] = [recipe(model)]
    else:
        message = [None]
    dist.broadcast_object_list(message, src=0)
    if rank == 0:
        return model, dict(model.state_dict())
    return build_on_meta(message[0]), {}


def load_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give a sharded ``model`` rank 0's ``full_state`` (the other ranks pass ``{}``): meta parameters are first
    allocated on ``device``, then each tensor is broadcast from rank 0 and each rank keeps its shard."""
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a sharded ``model`` on rank 0, in CPU memory, gathered one tensor at a time
    (the other ranks get ``{}``)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(recipe: tuple[type, tuple], state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain model (not sharded) from a recipe (class, constructor args) and a full state dict, built on the meta
    device and given ``state``'s tensors (no second copy of the weights)."""
    model = build_on_meta(recipe)
    model.load_state_dict(state, assign=True)
    return model

