r"""LoKO's predictive distribution of the logits and its calibration.

:class:`Predictive` is the linearised distribution :math:`\mathcal{N}(h, H P^- H^\top)` of a batch's logits;
:func:`predictive_probs` turns a mean and covariance into class probabilities (probit, Laplace bridge, Monte Carlo,
plug-in); ``calibrated`` scales the covariance by the factor of :data:`PREDICTIVE_SCALES` with the lowest
cumulative NLL on the samples already seen (``calibrate=True``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["PREDICTIVE_METHODS", "PREDICTIVE_SCALES", "Predictive", "calibrated", "predictive_probs", "probit"]

PREDICTIVE_METHODS = ("probit", "laplace_bridge", "mc", "plugin")


# The scales of the linearised predictive covariance that ``calibrate=True`` chooses among (1 = the filter's own
# covariance, 0 = the plug-in softmax), by the cumulative log-likelihood of the samples already seen.
PREDICTIVE_SCALES = tuple([2.0 ** -j for j in range(11)] + [0.0])


class Predictive(NamedTuple):
    r"""The linearised predictive distribution of a batch's logits (all tensors detached).

    Attributes:
        mean: ``(batch, classes)`` logits at the current parameters (the model's dtype).
        cov: ``(batch, classes, classes)`` float64 logit covariance per sample, :math:`H_b P H_b^\top` (plus the
            observation noise ``R`` where asked for).
        probs: ``(batch, classes)`` float64 class probabilities (see :func:`predictive_probs`).
    """

    mean: Tensor
    cov: Tensor
    probs: Tensor


def probit(mu: Tensor, var: Tensor) -> Tensor:
    """The multiclass probit of :func:`predictive_probs` from the logits' means and (clamped) variances
    ``(..., c)``, softmax over the last dimension."""
    return torch.softmax(mu / torch.sqrt(1.0 + (math.pi / 8.0) * var), dim=-1)


def predictive_probs(mean: Tensor, cov: Tensor, method: str = "probit", *, samples: int = 1000,
                     generator: torch.Generator | None = None) -> Tensor:
    r"""Class probabilities of logits :math:`f \sim \mathcal{N}(\mu, \Sigma)`, per sample (float64).

    .. math::
        \textbf{probit}:\ p = \operatorname{softmax}\!\Bigl(\frac{\mu_i}{\sqrt{1 + \pi\,\Sigma_{ii}/8}}\Bigr)
        \qquad
        \textbf{laplace\_bridge}:\ p_i = \frac{\alpha_i}{\sum_j \alpha_j},\
        \alpha_i = \frac{1}{\Sigma'_{ii}}\Bigl(1 - \frac{2}{C} + \frac{e^{\mu'_i}}{C^2}\sum_j e^{-\mu'_j}\Bigr)

    ``"probit"`` is the multiclass probit approximation of :math:`E[\operatorname{softmax}(f)]` (MacKay 1992;
    Gibbs 1997). ``"laplace_bridge"`` is the mean of the Dirichlet that the Laplace bridge (Hennig et al. 2012;
    Hobbhahn et al. 2022) matches to the Gaussian, after conditioning the Gaussian on :math:`\sum_i f_i = 0`
    (softmax ignores a common shift of the logits): :math:`\mu' = \mu - \Sigma 1\,(1^\top\mu)/(1^\top\Sigma 1)`,
    :math:`\Sigma' = \Sigma - \Sigma 1 1^\top \Sigma / (1^\top\Sigma 1)`. ``"mc"``: the average of
    ``softmax(f)`` over ``samples`` draws (``generator`` for reproducibility). ``"plugin"``: ``softmax(mu)``, the
    covariance ignored.

    Args:
        mean: ``(b, c)`` logits.
        cov: ``(b, c, c)`` logit covariances (symmetric positive semi-definite).
        method: one of :data:`PREDICTIVE_METHODS`.
    """
    if method not in PREDICTIVE_METHODS:
        raise ValueError(f"Invalid method: {method!r} (expected one of {PREDICTIVE_METHODS})")
    mu = mean.detach().to(torch.float64)
    cov = cov.to(torch.float64)
    var = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0.0)
    if method == "plugin":
        return torch.softmax(mu, dim=1)
    if method == "probit":
        return probit(mu, var)
    if method == "mc":
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"Invalid samples: {samples!r} (a positive int)")
        lam, vec = torch.linalg.eigh(0.5 * (cov + cov.transpose(1, 2)))  # PSD square root, singular cov allowed
        root = vec * lam.clamp_min(0.0).sqrt().unsqueeze(1)
        # drawn where the generator lives (a CPU one gives the same draws on every device), else on the device
        draw_on = mu.device if generator is None else generator.device
        z = torch.randn((samples, *mu.shape), dtype=torch.float64, generator=generator, device=draw_on).to(mu.device)
        f = mu + torch.einsum("bij,sbj->sbi", root, z)
        return torch.softmax(f, dim=2).mean(0)
    c = mu.shape[1]
    s1 = cov.sum(2)  # Sigma 1, (b, c)
    total = s1.sum(1, keepdim=True)  # 1^T Sigma 1
    pos = total > 0
    safe = torch.where(pos, total, torch.ones_like(total))
    mu_c = torch.where(pos, mu - s1 * mu.sum(1, keepdim=True) / safe, mu)
    var_c = torch.where(pos, var - s1.square() / safe, var).clamp_min(torch.finfo(torch.float64).tiny)
    if c == 1:  # one class: probability 1 (the formula's alpha is 0 / var)
        return torch.ones_like(mu)
    # alpha_i = (1 - 2/C + e^{log_term_i}) / var_i, normalised: in log space, so that logits far apart (e^{1e3}
    # overflows) give the limit instead of inf / inf
    log_term = mu_c + torch.logsumexp(-mu_c, dim=1, keepdim=True) - 2.0 * math.log(c)
    log_alpha = torch.logaddexp(torch.full_like(log_term, math.log1p(-2.0 / c) if c > 2 else -math.inf), log_term)
    return torch.softmax(log_alpha - var_c.log(), dim=1)


def _scaled(scale: Tensor | float, cov: Tensor) -> Tensor:
    """``scale * cov`` with ``0 * cov = 0`` exactly, also where ``cov`` overflowed (scale 0 is the plug-in)."""
    return torch.where(torch.as_tensor(scale, dtype=cov.dtype, device=cov.device) == 0, 0.0, scale * cov)


def _best_scale(nll: Tensor) -> Tensor:
    """Index of the lowest cumulative NLL (ties: the first, the filter's own covariance); a NaN sum (a state saved
    before non-finite samples were left out) never wins, where ``argmin`` would pick it."""
    return torch.argmin(torch.nan_to_num(nll, nan=math.inf))


def _diagonal_blocks(a: Tensor, b: int, c: int) -> Tensor:
    """The per-sample ``(c, c)`` diagonal blocks of a ``(b c, b c)`` matrix, ``(b, c, c)``."""
    if b == 1:  # the online protocol's case, without the gather
        return a.unsqueeze(0)
    idx = torch.arange(b, device=a.device)
    return a.reshape(b, c, b, c)[idx, :, idx, :]


def calibrated(mean: Tensor, cov: Tensor, e: Tensor, yhat: Tensor, gst: dict[str, Any]) -> Predictive:
    """The step's predictive with its covariance scaled by the scale of :data:`PREDICTIVE_SCALES` whose
    predictive had the lowest cumulative NLL on the samples *before* this one (prequential: the choice never
    sees the sample it predicts); then this sample's NLL under every scale is added to the running sums
    (``gst["predictive_nll"]``, created at the first call)."""
    nll = gst.get("predictive_nll")
    if nll is None:
        nll = gst["predictive_nll"] = torch.zeros(len(PREDICTIVE_SCALES), dtype=torch.float64,
                                                  device=mean.device)
    scales = torch.tensor(PREDICTIVE_SCALES, dtype=torch.float64, device=mean.device)
    # every scale at once, (scales, b, c): the probit reads only the diagonal of each scaled covariance, and
    # the diagonal of s * cov is s * diag(cov), entry for entry; scale 0 is the plug-in softmax whatever cov
    # holds (0 * inf would be NaN)
    var = _scaled(scales.view(-1, 1, 1), torch.diagonal(cov.to(torch.float64), dim1=1, dim2=2)).clamp_min(0.0)
    probs = probit(mean.detach().to(torch.float64), var)
    best = _best_scale(nll)
    y = e.reshape(yhat.shape) + yhat  # the target (one-hot, or the given probabilities)
    sample_nll = -(y * probs.clamp_min(1e-300).log()).sum(dim=(1, 2))
    # the sums compare the scales on the same samples: a sample whose NLL is not finite under some scale is
    # left out of all of them (once in a sum, a NaN or inf would decide every later choice)
    nll += torch.where(torch.isfinite(sample_nll).all(), sample_nll, torch.zeros_like(sample_nll))
    return Predictive(mean, _scaled(scales[best], cov), probs[best])
