"""The measurement update shared by KOALA-V and KOALA-M: a covariance that is a scalar multiple of I per block.

With the prior covariance of the weights ``P11 * I`` (and, for KOALA-M, the weight-velocity cross term
``P21 * I``), a tensor with effective gradient ``h`` and residual ``l`` is corrected by

    S = P11 * ||h||^2 + R
    theta <- theta - lr * l * (P11 / S) * h
    p     <- p     - lr * l * (P21 / S) * h        (KOALA-M only)

and the scalar covariance is then shrunk by the largest ``||h||^2 / S`` over the tensors (the caller does that:
it is group-level). The work is split in two so that a step can be checked before anything is written:
:func:`plan_buckets` derives every per-tensor scalar (no write) and whether what would be written is finite in the
dtype it is stored in; :func:`apply_buckets` then writes, masked by the step's final ``ok``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import GradBucket

__all__ = ["BucketPlan", "apply_buckets", "plan_buckets", "planned_largest", "shrink"]


class BucketPlan(NamedTuple):
    """The per-tensor scalars of one bucket (1-d, one entry per tensor), before the step's ``ok`` is known."""

    correctable: Tensor  # ||h||^2 > 0 and S finite and positive: the tensor is corrected if the step commits
    theta_coef: Tensor  # multiplier of h for theta (multi-tensor: added, reference: subtracted)
    momentum_coef: Tensor | None  # the same for the velocity (KOALA-M)
    ratio: Tensor  # ||h||^2 / S where correctable, else 0
    ok: Tensor  # 0-d: every coefficient is finite and the update it writes stays finite where it is stored


def _finite_update(coef: Tensor, hh: Tensor, correctable: Tensor, dtypes: list[torch.dtype]) -> Tensor:
    """Whether ``coef * h`` (with ``||h||^2 = hh``) certainly fits the storage dtypes, without touching ``h``.

    ``max |coef * h_i| <= |coef| * ||h||``; requiring that bound to stay under half the largest finite number of
    the narrowest storage dtype keeps ``x + coef * h`` finite for any ``|x|`` up to the other half. A step that
    would move a float32 weight by 1e38 (or a float16 one by 3e4) is bad input, not a step.
    """
    limit = min(torch.finfo(d).max for d in dtypes) / 2
    bound = coef.abs() * hh.sqrt()
    return torch.where(correctable, bound <= limit, True).all()


def plan_buckets(buckets: list[GradBucket], *, with_momentum: bool, loss_mean: Tensor, noise: Tensor, lr: float,
                 weight_decay: float, p11: Tensor, p21: Tensor | None, foreach: bool) -> tuple[Tensor, Tensor]:
    """Plan every bucket of a group (stored in ``bucket.plan``); returns (largest ratio, ok), 0-d, on p11's device.

    No write happens here. ``ok`` is False when a coefficient is not finite or an update could overflow.
    """
    ok = torch.ones((), dtype=torch.bool, device=p11.device)
    for b in buckets:
        dtype = b.h[0].dtype
        pp11, pp21 = p11.to(b.device, dtype), None if p21 is None else p21.to(b.device, dtype)
        R = noise.to(b.device, dtype)
        layer_loss = b.layer_loss(loss_mean, weight_decay)
        if foreach:
            hh = b.grad_sq
        else:  # the reference's own reduction, per tensor
            hh = torch.stack([h.reshape(-1).dot(h.reshape(-1)) for h in b.h])
        S = pp11 * hh + R
        correctable = (hh > 0) & (S > 0) & torch.isfinite(S)
        if foreach:
            scale = -lr * layer_loss / S
            theta_coef = scale * pp11
            momentum_coef = None if pp21 is None else scale * pp21
        else:
            theta_coef = lr * layer_loss * pp11 / S
            momentum_coef = None if pp21 is None else lr * layer_loss * pp21 / S
        bucket_ok = _finite_update(theta_coef, hh, correctable, [p.dtype for p in b.params] + [dtype])
        if with_momentum:
            bucket_ok = bucket_ok & _finite_update(momentum_coef, hh, correctable, [dtype])
        ratio = torch.where(correctable, hh / S, torch.zeros_like(hh))
        b.plan = BucketPlan(correctable, theta_coef, momentum_coef, ratio, bucket_ok)
        ok = ok & bucket_ok.to(ok.device)
    return planned_largest(buckets, p11), ok


def planned_largest(buckets: list[GradBucket], like: Tensor) -> Tensor:
    """The largest planned ``||h||^2 / S`` over the correctable tensors of a group (0 if none), like ``like``."""
    largest = torch.zeros_like(like)
    for b in buckets:
        ratio = b.plan.ratio
        largest = torch.maximum(largest, torch.cat([ratio, torch.zeros_like(ratio[:1])]).amax().to(largest))
    return largest


def apply_buckets(buckets: list[GradBucket], *, momentum_key: str | None, ok: Tensor, foreach: bool) -> None:
    """Write the planned corrections (``ok`` False: nothing changes, bit for bit); counts each corrected tensor."""
    for b in buckets:
        plan: BucketPlan = b.plan
        commit = ok.to(b.device) & plan.correctable
        momenta = None if momentum_key is None else [st[momentum_key] for st in b.states]
        steps = [st["step"] for st in b.states]
        if foreach:
            # Masked coefficients, not masked tensors: hs are finite, so a skipped tensor gets exactly theta - 0 * h.
            zero = torch.zeros_like(plan.theta_coef)
            torch._foreach_addcmul_(b.params, b.h, torch.where(commit, plan.theta_coef, zero).unbind(0))
            if momenta is not None:
                torch._foreach_addcmul_(momenta, b.h, torch.where(commit, plan.momentum_coef, zero).unbind(0))
            torch._foreach_add_(steps, commit.to(torch.float32).unbind(0))
            continue
        for i, param in enumerate(b.params):
            h = b.h[i]
            new_param = param.to(h.dtype) - plan.theta_coef[i] * h
            param.copy_(torch.where(commit[i], new_param, param.to(h.dtype)))
            if momenta is not None:
                new_momentum = momenta[i] - plan.momentum_coef[i] * h
                momenta[i].copy_(torch.where(commit[i], new_momentum, momenta[i]))
            steps[i].add_(commit[i].to(steps[i].dtype))


def shrink(p11: Tensor, largest: Tensor) -> Tensor:
    """``1 - P11 * max ||h||^2 / S``, the factor of the covariance update, clamped to [0, 1].

    It equals ``R / S`` of the tensor with the largest ratio, so it lies in [0, 1]; rounding can push the product
    ``P11 * ||h||^2 / S`` past 1 after a huge gradient, and ``P11 - P11^2 * c`` written out can overflow for a
    large ``P11``. Clamping the factor keeps the posterior variance non-negative (a negative one stalls the filter
    when q = 0).
    """
    return 1 - (p11 * largest).clamp(0.0, 1.0)
