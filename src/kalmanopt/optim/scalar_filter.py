"""The measurement update shared by KOALA-V and KOALA-M: a covariance that is a scalar multiple of I per block.

With the prior covariance of the weights ``P11 * I`` (and, for KOALA-M, the weight-velocity cross term
``P21 * I``), a tensor with effective gradient ``h`` and residual ``l`` is corrected by

    S = P11 * ||h||^2 + R
    theta <- theta - lr * l * (P11 / S) * h
    p     <- p     - lr * l * (P21 / S) * h        (KOALA-M only)

and the scalar covariance is then shrunk by the largest ``||h||^2 / S`` over the tensors (the caller does that:
it is group-level). Returns that largest ratio over the tensors that were corrected (0 if none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._reductions import squared_norms

if TYPE_CHECKING:
    from .base import GradBucket

__all__ = ["correct_buckets", "scalar_covariance_update"]


def scalar_covariance_update(params: list[Tensor], hs: list[Tensor], momenta: list[Tensor] | None,
                             steps: list[Tensor], *,
                             layer_loss: Tensor, noise: Tensor, ok: Tensor, lr: float, p11: Tensor,
                             p21: Tensor | None, foreach: bool, grad_sq: Tensor | None = None) -> Tensor:
    """Correct ``params`` (and ``momenta``) in place; returns max ||h||^2/S over committed tensors, 0-d."""
    if foreach:
        return _multi_tensor(params, hs, momenta, steps, layer_loss=layer_loss, noise=noise, ok=ok, lr=lr, p11=p11,
                             p21=p21, grad_sq=grad_sq)
    return _single_tensor(params, hs, momenta, steps, layer_loss=layer_loss, noise=noise, ok=ok, lr=lr, p11=p11,
                          p21=p21)


def correct_buckets(buckets: list[GradBucket], *, momentum_key: str | None, loss_mean: Tensor, noise: Tensor,
                    ok: Tensor, lr: float, weight_decay: float, p11: Tensor, p21: Tensor | None,
                    foreach: bool) -> Tensor:
    """Run :func:`scalar_covariance_update` on every bucket of a group; returns the largest ratio (on p11's device).

    ``momentum_key`` names the per-tensor velocity state (KOALA-M), or is None (KOALA-V).
    """
    largest = torch.zeros_like(p11)
    for b in buckets:
        dtype = b.h[0].dtype
        ratio = scalar_covariance_update(
            b.params, b.h, None if momentum_key is None else [st[momentum_key] for st in b.states],
            [st["step"] for st in b.states], layer_loss=b.layer_loss(loss_mean, weight_decay),
            noise=noise.to(b.device, dtype), ok=ok.to(b.device), lr=lr, p11=p11.to(b.device, dtype),
            p21=None if p21 is None else p21.to(b.device, dtype), foreach=foreach, grad_sq=b.grad_sq,
        )
        largest = torch.maximum(largest, ratio.to(largest))
    return largest


def _single_tensor(params, hs, momenta, steps, *, layer_loss, noise, ok, lr, p11, p21) -> Tensor:
    largest = torch.zeros_like(noise)
    for i, param in enumerate(params):
        h = hs[i]
        hh = h.reshape(-1).dot(h.reshape(-1))
        S = p11 * hh + noise
        commit = ok & (hh > 0) & (S > 0) & torch.isfinite(S)
        new_param = param.to(h.dtype) - (lr * layer_loss[i] * p11 / S) * h
        param.copy_(torch.where(commit, new_param, param.to(h.dtype)))
        if momenta is not None:
            new_momentum = momenta[i] - (lr * layer_loss[i] * p21 / S) * h
            momenta[i].copy_(torch.where(commit, new_momentum, momenta[i]))
        largest = torch.where(commit, torch.maximum(largest, hh / S), largest)
        steps[i].add_(commit.to(steps[i].dtype))
    return largest


def _multi_tensor(params, hs, momenta, steps, *, layer_loss, noise, ok, lr, p11, p21, grad_sq) -> Tensor:
    hh = squared_norms(hs) if grad_sq is None else grad_sq
    S = p11 * hh + noise
    commit = ok & (hh > 0) & (S > 0) & torch.isfinite(S)
    zero = torch.zeros_like(hh)
    # Masked coefficients, not masked tensors: hs are finite, so a skipped tensor gets exactly theta - 0 * h.
    scale = torch.where(commit, -lr * layer_loss / S, zero)
    torch._foreach_addcmul_(params, hs, (scale * p11).unbind(0))
    if momenta is not None:
        torch._foreach_addcmul_(momenta, hs, (scale * p21).unbind(0))
    torch._foreach_add_(steps, commit.to(torch.float32).unbind(0))
    ratios = torch.where(commit, hh / S, zero)
    return torch.cat([ratios, torch.zeros_like(noise).view(1)]).amax()
