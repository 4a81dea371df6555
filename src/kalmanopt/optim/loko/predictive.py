r"""LoKO's predictive distribution of the logits and its calibration.

:class:`Predictive` is the linearised distribution :math:`\mathcal{N}(h, H P^- H^\top)` of a batch's logits;
:func:`predictive_probs` turns a mean and covariance into class probabilities (probit, Laplace bridge, Monte Carlo,
plug-in); :func:`calibrated` calibrates the step's predictive online (``LoKO(calibrate=...)``), by one of
:data:`CALIBRATIONS`: ``"temperature"`` divides the mean by the temperature of :data:`PREDICTIVE_TEMPERATURES` and
scales the covariance by the factor of :data:`PREDICTIVE_SCALES` whose pair had the lowest cumulative Brier score on
the samples already seen; ``"scale"`` only scales the covariance, by the factor with the lowest cumulative NLL.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["CALIBRATIONS", "PREDICTIVE_METHODS", "PREDICTIVE_SCALES", "PREDICTIVE_TEMPERATURES", "Predictive",
           "calibrated", "predictive_probs", "probit"]

PREDICTIVE_METHODS = ("probit", "laplace_bridge", "mc", "plugin")


# The scales of the linearised predictive covariance that the calibration chooses among (1 = the filter's own
# covariance, 0 = the plug-in softmax): alone by the cumulative NLL (``"scale"``), or paired with a temperature by
# the cumulative Brier score (``"temperature"``).
PREDICTIVE_SCALES = tuple([2.0 ** -j for j in range(11)] + [0.0])

# The temperatures of ``calibrate="temperature"`` (1 first: the ties' choice), 2^(k/8) from 1/2 to 2 (down to 1/4
# or 1/8 was worse in NLL on nlp_spam and nlp_bbc_long). LoKO's logits
# are under-confident on our streams (mean confidence 0.09 below accuracy on digits_shift), which no covariance
# scale can fix (a covariance only lowers the confidence): a temperature below 1 sharpens them. Computed as
# :func:`_candidates` computes them on the device (to the last bit on the CPU).
def _temperatures(device: torch.device | None = None) -> Tensor:
    """2^(k/8), k = -8..8, made on ``device`` (no upload), reordered to put k = 0 (T = 1) first."""
    powers = torch.exp2(torch.arange(-8, 9, dtype=torch.float64, device=device) / 8.0)
    return torch.cat([powers[8:9], powers[:8], powers[9:]])


PREDICTIVE_TEMPERATURES = tuple(_temperatures().tolist())

# The online calibration rules of ``LoKO(calibrate=...)`` (see :func:`calibrated`).
CALIBRATIONS = ("temperature", "scale")

# The state holding each rule's running sums, one per candidate.
CALIBRATION_STATE = {"scale": ("predictive_nll", len(PREDICTIVE_SCALES)),
                     "temperature": ("predictive_brier", len(PREDICTIVE_TEMPERATURES) * len(PREDICTIVE_SCALES))}


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
    """Index of the lowest cumulative score (ties: the first, the filter's own covariance); a NaN sum (a state saved
    before non-finite samples were left out) never wins, where ``argmin`` would pick it."""
    return torch.argmin(torch.nan_to_num(nll, nan=math.inf))


def _diagonal_blocks(a: Tensor, b: int, c: int) -> Tensor:
    """The per-sample ``(c, c)`` diagonal blocks of a ``(b c, b c)`` matrix, ``(b, c, c)``."""
    if b == 1:  # the online protocol's case, without the gather
        return a.unsqueeze(0)
    idx = torch.arange(b, device=a.device)
    return a.reshape(b, c, b, c)[idx, :, idx, :]


def _candidates(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The candidates as float64 tensors on ``device``: the scales ``(S,)``, the temperatures ``(T, 1, 1, 1)``, and
    per candidate of ``"temperature"`` (temperature-major) its temperature and its scale, ``(T S,)`` each. Made
    afresh at each call (a module-level cache would outlive a fake or meta tensor mode; LoKO keeps them per optimizer
    and device, outside its state); only the 12 scales are uploaded."""
    scales = torch.tensor(PREDICTIVE_SCALES, dtype=torch.float64, device=device)
    temps = _temperatures(device)  # made on the device: no host-to-device copy beyond the scales' 12 numbers
    return (scales, temps.view(-1, 1, 1, 1), temps.repeat_interleave(len(PREDICTIVE_SCALES)),
            scales.repeat(len(PREDICTIVE_TEMPERATURES)))


