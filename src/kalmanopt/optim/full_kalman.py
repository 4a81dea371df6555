r"""FullKalman: the exact extended Kalman filter with a dense covariance, for small networks.

The ground truth that LoKO's diagonal (and KOALA's scalar) approximations are judged against, and the source of the
covariance-evolution experiment (``kalmanopt bench covariance``). It shares LoKO's measurement (observation models,
R estimators, guards; see :mod:`kalmanopt.optim.loko`) and keeps the full ``n x n`` covariance ``P`` over every
trainable parameter of every group, in the order the groups list them (``layer_slices()`` gives the blocks):

.. math::
    \begin{aligned}
        &P^- = P + q I,\quad S = H P^- H^\top + R,\quad K = P^- H^\top S^{-1}\ \text{(Cholesky solve)} \\
        &\theta \leftarrow \theta + K e,\quad P \leftarrow P^- - W W^\top,\ W = P^- H^\top L^{-\top},\ S = L L^\top
    \end{aligned}

Memory is ``n^2`` state-dtype numbers (n = 5,000 float32 parameters: 100 MB), time ``O(n^2 m)`` per step. The
prior is ``P_0 = diag(p0 per group)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .base import StateSpec, _check_number, load_state_keep_dtypes, state_dtype
from .loko import (
    check_numbers,
    cholesky_with_jitter,
    jacobian_rows,
    noise_matrix,
    observe,
    updated_noise_estimate,
    validate_shared,
)

__all__ = ["FullKalman"]


class FullKalman(Optimizer):
    r"""Dense-covariance EKF over the trainable parameters (for ``n`` up to ~20,000).

    Args:
        params: parameters or param groups (``p0`` may differ per group: the prior is block-diagonal).
        p0 (float): prior variance. Default 0.3.
        r0, beta, observation, noise, r_min, jacobian: as in :class:`kalmanopt.LoKO` (same defaults: logit
            observation, fixed ``R = r0 I`` with ``r0 = 1``).
        q (float): process noise added to the diagonal of ``P`` before every step. Default 0.
        max_params (int): refuse more trainable numbers than this (a guard against allocating n^2 by mistake).

    ``step(forward_fn, target)`` as in LoKO; returns the outputs before the update. State (in the first
    parameter's): ``P`` (``n x n``, in the state dtype of the first parameter), ``step``, ``skipped_steps``,
    ``noise_estimate``.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], p0: float = 0.3, r0: float = 1.0,
                 beta: float = 0.95, observation: str = "logits", q: float = 0.0, *, noise: str = "fixed",
                 r_min: float = 1e-3, jacobian: str = "batched", max_params: int = 20_000) -> None:
        defaults = dict(p0=p0, r0=r0, beta=beta, observation=observation, q=q, noise=noise, r_min=r_min,
                        jacobian=jacobian, p0_scale=1.0, variance_update="fd")
        self.max_params = max_params
        super().__init__(params, defaults)
        n = sum(p.numel() for g in self.param_groups for p in g["params"] if p.requires_grad)
        if n > max_params:
            raise ValueError(f"Invalid max_params: FullKalman over {n} parameters needs an {n}x{n} covariance; "
                             f"raise max_params (now {max_params}) if that is intended")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_shared(self, group)
        _check_number("p0", group["p0"], 0.0, low_inclusive=False, tensor_ok=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_state_keep_dtypes(self, state_dict, self._expected_state)

    def _expected_state(self, group: dict[str, Any], p: Tensor) -> StateSpec:
        pairs = self._trainable()
        if not pairs or p is not pairs[0][1]:
            return {}
        n = sum(q.numel() for _, q in pairs)
        return {"P": ((n, n), state_dtype(p)), "step": ((), torch.int64), "skipped_steps": ((), torch.int64),
                "noise_estimate": ((-1, -1), torch.float64)}

    def _trainable(self) -> list[tuple[dict[str, Any], Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def layer_slices(self) -> list[slice]:
        """Where each trainable parameter tensor sits along the axes of ``P``."""
        out, start = [], 0
        for _, p in self._trainable():
            out.append(slice(start, start + p.numel()))
            start += p.numel()
        return out

    def covariance(self) -> Tensor | None:
        """The current ``P`` (a view of the state; None before the first step)."""
        pairs = self._trainable()
        return self.state[pairs[0][1]].get("P") if pairs else None

    def _global_state(self, pairs: list[tuple[dict[str, Any], Tensor]], classes: int) -> dict[str, Any]:
        leader = pairs[0][1]
        st = self.state[leader]
        if "P" not in st:
            g = self.param_groups[0]
            diag = torch.cat([torch.full((p.numel(),), float(gr["p0"]), dtype=state_dtype(leader),
                                         device=leader.device) for gr, p in pairs])
            st["P"] = torch.diag(diag)
            # host-side counters, on the CPU on every device (as torch.optim's step): read without a synchronisation
            st["step"] = torch.zeros((), dtype=torch.int64)
            st["skipped_steps"] = torch.zeros((), dtype=torch.int64)
            c = 1 if g["observation"] == "loss" else classes
            st["noise_estimate"] = g["r0"] * torch.eye(c, dtype=torch.float64, device=leader.device)
        return st

    @property
    def skipped_steps(self) -> int:
        pairs = self._trainable()
        return int(self.state[pairs[0][1]]["skipped_steps"]) if pairs and "P" in self.state[pairs[0][1]] else 0

    def step(self, forward_fn: Callable[[], Tensor], target: Tensor) -> Tensor:  # type: ignore[override]
        """Observe one batch: returns the outputs computed before the update (detached)."""
        pairs = self._trainable()
        if not pairs:
            raise ValueError("FullKalman has no parameter with requires_grad=True")
        check_numbers(self)
        g0 = self.param_groups[0]
        params = [p for _, p in pairs]
        with torch.enable_grad():
            outputs = forward_fn()
            h, e, yhat = observe(outputs, target, g0["observation"])
            finite = bool(torch.isfinite(outputs).all())
            rows = jacobian_rows(h, params, g0["jacobian"]) if finite else None
        gst = self._global_state(pairs, outputs.shape[1])
        with torch.no_grad():
            ok = rows is not None and self._update(params, rows, e, yhat, gst)
        if not ok:
            gst["skipped_steps"] += 1
        return outputs.detach()

    @torch.no_grad()
    def _update(self, params: list[Tensor], rows: list[Tensor], e: Tensor, yhat: Tensor,
                gst: dict[str, Any]) -> bool:
        g0 = self.param_groups[0]
        m = e.numel()
        P = gst["P"]
        H = torch.cat([r.reshape(m, -1).to(P.dtype) for r in rows], dim=1)  # (m, n)
        if not (bool(torch.isfinite(H).all()) and bool(torch.isfinite(e).all())):
            return False
        q = g0["q"]
        PHt = P @ H.T  # (n, m); with process noise, P^- H^T = P H^T + q H^T
        if q:
            PHt.add_(H.T, alpha=q)
        HPH = (H @ PHt).to(torch.float64)
        R = noise_matrix(g0["noise"], gst["noise_estimate"], yhat, g0["r_min"], g0["observation"])
        L = cholesky_with_jitter(HPH + R)
        if L is None:
            warnings.warn("FullKalman: the innovation covariance is not positive definite; sample skipped",
                          RuntimeWarning, stacklevel=3)
            return False
        # K = P^- H^T S^-1 = W L^-1 with W = P^- H^T L^-T, so that P^- - K H P^- = P^- - W W^T (symmetric, rank m)
        W = torch.linalg.solve_triangular(L, PHt.T.to(torch.float64), upper=False).T  # (n, m)
        delta = (W @ torch.linalg.solve_triangular(L, e.unsqueeze(1), upper=False)).squeeze(1).to(P.dtype)
        W = W.to(P.dtype)
        if not (bool(torch.isfinite(delta).all()) and bool(torch.isfinite(W).all())):
            return False
        if g0["noise"] in ("ema", "ema_diag"):
            HW = (H @ W).to(torch.float64)
            hph = HPH - HW @ HW.T  # H P_new H^T without forming P_new
            blocks = 1 if g0["observation"] == "loss" else yhat.shape[0]
            new_r = updated_noise_estimate(g0["noise"], gst["noise_estimate"], e - (H @ delta).to(torch.float64),
                                           hph, g0["beta"], blocks)
            if not bool(torch.isfinite(new_r).all()):
                return False
            gst["noise_estimate"].copy_(new_r)
        if q:
            P.diagonal().add_(q)
        P.addmm_(W, W.T, alpha=-1.0)
        start = 0
        for p in params:
            p.add_(delta[start:start + p.numel()].view(p.shape).to(p.dtype))
            start += p.numel()
        gst["step"] += 1
        return True
