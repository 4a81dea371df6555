"""The measurement: how a minibatch loss becomes the filter's scalar observation and its noise R.

A KOALA filter observes one number per step, the minibatch loss ``L``, and needs the variance ``R`` of that
observation. ``R`` is either fixed (``r=<float>``) or an exponential average (coefficient ``alpha_r``, starting at
1.0, updated *before* use, no bias correction) of one statistic of the per-sample losses, chosen per param group by
``r_stat``:

``"second_moment"`` (default)
    ``mean(loss_i ** 2)``: the squared residual to a zero target, the original KOALA's choice. For a 0-d loss
    (a batch mean) it is ``loss ** 2``, what the KOALA++ scripts effectively feed.
``"squared_mean"``
    ``mean(loss_i) ** 2``; equals ``"second_moment"`` for a 0-d loss.
``"mean_variance"``
    ``var(loss_i) / B`` (unbiased), the variance of the batch mean as an estimate of the mean loss; needs
    per-sample losses and ``B >= 2``.

``update(loss_mean, loss_var)`` bypasses the choice and feeds ``loss_var`` as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor

R_STATISTICS = ("second_moment", "squared_mean", "mean_variance")
R_INITIAL = 1.0


def check_loss(loss: Tensor) -> Tensor:
    """Validate a loss handed to ``step`` and return it detached: a 0-d batch mean or 1-d per-sample losses."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a torch.Tensor (0-d batch mean or 1-d per-sample losses), got {type(loss)!r}")
    if not loss.is_floating_point():
        raise ValueError(f"loss must be a floating-point tensor, got dtype {loss.dtype}")
    if loss.dim() > 1:
        raise ValueError(
            f"loss must be 0-d (the batch mean) or 1-d (per-sample losses, reduction='none'), got shape "
            f"{tuple(loss.shape)}; flatten per-token losses first"
        )
    if loss.dim() == 1 and loss.numel() == 0:
        raise ValueError("loss is an empty 1-d tensor: a measurement needs at least one per-sample loss")
    return loss.detach()


def loss_moments(loss: Tensor) -> Tensor:
    """Sufficient statistics of a checked loss, ``[sum(l_i), sum(l_i ** 2), count]`` (a 0-d loss counts once).

    Statistics of the whole batch follow from these alone, so data-parallel ranks sum them (all-reduce) and every
    rank then sees the measurement of the global batch.
    """
    loss = loss.to(torch.promote_types(loss.dtype, torch.float32)).reshape(-1)
    count = torch.full((), loss.numel(), dtype=loss.dtype, device=loss.device)
    return torch.stack([loss.sum(), loss.square().sum(), count])


def check_statistic(loss: Tensor, r_stat: str) -> None:
    """Shape checks for ``r_stat`` that need no device values."""
    if r_stat not in R_STATISTICS:
        raise ValueError(f"unknown r_stat {r_stat!r}; expected one of {R_STATISTICS}")
    if r_stat == "mean_variance" and (loss.dim() == 0 or loss.numel() < 2):
        raise ValueError(
            "r_stat='mean_variance' needs per-sample losses (a 1-d loss with at least 2 entries); "
            f"got shape {tuple(loss.shape)}"
        )


def loss_statistic(moments: Tensor, r_stat: str) -> Tensor:
    """The statistic the R average is fed, from ``loss_moments`` (possibly summed over ranks), as a 0-d tensor."""
    total, total_sq, count = moments.unbind(0)
    mean = total / count
    if r_stat == "second_moment":
        return total_sq / count
    if r_stat == "squared_mean":
        return mean.square()
    if r_stat == "mean_variance":
        variance = (total_sq - total * mean) / (count - 1)  # unbiased
        return variance.clamp_min(0.0) / count
    raise ValueError(f"unknown r_stat {r_stat!r}; expected one of {R_STATISTICS}")


def measurement_noise(previous: Tensor, statistic: Tensor, r: float | None, alpha_r: float) -> Tensor:
    """This step's R: fixed ``r``, or the exponential average ``alpha_r * R + (1 - alpha_r) * statistic``."""
    if r is not None:
        return torch.full_like(previous, r)
    return previous * alpha_r + statistic.to(previous) * (1.0 - alpha_r)
