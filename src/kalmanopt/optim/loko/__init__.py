r"""LoKO: a diagonal extended Kalman filter over model *outputs*, for online fine-tuning of adapters.

The state is the set of trainable parameters (LoRA ``A``/``B``, DoRA magnitudes, a classification head, or any
subset of a plain model); the covariance is kept as its diagonal ``p``. One step observes one batch:

.. math::
    \begin{aligned}
        &h = h(\theta; x) \in \mathbb{R}^m,\quad H = \partial h / \partial\theta \;(m \times n),\quad e = y - h \\
        &p^- = (1 + \alpha)\,p + q \quad\text{(time update: inflation and process noise, both 0 by default)} \\
        &S = H\,\mathrm{diag}(p^-)\,H^\top + R \quad\text{(Cholesky-factored, never inverted)} \\
        &\textbf{fd}:\; \theta \leftarrow \theta + p^- \circ H^\top S^{-1} e,\quad
            p \leftarrow p^- - (p^-)^2 \circ \mathrm{diag}(H^\top S^{-1} H)
            \quad\text{(the diagonal of } (I - KH)\,\mathrm{diag}(p^-)) \\
        &\textbf{vd}:\; 1/p \leftarrow 1/p^- + \mathrm{diag}(H^\top R^{-1} H),\quad
            \theta \leftarrow \theta + p \circ H^\top R^{-1} e
    \end{aligned}

The Jacobian rows come from batched vector-Jacobian products (``autograd.grad(..., is_grads_batched=True)``,
falling back to one backward per row where an operator has no batching rule).

What is the paper's (Abdi et al., arXiv:2410.11551) and what is ours: the paper states a diagonal-covariance EKF on
the adapter parameters, a "robust" initialisation of P and an EMA estimate of R. The observation models, the exact
R recursions, the automatic P0 and the precision-matching variance update are **our formulation**, all selectable:

``observation``
    ``"softmax"``: ``h`` = class probabilities (``m = batch x classes``), ``y`` one-hot, ``e`` in [-1, 1].
    The softmax outputs sum to one, so every Jacobian row set is rank-deficient (rows sum to zero); we keep all
    classes and rely on ``R >= r_min I`` with ``r_min > 0`` to keep ``S`` positive definite (the innovation also
    sums to zero, so the extra direction carries no signal). ``"logits"``: ``h`` = logits, linearised, with the
    innovation ``e = onehot - softmax`` (equivalently a pseudo-target ``logits + onehot - softmax``), so that
    ``H^T e`` is minus the cross-entropy gradient. ``"loss"``: one scalar measurement per batch, the mean
    cross-entropy with target 0 and ``H = grad loss`` (a diagonal KOALA; no Jacobian rows, ``m = 1``).
``noise`` (R)
    ``"moment"``: moment-matched to the categorical variance at the current prediction,
    ``R = diag(yhat) - yhat yhat^T + r_min I`` (softmax only; with it the filter is an online natural-gradient
    method, as in Ollivier 2018 and Chang et al. 2022). ``"ema"``: the adaptive-EKF average
    ``R <- beta R + (1 - beta)(eps eps^T + H P H^T)`` with the post-update residual ``eps = e - H dtheta``
    (first order, no second forward pass), ``R_0 = r0 I``, plus the floor ``r_min I`` when used. ``"ema_diag"``:
    its diagonal. ``"fixed"``: ``R = r0 I + r_min I``. R is per sample (``classes x classes``; ``1 x 1`` for
    ``"loss"``) and block-diagonal over a batch.
``r_clip`` (outliers in the R estimate; default 100)
    the sample ``S = eps eps^T + H P H^T`` stored into the ``"ema"``/``"ema_diag"`` average is bounded to
    :math:`0 \preceq S \preceq r_{\text{clip}} R`, R the noise the step used (estimate plus floor): in R's metric
    its eigenvalues are clipped to ``[0, r_clip]`` (:func:`bounded_noise_sample`), the matrix form of KOALA's
    ``min(statistic, r_clip R)``. One input scaled by 1e20 otherwise put R at ~4e22 with a negative eigenvalue of
    ~2e20 (the post-update ``H P H^T`` of an outlier is a difference of huge numbers): R was indefinite beyond any
    jitter and every later sample was skipped. With the bound an outlier leaves R at most
    ``beta + (1 - beta) r_clip`` (5.95 at ``beta = 0.95``) times what it was, gone in about 35 steps; a sample
    within the bounds is stored bit for bit as before. Unlike KOALA's, the bound holds from the first step:
    ``R_0 = r0 I`` is a scale the user chose (the innovations of a classifier lie in [-1, 1]), not an arbitrary
    start. ``r_clip=None`` keeps only the lower bound (the paper's average, kept positive semi-definite).
    ``"moment"`` and ``"fixed"`` estimate nothing: the categorical variance is bounded by construction.
``variance_update``
    ``"fd"``: the variance-matching update above (the diagonal of the exact EKF update). ``"vd"``: precision
    matching (VD-EKF), ``1/p += diag(H^T R^-1 H)``, whose mean update uses the new ``p`` and ``R^-1``.
``p0``
    a number per param group, or ``"auto"``. With ``auto_scope="joint"``: at the first step with a non-zero
    Jacobian, one scalar for every ``"auto"`` group such that ``trace(H P0 H^T) = p0_scale * trace(R)``, the prior
    explains ``p0_scale`` times the observation noise (with LoRA's ``B = 0`` start, ``dh/dA = 0`` at step 0, so
    ``A`` gets the same scalar). With ``"group"`` (``"tensor"``): each of the U auto groups (tensors) gets its own
    scalar at its own first non-zero Jacobian, explaining ``p0_scale * trace(R) / U``; this adapts to groups whose
    derivatives differ by orders of magnitude (a fresh head next to LoRA factors).

``rank``
    ``0``: the diagonal filter above. ``k > 0`` (default 64): a low-rank-plus-diagonal **precision**
    :math:`\Sigma^{-1} = \Upsilon + W W^\top` (LoFi, Chang et al. 2023; :mod:`kalmanopt.optim.lofi`), with
    ``W`` of shape ``n x k`` over *all* trainable parameters jointly (so correlations across tensors and layers are
    kept), stored per parameter as ``upsilon`` (``p.shape``) and ``W`` (``(*p.shape, k)``). Per step: the time
    update (inflation, ``q``; exact in this form), the information :math:`H^\top R^{-1} H` appended to ``W``, the
    mean moved by the exact gain of that untruncated system (Woodbury, in ``k + m`` dimensions), then ``W`` cut back
    to its ``k`` leading directions (eigendecomposition of the ``(k+m) x (k+m)`` Gram matrix) with the dropped
    part's squared row norms added to ``Upsilon``, so the diagonal of the precision stays exact. It is
    precision-matching by construction: ``variance_update`` and ``p_min`` do not apply. With ``k >= n`` (or while
    the information gathered has rank ``<= k``) it is the exact EKF (:class:`kalmanopt.FullKalman`). Memory
    ``n (k + 1)``, time ``O(n (k + m)^2)`` per step. The prior of a tensor is ``Upsilon = 1 / p0``, ``W = 0``.

Predictive distribution: :meth:`LoKO.predictive` returns the linearised distribution of the logits,
:math:`\mathcal{N}(h, H P^- H^\top)` per sample, and class probabilities (probit, Laplace bridge, Monte Carlo);
every ``step`` with the logit observation stores that of the outputs it measured, before learning them, in
``opt.last_predictive`` (from the step's own Jacobian, no extra pass). It is calibrated online
(``calibrate=True`` stands for ``"temperature"``): the logits divided by a temperature and the covariance scaled,
the pair of :data:`PREDICTIVE_TEMPERATURES` x :data:`PREDICTIVE_SCALES` with the lowest cumulative Brier score on the
samples already seen (issue 22: LoKO's logits are under-confident, which no covariance scale can correct; ECE
0.121 -> 0.062 on digits_shift, 0.065 -> 0.039 on cv_mnist, 0.104 -> 0.028 on nlp_bbc_long, each with a lower
NLL, and lower on the three other benchmark streams too). ``calibrate="scale"`` keeps the earlier rule (the
covariance scale alone, by the cumulative NLL), ``calibrate=False`` the filter's own predictive.

Defaults: ``observation="softmax"`` with ``noise="moment"`` (the categorical variance), ``rank=64``,
``p0=0.1`` and ``trust=3``, chosen on four tuning streams whose Jacobian scales differ 400-fold (see
docs/algorithms.md, "Defaults and the evidence for them"). With the moment-matched R the filter is an online
natural-gradient (Gauss-Newton) method; the low-rank precision keeps the correlations the diagonal throws away
(accuracy rose monotonically with the rank on every stream); and the **trust region** bounds each step in function
space: after the update the same batch is run forward once more (no gradient), and if a logit moved by more than
``trust`` the mean step is shortened to move it by exactly ``trust`` (the covariance update is kept). Without it the
natural-gradient filter diverges on streams whose first steps are large, at any ``p0`` large enough to learn
quickly; with it the result is flat over ``p0`` from 0.03 to 1 on every stream. The second forward pass is run only
where it can matter (``trust_check="predicted"``): the step's own Jacobian predicts the change of the logits,
:math:`H_z \delta`, and a step predicted to move no logit by more than ``trust / 2`` is taken without it (2-20 % of
the steps on the benchmark streams ran it; ``"forward"`` runs it at every step, as before). ``forward_fn`` is
therefore called up to twice per step: it must be deterministic (eval mode, no dropout) and free of side effects.

Cost options (issue 22; each keeps the exact path): ``trust_check`` (above), ``truncation="whitened"`` (default;
LoFi's truncation from the matrix the mean update already has, one ``n (k + m)^2`` product less than LoFi's
``"gram"``) and ``classes=c`` (observe the softmax of the ``c`` most probable classes and the label, ``c + 2``
vector-Jacobian products instead of ``C``; off by default: it cost NLL on MNIST).

Everything inside one step runs in float64 for the ``m x m`` algebra and in the state dtype (float32 for 16/32-bit
parameters, float64 for float64 ones) for the ``O(n m)`` work.

Guards: the sample is skipped for non-finite outputs, Jacobian rows or innovation; for a finite input whose step
overflows the state dtype (``H P H^T`` of the measurement or of the logits, or one of LoFi's Gram matrices, not
finite; an automatic prior that is not a normal number; a new low-rank ``W`` whose Gram matrix the next step could
not form), e.g. an input scaled by 1e20 into a float32 model (into a float64 model it fits and is learned); and for
an ``S`` (or ``R`` for ``"vd"``) that stays non-positive-definite after two jitter retries. A skipped sample leaves
parameters, ``p`` (``upsilon``, ``W``), ``R`` and the calibration's sums bit-for-bit unchanged and
``skipped_steps`` counts it (a ``RuntimeWarning`` is issued for a failed factorisation). Since a skip leaves the
state as it was, no committed state may make every later sample fail: it is finite, usable in its dtype, and the R
estimate stays positive semi-definite and bounded (``r_clip``). Unlike the KOALA optimizers, LoKO synchronises with
the host inside ``step`` (it factorises a small matrix and branches).
"""

