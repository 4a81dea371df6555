r"""LoKO's measurement noise R: the ``m x m`` matrix of a batch, the EMA estimate and its ``r_clip`` bound.

``noise_matrix`` builds R for ``noise="moment"`` (the categorical variance), ``"ema"``, ``"ema_diag"`` or
``"fixed"``; ``updated_noise_estimate`` is the EMA recursion of the estimate after a step, whose sample
``bounded_noise_sample`` bounds to :math:`0 \preceq S \preceq r_{\text{clip}} R` (see
:mod:`kalmanopt.optim.loko`, ``r_clip``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .numerics import cholesky_with_jitter

__all__ = ["NEGATIVE_TOLERANCE", "NOISE_MODELS", "bounded_noise_sample", "categorical_covariance", "noise_matrix",
           "updated_noise_estimate"]

NOISE_MODELS = ("moment", "ema", "ema_diag", "fixed")


def categorical_covariance(yhat: Tensor) -> Tensor:
    r"""The categorical covariances :math:`\Lambda_b = \mathrm{diag}(\hat y_b) - \hat y_b \hat y_b^\top`,
    ``(B, C, C)``: ``noise="moment"``'s R (plus ``r_min I``) and the softmax's Jacobian."""
    return torch.diag_embed(yhat) - yhat.unsqueeze(2) * yhat.unsqueeze(1)


def noise_matrix(noise: str, estimate: Tensor, yhat: Tensor, r_min: float, observation: str,
                 moment: Tensor | None = None) -> Tensor:
    """The ``m x m`` measurement noise of this batch (float64), block-diagonal over the batch.

    ``moment``: :func:`categorical_covariance` of ``yhat`` where the caller has it (``noise="moment"``)."""
    b = yhat.shape[0]
    if noise == "moment":
        block = categorical_covariance(yhat) if moment is None else moment  # (B, C, C)
        eye = torch.eye(yhat.shape[1], dtype=torch.float64, device=yhat.device)
        blocks = block + r_min * eye
        return blocks[0] if b == 1 else torch.block_diag(*blocks)  # one sample: its block (block_diag copies)
    eye = torch.eye(estimate.shape[0], dtype=torch.float64, device=estimate.device)
    block = estimate.to(torch.float64) + r_min * eye
    return block if (observation == "loss" or b == 1) else torch.block_diag(*([block] * b))


def updated_noise_estimate(noise: str, estimate: Tensor, residual: Tensor, hph: Tensor, beta: float,
                           blocks: int, r_min: float | None = None, r_clip: float | None = None) -> Tensor:
    r"""The EMA R after a step: ``beta R + (1 - beta) S`` with the sample ``S = mean_b(eps_b eps_b^T + (H P H^T)_bb)``.

    With ``r_min`` given (LoKO), the sample stored is bounded first (:func:`bounded_noise_sample`): to
    :math:`0 \preceq S \preceq r_{\text{clip}}\,(R + r_{\min} I)`, the R this step used (``r_clip`` None: only
    :math:`S \succeq 0`). Without it (``r_min`` None), the unbounded recursion.
    """
    if noise not in ("ema", "ema_diag"):
        return estimate
    c = estimate.shape[0]
    eps = residual.reshape(blocks, c)
    hph_blocks = torch.stack([hph[i * c:(i + 1) * c, i * c:(i + 1) * c] for i in range(blocks)])
    sample = (eps.unsqueeze(2) * eps.unsqueeze(1) + hph_blocks).mean(0)
    if noise == "ema_diag":
        sample = torch.diag(torch.diagonal(sample))
    estimate = estimate.to(torch.float64)
    if r_min is not None:
        used = estimate + r_min * torch.eye(c, dtype=torch.float64, device=estimate.device)
        sample = bounded_noise_sample(sample, used, r_clip, diagonal=noise == "ema_diag")
    new = beta * estimate + (1.0 - beta) * sample
    return 0.5 * (new + new.T)


# A whitened eigenvalue of the R sample below -NEGATIVE_TOLERANCE * max(1, largest) is cancellation, not rounding.
NEGATIVE_TOLERANCE = 2.0 ** -26  # sqrt(float64 eps)


def bounded_noise_sample(sample: Tensor, used: Tensor, r_clip: float | None, diagonal: bool = False) -> Tensor:
    r"""The R sample ``S`` (``c x c``, float64) bounded to :math:`0 \preceq S \preceq r_{\text{clip}} R` with
    ``R = used`` (the R the step used, positive definite): the matrix form of KOALA's ``min(statistic, r_clip R)``.

    In R's metric, :math:`M = L^{-1} S L^{-\top}` (:math:`R = L L^\top`), every eigenvalue of ``M`` is clipped to
    ``[0, r_clip]`` (``r_clip`` None: ``[0, inf)``), so only the offending directions are shrunk; for a diagonal
    sample and R (``"ema_diag"``) that is ``min(max(s_i, 0), r_clip r_i)`` entry by entry. The upper bound keeps an
    outlier's memory in the average finite (after it, R is at most ``beta + (1 - beta) r_clip`` times what it was);
    the lower one restores what the sample is in exact arithmetic, positive semi-definite: the post-update
    :math:`H P^+ H^\top` of an outlier is a difference of huge numbers, and a sample with a negative eigenvalue of
    1e20 made R indefinite beyond any jitter, so that every later sample was skipped. A sample within the bounds
    (up to rounding below 0) is returned as it is, bit for bit. A non-finite one, or one whose whitened form
    overflows, comes back non-finite (the caller skips the step).
    """
    cap = math.inf if r_clip is None else float(r_clip)
    if diagonal:
        # an entry within the bounds is unchanged bit for bit; NaN propagates (clamp and minimum keep it)
        d = torch.diagonal(sample).clamp_min(0.0)
        return torch.diag(d if r_clip is None else d.minimum(cap * torch.diagonal(used)))
    # R is positive definite but for a singular estimate with r_min = 0 (allowed with rank=0): jitter then
    factor = cholesky_with_jitter(used)
    if factor is None:  # a non-finite R (never committed): nothing to bound against
        return torch.full_like(sample, math.nan)
    whitened = torch.linalg.solve_triangular(factor, sample, upper=False)
    whitened = torch.linalg.solve_triangular(factor, whitened.T, upper=False)  # L^-1 S L^-T (S symmetric)
    whitened = 0.5 * (whitened + whitened.T)
    ok = torch.isfinite(whitened).all()
    # on non-finite input eigh need not converge: decompose zeros instead, the result is replaced below
    lam, vec = torch.linalg.eigh(torch.where(ok, whitened, torch.zeros_like(whitened)))  # ascending
    outside = (lam[0] < -NEGATIVE_TOLERANCE * lam[-1].clamp_min(1.0)) | (lam[-1] > cap)
    root = factor @ vec
    rebuilt = (root * lam.clamp(0.0, cap)) @ root.T
    rebuilt = 0.5 * (rebuilt + rebuilt.T)
    bounded = torch.where(outside, rebuilt, sample)
    return torch.where(ok, bounded, torch.full_like(sample, math.nan))