def calibration_candidate(rule: str, index: int) -> tuple[float, float]:
    """The ``(temperature, scale)`` of candidate ``index`` of ``rule`` (temperature-major for ``"temperature"``)."""
    if rule == "scale":
        return 1.0, PREDICTIVE_SCALES[index]
    return PREDICTIVE_TEMPERATURES[index // len(PREDICTIVE_SCALES)], PREDICTIVE_SCALES[index % len(PREDICTIVE_SCALES)]


def calibrated(mean: Tensor, cov: Tensor, e: Tensor, yhat: Tensor, gst: dict[str, Any],
               rule: str = "scale", candidates: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Predictive:
    r"""The step's calibrated predictive, by the candidate with the lowest cumulative score on the samples *before*
    this one (prequential: the choice never sees the sample it predicts; ties: the first, the filter's own
    predictive); then this sample's score under every candidate is added to the running sums (in ``gst``, created at
    the first call, see :data:`CALIBRATION_STATE`).

    .. math::
        p_{T,s} = \operatorname{softmax}\Bigl(\frac{\mu_i / T}{\sqrt{1 + \pi s \Sigma_{ii}/8}}\Bigr)

    ``rule="scale"``: :math:`T = 1`, :math:`s \in` :data:`PREDICTIVE_SCALES`, scored by the NLL
    :math:`-\log p_y`. ``rule="temperature"``: every pair of :data:`PREDICTIVE_TEMPERATURES` x
    :data:`PREDICTIVE_SCALES`, scored by the Brier score :math:`\lVert p - y\rVert^2`: a proper score like the NLL,
    but bounded, so a few confidently wrong samples do not outweigh a systematic under-confidence (the NLL's
    choice left LoKO's predictive under-confident, ECE 0.06-0.12 on digits_shift and cv_mnist; see
    ``docs/benchmarks/research/loko_calibration.md``). The returned predictive is :math:`\mathcal{N}(\mu / T,
    s \Sigma)` with probabilities :math:`p_{T,s}` (``predictive_probs(mean, cov, "probit")`` of it).
    ``candidates``: :func:`_candidates` of ``mean``'s device, where the caller keeps them (made afresh if None).
    """
    if rule not in CALIBRATIONS:
        raise ValueError(f"Invalid rule: {rule!r} (expected one of {CALIBRATIONS})")
    key, count = CALIBRATION_STATE[rule]
    sums = gst.get(key)
    if sums is None:
        sums = gst[key] = torch.zeros(count, dtype=torch.float64, device=mean.device)
    scales, temps, pair_temps, pair_scales = _candidates(mean.device) if candidates is None else candidates
    mu = mean.detach().to(torch.float64)
    # every scale at once, (scales, b, c): the probit reads only the diagonal of each scaled covariance, and
    # the diagonal of s * cov is s * diag(cov), entry for entry; scale 0 is the plug-in softmax whatever cov
    # holds (0 * inf would be NaN)
    var = _scaled(scales.view(-1, 1, 1), torch.diagonal(cov.to(torch.float64), dim1=1, dim2=2)).clamp_min(0.0)
    y = e.reshape(yhat.shape) + yhat  # the target (one-hot, or the given probabilities)
    if rule == "scale":
        probs = probit(mu, var)
        sample_score = -(y * probs.clamp_min(1e-300).log()).sum(dim=(1, 2))
    else:  # (temperatures * scales, b, c), temperature-major: index // len(scales) is the temperature's
        # the probit of every pair, (T, 1 | S, b, c); the softmax written out: torch.softmax over a last dimension
        # of ~10 classes took 90 us for the 300 candidates, more than the whole rest of the calibration
        z = mu / temps / torch.sqrt(1.0 + (math.pi / 8.0) * var.unsqueeze(0))
        z = (z - z.amax(dim=-1, keepdim=True)).exp()
        probs = (z / z.sum(dim=-1, keepdim=True)).flatten(0, 1)
        sample_score = (probs - y).square().sum(dim=(1, 2))
    best = _best_scale(sums)
    # the sums compare the candidates on the same samples: a sample whose score is not finite under some candidate
    # is left out of all of them (once in a sum, a NaN or inf would decide every later choice)
    sums += torch.where(torch.isfinite(sample_score).all(), sample_score, 0.0)
    if rule == "scale":
        return Predictive(mean, _scaled(scales[best], cov), probs[best])
    return Predictive(mean / pair_temps[best].to(mean.dtype), _scaled(pair_scales[best], cov),
                      probs[best])
