"""KOALA-M: the original KOALA with a velocity state and a 2x2 scalar covariance per param group."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _docs
from ._inplace import copy_into
from ._reductions import squared_norms
from ._sharding import local_tensor, shard_reducer
from .base import GradBucket, KalmanOptimizer, _check_number, narrowest_state_dtype, state_dtype
from .noise import R_CLIP
from .scalar_filter import apply_buckets, plan_buckets, planned_largest, shrink

__all__ = ["KOALAM"]

_WEIGHT_EMA = 0.9  # the paper's EMA of the weights behind the online estimate of q_w


class KOALAM(KalmanOptimizer):
    r"""KOALA-M (Davtyan et al., AAAI 2022): Kalman optimization with momentum dynamics.

    The state is :math:`(\theta, p)` with dynamics :math:`F = \begin{bmatrix}1 & 1\\ 0 & \kappa\end{bmatrix}` and a
    covariance :math:`P \otimes I`, :math:`P` a symmetric 2x2 matrix shared by the group:

    .. math::
        \begin{aligned}
            &\textbf{predict}: \theta \gets \theta + p,\; p \gets \kappa p,\;
                \hat P = F P F^\top + \mathrm{diag}(q_w, q_v) \\
            &\textbf{per tensor } l: \; S_l = \lVert h_l\rVert^2 \hat P_{11} + R, \quad
                \theta_l \gets \theta_l - \eta\,\ell_l\,\frac{\hat P_{11}}{S_l}\,h_l, \quad
                p_l \gets p_l - \eta\,\ell_l\,\frac{\hat P_{21}}{S_l}\,h_l \\
            &\textbf{after all tensors}: c = \max_l \lVert h_l\rVert^2 / S_l, \quad
                P \gets \hat P - \hat P\,\mathrm{diag}(c, 0)\,\hat P^\top
        \end{aligned}

    ``step()`` predicts ahead: after it, the parameters hold the prediction for the next measurement, so the next
    forward pass is evaluated where the filter expects it. With ``qw=None`` the weight process noise is estimated
    online in the paper's form, :math:`q_w = \frac{1}{n}\lVert\theta_{k-1} - \bar\theta\rVert^2` with
    :math:`\bar\theta` an EMA (0.9) of the weights (the reference code's unsquared norm is not reproduced).

    Args:
        params: iterable of parameters or of dicts defining param groups.
        lr (float, optional): :math:`\eta` (default: 1.0).
        sw, sc, sv (float, optional): the initial covariance :math:`P_0 = [[s_w, s_c], [s_c, s_v]]`
            (defaults: 0.1, 0.0, 0.1).
        a (float, optional): velocity decay :math:`\kappa` (default: 0.9).
        qw (float or None, optional): weight process noise; ``None`` estimates it online (default: 0.01).
        qv (float, optional): velocity process noise (default: 0.01).
    """

    __doc__ = (__doc__ or "") + _docs.COMMON_ARGS + _docs.LOSS_PATHS + _docs.GUARDS + r"""
    Example:
        >>> import torch
        >>> from kalmanopt import KOALAM
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = KOALAM(model.parameters(), lr=0.5)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (model(torch.randn(8, 4)) - 1.0).square().mean()
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)

    References:
        Davtyan, Sameni, Cerkezi, Meishvili, Bielski, Favaro. "KOALA: A Kalman Optimization Algorithm with Loss
        Adaptivity". AAAI 2022, arXiv:2107.03331.
    """

    def __init__(self, params, lr: float = 1.0, sw: float = 0.1, sc: float = 0.0, sv: float = 0.1, a: float = 0.9,
                 qw: float | None = 0.01, qv: float = 0.01, r: float | None = None, alpha_r: float = 0.9,
                 weight_decay: float = 0.0, *, r_stat: str = "second_moment", r_clip: float | None = R_CLIP,
                 foreach: bool | None = None, process_group: Any = None) -> None:
        defaults = dict(lr=lr, sw=sw, sc=sc, sv=sv, a=a, qw=qw, qv=qv, r=r, alpha_r=alpha_r,
                        weight_decay=weight_decay, r_stat=r_stat, r_clip=r_clip, foreach=foreach)
        super().__init__(params, defaults, process_group=process_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        _check_number("sw", group["sw"], 0.0, low_inclusive=False)
        _check_number("sv", group["sv"], 0.0)
        _check_number("sc", group["sc"], -float("inf"))
        if group["sc"] ** 2 > group["sw"] * group["sv"]:
            raise ValueError(f"Invalid sc: {group['sc']!r} (P0 must be positive semi-definite: sc^2 <= sw * sv)")
        _check_number("a", group["a"], 0.0, high=1.0)
        _check_number("qw", group["qw"], 0.0, optional=True)
        _check_number("qv", group["qv"], 0.0)

    def _init_group_state(self, group: dict[str, Any], st: dict[str, Any], kw: dict[str, Any]) -> None:
        # posterior [P11, P12, P22], filled on the device (torch.tensor would copy it from the host, and wait)
        st["P"] = torch.stack([torch.full((), float(group[key]), **kw) for key in ("sw", "sc", "sv")])
        st["P_prior"] = st["P"].clone()  # F P F^T + Q, set by predict

    def _init_param_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> None:
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        st["momentum"] = torch.zeros(p.shape, device=p.device, dtype=state_dtype(p))
        if group["qw"] is None:
            st["weight_ema"] = p.detach().to(state_dtype(p), memory_format=torch.contiguous_format, copy=True)

    def _predict_group(self, group: dict[str, Any], group_state: dict[str, Any], gate: Tensor | None) -> None:
        started_params = [p for p in group["params"] if "momentum" in self.state[p]]
        started = [local_tensor(p) for p in started_params]
        P = group_state["P"]
        online = None if group["qw"] is not None else self._estimate_qw(started_params, started, P)
        qw = group["qw"] if online is None else online[0]
        kappa = group["a"]
        p11, p12, p22 = P.unbind(0)
        prior = torch.stack([p11 + 2 * p12 + p22 + qw, kappa * (p12 + p22), kappa**2 * p22 + group["qv"]])
        # A gated prediction (after a skipped step) keeps the old prior: the online q_w depends on where the weights
        # are. A prediction that would not be finite (q_w overflowing the state dtype) is not made at all; P is kept
        # in the first parameter's dtype but used in every tensor's, so "finite" is in the group's narrowest dtype.
        go = torch.isfinite(prior.to(narrowest_state_dtype(group))).all()
        if gate is not None:
            go = go & gate
        copy_into(group_state["P_prior"], torch.where(go, prior, group_state["P_prior"]))
        if online is not None and online[1]:
            # Selected, not masked by a zero weight: a gated-off prediction may be one whose q_w overflowed because a
            # difference theta_bar - theta did (a non-finite weight), and 0 * inf would write NaN into the average.
            emas, diffs = online[1], online[2]
            torch._foreach_mul_(diffs, -(1 - _WEIGHT_EMA))
            torch._foreach_add_(diffs, emas)
            for ema, moved in zip(emas, diffs, strict=True):
                ema.copy_(torch.where(go.to(ema.device), moved, ema))
        if not started:
            return
        momenta = [local_tensor(self.state[p]["momentum"]) for p in started_params]
        move = go.to(p11.dtype)
        decay = torch.where(go, kappa * torch.ones_like(p11), torch.ones_like(p11))  # kappa, or 1 when gated off
        if self._use_foreach(group):
            torch._foreach_addcmul_(started, momenta, [move.to(p.device) for p in started])
            torch._foreach_mul_(momenta, [decay.to(m.device) for m in momenta])
        else:
            for p, m in zip(started, momenta, strict=True):
                p.copy_(p.to(m.dtype) + move.to(m.device) * m)
                m.mul_(decay.to(m.device))

    def _estimate_qw(self, params: list[Tensor], local: list[Tensor],
                     P: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]] | None:
        """q_w = ||theta - theta_bar||^2 / n, with the EMAs and the differences for the caller's (gated) EMA update.

        ``local``: rank-local shards. Only tensors the filter has corrected at least once count (``n`` is their
        size): a tensor whose state was created by a step that was then skipped, or that has only had zero gradients,
        is not part of the filter yet, so a skipped step leaves the q_w of later steps as if it never happened.
        """
        if not params:
            return torch.zeros_like(P[0]), [], []
        states = [self.state[p] for p in params]
        for p, st in zip(params, states, strict=True):
            if "weight_ema" not in st:  # qw set to None after the state was made: the average starts here
                st["weight_ema"] = p.detach().to(state_dtype(p), memory_format=torch.contiguous_format, copy=True)
        emas = [local_tensor(st["weight_ema"]) for st in states]
        diffs = torch._foreach_sub(emas, local)  # theta_bar - theta, in the state dtype
        started = torch.stack([local_tensor(st["step"]).to(P) > 0 for st in states]).to(P.dtype)
        partial = squared_norms(diffs).to(P) * started
        n = sum(s * p.numel() for s, p in zip(started.unbind(0), params, strict=True))  # a DTensor's numel is global
        _, shard_sum = shard_reducer(params[0])
        total = (partial if shard_sum is None else shard_sum(partial)).sum()
        qw = torch.where(n > 0, total / n.clamp_min(1), torch.zeros_like(total))
        return qw, emas, diffs

    def _correct_group(self, group: dict[str, Any], group_state: dict[str, Any], buckets: list[GradBucket],
                       loss_mean: Tensor, noise: Tensor, ok: Tensor) -> None:
        prior = group_state["P_prior"]
        apply_buckets(buckets, momentum_key="momentum", ok=ok, foreach=self._use_foreach(group))
        posterior = self._posterior(prior, planned_largest(buckets, prior[0]))
        copy_into(group_state["P"], torch.where(ok, posterior, group_state["P"]))

    def _check_group(self, group: dict[str, Any], group_state: dict[str, Any], buckets: list[GradBucket],
                     loss_mean: Tensor, noise: Tensor) -> Tensor:
        prior = group_state["P_prior"]
        largest, ok = plan_buckets(buckets, with_momentum=True, loss_mean=loss_mean, noise=noise, lr=group["lr"],
                                   weight_decay=group["weight_decay"], p11=prior[0], p21=prior[1],
                                   foreach=self._use_foreach(group))
        both = torch.stack([prior, self._posterior(prior, largest)])
        return ok & torch.isfinite(both.to(narrowest_state_dtype(group))).all()  # used in every tensor's dtype

    @staticmethod
    def _posterior(prior: Tensor, largest: Tensor) -> Tensor:
        """P^ - P^ diag(c, 0) P^T in forms that keep the variances non-negative and cannot overflow (see shrink)."""
        p11, p12, p22 = prior.unbind(0)
        factor = shrink(p11, largest)  # 1 - c P11
        return torch.stack([p11 * factor, p12 * factor, (p22 - largest * p12 * p12).clamp_min(0.0)])
