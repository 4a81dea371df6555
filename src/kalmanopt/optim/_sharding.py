"""Sharded parameters (FSDP2's DTensors): the filter runs on each rank's local shard.

Element-wise work is local. Every per-tensor reduction (squared norms, dot products) is a partial sum over the
local shard, so it is summed over the shard group before use; the scalars of the filter are then identical on every
rank, and so is the step, as if the tensor were whole. Only 1-D device meshes (plain FSDP2) are supported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["local_tensor", "shard_reducer"]


def _is_dtensor(t: Tensor) -> bool:
    return dist.is_available() and isinstance(t, dist.tensor.DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The rank-local shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def shard_reducer(p: Tensor) -> tuple[object | None, Callable[[Tensor], Tensor] | None]:
    """``(key, sum_over_shards)`` for a parameter: ``(None, None)`` unless it is a sharded DTensor."""
    if not _is_dtensor(p) or all(not pl.is_shard() for pl in p.placements):
        return None, None
    mesh = p.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError("kalmanopt supports DTensor parameters on 1-D device meshes (FSDP2) only")
    group = mesh.get_group()

    def sum_over_shards(values: Tensor) -> Tensor:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
        return values

    return group, sum_over_shards


def reduce_if(reducer: Callable[[Tensor], Tensor] | None, *values: Tensor) -> tuple[Tensor, ...]:
    """Apply ``reducer`` to the stacked ``values`` (one all-reduce), or return them unchanged."""
    if reducer is None:
        return values
    return tuple(reducer(torch.stack(values)).unbind(0))