from __future__ import annotations

# The package's modules, each readable alone: observation (the measurement models), jacobian (the Jacobian rows),
# measurement_noise (R, its EMA estimate and the r_clip bound), predictive (the predictive distribution and its
# calibration), hyperparameters (their checks, shared with FullKalman), numerics (finiteness and Cholesky guards) and
# optimizer (the LoKO class); the low-rank algebra is the sibling kalmanopt.optim.lofi. Everything that loko.py
# defined is importable from here, private helpers included (tests and FullKalman use them).
from .hyperparameters import _SHARED, AUTO_SCOPES, VARIANCE_UPDATES, check_numbers, validate_shared  # noqa: F401
from .jacobian import _BATCHING_FAILED, JACOBIAN_MODES, jacobian_rows  # noqa: F401
from .measurement_noise import (  # noqa: F401
    NEGATIVE_TOLERANCE,
    NOISE_MODELS,
    bounded_noise_sample,
    noise_matrix,
    updated_noise_estimate,
)
from .numerics import all_finite, cholesky_with_jitter  # noqa: F401
from .observation import (  # noqa: F401
    OBSERVATIONS,
    class_subset,
    observe,
    one_hot_target,
    softmax_rows,
    subset_logit_covariance,
)
from .optimizer import (  # noqa: F401
    DEFAULT_CALIBRATION,
    TRUNCATIONS,
    TRUST_CHECKS,
    TRUST_MARGIN,
    LoKO,
    _auto_priors_fit,
    _Pending,
)
from .predictive import (  # noqa: F401
    CALIBRATIONS,
    PREDICTIVE_METHODS,
    PREDICTIVE_SCALES,
    PREDICTIVE_TEMPERATURES,
    Predictive,
    _best_scale,
    _diagonal_blocks,
    _scaled,
    predictive_probs,
    probit,
)

__all__ = ["LoKO", "Predictive", "predictive_probs", "OBSERVATIONS", "NOISE_MODELS", "VARIANCE_UPDATES",
           "PREDICTIVE_METHODS"]
