"""Numerical guards shared by LoKO's modules: a cheap finiteness check and a Cholesky factor with jitter."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_finite", "cholesky_with_jitter"]


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry of every tensor is finite (one host sync).

    A sum is finite only if every term is (an inf or nan term makes it inf or nan), so the common case costs one
    reduction per tensor instead of ``isfinite``'s four elementwise passes; only a non-finite sum (bad input, or a
    sum of finite terms that overflows) pays for the exact check.
    """
    sums = torch.stack([t.sum().to(torch.float64) for t in tensors])  # in the tensors' dtype: no upcast pass
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def cholesky_with_jitter(a: Tensor, retries: int = 2) -> Tensor | None:
    """Lower Cholesky factor of the symmetric ``a``; adds relative jitter up to ``retries`` times, else None."""
    a = 0.5 * (a + a.T)
    # a factor of a finite a has entries below 1e155 (their sum is finite exactly when they all are: one reduction
    # instead of isfinite's elementwise passes); one host read for both checks
    factor, info = torch.linalg.cholesky_ex(a)
    if bool((info == 0) & torch.isfinite(factor.sum())):
        return factor
    scale = torch.diagonal(a).abs().mean().clamp_min(1e-30)
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for k in range(retries):
        factor, info = torch.linalg.cholesky_ex(a + scale * 10.0 ** (-8 + 2 * k) * eye)
        if bool((info == 0) & torch.isfinite(factor.sum())):
            return factor
    return None
