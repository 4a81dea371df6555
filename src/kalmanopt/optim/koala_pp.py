"""KOALA++: a Kalman filter that tracks the gradient-covariance product v_k = H_k P_{k-1} instead of P."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _docs
from ._reductions import dots, squared_norms
from ._sharding import reduce_if
from .base import GradBucket, KalmanOptimizer, _check_number, state_dtype
from .noise import R_CLIP

__all__ = ["KOALAPlusPlus", "koala_pp"]


class KOALAPlusPlus(KalmanOptimizer):
    r"""KOALA++ (Xia, Davtyan, Favaro, NeurIPS 2025).

    Each parameter tensor is a block of the state; the filter stores, per tensor, the previous effective gradient
    :math:`H_{k-1}`, the row vector :math:`v_{k-1} = H_{k-1}P_{k-2}` and three scalars, never the covariance:

    .. math::
        \begin{aligned}
            &\textbf{input}: \eta \text{ (lr)}, \sigma, Q, R_k, \text{loss } L_k, \text{weight decay } \lambda \\
            &h_k = g_k + \lambda\theta_{k-1}, \quad \ell_k = L_k + \tfrac{\lambda}{2}\lVert\theta_{k-1}\rVert^2 \\
            &\textbf{if } k = 1: \; H_{k-1} \gets h_k,\; v_{k-1} \gets \sigma h_k,\;
                S_{k-1} \gets h_k\cdot v_{k-1} + Q\lVert h_k\rVert^2 + R_k
                \quad \text{(prior } P_0 = \sigma I) \\
            &\alpha_k = \frac{h_k\cdot H_{k-1}}{\lVert H_{k-1}\rVert^2}, \quad
             \lambda_k = \frac{h_k\cdot(v_{k-1} + Q H_{k-1})}{S_{k-1}} \\
            &w_k = \frac{(h_k\cdot v_{k-1})\lVert H_{k-1}\rVert^2
                  - (H_{k-1}\cdot v_{k-1})(h_k\cdot H_{k-1})}{\lVert H_{k-1}\rVert^4}
                  \quad (w_k = 0 \text{ if not symmetric}) \\
            &v_k = (\alpha_k - \lambda_k) v_{k-1} + Q(h_k - \lambda_k H_{k-1}) + w_k H_{k-1} \\
            &S_k = h_k\cdot v_k + Q\lVert h_k\rVert^2 + R_k \\
            &\theta_k = \theta_{k-1} - \eta\,\frac{\ell_k}{S_k}\,(v_k + Q h_k)
        \end{aligned}

    A zero previous gradient or a non-positive :math:`S` restarts the tensor from its prior (the ``k = 1`` line).
    The multi-tensor path gets :math:`h_k\cdot v_k` (hence :math:`S_k`) algebraically from the recursion before
    :math:`v_k` exists, so it needs one batched reduction and one element-wise pass.

    Args:
        params: iterable of parameters or of dicts defining param groups.
        lr (float, optional): :math:`\eta`, the fraction of the loss each step asks the filter to remove
            (default: 1.0).
        sigma (float, optional): prior variance :math:`P_0 = \sigma I`, used at a tensor's first step and on a
            restart (default: 0.1).
        q (float, optional): process noise :math:`Q` (default: 0.1).
        symmetric (bool, optional): the symmetric minimum-norm closure (default) or the vanilla one
            (:math:`w_k = 0`).
    """

    __doc__ = (__doc__ or "") + _docs.COMMON_ARGS + _docs.LOSS_PATHS + _docs.GUARDS + r"""
    Example:
        >>> import torch
        >>> from kalmanopt import KOALAPlusPlus
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = KOALAPlusPlus(model.parameters(), lr=0.5)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> losses = (model(x) - y).square().squeeze(1)
        >>> losses.mean().backward()
        >>> _ = opt.step(loss=losses)

    References:
        Xia, Davtyan, Favaro. "KOALA++: Efficient Kalman-Based Optimization of Neural Networks with
        Gradient-Covariance Products". NeurIPS 2025, arXiv:2506.04432.
    """

    def __init__(self, params, lr: float = 1.0, sigma: float = 0.1, q: float = 0.1, r: float | None = None,
                 alpha_r: float = 0.9, weight_decay: float = 0.0, symmetric: bool = True, *,
                 r_stat: str = "second_moment", r_clip: float | None = R_CLIP, foreach: bool | None = None,
                 process_group: Any = None) -> None:
        defaults = dict(lr=lr, sigma=sigma, q=q, r=r, alpha_r=alpha_r, weight_decay=weight_decay,
                        symmetric=symmetric, r_stat=r_stat, r_clip=r_clip, foreach=foreach)
        super().__init__(params, defaults, process_group=process_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        _check_number("sigma", group["sigma"], 0.0, low_inclusive=False)
        _check_number("q", group["q"], 0.0)
        if group["q"] == 0 and group["r"] == 0:
            raise ValueError("q and r cannot both be 0: the innovation variance S would vanish")
        if not isinstance(group["symmetric"], bool):
            raise ValueError(f"Invalid symmetric: {group['symmetric']!r} (expected a bool)")

    def _init_param_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> None:
        kw = {"device": p.device, "dtype": state_dtype(p)}
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        st["prev_grad"] = torch.zeros(p.shape, **kw)  # H_{k-1}; all zeros means "no previous gradient"
        # The gain numerator v_{k-1} + Q H_{k-1} = H_{k-1}(P_{k-2} + Q I), stored instead of v_{k-1} itself: the
        # parameter update is then a single multiply-add (v is recovered with the Q it was stored with).
        st["gain"] = torch.zeros(p.shape, **kw)
        st["prev_q"] = torch.zeros((), **kw)
        st["prev_S"] = torch.zeros((), **kw)  # S_{k-1}
        st["prev_grad_sq"] = torch.zeros((), **kw)  # ||H_{k-1}||^2
        st["prev_grad_v"] = torch.zeros((), **kw)  # H_{k-1} . v_{k-1}

    def _correct_group(self, group: dict[str, Any], group_state: dict[str, Any], buckets: list[GradBucket],
                       loss_mean: Tensor, noise: Tensor, ok: Tensor) -> None:
        for b in buckets:
            koala_pp(
                b.params, b.h,
                [st["prev_grad"] for st in b.states], [st["gain"] for st in b.states],
                [st["prev_S"] for st in b.states], [st["prev_grad_sq"] for st in b.states],
                [st["prev_grad_v"] for st in b.states], [st["prev_q"] for st in b.states],
                [st["step"] for st in b.states],
                layer_loss=b.layer_loss(loss_mean, group["weight_decay"]),
                noise=noise.to(b.device, b.grad_sq.dtype), ok=ok.to(b.device),
                lr=group["lr"], sigma=group["sigma"], q=group["q"], symmetric=group["symmetric"],
                foreach=self._use_foreach(group), grad_sq=b.grad_sq, shard_sum=b.shard_sum,
            )


def koala_pp(params: list[Tensor], hs: list[Tensor], prev_grads: list[Tensor], gains: list[Tensor],
             prev_S: list[Tensor], prev_grad_sq: list[Tensor], prev_grad_v: list[Tensor], prev_q: list[Tensor],
             steps: list[Tensor], *,
             layer_loss: Tensor, noise: Tensor, ok: Tensor, lr: float, sigma: float, q: float, symmetric: bool,
             foreach: bool, grad_sq: Tensor | None = None, shard_sum: Callable[[Tensor], Tensor] | None = None) -> None:
    """Functional KOALA++ measurement update. See :class:`KOALAPlusPlus`.

    ``hs`` are the effective gradients (state dtype, contiguous, finite); ``gains`` hold ``v + prev_q * H_prev``;
    ``layer_loss`` the per-tensor residuals
    (1-d), ``noise`` the 0-d R, ``ok`` a 0-d bool that, when False, leaves every tensor untouched. ``grad_sq``
    (1-d, optional) are the squared norms of ``hs`` if already known; the reference recomputes them. ``shard_sum``
    sums per-tensor partial reductions over shards when the tensors are local shards (multi-tensor path only).
    """
    if foreach:
        _multi_tensor_koala_pp(params, hs, prev_grads, gains, prev_S, prev_grad_sq, prev_grad_v, prev_q, steps,
                               layer_loss=layer_loss, noise=noise, ok=ok, lr=lr, sigma=sigma, q=q,
                               symmetric=symmetric, grad_sq=grad_sq, shard_sum=shard_sum)
    else:
        if shard_sum is not None:
            raise ValueError("sharded tensors need the multi-tensor path: foreach=True")
        _single_tensor_koala_pp(params, hs, prev_grads, gains, prev_S, prev_grad_sq, prev_grad_v, prev_q, steps,
                                layer_loss=layer_loss, noise=noise, ok=ok, lr=lr, sigma=sigma, q=q,
                                symmetric=symmetric)


def _innovation(h: Tensor, H_prev: Tensor, v_prev: Tensor, S_prev: Tensor, *, q: float, noise: Tensor,
                symmetric: bool) -> tuple[Tensor, Tensor]:
    """Algorithm 1 of the paper on flat vectors: returns v_k and S_k."""
    prev_sq = H_prev.dot(H_prev)
    alpha = h.dot(H_prev) / prev_sq
    lam = h.dot(v_prev + q * H_prev) / S_prev
    if symmetric:
        w = (h.dot(v_prev) * prev_sq - H_prev.dot(v_prev) * h.dot(H_prev)) / prev_sq.square()
    else:
        w = torch.zeros_like(alpha)
    v = (alpha - lam) * v_prev + q * (h - lam * H_prev) + w * H_prev
    S = h.dot(v) + q * h.dot(h) + noise
    return v, S


def _single_tensor_koala_pp(params, hs, prev_grads, gains, prev_S, prev_grad_sq, prev_grad_v, prev_q, steps, *,
                            layer_loss, noise, ok, lr, sigma, q, symmetric) -> None:
    for i, param in enumerate(params):
        h, H_prev, gain_prev = hs[i].reshape(-1), prev_grads[i].view(-1), gains[i].view(-1)
        v_prev = gain_prev - prev_q[i] * H_prev
        hh = h.dot(h)
        v, S = _innovation(h, H_prev, v_prev, prev_S[i], q=q, noise=noise, symmetric=symmetric)
        # The prior: pretend the same gradient was seen before under P0 = sigma * I.
        prior_S = (sigma + q) * hh + noise
        v0, S0 = _innovation(h, h, sigma * h, prior_S, q=q, noise=noise, symmetric=symmetric)
        use_prior = (prev_grad_sq[i] <= 0) | ~(prev_S[i] > 0) | ~(S > 0) | ~torch.isfinite(S) \
            | ~torch.isfinite(v).all()
        v = torch.where(use_prior, v0, v)
        S = torch.where(use_prior, S0, S)

        commit = ok & (hh > 0) & (S > 0) & torch.isfinite(S)
        step_size = lr * layer_loss[i] / S
        gain = v + q * h
        new_param = param.to(h.dtype) - step_size * gain.view(param.shape)
        param.copy_(torch.where(commit, new_param, param.to(h.dtype)))
        gains[i].copy_(torch.where(commit, gain, gain_prev).view(gains[i].shape))
        prev_q[i].copy_(torch.where(commit, torch.full_like(prev_q[i], q), prev_q[i]))
        prev_grads[i].copy_(torch.where(commit, h, H_prev).view(prev_grads[i].shape))
        prev_S[i].copy_(torch.where(commit, S, prev_S[i]))
        prev_grad_sq[i].copy_(torch.where(commit, hh, prev_grad_sq[i]))
        prev_grad_v[i].copy_(torch.where(commit, h.dot(v), prev_grad_v[i]))
        steps[i].add_(commit.to(steps[i].dtype))


class _Coefficients(NamedTuple):
    """v_k = a * v_{k-1} + b * h_k + c * H_{k-1}, and the scalars that follow, one entry per tensor."""

    a: Tensor
    b: Tensor
    c: Tensor
    h_dot_v: Tensor  # h_k . v_k, from the recursion
    S: Tensor


def _coefficients(hh: Tensor, h_dot_prev: Tensor, h_dot_v: Tensor, prev_sq: Tensor, prev_dot_v: Tensor,
                  S_prev: Tensor, *, q: float, noise: Tensor, symmetric: bool) -> _Coefficients:
    alpha = h_dot_prev / prev_sq
    lam = (h_dot_v + q * h_dot_prev) / S_prev
    w = (h_dot_v * prev_sq - prev_dot_v * h_dot_prev) / prev_sq.square() if symmetric else torch.zeros_like(hh)
    a = alpha - lam
    b = torch.full_like(hh, q)
    c = w - q * lam
    h_dot_v_new = a * h_dot_v + b * hh + c * h_dot_prev
    return _Coefficients(a, b, c, h_dot_v_new, h_dot_v_new + q * hh + noise)


def _multi_tensor_koala_pp(params, hs, prev_grads, gains, prev_S, prev_grad_sq, prev_grad_v, prev_q, steps, *,
                           layer_loss, noise, ok, lr, sigma, q, symmetric, grad_sq=None, shard_sum=None) -> None:
    # One batched reduction pass: h.H_prev and h.gain_prev for every tensor; h.v_prev follows.
    h_dot_prev, h_dot_gain = reduce_if(shard_sum, dots(hs, prev_grads), dots(hs, gains))
    hh = squared_norms(hs) if grad_sq is None else grad_sq
    S_prev, prev_sq, prev_dot_v = torch.stack(prev_S), torch.stack(prev_grad_sq), torch.stack(prev_grad_v)
    q_prev = torch.stack(prev_q)
    h_dot_v = h_dot_gain - q_prev * h_dot_prev

    normal = _coefficients(hh, h_dot_prev, h_dot_v, prev_sq, prev_dot_v, S_prev, q=q, noise=noise,
                           symmetric=symmetric)
    # Prior restart: H_prev := h, v_prev := sigma * h, so v_k is a multiple of h.
    prior = _coefficients(hh, hh, sigma * hh, hh, sigma * hh, (sigma + q) * hh + noise, q=q, noise=noise,
                          symmetric=symmetric)
    use_prior = (prev_sq <= 0) | ~(S_prev > 0) | ~(normal.S > 0) | ~torch.isfinite(normal.S) \
        | ~torch.isfinite(normal.a) | ~torch.isfinite(normal.c)
    zero, one = torch.zeros_like(hh), torch.ones_like(hh)
    a = torch.where(use_prior, zero, normal.a)
    b = torch.where(use_prior, prior.a * sigma + prior.b + prior.c, normal.b)
    c = torch.where(use_prior, zero, normal.c)
    S = torch.where(use_prior, prior.S, normal.S)
    h_dot_v_new = torch.where(use_prior, prior.h_dot_v, normal.h_dot_v)

    # The same update on the stored gain numerator: with v_prev = gain_prev - q_prev * H_prev,
    # gain = v + q h = a gain_prev + (c - a q_prev) H_prev + (b + q) h.
    c = c - a * q_prev
    b = b + q
    # Masking by coefficients (not by torch.where on tensors) keeps it one pass; hs are finite, so a skipped
    # tensor gets exactly gain*1 + 0, theta - 0 and a lerp of weight 0.
    commit = ok & (hh > 0) & (S > 0) & torch.isfinite(S)
    a = torch.where(commit, a, one)
    b = torch.where(commit, b, zero)
    c = torch.where(commit, c, zero)
    neg_step = torch.where(commit, -lr * layer_loss / S, zero)

    # One element-wise pass over the gain, theta and H_prev.
    torch._foreach_mul_(gains, a.unbind(0))
    torch._foreach_addcmul_(gains, prev_grads, c.unbind(0))
    torch._foreach_addcmul_(gains, hs, b.unbind(0))
    torch._foreach_addcmul_(params, gains, neg_step.unbind(0))
    torch._foreach_lerp_(prev_grads, hs, list(commit.to(hh.dtype).unbind(0)))

    torch._foreach_copy_(prev_S, torch.where(commit, S, S_prev).unbind(0))
    torch._foreach_copy_(prev_grad_sq, torch.where(commit, hh, prev_sq).unbind(0))
    torch._foreach_copy_(prev_grad_v, torch.where(commit, h_dot_v_new, prev_dot_v).unbind(0))
    torch._foreach_copy_(prev_q, torch.where(commit, torch.full_like(q_prev, q), q_prev).unbind(0))
    torch._foreach_add_(steps, commit.to(torch.float32).unbind(0))
