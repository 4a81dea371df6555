"""Per-tensor reductions over a list of tensors, in one batched call.

Eager mode uses ``torch._foreach_powsum`` and ``torch._foreach_mm`` (a 1 x n by n x 1 product per tensor): one
dispatch for the whole list, no Python loop of kernels. Dynamo cannot trace those two ops, so under
``torch.compile`` the same quantities are written as per-tensor sums, which the compiler fuses into a few kernels;
this keeps ``torch.compile(opt.step, fullgraph=True)`` free of graph breaks.
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
    products = torch._foreach_mm([a.view(1, -1) for a in left], [b.view(-1, 1) for b in right])
    return torch.cat(products).view(-1)
