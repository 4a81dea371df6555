"""Per-tensor reductions over a list of tensors, in one batched call.

Squared norms use ``torch._foreach_powsum``: one dispatch for the whole list. Dot products have no foreach op;
``torch._foreach_mm`` on 1 x n by n x 1 views would be one dispatch, but it runs a general matrix product that was
measured 10x slower than BLAS ``dot`` on CPU (4.1 ms against 0.4 ms for 2.4 M floats), so eager mode issues one
``torch.dot`` per tensor: a short loop of launches, each memory-bound. Dynamo cannot trace ``_foreach_powsum``, so
under ``torch.compile`` both are written as per-tensor sums, which the compiler fuses; this keeps
``torch.compile(opt.step, fullgraph=True)`` free of graph breaks.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dots", "squared_norms"]


def squared_norms(tensors: list[Tensor]) -> Tensor:
    """``||t||^2`` for every tensor, as a 1-d tensor."""
    if torch.compiler.is_compiling():
        return torch.stack([t.square().sum() for t in tensors])
    return torch.stack(torch._foreach_powsum(tensors, 2))


def dots(left: list[Tensor], right: list[Tensor]) -> Tensor:
    """``a . b`` for every pair of same-shaped contiguous tensors, as a 1-d tensor."""
    if torch.compiler.is_compiling():
        return torch.stack([(a * b).sum() for a, b in zip(left, right, strict=True)])
    return torch.stack([torch.dot(a.view(-1), b.view(-1)) for a, b in zip(left, right, strict=True)])
