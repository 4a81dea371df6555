"""KOALA-V: the original KOALA with a scalar covariance P = sigma * I (one sigma per param group)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _docs
from ._inplace import copy_into
from .base import GradBucket, KalmanOptimizer, _check_number, narrowest_state_dtype
from .noise import R_CLIP
from .scalar_filter import apply_buckets, plan_buckets, planned_largest, shrink

__all__ = ["KOALAV"]


class KOALAV(KalmanOptimizer):
    r"""KOALA-V (Davtyan et al., AAAI 2022): Kalman optimization with a scalar covariance.

    .. math::
        \begin{aligned}
            &\textbf{predict}: \hat\sigma = \sigma + q \\
            &\textbf{per tensor } l: \; h_l = g_l + \lambda\theta_l, \;
                \ell_l = L + \tfrac{\lambda}{2}\lVert\theta_l\rVert^2, \;
                S_l = \hat\sigma\lVert h_l\rVert^2 + R \\
            &\qquad \theta_l \gets \theta_l - \eta\,\ell_l\,\frac{\hat\sigma}{S_l}\,h_l \\
            &\textbf{after all tensors}: \sigma \gets \hat\sigma - \hat\sigma^2 \max_l \frac{\lVert h_l\rVert^2}{S_l}
        \end{aligned}

    Unlike the original code, the step direction is the effective gradient :math:`h_l` (weight decay included),
    and a step in which no tensor was corrected leaves :math:`\sigma = \hat\sigma` instead of failing on an empty
    max.

    Args:
        params: iterable of parameters or of dicts defining param groups.
        lr (float, optional): :math:`\eta`, the fraction of the loss to remove per step (default: 1.0).
        sigma (float, optional): initial covariance scale :math:`\sigma_0` (default: 0.1).
        q (float, optional): process noise (default: 1.0).
    """

    __doc__ = (__doc__ or "") + _docs.COMMON_ARGS + _docs.LOSS_PATHS + _docs.GUARDS + r"""
    Example:
        >>> import torch
        >>> from kalmanopt import KOALAV
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = KOALAV(model.parameters(), lr=0.5)
        >>> loss = (model(torch.randn(8, 4)) - torch.randn(8, 1)).square().mean()
        >>> loss.backward()
        >>> _ = opt.step(loss=loss)

    References:
        Davtyan, Sameni, Cerkezi, Meishvili, Bielski, Favaro. "KOALA: A Kalman Optimization Algorithm with Loss
        Adaptivity". AAAI 2022, arXiv:2107.03331.
    """

    def __init__(self, params, lr: float = 1.0, sigma: float = 0.1, q: float = 1.0, r: float | None = None,
                 alpha_r: float = 0.9, weight_decay: float = 0.0, *, r_stat: str = "second_moment",
                 r_clip: float | None = R_CLIP, foreach: bool | None = None, process_group: Any = None) -> None:
        defaults = dict(lr=lr, sigma=sigma, q=q, r=r, alpha_r=alpha_r, weight_decay=weight_decay, r_stat=r_stat,
                        r_clip=r_clip, foreach=foreach)
        super().__init__(params, defaults, process_group=process_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        _check_number("sigma", group["sigma"], 0.0, low_inclusive=False)
        _check_number("q", group["q"], 0.0)

    def _init_group_state(self, group: dict[str, Any], st: dict[str, Any], kw: dict[str, Any]) -> None:
        st["sigma"] = torch.full((), float(group["sigma"]), **kw)  # posterior (a fill: no copy from the host)
        st["sigma_prior"] = st["sigma"].clone()  # sigma + q, set by predict

    def _init_param_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> None:
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _predict_group(self, group: dict[str, Any], group_state: dict[str, Any], gate: Tensor | None) -> None:
        # Recomputed from the posterior, so a repeated prediction needs no masking; a gated one keeps the old prior.
        prior = group_state["sigma"] + group["q"]
        if gate is not None:
            prior = torch.where(gate, prior, group_state["sigma_prior"])
        copy_into(group_state["sigma_prior"], prior)

    def _check_group(self, group: dict[str, Any], group_state: dict[str, Any], buckets: list[GradBucket],
                     loss_mean: Tensor, noise: Tensor) -> Tensor:
        prior = group_state["sigma_prior"]
        largest, ok = plan_buckets(buckets, with_momentum=False, loss_mean=loss_mean, noise=noise, lr=group["lr"],
                                   weight_decay=group["weight_decay"], p11=prior, p21=None,
                                   foreach=self._use_foreach(group))
        # sigma is kept in the first parameter's dtype but used in every tensor's: it must fit the narrowest
        posterior = prior * shrink(prior, largest)
        return ok & torch.isfinite(torch.stack([prior, posterior]).to(narrowest_state_dtype(group))).all()

    def _correct_group(self, group: dict[str, Any], group_state: dict[str, Any], buckets: list[GradBucket],
                       loss_mean: Tensor, noise: Tensor, ok: Tensor) -> None:
        prior = group_state["sigma_prior"]
        largest = planned_largest(buckets, prior)
        apply_buckets(buckets, momentum_key=None, ok=ok, foreach=self._use_foreach(group))
        # sigma_prior - sigma_prior^2 * largest, in the form that stays in [0, sigma_prior] (see shrink)
        posterior = prior * shrink(prior, largest)
        copy_into(group_state["sigma"], torch.where(ok, posterior, group_state["sigma"]))
