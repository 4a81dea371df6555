r"""Low-rank-plus-diagonal precision algebra for LoKO's ``rank=k`` option (LoFi).

After Chang, Durán-Martín, Shestopaloff, Jones and Murphy, "Low-rank extended Kalman filtering for online learning of
neural networks" (CoLLAs 2023). The posterior over the ``n`` filtered parameters is kept as a precision

.. math::
    \Sigma^{-1} = \Upsilon + W W^\top, \qquad \Upsilon = \operatorname{diag}(\upsilon) \succ 0,\quad
    W \in \mathbb{R}^{n \times k},

so memory is ``n (k + 1)`` numbers and no ``n x n`` matrix is ever formed. Pure functions, no state: LoKO keeps its
per-parameter state as views of the joint ``upsilon`` (n,) and ``W`` (n, k) and calls them with those.

**Predict** (time update, exact). With the covariance dynamics :math:`\Sigma^- = \Gamma\Sigma\Gamma + Q`,
:math:`\Gamma = \operatorname{diag}(\sqrt{a})` (``a = 1 + inflation``) and :math:`Q = \operatorname{diag}(q)`, put
:math:`D = \Upsilon / a`, :math:`U = W / \sqrt{a}` (row-wise) and :math:`s = 1 / (1 + q D)`; Woodbury twice gives

.. math::
    \Upsilon^- = s\,D, \qquad W^- = \operatorname{diag}(s)\,U\,F, \qquad
    F F^\top = \bigl(I_k + U^\top \operatorname{diag}(q\,s)\,U\bigr)^{-1},

which is the exact precision :math:`(\Gamma(\Upsilon + WW^\top)^{-1}\Gamma + Q)^{-1}` (it stays of the form diagonal
plus rank k because ``Q`` is diagonal), continuous at ``q = 0``.

**Update** with ``m`` outputs, Jacobian ``H`` (m, n), noise ``R = L_R L_R^T`` and innovation ``e``. The information
``H^T R^{-1} H = G^T G`` with ``G = L_R^{-1} H`` is appended to the low-rank factor,
:math:`\tilde W = [W^-, G^\top]` (n, k + m), so that the *untruncated* posterior precision is
:math:`\Upsilon^- + \tilde W\tilde W^\top` (exact). The mean moves by the exact EKF gain of that system, by Woodbury in
the (k + m)-dimensional space:

.. math::
    \theta \leftarrow \theta + \Sigma^+ H^\top R^{-1} e,\qquad
    \Sigma^+ = \Upsilon^{-1} - \Upsilon^{-1}\tilde W\,(I + \tilde W^\top\Upsilon^{-1}\tilde W)^{-1}\,
    \tilde W^\top\Upsilon^{-1}.

Then the rank is cut back to k: with the eigendecomposition of the small Gram matrix
:math:`\tilde W^\top\tilde W = V \operatorname{diag}(\lambda) V^\top` (eigenvalues descending), :math:`\tilde W V` has
orthogonal columns (the left singular vectors scaled by the singular values) and :math:`\tilde W\tilde W^\top =
(\tilde W V)(\tilde W V)^\top`; the first k columns are the new ``W`` (the best rank-k approximation of
:math:`\tilde W\tilde W^\top`), the squared row norms of the ``m`` dropped ones are added to :math:`\Upsilon`. The
diagonal of the precision is therefore exact: :math:`\upsilon^+ + \operatorname{rowsum}(W^{+2}) =
\upsilon^- + \operatorname{rowsum}(W^{-2}) + \operatorname{diag}(H^\top R^{-1} H)`. When the information gathered so
far has rank at most k (or k >= n), nothing is dropped and the filter is the exact EKF.

Cost: ``O(n (k + m)^2)`` for the two Gram products and the rotation, ``O((k + m)^3)`` for the small
factorisations. ``G`` itself is never formed: with :math:`W_z = [W, H^\top]` and
:math:`E = \operatorname{diag}(I_k, L_R^{-1})`, :math:`\tilde W = W_z E^\top`, so the Gram matrices are those of
:math:`W_z` conjugated by ``E`` and the rotation is :math:`W_z (E^\top V)`. The same holds for any row mixing
``mix @ H`` (LoKO's softmax rows from the logits' Jacobian), which then costs nothing in ``n`` dimensions and gives the
prior quadratic form of the unmixed rows for free (``rows_prior``). The ``n``-dimensional work runs in the dtype
of the inputs (float32 or float64); every ``(k + m)``-dimensional matrix is float64. Everything the step needs
besides (``H Sigma H^T`` before and after the update, ``H dtheta``) is read off the small matrix
:math:`\tilde W^\top\Upsilon^{-1}\tilde W`, with no extra ``n``-dimensional work.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["LofiUpdate", "predict", "update", "quadratic_form"]


def predict(upsilon: Tensor, W: Tensor, inflation: Tensor | float = 0.0,
            q: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    r"""Time update of the precision ``diag(upsilon) + W W^T`` (exact; see the module docs).

    Args:
        upsilon: ``(n,)`` positive diagonal of the precision.
        W: ``(n, k)`` low-rank factor.
        inflation: covariance inflation ``alpha >= 0`` (``Sigma <- (1 + alpha) Sigma``), a number or ``(n,)``.
        q: process noise ``>= 0`` added to the covariance diagonal, a number or ``(n,)``.

    Returns:
        ``(upsilon, W)`` of the predicted precision (the inputs are not modified; without inflation and process
        noise they are returned as they are, uncopied).
    """
    no_q = isinstance(q, int | float) and q == 0
    if isinstance(inflation, int | float) and inflation == 0 and no_q:
        return upsilon, W
    a = 1.0 + inflation
    D = upsilon / a
    U = W / (a.sqrt().unsqueeze(1) if isinstance(a, Tensor) else math.sqrt(a))
    if no_q:
        return D, U
    s = 1.0 / (1.0 + q * D)
    qs = q * s
    Us = U * (qs.unsqueeze(1) if isinstance(qs, Tensor) else qs)
    k = W.shape[1]
    inner = torch.eye(k, dtype=torch.float64, device=W.device) + (U.T @ Us).to(torch.float64)
    L = torch.linalg.cholesky(0.5 * (inner + inner.T))  # I + PSD: always positive definite
    # F = L^{-T}: F F^T = (L L^T)^{-1}, the k x k square root of C that keeps the product's rank
    F = torch.linalg.solve_triangular(L.T, torch.eye(k, dtype=torch.float64, device=W.device), upper=True)
    return s * D, (U * s.unsqueeze(1)) @ F.to(W.dtype)


class LofiUpdate(NamedTuple):
    """The outcome of :func:`update` (nothing is written; the caller commits it).

    Attributes:
        delta: ``(n,)`` mean increment :math:`\\Sigma^+ H^\\top R^{-1} e`.
        upsilon: ``(n,)`` new diagonal (the dropped directions' squared row norms added).
        W: ``(n, k)`` new low-rank factor (columns by decreasing norm).
        prior_hph: ``(m, m)`` float64 :math:`H \\Sigma^- H^\\top` (the predictive covariance of the outputs).
        post_hph: ``(m, m)`` float64 :math:`H \\Sigma^+ H^\\top` of the untruncated posterior.
        h_delta: ``(m,)`` float64 :math:`H\\,\\delta`, the linearised change of the outputs.
        rows_hph: ``(m, m)`` float64 :math:`H \\Sigma^- H^\\top` of the unmixed rows (``rows_prior=True``).
        rows_delta: ``(r,)`` float64 :math:`H\\,\\delta` of the unmixed rows (``rows_prior=True``), the linearised
            change of what they measure (LoKO's logits) under the mean step, read off the small matrices.
    """

    delta: Tensor
    upsilon: Tensor
    W: Tensor
    prior_hph: Tensor | None
    post_hph: Tensor | None
    h_delta: Tensor | None
    rows_hph: Tensor | None = None
    rows_delta: Tensor | None = None


def workspace_buffer(workspace: dict[str, Tensor] | None, name: str, shape: tuple[int, ...],
                     like: Tensor) -> Tensor | None:
    """A persistent buffer ``workspace[name]`` of ``shape`` with ``like``'s dtype and device (None without a
    workspace): the ``out=`` of an ``n``-dimensional temporary.

    On the CPU a fresh multi-megabyte temporary is memory the allocator maps from the system (glibc returns large
    freed blocks to it), and every one of its pages is faulted in again at the first write: on the long BBC stream
    (n = 14,213, k + m = 69) about 3,700 page faults a step, 4-5 ms of a 36 ms step. A buffer kept between steps is
    written in place.
    """
    if workspace is None:
        return None
    buf = workspace.get(name)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def _product_width(columns: int, inner: int, W: Tensor) -> int:
    """The number of columns of the rotation's product ``Wz @ (E^T V)`` (``Wz``: ``(n, inner)``, ``W``'s dtype):
    ``columns`` (= k + m), or, for float32 on the CPU with ``inner >= 16``, ``columns`` padded with zero columns to
    a multiple of 16, the widths MKL's single-precision kernels are made for: n x 74 @ 74 x 80 took 0.86x the time
    of n x 74 @ 74 x 74 at n = 2,926 and 0.65-0.76x at n = 14,213, and every column of the padded product equalled
    the unpadded one's bit for bit for inner = 12..139 at n = 40..14,213 (not for inner = 9..11, nor in float64:
    there MKL's kernels sum in another order, so those are not padded)."""
    if W.device.type != "cpu" or W.dtype != torch.float32 or inner < 16:
        return columns
    return -(-columns // 16) * 16


def _sym_solve(L: Tensor, b: Tensor) -> Tensor:
    return torch.cholesky_solve(b, L)


def _conjugate(A: Tensor, B: Tensor, k: int) -> Tensor:
    """``E A E^T`` with ``E = diag(I_k, B)``, by blocks (the ``k x k`` block is ``A``'s, exactly)."""
    right = torch.cat([A[:, :k], A[:, k:] @ B.T], dim=1)  # A E^T
    return torch.cat([right[:k], B @ right[k:]], dim=0)


def update(upsilon: Tensor, W: Tensor, H: Tensor, chol_R: Tensor, e: Tensor, *, prior: bool = True,
           posterior: bool = True, mix: Tensor | None = None, rows_prior: bool = False,
           truncation: str = "gram", workspace: dict[str, Tensor] | None = None) -> LofiUpdate | None:
    r"""Measurement update of the precision ``diag(upsilon) + W W^T`` (see the module docs).

    Args:
        upsilon: ``(n,)`` prior diagonal (after :func:`predict`), positive.
        W: ``(n, k)`` prior low-rank factor, ``k >= 1``.
        H: ``(m, n)`` Jacobian of the outputs, in the dtype of ``W`` (``(r, n)`` rows with a rectangular ``mix``).
        chol_R: ``(m, m)`` float64 lower Cholesky factor of the observation noise ``R``.
        e: ``(m,)`` float64 innovation.
        prior, posterior: compute ``prior_hph`` / ``post_hph`` and ``h_delta`` (else they are None).
        mix: ``(m, m)`` or ``(m, r)`` float64: the measurement's Jacobian is ``mix @ H`` (LoKO's softmax rows from
            the logits' ``H``, or from ``r = m + 1`` rows per sample with ``classes``), applied to the small matrices
            only; None: ``H`` itself.
        rows_prior: also return ``rows_hph``, :math:`H \Sigma^- H^\top` of the rows ``H`` as given (before ``mix``),
            and ``rows_delta``, their :math:`H\delta`.
        truncation: ``"gram"`` (LoFi's): keep the ``k`` leading eigenvectors of the Gram matrix
            :math:`\tilde W^\top\tilde W`, the best rank-``k`` approximation of :math:`\tilde W\tilde W^\top` in
            Frobenius norm. ``"whitened"``: those of :math:`\tilde W^\top\Upsilon^{-1}\tilde W` (the matrix
            the mean update has already formed), the best rank-``k`` approximation of the whitened
            :math:`\Upsilon^{-1/2}\tilde W\tilde W^\top\Upsilon^{-1/2}`: the directions in which the low-rank
            part of the precision dominates its diagonal most. It saves the ``n (k + m)^2`` Gram product; the
            diagonal of the precision stays exact either way (any rotation of :math:`\tilde W` keeps its row norms).
        workspace: persistent buffers for the ``n (k + m)`` temporaries (:func:`workspace_buffer`; LoKO passes one
            on the CPU). The returned ``W`` is then a view of a workspace buffer, valid until the next call with it.

    Returns:
        A :class:`LofiUpdate`, or None when the small ``(k + m)`` system cannot be factorised (non-finite input),
        when the Gram matrix of this update overflows the dtype of ``W``, or when the update would leave a state
        the next one cannot use (the new ``W``'s Gram matrix beyond the dtype of ``W``, or
        :math:`W^\top\Upsilon^{-1}W` beyond float64's resolution for factorising :math:`I + T`).
    """
    n, k = W.shape
    m = H.shape[0] if mix is None else mix.shape[0]  # measurements (H may hold other rows, mixed into them)
    f64 = torch.float64
    # The whitened Jacobian G = L_R^{-1} mix H (H^T R^{-1} H = G^T G for the measured rows) is never formed in n
    # dimensions: W~ = [W, G^T] = Wz E^T with Wz = [W, H^T] and E = diag(I_k, B), B = L_R^{-1} mix, so every
    # (k + m)-dimensional matrix of W~ is that of Wz conjugated by the small E (float64), and the n-dimensional
    # work is three products with Wz.
    B = torch.linalg.solve_triangular(chol_R, torch.eye(m, dtype=f64, device=H.device) if mix is None else mix,
                                      upper=False)
    e_w = torch.linalg.solve_triangular(chol_R, e.unsqueeze(1), upper=False).squeeze(1)  # whitened innovation
    cols = k + H.shape[0]
    Wz = torch.cat([W, H.T], dim=1, out=workspace_buffer(workspace, "Wz", (n, cols), W))  # (n, k + m)
    U = torch.div(Wz, upsilon.unsqueeze(1), out=workspace_buffer(workspace, "U", (n, cols), W))  # Upsilon^-1 Wz
    Tz = (Wz.T @ U).to(f64)  # Wz^T Upsilon^{-1} Wz (symmetric up to rounding: T and rows_hph are symmetrised)
    T = _conjugate(Tz, B, k)  # W~^T Upsilon^{-1} W~
    T = 0.5 * (T + T.T)
    eye = torch.eye(k + m, dtype=f64, device=H.device)
    L_M, info = torch.linalg.cholesky_ex(eye + T)
    # L_M's entries are at most sqrt(1 + max T_ii) < 1e155: their sum is finite exactly when they all are (one
    # reduction instead of isfinite's four elementwise passes), and one host read for both checks
    if not bool((info == 0) & torch.isfinite(L_M.sum())):
        return None
    # Sigma^+ H^T R^{-1} e = Upsilon^{-1} G^T e_w - U M^{-1} U^T G^T e_w; U^T G^T e_w = T[:, k:] e_w
    t_e = T[:, k:] @ e_w
    coef = -_sym_solve(L_M, t_e.unsqueeze(1)).squeeze(1)
    coef[k:] += e_w
    coef_z = torch.cat([coef[:k], B.T @ coef[k:]])  # E^T coef
    delta = U @ coef_z.to(U.dtype)
    # quadratic forms in the outputs, read off T: H Upsilon^{-1} H^T = L_R T_gg L_R^T, H Upsilon^{-1} W = L_R T_gw
    T_gg = T[k:, k:]
    prior_hph = post_hph = h_delta = rows_hph = rows_delta = None
    if prior or rows_prior:  # chol(I + T_ww): the leading block of chol(I + T)
        L_w = L_M[:k, :k]
    if prior:
        Z = torch.linalg.solve_triangular(L_w, T[:k, k:], upper=False)  # (k, m)
        prior_hph = chol_R @ (T_gg - Z.T @ Z) @ chol_R.T
        prior_hph = 0.5 * (prior_hph + prior_hph.T)
    if rows_prior:  # the same with the unmixed rows, from Tz
        Z = torch.linalg.solve_triangular(L_w, Tz[:k, k:], upper=False)
        rows_hph = Tz[k:, k:] - Z.T @ Z
        rows_hph = 0.5 * (rows_hph + rows_hph.T)
        # H delta = H Upsilon^{-1} Wz coef_z = Tz[k:, :] coef_z: no n-dimensional pass
        rows_delta = Tz[k:, :] @ coef_z
    if posterior:
        Z2 = torch.linalg.solve_triangular(L_M, T[:, k:], upper=False)  # (k + m, m)
        post_hph = chol_R @ (T_gg - Z2.T @ Z2) @ chol_R.T
        post_hph = 0.5 * (post_hph + post_hph.T)
        h_delta = chol_R @ (T[k:, :] @ coef)
    # truncation: rotate W~ onto the eigenvectors of its Gram matrix, keep the k largest (one product: the kept
    # columns and the dropped ones side by side)
    if truncation == "whitened":  # T is finite here (its Cholesky factor was: a non-finite entry reaches it)
        evals, V = torch.linalg.eigh(T)  # ascending
    else:
        gram = _conjugate((Wz.T @ Wz).to(f64), B, k)
        gram = 0.5 * (gram + gram.T)
        # Wz^T Wz (unlike Wz^T Upsilon^{-1} Wz, checked above) can overflow the input dtype, and eigh raises on
        # non-finite input instead of returning NaN: decompose zeros then, and give up below
        finite = torch.isfinite(gram).all()
        evals, V = torch.linalg.eigh(torch.where(finite, gram, torch.zeros_like(gram)))  # ascending
    evals, V = evals.flip(0), V.flip(1)  # by decreasing eigenvalue
    # The state this update leaves must be one the next update can use, else every later update fails (an outlier
    # would end the filter): that one forms W^T W in the input dtype (the new W's is diag(evals[:k])), and
    # factorises I + T, whose leading block W^T Upsilon^{-1} W is at most V_k^T T V_k here (the new upsilon is at
    # least the old); Cholesky is guaranteed to factorise it in float64 while its norm (at most its trace) stays
    # below 1 / (4 (k + m) eps), ~1e13 (normal streams: 1e2-1e4). An input scaled by 1e16 against R = 1e-6 broke
    # the first (float32) and, against R = 1e3, the second (float64: a precision 1e29 times its diagonal); such an
    # update does not happen (None).
    headroom = torch.finfo(W.dtype).max / 4  # for the next update's rounding and its new rows
    resolution = 1.0 / (4 * (k + m) * torch.finfo(f64).eps)
    if truncation == "whitened":
        # evals are T's, and the new W's Gram matrix is not diagonal: its largest eigenvalue is at most its trace
        # sum_i w_i^2 <= max(upsilon) sum_i w_i^2 / upsilon_i = max(upsilon) sum(evals[:k]) (no n k pass); the
        # next I + T's leading block is at most diag(evals[:k])
        kept_sum = evals[:k].clamp_min(0.0).sum()
        usable = (upsilon.max().to(f64) * kept_sum <= headroom) & (kept_sum <= resolution)
    else:
        kept = V[:, :k]
        usable = finite & (evals[0] <= headroom) & ((kept * (T @ kept)).sum() <= resolution)
    if not bool(usable):
        return None
    # Directions whose eigenvalue is within the Gram matrix's own rounding of zero (while the information has
    # rank < k + m: the first steps, or n < k + m) are exactly zero columns of W~ V in exact arithmetic; computed,
    # they are rounding noise whose products underflow to subnormal numbers, which the CPU multiplies ~100x more
    # slowly (the Gram products of the next steps took 5-10x their usual time). They are set to their exact value.
    null = evals <= evals[0].clamp_min(0.0) * ((k + m) * torch.finfo(f64).eps)
    V = V.masked_fill(null, 0.0)
    rotation = torch.cat([V[:k], B.T @ V[k:]]).to(W.dtype)  # W~ V = Wz (E^T V)
    width = _product_width(k + m, cols, W)
    if width > k + m:  # zero columns up to the width MKL's kernels prefer: the same numbers in the others
        rotation = torch.cat([rotation, rotation.new_zeros((rotation.shape[0], width - k - m))], dim=1)
    rotated = torch.mm(Wz, rotation, out=workspace_buffer(workspace, "rotated", (n, width), W))
    W_new = rotated[:, :k]
    ups_new = upsilon + rotated[:, k:k + m].square().sum(1)
    return LofiUpdate(delta, ups_new, W_new, prior_hph, post_hph, h_delta, rows_hph, rows_delta)


def quadratic_form(upsilon: Tensor, W: Tensor | None, H: Tensor) -> Tensor:
    r"""Per-sample blocks of :math:`H \Sigma H^\top` with :math:`\Sigma = (\Upsilon + W W^\top)^{-1}` (Woodbury).

    Args:
        upsilon: ``(n,)`` positive diagonal of the precision.
        W: ``(n, k)`` low-rank factor, or None for a diagonal precision.
        H: ``(b, c, n)`` Jacobian rows, grouped by sample.

    Returns:
        ``(b, c, c)`` float64.
    """
    Hu = H / upsilon
    out = (Hu @ H.transpose(1, 2)).to(torch.float64)
    if W is not None and W.shape[1]:
        k = W.shape[1]
        inner = torch.eye(k, dtype=torch.float64, device=W.device) + (W.T @ (W / upsilon.unsqueeze(1))).to(
            torch.float64)
        L = torch.linalg.cholesky(0.5 * (inner + inner.T))
        HuW = (Hu @ W).to(torch.float64)  # (b, c, k)
        Z = torch.linalg.solve_triangular(L, HuW.transpose(1, 2), upper=False)  # (b, k, c)
        out = out - Z.transpose(1, 2) @ Z
    return 0.5 * (out + out.transpose(1, 2))
