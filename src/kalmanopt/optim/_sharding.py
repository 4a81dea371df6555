"""Sharded parameters (FSDP2's DTensors): the filter runs on each rank's local shard.

Element-wise work is local. Every per-tensor reduction (squared norms, dot products) is a partial sum over the
local shard, so it is summed over the shard group before use; the scalars of the filter are then identical on every
rank, and so is the step, as if the tensor were whole. Only 1-D device meshes (plain FSDP2) are supported.

Optimizer state follows ``torch.optim``'s convention for DTensor parameters: per-element state (KOALA++'s gain and
previous gradient, KOALA-M's velocity and weight EMA) is a DTensor with the parameter's mesh, placements and global
shape, so that ``torch.distributed.checkpoint`` saves and reshards it like the parameter; scalar state (identical on
every rank) stays a plain tensor and is saved once. The step works on local views (:func:`local_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["local_state", "local_tensor", "shard_like", "shard_reducer", "shard_state"]


def _is_dtensor(t: Tensor) -> bool:
    return dist.is_available() and isinstance(t, dist.tensor.DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The rank-local shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def local_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every DTensor replaced by its local shard (a view: in-place writes reach the state)."""
    return {key: local_tensor(value) if isinstance(value, Tensor) else value for key, value in state.items()}


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def shard_like(p: Tensor, value: Tensor) -> Tensor:
    """The rank-local ``value`` of a per-element state of DTensor ``p`` as a DTensor laid out like ``p``.

    Shares ``value``'s storage. ``value`` must have the shape of ``p``'s local shard.
    """
    return dist.tensor.DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                          stride=_contiguous_stride(p.shape))


def shard_state(p: Tensor, state: dict[str, Any], keys: Iterable[str]) -> None:
    """Turn the per-element entries ``keys`` of ``p``'s state into DTensors like ``p`` (no-op unless ``p`` is one).

    An entry that is already a DTensor, or whose shape is not that of the local shard, is left as it is.
    """
    if not _is_dtensor(p):
        return
    local_shape = p.to_local().shape
    for key in keys:
        value = state.get(key)
        if isinstance(value, Tensor) and not _is_dtensor(value) and value.dim() > 0 and value.shape == local_shape:
            state[key] = shard_like(p, value)


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
