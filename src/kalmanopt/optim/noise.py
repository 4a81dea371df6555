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

**Outliers** (``r_clip``, default 100). In the papers' average a single outlier loss stays in R for a long time:
a loss 1e30 times the normal one puts R at about 1e59 and, at ``alpha_r = 0.9``, R needs about 1,300 steps to
come back, steps in which the filter barely moves. So the statistic *stored* into the average is clipped at
``r_clip`` times the previous R. The R *used* in that same step is the papers' (unclipped) average, so the outlier's
own step stays as damped as in the paper; only its memory is bounded (after the outlier R is at most
``alpha_r + (1 - alpha_r) * r_clip`` = 10.9 times what it was, gone in about 23 steps). The clip is inactive at the
first measurement (group state ``noise_updates`` = 0: the first statistic sets the scale), and a statistic below
the cap passes unchanged, so a run without 100-fold jumps of the statistic is the papers' recursion bit for bit;
``r_clip=None`` is the papers' average always (what a "paper" configuration should use). 100 is far above the
step-to-step variation of a training loss's statistic (a 10-fold jump of the loss itself), so it only acts on
outliers.
"""

from __future__ import annotations

import torch
from torch import Tensor

R_STATISTICS = ("second_moment", "squared_mean", "mean_variance")
R_INITIAL = 1.0
R_CLIP = 100.0  # default r_clip: see "Outliers" above


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


def measurement_noise(previous: Tensor, statistic: Tensor, r: float | None, alpha_r: float,
                      r_clip: float | None = None, first: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """This step's R and the R to store for the next step.

    Fixed ``r``: both are ``r``. Otherwise this step uses the exponential average
    ``alpha_r * R + (1 - alpha_r) * statistic``, and the stored one feeds ``min(statistic, r_clip * R)`` instead
    (unless ``r_clip`` is None or ``first``, a 0-d bool, says no measurement has been made yet; see "Outliers" in
    the module docstring).
    """
    if r is not None:
        fixed = torch.full_like(previous, r)
        return fixed, fixed
    statistic = statistic.to(previous)
    used = previous * alpha_r + statistic * (1.0 - alpha_r)
    if r_clip is None:
        return used, used
    cap = previous * r_clip
    if first is not None:
        cap = torch.where(first.to(previous.device), statistic, cap)
    return used, previous * alpha_r + torch.minimum(statistic, cap) * (1.0 - alpha_r)
