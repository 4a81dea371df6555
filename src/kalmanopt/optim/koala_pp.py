"""KOALA++: a Kalman filter that tracks the gradient-covariance product v_k = H_k P_{k-1} instead of P."""

from __future__ import annotations

import ctypes
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _docs, _koala_pp_fused, _koala_pp_op, _koala_pp_triton
from ._reductions import dots, squared_norms
from ._sharding import reduce_if
from .base import GradBucket, KalmanOptimizer, StateSpec, _check_number, _is_dtensor, narrowest_state_dtype, state_dtype
from .noise import R_CLIP, R_STATISTICS, loss_moments, loss_statistic

__all__ = ["BLOCKS", "LR_ADAPTATION", "PRESETS", "STATE_DTYPES", "KOALAPlusPlus", "koala_pp"]

BLOCKS = ("tensor", "group")
#: the storage dtypes of the per-element state: None (the compute dtype: float32, float64 for float64 parameters)
#: or bfloat16. float16 is not offered: the second moment (a squared gradient) underflows in its range.
STATE_DTYPES = (None, torch.bfloat16)


class _FromPreset:
    """The default of an argument that the ``preset`` decides."""

    def __repr__(self) -> str:
        return "<from preset>"


PRESET: Any = _FromPreset()

#: The default preset's ``lr_adaptation`` (kappa): the rate at which the step cap follows the hypergradient of the
#: step size, above ``lr`` (``lr_scale_min`` 1). BENCHMARKS.md, learning-rate sensitivity: 0.05, 0.1 and 0.2 compared.
LR_ADAPTATION = 0.2

#: The two configurations a user chooses between with ``preset=``; any argument given explicitly wins.
PRESETS: dict[str, dict[str, Any]] = {
    # The default: the paper's per-tensor blocks, a diagonal (Adam-like) metric for the prior and the process noise,
    # no measurement noise (R = 0), the step size min(loss_fraction * (loss - floor) / S, lr / q): the filter's own
    # (Polyak-type) step, capped so that no step exceeds AdamW's step of the same lr in the same metric; the
    # corrections averaged with momentum 0.9. Chosen on the development grid (docs/algorithms.md, BENCHMARKS.md).
    "adaptive": dict(lr=1e-3, r=0.0, block="tensor", precondition=True, momentum=0.9, loss_fraction=1.0,
                     max_step=None, loss_floor=0.0, r_clip=R_CLIP, lr_adaptation=LR_ADAPTATION),
    # Algorithm 1 of the paper with the reference code's defaults, bit for bit: per-tensor blocks, P0 = sigma I,
    # R an EMA of the per-sample squared loss, the step lr * loss / S (lr is the paper's eta, the fraction of the
    # loss each step asks to remove), no cap, no momentum, no floor under the loss.
    "paper": dict(lr=1.0, r=None, block="tensor", precondition=False, momentum=0.0, loss_fraction=None,
                  max_step=None, loss_floor=None, r_clip=None, lr_adaptation=None),
}

#: An ``lr`` at or above this with the AdamW-unit step rule is almost surely a KOALA++ lr of the old meaning (the
#: fraction of the loss, 0.1-2): warn, since it would now ask for steps 100-2000x AdamW's.
_OLD_LR_WARNING = 0.1


def step_rule(group: dict[str, Any]) -> tuple[Any, Any]:
    r"""The functional step rule ``(eta, max_step)`` of a param group: the step size is
    :math:`\eta\min(\ell/S, \gamma_{\max})` (:func:`koala_pp`).

    With ``loss_fraction`` :math:`\tau` (the default preset): :math:`\eta = \tau`, :math:`\gamma_{\max} =
    \mathrm{lr}/(Q\tau)`, i.e. :math:`\gamma = \min(\tau\ell/S, \mathrm{lr}/Q)`: where the gradient has
    decorrelated from the previous ones the correction is about :math:`\gamma Q D h`, so the cap is exactly AdamW's
    step of the same ``lr`` in the same metric. Without it (``preset="paper"``): :math:`\eta = \mathrm{lr}`, and
    ``max_step`` (None: no cap) is scaled by it, as in the paper's algorithm.
    This is the one place where a group's user-facing hyperparameters become the kernels' ``lr``/``max_step``.
    """
    fraction = group.get("loss_fraction")
    if fraction is None:
        return group["lr"], group.get("max_step")
    return fraction, group["lr"] / (group["q"] * fraction)


class KOALAPlusPlus(KalmanOptimizer):
    r"""KOALA++ (Xia, Davtyan, Favaro, NeurIPS 2025), with a default that needs no schedule.

    The filter never stores the covariance P: per tensor it keeps the previous gradient :math:`H_{k-1}`, the row
    vector :math:`v_{k-1} = H_{k-1}P_{k-2}` (as the gain numerator :math:`v + QH`) and three scalars. Within a
    *block* (``block="tensor"``: each tensor; ``block="group"``: all tensors of the param group with a gradient,
    i.e. the whole parameter vector of the paper's derivation) every dot product below runs over the block:

    .. math::
        \begin{aligned}
            &\textbf{input}: \text{lr}, \tau \text{ (loss\_fraction)}, \sigma, Q, R_k, \text{loss } L_k,
                \text{floor } L_* \text{ (loss\_floor)}, \text{weight decay } \lambda, \mu \text{ (momentum)},
                \beta_2, \epsilon \\
            &h_k = g_k + \lambda\theta_{k-1}, \quad
                \ell_k = L_k - L_* + \tfrac{\lambda}{2}\lVert\theta_{k-1}\rVert^2 \\
            &\log \rho_k = \operatorname{clip}\big(\log \rho_{k-1} + \kappa\cos(h_k, m_{k-1}),\
                [\log \rho_{\min}, \log 1000]\big) \quad (\kappa \text{ = lr\_adaptation}, \rho_{\min}
                \text{ = lr\_scale\_min, over the param group}; \rho_k = 1 \text{ without it}) \\
            &\textbf{if precondition}: s_k = \beta_2 s_{k-1} + (1-\beta_2) h_k^2,\;
                D_k = \big(\sqrt{s_k / (1-\beta_2^k)} + \epsilon\big)^{-1},\; h_k \gets D_k^{1/2} h_k
                \quad \text{(else } D_k = 1) \\
            &\textbf{if } k = 1: \; H_{k-1} \gets h_k,\; v_{k-1} \gets \sigma h_k,\;
                S_{k-1} \gets h_k\cdot v_{k-1} + Q\lVert h_k\rVert^2 + R_k
                \quad \text{(prior } P_0 = \sigma D) \\
            &\alpha_k = \frac{h_k\cdot H_{k-1}}{\lVert H_{k-1}\rVert^2}, \quad
             \lambda_k = \frac{h_k\cdot(v_{k-1} + Q H_{k-1})}{S_{k-1}} \\
            &w_k = \frac{(h_k\cdot v_{k-1})\lVert H_{k-1}\rVert^2
                  - (H_{k-1}\cdot v_{k-1})(h_k\cdot H_{k-1})}{\lVert H_{k-1}\rVert^4}
                  \quad (w_k = 0 \text{ if not symmetric}) \\
            &v_k = (\alpha_k - \lambda_k) v_{k-1} + Q(h_k - \lambda_k H_{k-1}) + w_k H_{k-1} \\
            &S_k = h_k\cdot v_k + Q\lVert h_k\rVert^2 + R_k \\
            &\gamma_k = \min\big(\tau\ell_k / S_k,\; \rho_k\,\text{lr}/Q\big)
                \;(\gamma_k = \text{lr}/Q \text{ if } \ell_k < 0), \quad
             c_k = \gamma_k\, D_k^{1/2} (v_k + Q h_k) \\
            &m_k = \mu m_{k-1} + (1-\mu) c_k, \quad \theta_k = \theta_{k-1} - m_k / (1 - \mu^k)
                \quad (\mu = 0: \theta_k = \theta_{k-1} - c_k)
        \end{aligned}

    With ``preset="paper"`` (no metric, R an average of the squared loss, :math:`\gamma_k = \eta\ell_k/S_k` with
    :math:`\eta` = ``lr``, no cap, no floor, no momentum) this is Algorithm 1 of the paper, bit for bit. The default,
    ``preset="adaptive"``, changes four things, each ablated on the development grid (docs/algorithms.md and
    BENCHMARKS.md give the evidence):

    * **a diagonal metric** :math:`D` (Adam's second moment): the prior :math:`\sigma D` and the process noise
      :math:`QD` are scaled per parameter, so that a tensor of small gradients is not starved (transformers).
    * **R = 0 and a step cap in AdamW's units** (SPS_max, ALI-G): a loss-free measurement, whose gain is bounded by
      the cap :math:`\gamma_k \le \mathrm{lr}/Q` instead. Where the gradient has decorrelated from the previous
      ones the correction is about :math:`\gamma_k Q D h`, so the capped step is AdamW's step of the same ``lr``
      in the same metric: ``lr`` is the number a user passes to AdamW (1e-3 from scratch, 2e-5 to 5e-5 for full
      fine-tuning, 1e-4 to 1e-3 for LoRA), and an LR schedule anneals it. Below the cap the filter sizes the step
      itself, :math:`\tau\ell/S` (asking each block to remove the fraction :math:`\tau` of the loss above its floor).
      The paper's R (an average of :math:`\ell^2`) makes the step shrink like :math:`1/\ell` early and grow like
      :math:`1/\ell` late; without a cap, R = 0 overshoots where the loss cannot reach 0 (language models).
    * **momentum** :math:`\mu = 0.9` on the corrections (as Adam's first moment, bias-corrected).
    * **a cap that rises above** ``lr`` **where the steps are too short** (``lr_adaptation`` :math:`\kappa = 0.2`,
      floor ``lr_scale_min`` 1): its multiplier :math:`\rho` grows while each gradient still points along the last
      update and comes back down to 1 when the steps overshoot, so that a too-small ``lr`` costs little.

    ``block="group"`` makes the whole param group one block (the paper's parameter vector): a step then asks to
    remove at most :math:`\eta\ell` in all; with the cap, per-tensor blocks did better on every task of the grid.

    It stores four floats per parameter (AdamW: two; ``preset="paper"``: two), or four bfloat16 numbers with
    ``state_dtype=torch.bfloat16``. A zero previous gradient, a member
    of a group block without history, or a non-positive :math:`S` restarts the block from its prior. The
    multi-tensor path gets :math:`h_k\cdot v_k` (hence :math:`S_k`) algebraically from the recursion before
    :math:`v_k` exists, so it needs one batched reduction and one element-wise pass. :meth:`diagnostics` returns
    the step size, S, :math:`h\cdot v` and :math:`\lVert h\rVert^2` of the last step without a host synchronisation.

    Args:
        params: iterable of parameters or of dicts defining param groups.
        lr (float, optional): the default preset: the largest step, in AdamW's units (default: 1e-3, AdamW's):
            pass the lr you would give ``torch.optim.AdamW`` for the task; the step is AdamW-sized where the filter's
            own step :math:`\tau\ell/S` is larger, smaller where the loss says so. ``preset="paper"`` (and any
            ``loss_fraction=None``): the paper's :math:`\eta`, the fraction of the loss each step asks the filter to
            remove (default: 1.0). Until kalmanopt 0.1 the default preset's ``lr`` had that meaning too: the old
            ``lr=X`` is ``lr=X * 1e-3`` now (a warning is raised for ``lr >= 0.1``).
        sigma (float, optional): prior variance :math:`P_0 = \sigma D`, used at a block's first step and on a
            restart (default: 0.1). With :math:`R = 0` (the default preset) the first update after the prior absorbs
            the measurement whatever :math:`\sigma` is (the gain is :math:`h/\lVert h\rVert^2`): it changes the
            step only through rounding; it matters with ``r > 0`` or ``r=None``.
        q (float, optional): process noise :math:`Q` (default: 0.1).
        symmetric (bool, optional): the symmetric minimum-norm closure (default) or the vanilla one
            (:math:`w_k = 0`).
        preset (str, optional): ``"adaptive"`` (default) or ``"paper"``; it sets ``r``, ``block``,
            ``precondition``, ``momentum``, ``max_step`` and ``r_clip`` unless they are given explicitly.
        block (str, optional): ``"tensor"`` (both presets) or ``"group"``.
        precondition (bool, optional): the diagonal metric :math:`D` (adaptive: on).
        beta2 (float, optional): decay of its second moment (default: 0.999).
        eps (float, optional): its :math:`\epsilon` (default: 1e-8).
        momentum (float, optional): :math:`\mu` (adaptive: 0.9, paper: 0).
        loss_fraction (float or None, optional): :math:`\tau`, the fraction of the loss above its floor each
            block's step asks to remove, below the cap (adaptive: 1.0). ``None`` (paper): the paper's step rule,
            :math:`\eta\ell/S` with :math:`\eta` = ``lr``.
        max_step (float or None, optional): with the paper's step rule only (``loss_fraction=None``): the cap
            :math:`\eta\,\gamma_{\max}` on the step size, scaled by ``lr`` (default: none). Giving it alone selects
            the paper's step rule (``lr`` is then :math:`\eta`, default 1.0).
        loss_floor (float or None, optional): :math:`L_*`, the lower bound of the loss the filter measures from
            (adaptive: 0, the bound of cross-entropy and squared errors; paper: none). A loss below it (a Gaussian
            NLL, an ELBO, a shifted loss) gives no distance to the optimum: that step is the capped, AdamW-sized
            step instead of an uphill one. Pass the known bound of your loss if it is not 0. One value for all
            param groups (the loss is one measurement).
        fused (bool, optional): the whole step in one fused kernel: one reduction pass and one element-wise
            pass per tensor. On CPU a C kernel (:mod:`kalmanopt.optim._koala_pp_fused`) for dense float32/float64
            parameters, built by a C compiler (about a second, once per machine, cached); on CUDA Triton kernels
            (:mod:`kalmanopt.optim._koala_pp_triton`) for dense float32/float64/bfloat16/float16 parameters, launched
            over all tensors at once. ``None`` (default): used when ``foreach`` is also ``None``,
            ``block="tensor"``, every hyperparameter is a Python number and the device's kernel is there; otherwise
            the multi-tensor path runs, with the same results up to rounding. ``True`` raises where no kernel can be
            used (DTensors, ``block="group"``, no compiler on CPU, no Triton on CUDA). ``update()`` and ``step()``
            both use it. Under ``torch.compile`` (``fullgraph=True`` too) the kernel runs as the custom operator
            ``torch.ops.kalmanopt.koala_pp_fused_step``, one opaque node of the graph, with the eager step's results
            bit for bit; as with ``torch.optim``, a float ``lr`` is a constant of the compiled graph (a scheduler's
            new value compiles again) and a tensor ``lr`` takes the multi-tensor path.
        lr_adaptation (float or None, optional): :math:`\kappa`, the rate at which the step cap follows its
            hypergradient (default preset: 0.2, :data:`LR_ADAPTATION`; ``preset="paper"``: None; ``None`` or 0: a
            fixed cap ``lr / q``). Each step moves
            the cap's multiplier :math:`s` by :math:`\log s \mathrel{+}= \kappa\cos(h_k, m_{k-1})`: up where the
            new gradient still points along the last update (the step was too short), down where it turned against
            it (the step overshot); :math:`s \in [\mathrm{lr\_scale\_min}, 1000]`, from 1 (see ``lr_scale_min``:
            by default the cap never falls below ``lr / q``). ``lr`` is then where the cap starts, and the result
            depends less on it (BENCHMARKS.md, learning-rate sensitivity). Needs the default step rule and momentum:
            a group that inherits the preset's value without them runs without it; asked for explicitly, a
            ``ValueError``. It runs on every path, the fused kernels
            included (their reduction pass reads the momentum buffer once more for the cosine, their scalar pass
            moves :math:`s`): it costs about 5 % of a step. :meth:`diagnostics` reports ``lr_scale``; the multiplier
            is group state (``lr_log_scale``), saved and resumed with the rest.
        lr_scale_min (float, optional): the smallest cap multiplier :math:`s` that ``lr_adaptation`` may reach, in
            (0, 1]: :math:`\log s` is clipped to :math:`[\log \mathrm{lr\_scale\_min}, \log 1000]` (default: 1,
            the cap never below ``lr / q``). With the default the filter raises the cap above ``lr`` where the steps
            are too short and brings it back to ``lr`` where they overshoot, never below: a multiplier free to fall
            (``lr_scale_min=1e-3``) drove the cap to 0.02-0.05x over 20 epochs of Fashion-MNIST (60k) and the run
            stalled at 88.7 % against 92.3 %; with the floor, 92.3 %. Only used with ``lr_adaptation``. The bound
            applies where :math:`s` moves (an accepted step): a multiplier below a raised floor (e.g. from a
            checkpoint saved before this option, which resumes with the floor 1) is lifted to it at the next one.
        length_bound (float or None, optional): :math:`L`, a bound on the length of each tensor's correction
            relative to AdamW's step at the same ``lr`` (default None: no bound). The cap bounds the step size
            :math:`\gamma`; the correction is :math:`\gamma D^{1/2}(v_k + Q\tilde h_k)`, and where successive
            gradients agree the covariance term :math:`v_k` lengthens it (on a MiniLM LoRA fine-tune to 1-2 times
            AdamW's step before momentum). With ``length_bound`` the cap is lowered, per tensor, so that
            :math:`\gamma\lVert v_k + Q\tilde h_k\rVert \le L\,s\,\mathrm{lr}\,\lVert\tilde h_k\rVert`: at
            :math:`L = 1` a step is never longer, in the metric, than AdamW's (before momentum) at ``lr`` (times
            ``lr_adaptation``'s multiplier). A trade-off, measured (docs/algorithms.md): at 10x the usual lr it
            holds the result (MiniLM LoRA on BBC News 93.1 % against 88.1 % without it), at the usual lr it costs
            0.2-0.6 points and 0.5 perplexity from scratch and 1.2 points on that LoRA task. Needs a capped step
            rule. It runs on the multi-tensor path only (it needs :math:`\lVert v + Q\tilde h\rVert`, which the
            fused kernels do not form): a group with it is not fused.
        state_dtype (torch.dtype or None, optional): how the four per-element state tensors (previous gradient,
            gain numerator, second moment, momentum buffer) are stored. ``None`` (default): in the compute dtype
            (float32, or float64 for float64 parameters). ``torch.bfloat16``: half the state memory and less memory
            traffic per step; each step widens the stored values exactly, computes in the compute dtype as before
            and rounds what it stores to nearest even (torch's conversion). The scalars stay in the compute dtype,
            and :math:`\lVert H\rVert^2`, :math:`H\cdot v` are kept for the rounded vectors. All three paths support
            it (the fused kernel has bfloat16 variants; it falls back to the multi-tensor path when param groups
            differ in it). A per-element relative rounding of at most :math:`2^{-9}`, not a change of the algorithm:
            docs/algorithms.md reports its measured effect on accuracy. Checkpoints keep the dtype; loading follows
            the loaded param groups' ``state_dtype`` (casting the saved state to it).
    """

    __doc__ = (__doc__ or "") + _docs.COMMON_ARGS + _docs.LOSS_PATHS + _docs.GUARDS + r"""
    Example:
        >>> import torch
        >>> from kalmanopt import KOALAPlusPlus
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = KOALAPlusPlus(model.parameters(), lr=1e-3)  # the lr you would give AdamW
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> losses = (model(x) - y).square().squeeze(1)
        >>> losses.mean().backward()
        >>> _ = opt.step(loss=losses)

    References:
        Xia, Davtyan, Favaro. "KOALA++: Efficient Kalman-Based Optimization of Neural Networks with
        Gradient-Covariance Products". NeurIPS 2025, arXiv:2506.04432.
    """

    def __init__(self, params, lr: Any = PRESET, sigma: Any = PRESET, q: float = 0.1, r: Any = PRESET,
                 alpha_r: float = 0.9, weight_decay: float = 0.0, symmetric: bool = True, *,
                 preset: str = "adaptive", block: Any = PRESET, precondition: Any = PRESET, beta2: float = 0.999,
                 eps: float = 1e-8, momentum: Any = PRESET, loss_fraction: Any = PRESET, max_step: Any = PRESET,
                 loss_floor: Any = PRESET, r_stat: str = "second_moment", r_clip: Any = PRESET,
                 foreach: bool | None = None, fused: bool | None = None, state_dtype: torch.dtype | None = None,
                 lr_adaptation: Any = PRESET, lr_scale_min: float = 1.0, length_bound: float | None = None,
                 process_group: Any = None) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
        chosen = dict(lr=lr, r=r, block=block, precondition=precondition, momentum=momentum,
                      loss_fraction=loss_fraction, max_step=max_step, loss_floor=loss_floor, r_clip=r_clip,
                      lr_adaptation=lr_adaptation)
        if loss_fraction is PRESET and max_step is not PRESET and max_step is not None:
            chosen["loss_fraction"] = None  # an explicit cap on lr * loss / S asks for the paper's step rule
        if chosen["loss_fraction"] is None and lr is PRESET:
            chosen["lr"] = PRESETS["paper"]["lr"]  # the paper's step rule: lr is its eta
        chosen = {k: PRESETS[preset][k] if v is PRESET else v for k, v in chosen.items()}
        if lr_adaptation is PRESET and (chosen["loss_fraction"] is None or not chosen["momentum"]):
            chosen["lr_adaptation"] = None  # the preset's adaptation, where the chosen step rule has no cap to adapt
        if sigma is not PRESET and chosen["r"] == 0:
            warnings.warn("KOALAPlusPlus: sigma (the prior P0 = sigma D) has no effect with r=0, the default preset's "
                          "R: the first update after the prior absorbs the loss whatever sigma is. It matters with "
                          "r > 0 or r=None", stacklevel=2)
        defaults = dict(sigma=0.1 if sigma is PRESET else sigma, q=q, alpha_r=alpha_r, weight_decay=weight_decay,
                        symmetric=symmetric, beta2=beta2, eps=eps, r_stat=r_stat, foreach=foreach, fused=fused,
                        state_dtype=state_dtype, lr_scale_min=lr_scale_min, length_bound=length_bound, **chosen)
        # A param group that inherits the preset's lr_adaptation but turns off what it needs (momentum, the capped
        # step rule) runs without it; one that asks for it explicitly gets the error.
        self._lr_adaptation_from_preset = lr_adaptation is PRESET
        super().__init__(params, defaults, process_group=process_group)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        _check_number("sigma", group["sigma"], 0.0, low_inclusive=False)
        _check_number("q", group["q"], 0.0)
        if group["q"] == 0 and group["r"] == 0:
            raise ValueError("q and r cannot both be 0: the innovation variance S would vanish")
        if not isinstance(group["symmetric"], bool):
            raise ValueError(f"Invalid symmetric: {group['symmetric']!r} (expected a bool)")
        if group["block"] not in BLOCKS:
            raise ValueError(f"Invalid block: {group['block']!r} (expected one of {BLOCKS})")
        if not isinstance(group["precondition"], bool):
            raise ValueError(f"Invalid precondition: {group['precondition']!r} (expected a bool)")
        _check_number("beta2", group["beta2"], 0.0, high=1.0, high_inclusive=False)
        _check_number("eps", group["eps"], 0.0, low_inclusive=False)
        _check_number("momentum", group["momentum"], 0.0, high=1.0, high_inclusive=False)
        _check_number("max_step", group["max_step"], 0.0, low_inclusive=False, optional=True)
        _check_number("loss_fraction", group.setdefault("loss_fraction", None), 0.0, low_inclusive=False,
                      optional=True)
        _check_number("loss_floor", group.setdefault("loss_floor", None), -math.inf, optional=True,
                      tensor_ok=False)
        if group["loss_floor"] != self.param_groups[0].get("loss_floor", group["loss_floor"]):
            raise ValueError(f"Invalid loss_floor: {group['loss_floor']!r}: the loss is one measurement shared by "
                             f"every param group, whose floor is {self.param_groups[0]['loss_floor']!r}")
        # The scalars the step stores per tensor (q, sigma * h.h, lr / q) must fit the narrowest state dtype: a value
        # beyond it would fail inside the step, after R was written.
        limit = torch.finfo(narrowest_state_dtype(group)).max
        for key in ("lr", "sigma", "q", "loss_fraction"):
            value = group.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > limit:
                raise ValueError(f"Invalid {key}: {value!r} (beyond the state dtype's range, {limit:.3g})")
        if group["loss_fraction"] is not None:
            # lr in AdamW's units: the cap lr / q on the step size (see step_rule)
            if group["max_step"] is not None:
                raise ValueError("max_step caps the paper's step lr * loss / S; with loss_fraction (the default "
                                 "preset) the cap is lr itself, in AdamW's units: pass loss_fraction=None to use "
                                 "max_step")
            if group["q"] == 0:
                raise ValueError("q = 0 with loss_fraction: the step cap lr / q (AdamW's step in the filter's "
                                 "metric) needs q > 0")
            lr = group["lr"]
            if not isinstance(lr, Tensor) and lr >= _OLD_LR_WARNING:
                warnings.warn(f"KOALAPlusPlus: lr={lr} asks for steps {lr / 1e-3:.0f}x AdamW's default. Since "
                              "kalmanopt 0.2 lr is in AdamW's units (default 1e-3: pass the lr you use with "
                              "AdamW); the old lr (the fraction of the loss a step removes) is loss_fraction, and "
                              "the old lr=X is lr=X*1e-3 now", stacklevel=4)
        rate = group.setdefault("lr_adaptation", None)
        _check_number("lr_adaptation", rate, 0.0, optional=True, tensor_ok=False)
        if rate == 0:
            rate = group["lr_adaptation"] = None  # a rate of 0: off (a fixed cap), without the cosine's reductions
        # the smallest cap multiplier; a group from before the option (e.g. a loaded checkpoint) gets the default
        _check_number("lr_scale_min", group.setdefault("lr_scale_min", 1.0), 0.0, low_inclusive=False, high=1.0,
                      tensor_ok=False)
        inherited = getattr(self, "_lr_adaptation_from_preset", False) and rate == self.defaults["lr_adaptation"]
        if rate is not None and inherited and (group["loss_fraction"] is None or not group["momentum"]):
            rate = group["lr_adaptation"] = None
        if rate is not None:
            if group["loss_fraction"] is None:
                raise ValueError("lr_adaptation adapts the step cap lr / q of the default step rule: it needs "
                                 "loss_fraction (the paper's step rule has no cap in AdamW's units)")
            if not group["momentum"]:
                raise ValueError("lr_adaptation measures the last update from the momentum buffer: it needs "
                                 "momentum > 0")
        bound = group.setdefault("length_bound", None)  # a group from before the option: none
        _check_number("length_bound", bound, 0.0, low_inclusive=False, optional=True, tensor_ok=False)
        if bound is not None and step_rule(group)[1] is None:
            raise ValueError("length_bound bounds the capped step (the default step rule, or max_step with the "
                             "paper's): this group's step has no cap")
        storage = group.setdefault("state_dtype", None)
        if storage not in STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {storage!r} (expected None, i.e. the parameter's dtype, or "
                             "torch.bfloat16)")
        fused = group.setdefault("fused", None)
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r} (expected None, True or False)")
        if fused:
            if group["foreach"]:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
            if group["block"] != "tensor":
                raise RuntimeError("fused=True supports block='tensor' only")
            if group["length_bound"] is not None:
                raise RuntimeError("fused=True: length_bound runs on the multi-tensor path only")
            _check_fusable(group["params"])

    def _init_param_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> None:
        kw = {"device": p.device, "dtype": state_dtype(p)}
        # The per-element tensors in state_dtype (bfloat16: widened on load, rounded on store); the scalars stay in
        # the compute dtype.
        per_element = {"device": p.device, "dtype": group.get("state_dtype") or kw["dtype"]}
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        st["prev_grad"] = torch.zeros(p.shape, **per_element)  # H_{k-1}; all zeros means "no previous gradient"
        # The gain numerator v_{k-1} + Q H_{k-1} = H_{k-1}(P_{k-2} + Q I), stored instead of v_{k-1} itself: the
        # parameter update is then a single multiply-add (v is recovered with the Q it was stored with).
        st["gain"] = torch.zeros(p.shape, **per_element)
        st["prev_q"] = torch.zeros((), **kw)
        st["prev_S"] = torch.zeros((), **kw)  # S_{k-1}
        st["prev_grad_sq"] = torch.zeros((), **kw)  # ||H_{k-1}||^2
        st["prev_grad_v"] = torch.zeros((), **kw)  # H_{k-1} . v_{k-1}
        if group.get("precondition"):
            st["exp_avg_sq"] = torch.zeros(p.shape, **per_element)  # the diagonal metric's second moment
        if group.get("momentum"):
            st["momentum_buffer"] = torch.zeros(p.shape, **per_element)  # the average of the corrections

    def _init_group_state(self, group: dict[str, Any], st: dict[str, Any], kw: dict[str, Any]) -> None:
        if group.get("lr_adaptation") is not None:
            st["lr_log_scale"] = _new_log_scale(kw["device"])

    def _expected_state(self, group: dict[str, Any], p: Tensor) -> StateSpec:
        # While loading, the loaded group's state_dtype decides (its hyperparameters replace this group's).
        loading = self.__dict__.get("_loading_state_dtypes")
        if loading is not None and id(group) in loading:
            group = {**group, "state_dtype": loading[id(group)]}
        return super()._expected_state(group, p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = [g.get("state_dtype") for g in state_dict["param_groups"]]
        for dtype in saved:
            if dtype not in STATE_DTYPES:
                raise ValueError(f"{type(self).__name__}.load_state_dict: invalid state_dtype {dtype!r}")
        self.__dict__["_loading_state_dtypes"] = {id(g): d for g, d in zip(self.param_groups, saved, strict=False)}
        try:
            super().load_state_dict(state_dict)
        finally:
            del self.__dict__["_loading_state_dtypes"]
        for group in self.param_groups:
            group.setdefault("state_dtype", None)  # a checkpoint from before the option
            group.setdefault("lr_scale_min", 1.0)  # from before the option: resumes with the floor 1
            group.setdefault("length_bound", None)  # from before the option: no bound

    def diagnostics(self) -> list[dict[str, Tensor]]:
        r"""What the filter did at the last step, per param group, as tensors (reading them never syncs ``step``).

        Each dict holds 1-d tensors with one entry per tensor that had a gradient (equal entries within a
        ``block="group"`` block): ``step_size`` (the possibly capped :math:`\eta\ell/S`), ``S``, ``h_dot_v``
        (:math:`h\cdot v`) and ``grad_sq`` (:math:`\lVert h\rVert^2`), in the filter's coordinates, plus the
        0-d ``noise`` (R) and ``loss``. An empty dict for a group that has not stepped.
        """
        recorded = self.__dict__.get("_diagnostics", {})
        return [_materialise(recorded.get(i, {})) for i in range(len(self.param_groups))]

    def _init_group(self, predict: bool) -> None:
        super()._init_group(predict)
        # The kernels built or imported (or not) before tracing: neither can be traced.
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if any(d.type == "cpu" and not _koala_pp_triton.wanted(d) for d in devices):
            _koala_pp_op.build()
        for device in devices:
            _koala_pp_triton.available(device)
        # What a compiled step records into (see _fused_step), with every group's key already there: the graph
        # guards on the keys it saw, which then do not change.
        recorded = self.__dict__.setdefault("_diagnostics", {})
        for index in range(len(self.param_groups)):
            recorded.setdefault(index, {})

    # ------------------------------------------------------------------ the fused path
    def _fused_group(self, group: dict[str, Any]) -> bool:
        """Whether this group's step may run on a fused kernel: ``fused=True``, or by default (``fused`` and
        ``foreach`` both None). :meth:`_fused_step` checks that the device's kernel is there (the C kernel on CPU,
        Triton on CUDA) and the tensors themselves, and falls back when they are not the kernel's."""
        fused = group.get("fused")
        if fused is False or group["block"] != "tensor" or group.get("length_bound") is not None:
            return False  # length_bound: the multi-tensor path only (it reads ||gain||^2, the kernels do not)
        return fused is not None or group["foreach"] is None

    # ------------------------------------------------------------------ the floor under the loss
    def _measure(self, measured: Tensor, hyper_ok: Tensor | None) -> Tensor | None:
        # The filter measures the loss above its floor (loss_floor, default 0: the lower bound of the usual losses).
        # With a floor of 0 the subtraction is exact (x - 0.0 == x): the same step, bit for bit. A loss below the
        # floor makes a negative residual, for which the step rule takes the capped step (koala_pp).
        floor = _loss_floor(self.param_groups)
        return self._measure_residual(measured if floor is None else measured - floor, hyper_ok)

    def _measure_given(self, loss_mean: Tensor, statistic: Tensor, hyper_ok: Tensor | None) -> Tensor | None:
        floor = _loss_floor(self.param_groups)
        return self._measure_given_residual(loss_mean if floor is None else loss_mean - floor, statistic, hyper_ok)

    def _measure_residual(self, measured: Tensor, hyper_ok: Tensor | None) -> Tensor | None:
        # The fused kernel takes the whole step when every group can (Python-number hyperparameters, CPU tensors);
        # otherwise the multi-tensor path does, with the same semantics. Under torch.compile the kernel runs as the
        # custom operator kalmanopt::koala_pp_fused_step, one opaque node of the graph.
        moments = self._all_reduce(loss_moments(measured))
        # Compiled and not distributed, the operator forms the moments itself, as this eager step does: inductor's
        # sum of the losses would round differently (unused, the traced moments are then dropped from the graph).
        loss = measured if torch.compiler.is_compiling() and not self._distributed() else None
        if hyper_ok is None and self._fused_step(moments, given=False, loss=loss):
            return None
        return self._measurement_update(moments[0] / moments[2],
                                        lambda group: loss_statistic(moments, group["r_stat"]), hyper_ok)

    def _measure_given_residual(self, loss_mean: Tensor, statistic: Tensor,
                                hyper_ok: Tensor | None) -> Tensor | None:
        if hyper_ok is None and self._fused_step(torch.stack([loss_mean, statistic.to(loss_mean)]), given=True):
            return None
        return super()._measure_given(loss_mean, statistic, hyper_ok)

    def _fused_step(self, measurement: Tensor, given: bool, loss: Tensor | None = None) -> bool:
        """The whole measurement update on the fused kernel; False (nothing done) where it cannot run.

        Same semantics as :meth:`KalmanOptimizer._measurement_update` followed by :func:`koala_pp`: every guard is
        checked before the first write, a skipped step only counts itself. The kernels read the loss and the state
        scalars where they lie (CPU memory for the C kernel, the device for the Triton kernels on CUDA): no
        synchronisation is involved.
        """
        groups = self.param_groups
        if not all(self._fused_group(g) for g in groups):
            return False
        compiling = torch.compiler.is_compiling()
        device = groups[0]["params"][0].device
        # CUDA: the Triton kernels; CPU: the C kernel (the Triton kernels under the interpreter for the tests, eagerly).
        triton = _koala_pp_triton.wanted(device) and not (compiling and device.type == "cpu")
        if not (_koala_pp_triton.available(device) if triton else device.type == "cpu" and _koala_pp_op.available()):
            return False
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if not (_cpu_scalar(grad_scale, device) and _cpu_scalar(found_inf, device)):
            return False
        if measurement.dtype not in _KINDS:
            return False
        if measurement.device != device:
            # update(mean, var) with Python numbers on a CUDA model: the measurement goes to the device without
            # waiting for it (pinned memory); anything else takes the multi-tensor path
            if not (triton and not compiling and measurement.device.type == "cpu" and device.type == "cuda"):
                return False
            measurement = measurement.pin_memory().to(device, non_blocking=True)
        if triton and not compiling:
            cached = self._fused_triton_cached(measurement, given, grad_scale, found_inf)
            if cached is not None:
                out, members, scales = cached
                self._record_fused(out, members, False, scales)
                return True
        measurement = measurement.contiguous()
        dtype, params, grads, numels, tensors, shared, first, hyper, members = None, [], [], [], [], [], [0], [], []
        scales: list[Tensor | None] = []  # each group's lr_log_scale (lr_adaptation), None where it does not adapt
        storage = None  # the per-element state's dtype: one kernel variant per call
        for group in groups:
            precondition, momentum, count = group["precondition"], bool(group["momentum"]), 0
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                compute = state_dtype(p) if triton else p.dtype  # the C kernel computes in the parameters' dtype
                if dtype is None:
                    dtype = compute
                if compute != dtype or grad.dtype != p.dtype or p.device != device or grad.device != device \
                        or not grad.is_contiguous() or not p.is_contiguous() or not _fusable_param(p, triton):
                    return False
                st = self.state[p]
                if "step" not in st:
                    st = self._init_state(group, p)
                if precondition and "exp_avg_sq" not in st:  # options switched on after the state was made
                    st["exp_avg_sq"] = torch.zeros_like(st["gain"])
                if momentum and "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(st["gain"])
                if storage is None:
                    storage = st["gain"].dtype
                if st["gain"].dtype != storage:  # e.g. groups of different state_dtype: the multi-tensor path
                    return False
                params.append(p)
                grads.append(grad)
                numels.append(p.numel())
                tensors += [st.get(key) for key in _STATE_KEYS]
                count += 1
            st = self._group_state(group)
            if "noise_updates" not in st:  # a checkpoint from before the counter: R has been measured
                st["noise_updates"] = torch.ones((), dtype=torch.int64, device=st["skipped_steps"].device)
            shared += [st["measurement_noise"], st["skipped_steps"], st["noise_updates"]]
            scales.append(_log_scale(st) if group.get("lr_adaptation") is not None else None)
            first.append(first[-1] + count)
            members.append(count)
            hyper += _hyper(group)
        if dtype is None:
            dtype = state_dtype(groups[0]["params"][0])
        storage = storage or dtype
        suffix = _koala_pp_op.SUFFIXES.get((dtype, storage))
        if suffix is None:
            return False
        n, n_groups = first[-1], len(groups)
        if triton and not compiling:
            out = _koala_pp_triton.fused_step(params, grads, tensors, shared, first, hyper, measurement, given,
                                              grad_scale, found_inf, self.__dict__.setdefault("_triton_cache", {}),
                                              scales)
            if out is None:
                return False
            self._remember_triton(params, tensors, shared, members, scales)
        elif compiling:
            kind = _koala_pp_op.GIVEN if given else _koala_pp_op.MOMENTS if loss is None else _koala_pp_op.LOSS
            out = self._fused_op(tensors, shared, params, grads, first, hyper,
                                 measurement if loss is None else loss, kind, grad_scale, found_inf, dtype, scales)
            if out is None:
                return False
        else:
            state_arrays = self._fused_plan(dtype, storage, tensors + shared + scales, numels, first)
            if state_arrays is None:
                return False
            work = self.__dict__.get("_fused_work")
            size = _koala_pp_op.SUMS * n + 2 * n_groups
            if work is None or len(work) < size:
                work = self.__dict__["_fused_work"] = (ctypes.c_double * size)()
            out = torch.empty(4 * n + n_groups + 1, dtype=dtype)
            group_arrays, first_array, tensor_arrays, numel_array = state_arrays
            _koala_pp_op.call_kernel(suffix, hyper, group_arrays, first_array, params, grads, tensor_arrays,
                                     numel_array, measurement, given, grad_scale, found_inf, work, out)
        self._record_fused(out, members, compiling, scales)
        return True

    def _record_fused(self, out: Tensor, members: list[int], compiling: bool, scales: list[Tensor | None]) -> None:
        """Where each group's diagnostics lie in the kernels' output buffer (see :meth:`diagnostics`), and its
        ``lr_log_scale`` with ``lr_adaptation`` (``lr_scale`` is formed from it when asked for: the value the step
        used, since nothing else writes it between steps)."""
        # Compiled: the dict _init_group made, changed in place (dynamo replays that after the graph; an attribute
        # store on an optimizer it drops).
        recorded = getattr(self, "_diagnostics", None) if compiling else self.__dict__.setdefault("_diagnostics", {})
        if recorded is not None:
            n, start = sum(members), 0
            for index, (count, scale) in enumerate(zip(members, scales, strict=True)):
                if count:
                    recorded[index] = (out, n, start, start + count, 4 * n + index, scale)
                else:  # a group without gradients now: the loss, and the multiplier with lr_adaptation
                    recorded[index] = {"loss": out[-1]} if scale is None else (out[-1], scale)
                start += count

    def _remember_triton(self, params: list[Tensor], tensors: list[Tensor | None], shared: list[Tensor],
                         members: list[int], scales: list[Tensor | None]) -> None:
        """What :meth:`_fused_triton_cached` checks at the next step to reuse this step's plan: every tensor the
        kernels read or write through a pointer, where it was found (its state dict and key) and its address."""
        plan = self.__dict__.get("_triton_cache", {}).get("plan")
        if plan is None:
            self.__dict__.pop("_triton_memo", None)
            return
        stepped = {id(p) for p in params}
        state, width = self.state, len(_STATE_KEYS)
        checks = []
        for i, p in enumerate(params):
            st = state[p]
            checks += [(st, key, value, value.data_ptr())
                       for key, value in zip(_STATE_KEYS, tensors[i * width:(i + 1) * width], strict=True)
                       if value is not None]
        for st, scale in zip((self._group_state(g) for g in self.param_groups), scales, strict=True):
            checks += [(st, key, st[key], st[key].data_ptr())
                       for key in ("measurement_noise", "skipped_steps", "noise_updates")]
            if scale is not None:
                checks.append((st, "lr_log_scale", scale, scale.data_ptr()))
        self.__dict__["_triton_memo"] = _TritonMemo(
            plan=plan, state=state, groups=[(g["params"], len(g["params"])) for g in
                                                                  self.param_groups],
            stepped=list(params), dtypes=[p.dtype for p in params], pointers=[p.data_ptr() for p in params],
            dicts=[state[p] for p in params],
            unstepped=[p for g in self.param_groups for p in g["params"] if id(p) not in stepped],
            checks=checks, members=list(members), scales=list(scales))

    def _fused_triton_cached(self, measurement: Tensor, given: bool, grad_scale: Tensor | None,
                             found_inf: Tensor | None) -> tuple[Tensor, list[int], list] | None:
        """The Triton step on the last step's plan when nothing it was made from changed, checked in one pass: the
        same parameters have gradients (of their dtype, dense, contiguous, on the plan's device), the same state
        tensors sit where they were, at the same addresses, and the kernels' options are the same. The common case,
        without the per-step list building and checks of :meth:`_fused_step` (which would cost the host more time
        than the device spends on the step). None: something changed; :meth:`_fused_step` rebuilds the plan.
        Returns the diagnostics buffer, the number of stepped tensors per group and their ``lr_log_scale``."""
        memo = self.__dict__.get("_triton_memo")
        cache = self.__dict__.get("_triton_cache")
        if memo is None or cache is None or cache.get("plan") is not memo.plan or self.state is not memo.state:
            return None
        groups = self.param_groups
        if len(groups) != len(memo.groups) or any(
                g["params"] is not params or len(params) != count
                for g, (params, count) in zip(groups, memo.groups, strict=True)):
            return None
        hyper = [x for g in groups for x in _hyper(g)]
        if _koala_pp_triton.options_of(hyper) != memo.plan.options:
            return None
        device, state, grads = memo.plan.device, self.state, []
        for p, dtype, pointer, st in zip(memo.stepped, memo.dtypes, memo.pointers, memo.dicts, strict=True):
            g = p.grad
            if g is None or g.dtype != dtype or g.is_sparse or not g.is_contiguous() or g.device != device \
                    or p.data_ptr() != pointer or state.get(p) is not st:
                return None
            grads.append(g)
        if any(p.grad is not None for p in memo.unstepped):
            return None
        for st, key, value, pointer in memo.checks:
            found = st.get(key)
            if found is not value or found.data_ptr() != pointer:
                return None
        out = _koala_pp_triton.planned_step(memo.plan, grads, hyper, measurement, given, grad_scale, found_inf,
                                            cache)
        return out, memo.members, memo.scales

    @staticmethod
    def _fused_op(tensors: list[Tensor | None], shared: list[Tensor], params: list[Tensor], grads: list[Tensor],
                  first: list[int], hyper: list[float], measurement: Tensor, kind: int, grad_scale: Tensor | None,
                  found_inf: Tensor | None, dtype: torch.dtype, scales: list[Tensor | None]) -> Tensor | None:
        """The compiled step's call of the kernel: the custom operator, which dynamo and inductor do not trace.

        The operator checks every tensor it writes through when it runs; here, while tracing, what the eager
        path's plan declines without raising is declined too (R or a counter of another dtype: None).
        """
        n_groups, width = len(first) - 1, len(_STATE_KEYS)
        if any(t.dtype != want for t, want in zip(shared, [dtype, torch.int64, torch.int64] * n_groups, strict=True)):
            return None
        scales = [t for t in scales if t is not None]  # the op's layout: the adapting groups' log scales
        if any(t.dtype != torch.float32 or t.numel() != 1 for t in scales):
            return None
        state = []  # each tensor's state, the optional buffers only where its group uses them (the op's layout)
        for j in range(n_groups):
            flags = int(hyper[_koala_pp_op.NHP * j + _koala_pp_op.HP_FLAGS])
            for i in range(first[j], first[j + 1]):
                state += [t for t, key in zip(tensors[i * width:(i + 1) * width], _STATE_KEYS, strict=True)
                          if _koala_pp_op.uses(key, flags)]
        return _koala_pp_op.fused_step(params, grads, state + scales + shared, first, hyper, measurement, kind,
                                       grad_scale, found_inf)

    def _fused_plan(self, dtype: torch.dtype, storage: torch.dtype, tensors: list[Tensor | None], numels: list[int],
                    first: list[int]) -> tuple | None:
        """The kernel's pointer arrays for the state tensors, checked once and reused while nothing changed.

        ``tensors`` holds each stepped parameter's state (``_STATE_KEYS``; the per-element tensors in ``storage``,
        the scalars in ``dtype``), then each group's R and counters, then each group's ``lr_log_scale`` (None where
        it does not adapt). The
        arrays are rebuilt, and every tensor checked (dtype, CPU, contiguous, size: the kernel writes through these
        pointers), whenever a tensor, its storage, a size or the set of stepped parameters differs from last time.
        None where a group's state is not the kernel's (e.g. R of another dtype).
        """
        pointers = [None if t is None else t.data_ptr() for t in tensors]
        plan = self.__dict__.get("_fused_cache")
        if plan is not None and plan[0] == (dtype, storage) and plan[2] == pointers and plan[3] == numels \
                and plan[4] == first and all(a is b for a, b in zip(plan[1], tensors, strict=True)):
            return plan[5]
        self.__dict__.pop("_fused_cache", None)
        n, width = len(numels), len(_STATE_KEYS)
        for i, numel in enumerate(numels):
            for k, key in enumerate(_STATE_KEYS):
                _check_state(tensors[i * width + k], key, dtype, storage, numel)
        n_groups = len(first) - 1
        for j in range(n_groups):
            noise, skipped, updates = tensors[n * width + 3 * j:n * width + 3 * j + 3]
            if noise.dtype != dtype or noise.device.type != "cpu" or noise.numel() != 1:
                return None
            for counter in (skipped, updates):
                if counter.dtype != torch.int64 or counter.device.type != "cpu" or counter.numel() != 1:
                    return None
            scale = tensors[n * width + 3 * n_groups + j]
            if scale is not None and (scale.dtype != torch.float32 or scale.device.type != "cpu"
                                      or scale.numel() != 1):
                return None
        columns = [[pointers[i * width + k] for i in range(n)] for k in range(width)]
        groups = [[pointers[n * width + 3 * j + k] for j in range(n_groups)] for k in range(3)]
        groups.append(pointers[n * width + 3 * n_groups:])
        array = _koala_pp_op._array
        arrays = ([array(c) for c in groups], array(first, ctypes.c_int32), [array(c) for c in columns],
                  array(numels, ctypes.c_int64))
        self.__dict__["_fused_cache"] = ((dtype, storage), tensors, pointers, list(numels), list(first), arrays)
        return arrays

    def _correct_group(self, group: dict[str, Any], group_state: dict[str, Any], buckets: list[GradBucket],
                       loss_mean: Tensor, noise: Tensor, ok: Tensor) -> None:
        recorded, index = {}, self._group_index(group)
        eta, max_step = step_rule(group)
        for b in buckets:
            for st in b.states:  # options switched on after the state was made
                if group["precondition"] and "exp_avg_sq" not in st:
                    st["exp_avg_sq"] = torch.zeros_like(st["gain"])
                if group["momentum"] and "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(st["gain"])
        if group.get("lr_adaptation") is not None:
            scale = _adapt_lr_scale(group_state, buckets, group["lr_adaptation"], group.get("lr_scale_min", 1.0), ok)
            max_step = max_step * scale
            recorded["lr_scale"] = scale
        for b in buckets:
            diag = koala_pp(
                b.params, b.h,
                [st["prev_grad"] for st in b.states], [st["gain"] for st in b.states],
                [st["prev_S"] for st in b.states], [st["prev_grad_sq"] for st in b.states],
                [st["prev_grad_v"] for st in b.states], [st["prev_q"] for st in b.states],
                [st["step"] for st in b.states],
                layer_loss=b.layer_loss(loss_mean, group["weight_decay"]),
                loss=loss_mean.to(b.device, b.grad_sq.dtype),
                noise=noise.to(b.device, b.grad_sq.dtype), ok=ok.to(b.device),
                lr=eta, sigma=group["sigma"], q=group["q"], symmetric=group["symmetric"],
                foreach=self._use_foreach(group), grad_sq=b.grad_sq, shard_sum=b.shard_sum,
                block=group["block"],
                exp_avg_sqs=[st["exp_avg_sq"] for st in b.states] if group["precondition"] else None,
                beta2=group["beta2"], eps=group["eps"],
                momentum_buffers=[st["momentum_buffer"] for st in b.states] if group["momentum"] else None,
                momentum=group["momentum"], max_step=max_step, length_bound=group.get("length_bound"),
                scratch=self._scratch_views(b, index=index),
            )
            for key, value in diag.items():
                recorded[key] = value if key == "noise" or key not in recorded else torch.cat([recorded[key], value])
        if not torch.compiler.is_compiling():
            recorded["loss"] = loss_mean
            self.__dict__.setdefault("_diagnostics", {})[index] = recorded

    def _group_index(self, group: dict[str, Any]) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    def _scratch_views(self, bucket: GradBucket, index: int) -> Callable[[str], list[Tensor]]:
        """Reusable full-size temporaries for the kernel, as views shaped like the bucket's (local) tensors."""
        sizes = [h.numel() for h in bucket.h]
        dtype, device = bucket.h[0].dtype, bucket.h[0].device

        def views(name: str) -> list[Tensor]:
            flat = self._scratch((index, name, device, dtype, id(bucket.shard_sum)), sum(sizes), dtype, device)
            return [chunk.view(h.shape) for chunk, h in zip(flat.split(sizes), bucket.h, strict=True)]

        return views


LR_SCALE_BOUND = 1000.0  # lr_adaptation keeps the cap within [lr * lr_scale_min, lr * 1000]


def _new_log_scale(device: torch.device) -> Tensor:
    """``lr_adaptation``'s state: the log of the cap multiplier, a 0-d float32 (ample for a value within +-7 moved by
    steps of about 1e-3; and torch.compile drops in-place writes to 0-d float64 CPU state, measured with torch 2.13)."""
    return torch.zeros((), dtype=torch.float32, device=device)


def _log_scale(group_state: dict[str, Any]) -> Tensor:
    """The group's ``lr_log_scale``, made (at 0, the multiplier 1) where the option was switched on after the group
    state was made."""
    if "lr_log_scale" not in group_state:
        group_state["lr_log_scale"] = _new_log_scale(group_state["measurement_noise"].device)
    return group_state["lr_log_scale"]


def _adapt_lr_scale(group_state: dict[str, Any], buckets: list[GradBucket], rate: float, scale_min: float,
                    ok: Tensor) -> Tensor:
    r"""``lr_adaptation``: move the group's cap multiplier :math:`s_k` along the hypergradient of the step size.

    The derivative of the new minibatch loss with respect to the size of the last update
    :math:`\Delta_{k-1} = \theta_{k-1} - \theta_{k-2}` is :math:`h_k\cdot\Delta_{k-1}` (up to the size); with
    momentum :math:`\Delta_{k-1} = -m_{k-1}/(1-\mu^{k-1})`, so its normalised form is
    :math:`c_k = \cos(h_k, m_{k-1})`: positive where the loss still falls along the last step (it was too short),
    negative where it overshot. :math:`\log s_k = \operatorname{clip}(\log s_{k-1} + \kappa c_k,
    [\log s_{\min}, \log 1000])` with :math:`s_{\min}` = ``scale_min`` (``lr_scale_min``; Baydin et al. 2018,
    multiplicative and normalised), and the cap is :math:`s_k\,\mathrm{lr}/Q`. One cosine over
    the whole group (all its tensors, all shards); a skipped step, a first step (no momentum yet) or a non-finite
    cosine leaves :math:`s` as it was. Returns :math:`s_k` (0-d, on the leader's device).

    The fused kernels (``koala_pp_step.c``, ``koala_pp_triton.py``) compute the same: :math:`h\cdot m`,
    :math:`\lVert h\rVert^2` (of :math:`h` before the metric, as here) and :math:`\lVert m\rVert^2` per tensor in
    their reduction pass, rounded to the compute dtype and summed over the group in float64 in their scalar pass.
    """
    log_scale = _log_scale(group_state)
    wide = _scalar_dtype(log_scale)  # the sums and the cosine
    totals = torch.zeros(3, dtype=wide, device=log_scale.device)  # h.m, ||h||^2, ||m||^2 over the group
    for b in buckets:
        # in the compute dtype (a bfloat16 momentum buffer widened to it), one batched reduction each; summed wide
        ms = [st["momentum_buffer"].to(h.dtype) for st, h in zip(b.states, b.h, strict=True)]
        sums = torch.stack([dots(b.h, ms), squared_norms(b.h), squared_norms(ms)], dim=1).to(wide).sum(0)
        if b.shard_sum is not None:  # local shards: the bucket's three sums over all shards, one all-reduce
            sums = b.shard_sum(sums)
        totals = totals + sums.to(log_scale.device)
    dot, hh, mm = totals.unbind()
    cosine = dot / (hh * mm).sqrt()
    # the lower bound as the kernels read it: the same double, log(lr_scale_min), from _hyper
    moved = (log_scale.to(wide) + rate * cosine).clamp(math.log(scale_min), math.log(LR_SCALE_BOUND))
    valid = ok.to(log_scale.device) & (hh > 0) & (mm > 0) & torch.isfinite(cosine)
    log_scale.copy_(torch.where(valid, moved, log_scale.to(wide)))
    return _lr_scale(log_scale)


def _lr_scale(log_scale: Tensor) -> Tensor:
    """The cap multiplier s from the stored ``lr_log_scale``, in the scalar dtype (the fused kernels form the same
    value from the same float32)."""
    return log_scale.to(_scalar_dtype(log_scale)).exp()


def koala_pp(params: list[Tensor], hs: list[Tensor], prev_grads: list[Tensor], gains: list[Tensor],
             prev_S: list[Tensor], prev_grad_sq: list[Tensor], prev_grad_v: list[Tensor], prev_q: list[Tensor],
             steps: list[Tensor], *,
             layer_loss: Tensor, noise: Tensor, ok: Tensor, lr: float, sigma: float, q: float, symmetric: bool,
             foreach: bool, grad_sq: Tensor | None = None, shard_sum: Callable[[Tensor], Tensor] | None = None,
             loss: Tensor | None = None, block: str = "tensor", exp_avg_sqs: list[Tensor] | None = None,
             beta2: float = 0.999, eps: float = 1e-8, momentum_buffers: list[Tensor] | None = None,
             momentum: float = 0.0, max_step: float | None = None, length_bound: float | None = None,
             scratch: Callable[[str], list[Tensor]] | None = None) -> dict[str, Tensor]:
    r"""Functional KOALA++ measurement update. See :class:`KOALAPlusPlus`.

    ``hs`` are the effective gradients (state dtype, contiguous, finite); ``gains`` hold ``v + prev_q * H_prev``
    (in the preconditioned coordinates when ``exp_avg_sqs`` is given); ``layer_loss`` the per-tensor residuals (1-d),
    ``loss`` the 0-d loss they share (needed for ``block="group"``), ``noise`` the 0-d R, ``ok`` a 0-d bool that, when
    False, leaves every tensor untouched. ``grad_sq`` (1-d, optional) are the squared norms of ``hs`` if already known
    (unused when preconditioning). ``shard_sum`` sums per-tensor partial reductions over shards when the tensors are
    local shards (multi-tensor path only). ``exp_avg_sqs`` (with ``beta2``, ``eps``) turn on the diagonal metric,
    ``momentum_buffers`` (with ``momentum``) the averaging of the corrections, ``max_step`` the cap on the step size,
    ``length_bound`` :math:`L` (with ``max_step``) lowers that cap so that the correction is no longer than :math:`L`
    times the capped step along the gradient alone: :math:`\gamma\lVert v + Qh\rVert \le L\,\gamma_{\max} Q
    \lVert h\rVert` (per block, in the filter's coordinates).
    ``scratch(name)`` (multi-tensor path, optional) returns reusable buffers shaped like ``params``; without it the
    path allocates them. With the metric, the multi-tensor path overwrites ``hs`` with :math:`D^{1/2}h`.

    Returns the step's diagnostics: 1-d tensors with one entry per tensor (all equal within a group block):
    ``step_size`` (the possibly capped :math:`\eta\ell/S`), ``S``, ``h_dot_v`` (:math:`h\cdot v`) and ``grad_sq``
    (:math:`\lVert h\rVert^2`, in the filter's coordinates), plus the 0-d ``noise``.
    """
    if block not in BLOCKS:
        raise ValueError(f"unknown block {block!r}; expected one of {BLOCKS}")
    if block == "group" and loss is None:
        raise ValueError("block='group' needs the 0-d loss")
    if hs and any(xs is not None and any(x.dtype != hs[0].dtype for x in xs)
                  for xs in (prev_grads, gains, exp_avg_sqs, momentum_buffers)):
        # Per-element state stored narrower than the compute dtype (state_dtype=torch.bfloat16): the step runs on
        # widened copies, exactly as on state of the compute dtype, and what it wrote is rounded back to the
        # storage dtype (torch's conversion: to nearest, ties to even). A tensor left alone round-trips exactly.
        stored = [prev_grads, gains, exp_avg_sqs, momentum_buffers]
        wide = [None if xs is None else [x.to(hs[0].dtype) for x in xs] for xs in stored]
        steps_before = torch.stack(steps)
        diag = koala_pp(params, hs, wide[0], wide[1], prev_S, prev_grad_sq, prev_grad_v, prev_q, steps,
                        layer_loss=layer_loss, noise=noise, ok=ok, lr=lr, sigma=sigma, q=q, symmetric=symmetric,
                        foreach=foreach, grad_sq=grad_sq, shard_sum=shard_sum, loss=loss, block=block,
                        exp_avg_sqs=wide[2], beta2=beta2, eps=eps, momentum_buffers=wide[3], momentum=momentum,
                        max_step=max_step, length_bound=length_bound, scratch=scratch)
        for narrow, widened in zip(stored, wide, strict=True):
            if narrow is not None:
                for x, y in zip(narrow, widened, strict=True):
                    x.copy_(y)
        # ||H||^2 and H.v (v = gain - q H) of the rounded vectors the next step reads, not of the unrounded ones:
        # the multi-tensor path and the fused kernel take them from these scalars, the reference from the vectors.
        committed = torch.stack(steps) != steps_before
        H = [x.to(hs[0].dtype).view(-1) for x in prev_grads]
        sums = torch.stack([torch.stack([x.dot(x) for x in H]),
                            torch.stack([x.dot(y.to(x.dtype).view(-1)) for x, y in zip(H, gains, strict=True)])])
        if shard_sum is not None:
            sums = shard_sum(sums)
        for i in range(len(steps)):
            prev_grad_sq[i].copy_(torch.where(committed[i], sums[0, i], prev_grad_sq[i]))
            prev_grad_v[i].copy_(torch.where(committed[i], sums[1, i] - prev_q[i] * sums[0, i], prev_grad_v[i]))
        return diag
    kwargs = dict(layer_loss=layer_loss, noise=noise, ok=ok, lr=lr, sigma=sigma, q=q, symmetric=symmetric,
                  loss=loss, block=block, exp_avg_sqs=exp_avg_sqs, beta2=beta2, eps=eps,
                  momentum_buffers=momentum_buffers, momentum=momentum, max_step=max_step, length_bound=length_bound)
    if foreach:
        return _multi_tensor_koala_pp(params, hs, prev_grads, gains, prev_S, prev_grad_sq, prev_grad_v, prev_q,
                                      steps, grad_sq=grad_sq, shard_sum=shard_sum, scratch=scratch, **kwargs)
    if shard_sum is not None:
        raise ValueError("sharded tensors need the multi-tensor path: foreach=True")
    return _single_tensor_koala_pp(params, hs, prev_grads, gains, prev_S, prev_grad_sq, prev_grad_v, prev_q, steps,
                                   **kwargs)


def _scalar_dtype(like: Tensor) -> torch.dtype:
    """The dtype of the filter's scalar algebra: float64 on CPU and CUDA (as the fused kernel), else ``like``'s.

    The dot products are formed in the compute dtype; what follows from them (alpha, lambda, w, S, the step size,
    the bias corrections) cancels: ``alpha - lambda`` and the numerator of ``w`` lose digits, ``1 - beta2 ** k``
    loses three of float32's seven at beta2 = 0.999, and ``||H||^4`` underflows float32 (to subnormals below
    ``||H||^2 = 1e-19``, to 0 below 4e-23, which left such a tensor uncorrected). In float32 that put the multi-tensor
    path about 1e-5 (relative) from the kernel in the scalar state; in float64 the paths differ by the order in which
    their dot products are summed only. The results are rounded to the compute dtype where they are stored or
    multiply a tensor. (MPS and other devices without float64 keep the compute dtype.)
    """
    return torch.float64 if like.device.type in ("cpu", "cuda") else like.dtype


def _fits(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Elementwise: ``x`` is finite once rounded to ``dtype`` (where it is stored, or multiplies a tensor)."""
    return torch.isfinite(x.to(dtype))


def _innovation(h: Tensor, H_prev: Tensor, v_prev: Tensor, S_prev: Tensor, *, q: float, noise: Tensor,
                symmetric: bool) -> tuple[Tensor, Tensor]:
    """Algorithm 1 of the paper on flat vectors: returns v_k and S_k (the scalars in :func:`_scalar_dtype`)."""
    wide = _scalar_dtype(h)
    prev_sq, h_dot_prev = H_prev.dot(H_prev).to(wide), h.dot(H_prev).to(wide)
    alpha = h_dot_prev / prev_sq
    lam = h.dot(v_prev + q * H_prev).to(wide) / S_prev.to(wide)
    if symmetric:
        w = (h.dot(v_prev).to(wide) * prev_sq - H_prev.dot(v_prev).to(wide) * h_dot_prev) / prev_sq.square()
    else:
        w = torch.zeros_like(alpha)
    a, lam, w = (alpha - lam).to(h.dtype), lam.to(h.dtype), w.to(h.dtype)
    v = a * v_prev + q * (h - lam * H_prev) + w * H_prev
    S = h.dot(v).to(wide) + q * h.dot(h).to(wide) + noise.to(wide)
    return v, S


def _metric_root(h: Tensor, exp_avg_sq: Tensor, step: Tensor, beta2: float, eps: float) -> tuple[Tensor, Tensor]:
    r"""The updated second moment and :math:`D^{1/2} = (\sqrt{\hat s} + \epsilon)^{-1/2}` (Adam's bias correction)."""
    new_sq = exp_avg_sq * beta2 + (1 - beta2) * h * h
    correction = (1 - beta2 ** (step.to(_scalar_dtype(h)) + 1)).to(h.dtype)
    return new_sq, ((new_sq / correction).sqrt() + eps).rsqrt()


def _single_tensor_koala_pp(params, hs, prev_grads, gains, prev_S, prev_grad_sq, prev_grad_v, prev_q, steps, *,
                            layer_loss, noise, ok, lr, sigma, q, symmetric, loss, block, exp_avg_sqs, beta2, eps,
                            momentum_buffers, momentum, max_step, length_bound=None) -> dict[str, Tensor]:
    """The readable reference: each block (one tensor, or every tensor of the group with a gradient) is the flat
    concatenation of its tensors, filtered by :func:`_innovation` exactly as a single tensor would be."""
    n = len(params)
    # The filter's coordinates: h itself, or D^{1/2} h with the diagonal metric.
    roots, new_sqs, ht = [None] * n, [None] * n, []
    for i in range(n):
        h = hs[i].reshape(-1)
        if exp_avg_sqs is not None:
            new_sqs[i], roots[i] = _metric_root(h, exp_avg_sqs[i].view(-1), steps[i], beta2, eps)
            h = h * roots[i]
        ht.append(h)
    blocks = [[i] for i in range(n)] if block == "tensor" else [list(range(n))]
    diag = {k: torch.zeros(n, dtype=noise.dtype, device=noise.device) for k in ("step_size", "S", "h_dot_v",
                                                                               "grad_sq")}
    for members in blocks:
        # In a group block, tensors without a gradient now (h = 0) sit out: their history is masked out of the sums.
        active = {i: ht[i].dot(ht[i]) > 0 if block == "group" else torch.ones((), dtype=torch.bool, device=ht[i].device)
                  for i in members}  # on the tensors' device: the flags meet them in torch.where

        def cat(xs: list[Tensor], members: list[int] = members, active: dict = active) -> Tensor:
            return torch.cat([xs[i] * active[i].to(xs[i].dtype) for i in members])

        h = cat(ht)
        H_prev = cat([prev_grads[i].view(-1) for i in range(n)])
        v_prev = cat([gains[i].view(-1) - prev_q[i] * prev_grads[i].view(-1) for i in range(n)])
        # The block's previous S; a member without history, or members last corrected apart, restart the block.
        prev = torch.stack([prev_S[i] for i in members])
        on = torch.stack([active[i] for i in members])
        S_prev = torch.where(on, prev, torch.full_like(prev, torch.finfo(prev.dtype).max)).min()
        fresh = (on & (torch.stack([prev_grad_sq[i] for i in members]) <= 0)).any()
        mixed = S_prev != torch.where(on, prev, torch.full_like(prev, -torch.finfo(prev.dtype).max)).max()
        hh = h.dot(h)
        wide = _scalar_dtype(h)
        v, S = _innovation(h, H_prev, v_prev, S_prev, q=q, noise=noise, symmetric=symmetric)
        # The prior: pretend the same gradient was seen before under P0 = sigma * I.
        v0, S0 = _innovation(h, h, sigma * h, (sigma + q) * hh.to(wide) + noise.to(wide), q=q, noise=noise,
                             symmetric=symmetric)
        use_prior = fresh | mixed | ~(S_prev > 0) | ~(S > 0) | ~_fits(S, h.dtype) | ~torch.isfinite(v).all()
        v = torch.where(use_prior, v0, v)
        S = torch.where(use_prior, S0, S)

        residual = layer_loss[members[0]] if block == "tensor" else \
            loss + sum(active[i].to(loss.dtype) * (layer_loss[i] - loss) for i in members)  # L + wd/2 sum ||th||^2
        residual = residual.to(wide)
        block_commit = ok & (hh > 0) & (S > 0) & _fits(S, h.dtype)
        gain = v + q * h
        step_size = lr * residual / S
        if max_step is not None:
            cap = lr * max_step * torch.ones_like(step_size)
            if length_bound is not None:  # the correction no longer than L times the capped step along h alone
                cap = cap * _length_factor(length_bound, q * q * hh.to(wide) / gain.dot(gain).to(wide))
            step_size = torch.minimum(step_size, cap)  # the cap follows lr (a schedule)
            # A loss below its floor says nothing of the distance to the optimum: the capped step, not an uphill one.
            step_size = torch.where(residual < 0, cap, step_size)
        offset = 0
        for i in members:
            size = ht[i].numel()
            gain_i, v_i = gain[offset : offset + size], v[offset : offset + size]
            offset += size
            param, shape = params[i], params[i].shape
            # A step size that overflows the compute dtype (a huge loss over a tiny S) would write inf: the tensor is
            # left alone, as for a non-finite S.
            commit = block_commit & active[i] & _fits(step_size, h.dtype)
            correction = step_size.to(h.dtype) * (gain_i if roots[i] is None else roots[i] * gain_i)
            if momentum_buffers is not None:
                new_buf = momentum * momentum_buffers[i].view(-1) + (1 - momentum) * correction
                correction = new_buf / (1 - momentum ** (steps[i].to(wide) + 1)).to(new_buf.dtype)
                momentum_buffers[i].copy_(torch.where(commit, new_buf, momentum_buffers[i].view(-1)).view(shape))
            new_param = param.to(h.dtype) - correction.view(shape)
            param.copy_(torch.where(commit, new_param, param.to(h.dtype)))
            if exp_avg_sqs is not None:
                exp_avg_sqs[i].copy_(torch.where(commit, new_sqs[i], exp_avg_sqs[i].view(-1)).view(shape))
            gains[i].copy_(torch.where(commit, gain_i, gains[i].view(-1)).view(gains[i].shape))
            prev_q[i].copy_(torch.where(commit, torch.full_like(prev_q[i], q), prev_q[i]))
            prev_grads[i].copy_(torch.where(commit, ht[i], prev_grads[i].view(-1)).view(prev_grads[i].shape))
            prev_S[i].copy_(torch.where(commit, S, prev_S[i]))
            prev_grad_sq[i].copy_(torch.where(commit, ht[i].dot(ht[i]), prev_grad_sq[i]))
            prev_grad_v[i].copy_(torch.where(commit, ht[i].dot(v_i), prev_grad_v[i]))
            steps[i].add_(commit.to(steps[i].dtype))
            diag["step_size"][i], diag["S"][i], diag["h_dot_v"][i], diag["grad_sq"][i] = step_size, S, h.dot(v), hh
    diag["noise"] = noise
    return diag


def _length_factor(bound: float, ratio_sq: Tensor) -> Tensor:
    r"""``length_bound``'s factor on the cap: :math:`\min(1, L\sqrt{Q^2\lVert h\rVert^2 / \lVert v + Qh\rVert^2})`
    from ``ratio_sq`` (the squared ratio), 1 where that is not a finite number (a zero gain, whose step moves
    nothing)."""
    factor = (bound * ratio_sq.sqrt()).clamp(max=1.0)
    return torch.where(torch.isfinite(factor), factor, torch.ones_like(factor))


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
                           layer_loss, noise, ok, lr, sigma, q, symmetric, loss, block, exp_avg_sqs, beta2, eps,
                           momentum_buffers, momentum, max_step, length_bound=None, grad_sq=None, shard_sum=None,
                           scratch=None) -> dict[str, Tensor]:
    # Full-size temporaries live in reusable buffers: a fresh allocation of tens of MB is page-faulted on every step
    # on CPU, which cost more than the arithmetic (see KalmanOptimizer._scratch).
    buffer = scratch or (lambda name: [torch.empty_like(h) for h in hs])
    dtype, wide = hs[0].dtype, _scalar_dtype(hs[0])  # the compute dtype, and that of the scalar algebra
    step_prev = torch.stack(steps).to(wide)
    roots = new_sqs = None
    if exp_avg_sqs is not None:
        # The diagonal metric: the new second moments (committed at the end) and D^{1/2}; the filter then works on
        # h~ = D^{1/2} h, written over hs (the bucket's own buffer, not needed as h after this point).
        new_sqs, roots = buffer("exp_avg_sq"), buffer("metric_root")
        torch._foreach_copy_(new_sqs, exp_avg_sqs)
        torch._foreach_mul_(new_sqs, beta2)
        torch._foreach_addcmul_(new_sqs, hs, hs, value=1 - beta2)
        # A finite h whose square overflows makes ||h||^2 infinite, and the step is skipped; but the masked commit
        # below (a lerp of weight 0: s + 0 * (new - s)) would compute through the infinite second moment and write
        # NaN. Clamped at the largest finite number, every value that can reach a masked write is finite; a
        # committed step is unchanged (there every h_i^2 <= ||h||^2 is finite, and so is new_sq).
        torch._foreach_clamp_max_(new_sqs, torch.finfo(dtype).max)
        corrections = (1 - beta2 ** (step_prev + 1)).to(dtype)
        torch._foreach_copy_(roots, new_sqs)
        torch._foreach_div_(roots, list(corrections.unbind(0)))
        torch._foreach_sqrt_(roots)
        torch._foreach_add_(roots, eps)
        torch._foreach_rsqrt_(roots)
        torch._foreach_mul_(hs, roots)
        grad_sq = None
    # One batched reduction pass: h.H_prev and h.gain_prev for every tensor; h.v_prev follows.
    h_dot_prev, h_dot_gain = reduce_if(shard_sum, dots(hs, prev_grads), dots(hs, gains))
    if grad_sq is None:
        grad_sq = squared_norms(hs)
        if shard_sum is not None:
            grad_sq = shard_sum(grad_sq)
    # From here on the scalars are in the wide dtype (see _scalar_dtype); the reductions and the stored scalars are
    # exact in it, and what is stored or multiplies a tensor is rounded back to the compute dtype.
    h_dot_prev, h_dot_gain, grad_sq = h_dot_prev.to(wide), h_dot_gain.to(wide), grad_sq.to(wide)
    stored_S, stored_sq, stored_dot_v, q_prev = (torch.stack(xs).to(wide)
                                                 for xs in (prev_S, prev_grad_sq, prev_grad_v, prev_q))
    S_prev, prev_sq, prev_dot_v = stored_S, stored_sq, stored_dot_v  # per tensor; summed below for a group block
    noise_given, noise, layer_loss = noise, noise.to(wide), layer_loss.to(wide)
    h_dot_v = h_dot_gain - q_prev * h_dot_prev
    own_hh, own_h_dot_v, own_h_dot_prev = grad_sq, h_dot_v, h_dot_prev  # per tensor, before any block sum
    hh, residual = grad_sq, layer_loss

    restart = prev_sq <= 0
    if block == "group":
        # One block: every sum runs over the tensors that have a gradient now (zero-gradient tensors sit out).
        active = hh > 0
        total = lambda x: torch.where(active, x, torch.zeros_like(x)).sum().expand_as(x)  # noqa: E731
        hh, h_dot_prev, h_dot_v = total(hh), total(h_dot_prev), total(h_dot_v)
        prev_sq, prev_dot_v = total(prev_sq), total(prev_dot_v)
        residual = loss.to(layer_loss) + total(layer_loss - loss.to(layer_loss))
        # S_prev is the block's; members last corrected apart (or without history) restart the block.
        big = torch.finfo(S_prev.dtype).max
        low = torch.where(active, S_prev, torch.full_like(S_prev, big)).min()
        high = torch.where(active, S_prev, torch.full_like(S_prev, -big)).max()
        restart = (total(restart.to(hh.dtype)) > 0) | (low != high)
        S_prev = low.expand_as(S_prev)

    normal = _coefficients(hh, h_dot_prev, h_dot_v, prev_sq, prev_dot_v, S_prev, q=q, noise=noise,
                           symmetric=symmetric)
    # Prior restart: H_prev := h, v_prev := sigma * h, so v_k is a multiple of h.
    prior = _coefficients(hh, hh, sigma * hh, hh, sigma * hh, (sigma + q) * hh + noise, q=q, noise=noise,
                          symmetric=symmetric)
    use_prior = restart | ~(S_prev > 0) | ~(normal.S > 0) | ~_fits(normal.S, dtype) \
        | ~_fits(normal.a, dtype) | ~_fits(normal.c, dtype)
    zero, one = torch.zeros_like(hh), torch.ones_like(hh)
    a = torch.where(use_prior, zero, normal.a)
    b = torch.where(use_prior, prior.a * sigma + prior.b + prior.c, normal.b)
    c = torch.where(use_prior, zero, normal.c)
    S = torch.where(use_prior, prior.S, normal.S)
    h_dot_v_new = torch.where(use_prior, prior.h_dot_v, normal.h_dot_v)
    # Each tensor's own h_i . v_i for the next step, from the same coefficients (v = a v_prev + b h + c H_prev).
    own_h_dot_v_new = h_dot_v_new if block == "tensor" else a * own_h_dot_v + b * own_hh + c * own_h_dot_prev

    # The same update on the stored gain numerator: with v_prev = gain_prev - q_prev * H_prev,
    # gain = v + q h = a gain_prev + (c - a q_prev) H_prev + (b + q) h.
    c = c - a * q_prev
    b = b + q
    # Masking by coefficients (not by torch.where on tensors) keeps it one pass. A tensor that is not committed
    # gets gain * 1 + H * 0 + h * 0, theta + m * 0 (or + gain * 0), m * 1 + 0 and lerps of weight 0 (old + 0 * (new -
    # old)); each is its old value exactly (up to the sign of a zero) because every operand it multiplies by 0 is
    # finite: hs (sanitised by the caller, then scaled by a finite D^1/2), new_sqs (clamped above), the committed
    # state, and the lerps' differences (new_sqs and s lie in [0, max]; committed |H| <= ||H|| <= sqrt(max), so
    # h - H cannot overflow). Every scalar coefficient is selected by torch.where, never multiplied by the mask.
    commit = ok & (hh > 0) & (S > 0) & _fits(S, dtype)
    if block == "group":
        commit = commit & (own_hh > 0)
    step_size = lr * residual / S
    if max_step is not None:
        cap = lr * max_step * one
        if length_bound is not None:  # the correction no longer than L times the capped step along h alone
            gain_sq = squared_norms(gains)  # ||gain_prev||^2: the new gain's norm follows from the coefficients
            if shard_sum is not None:
                gain_sq = shard_sum(gain_sq)
            # gain = a gain_prev + c H_prev + b h, each tensor's inner products of the three (gain_prev . H_prev =
            # H_prev . v_prev + q_prev ||H_prev||^2); a group block sums them over its members.
            own = (a * a * gain_sq.to(wide) + c * c * stored_sq + b * b * own_hh
                   + 2 * a * c * (stored_dot_v + q_prev * stored_sq) + 2 * a * b * h_dot_gain
                   + 2 * c * b * own_h_dot_prev)
            new_gain_sq = total(own) if block == "group" else own
            cap = cap * _length_factor(length_bound, q * q * hh / new_gain_sq.clamp(min=0))
        step_size = torch.minimum(step_size, cap)  # the cap follows lr (a schedule)
        # A loss below its floor says nothing of the distance to the optimum: the capped step, not an uphill one.
        step_size = torch.where(residual < 0, cap, step_size)
    # A step size that overflows the compute dtype (a huge loss over a tiny S) would write inf: the tensor is left
    # alone, as for a non-finite S.
    commit = commit & _fits(step_size, dtype)
    # The coefficients rounded to the compute dtype, as the kernel rounds them.
    a = torch.where(commit, a, one).to(dtype)
    b = torch.where(commit, b, zero).to(dtype)
    c = torch.where(commit, c, zero).to(dtype)
    weight = commit.to(dtype)

    # One element-wise pass over the gain, theta and H_prev.
    torch._foreach_mul_(gains, a.unbind(0))
    torch._foreach_addcmul_(gains, prev_grads, c.unbind(0))
    torch._foreach_addcmul_(gains, hs, b.unbind(0))
    if roots is None and momentum_buffers is None:
        torch._foreach_addcmul_(params, gains, torch.where(commit, -step_size, zero).to(dtype).unbind(0))
    else:
        # The correction in parameter coordinates, step * D^{1/2} * gain~ (in the metric's buffer, no longer needed),
        # averaged over steps with momentum (the buffer holds the bias-uncorrected average, as Adam's first moment).
        if roots is None:
            roots = buffer("metric_root")
            torch._foreach_copy_(roots, gains)
        else:
            torch._foreach_mul_(roots, gains)
        if momentum_buffers is None:
            torch._foreach_addcmul_(params, roots, torch.where(commit, -step_size, zero).to(dtype).unbind(0))
        else:
            scale = torch.where(commit, (1 - momentum) * step_size, zero).to(dtype)
            torch._foreach_mul_(roots, scale.unbind(0))
            decay = torch.where(commit, torch.full_like(hh, momentum), one).to(dtype)
            torch._foreach_mul_(momentum_buffers, decay.unbind(0))
            torch._foreach_add_(momentum_buffers, roots)
            unbias = torch.where(commit, -1 / (1 - momentum ** (step_prev + 1)), zero).to(dtype)
            torch._foreach_addcmul_(params, momentum_buffers, unbias.unbind(0))
        if exp_avg_sqs is not None:
            torch._foreach_lerp_(exp_avg_sqs, new_sqs, list(weight.unbind(0)))
    torch._foreach_lerp_(prev_grads, hs, list(weight.unbind(0)))

    # The scalar state, rounded to the compute dtype (a tensor left alone round-trips exactly).
    torch._foreach_copy_(prev_S, torch.where(commit, S, stored_S).to(dtype).unbind(0))
    torch._foreach_copy_(prev_grad_sq, torch.where(commit, own_hh, stored_sq).to(dtype).unbind(0))
    torch._foreach_copy_(prev_grad_v, torch.where(commit, own_h_dot_v_new, stored_dot_v).to(dtype).unbind(0))
    torch._foreach_copy_(prev_q, torch.where(commit, torch.full_like(q_prev, q), q_prev).to(dtype).unbind(0))
    torch._foreach_add_(steps, commit.to(torch.float32).unbind(0))
    return {"step_size": step_size.to(dtype), "S": S.to(dtype), "h_dot_v": h_dot_v_new.to(dtype),
            "grad_sq": hh.to(dtype), "noise": noise_given}


# ---------------------------------------------------------------------------------------------- fused-path helpers
_KINDS = _koala_pp_op.KINDS  # the kernel's measurement kinds: moments (+2: mean, statistic)
# per-tensor state, in the kernel's argument order; None where the option is off
_STATE_KEYS = _koala_pp_op.STATE_KEYS
_FLAGS = {"symmetric": 1, "precondition": 2, "momentum": 4}
_R_STATS = {name: code for code, name in enumerate(R_STATISTICS)}


def _loss_floor(groups: list[dict[str, Any]]) -> float | None:
    """The floor the measured loss is taken above: one measurement serves every group, so they must agree."""
    floors = {g.get("loss_floor") for g in groups}
    if len(floors) != 1:
        raise ValueError(f"KOALAPlusPlus: param groups disagree on loss_floor ({sorted(floors, key=str)}): the loss is "
                         "one measurement shared by every group")
    return floors.pop()


def _fusable_param(p: Tensor, triton: bool = False) -> bool:
    """A parameter the C kernel (dense float32/float64 on CPU) or the Triton kernels (``triton``: dense float32,
    float64, bfloat16 or float16) can step."""
    if p.is_sparse or _is_dtensor(p):
        return False
    return p.dtype in _koala_pp_triton.PARAM_DTYPES if triton else p.device.type == "cpu" and p.dtype in _KINDS


def _check_fusable(params: list[Tensor]) -> None:
    """``fused=True``: every parameter must be one its device's kernel can step, and that kernel there (else
    RuntimeError, at construction)."""
    for p in params:
        triton = _koala_pp_triton.wanted(p.device)
        if not _fusable_param(p, triton):
            what = "dense float32, float64, bfloat16 or float16 CUDA" if triton else "dense float32 or float64 CPU"
            raise RuntimeError(f"fused=True needs {what} parameters (not DTensors), got {type(p).__name__} of "
                               f"{p.dtype} on {p.device}")
        if triton and not _koala_pp_triton.available(p.device):
            reason = _koala_pp_triton.unavailable_reason(p.device)
            raise RuntimeError(f"fused=True: the Triton kernels are not available ({reason})")
        if not triton and _koala_pp_fused.load() is None:
            reason = _koala_pp_fused.unavailable_reason()
            raise RuntimeError(f"fused=True: the fused kernel is not available ({reason})")


def _cpu_scalar(t: Tensor | None, device: torch.device) -> bool:
    """A GradScaler scale / found-inf flag the kernels can read: a float32 tensor of one element on the parameters'
    device (or none)."""
    return t is None or (t.device == device and t.dtype == torch.float32 and t.numel() == 1)


def _check_state(value: Tensor | None, key: str, dtype: torch.dtype, storage: torch.dtype, numel: int) -> None:
    """One state tensor is what the kernel reads and writes through its pointer (else ValueError)."""
    if value is None:
        return
    per_element = key in ("prev_grad", "gain", "exp_avg_sq", "momentum_buffer")
    want = torch.float32 if key == "step" else storage if per_element else dtype
    size = numel if per_element else 1
    if value.dtype != want or value.device.type != "cpu" or not value.is_contiguous() or value.numel() != size:
        raise ValueError(f"KOALAPlusPlus: state {key!r} is {value.dtype} of {value.numel()} elements on "
                         f"{value.device}, the step needs a contiguous {want} CPU tensor of {size}")


def _hyper(group: dict[str, Any]) -> list[float]:
    """A group's hyperparameters in the kernel's layout (KOALA_NHP doubles)."""
    flags = sum(bit for key, bit in _FLAGS.items() if group[key])
    (eta, max_step), r, r_clip = step_rule(group), group["r"], group["r_clip"]
    flags |= (8 if r is not None else 0) | (16 if max_step is not None else 0) | (32 if r_clip is not None else 0)
    rate = group.get("lr_adaptation")
    flags |= _koala_pp_op.F_LR_ADAPTATION if rate is not None else 0
    return [float(eta), float(group["sigma"]), float(group["q"]), float(group["weight_decay"]),
            float(group["beta2"]), float(group["eps"]), float(group["momentum"]), float(max_step or 0.0),
            float(r or 0.0), float(group["alpha_r"]), float(r_clip or 0.0), float(flags),
            float(_R_STATS[group["r_stat"]]), float(rate or 0.0), math.log(group.get("lr_scale_min", 1.0))]


class _TritonMemo(NamedTuple):
    """What the Triton plan was made from (see :meth:`KOALAPlusPlus._remember_triton`)."""

    plan: Any
    state: Any
    groups: list
    stepped: list
    dtypes: list
    pointers: list
    dicts: list
    unstepped: list
    checks: list
    members: list
    scales: list


def _materialise(recorded: Any) -> dict[str, Tensor]:
    """A group's diagnostics as :meth:`KOALAPlusPlus.diagnostics` returns them (the fused path records the kernel's
    output buffer and where the group's entries lie in it, and the group's ``lr_log_scale`` with ``lr_adaptation``)."""
    if isinstance(recorded, dict):
        return dict(recorded)
    if len(recorded) == 2:  # a group without gradients at that step, with lr_adaptation
        loss, log_scale = recorded
        return {"lr_scale": _lr_scale(log_scale), "loss": loss}
    out, n, start, end, noise, log_scale = recorded
    found = {"step_size": out[start:end], "S": out[n + start:n + end], "h_dot_v": out[2 * n + start:2 * n + end],
             "grad_sq": out[3 * n + start:3 * n + end], "noise": out[noise], "loss": out[-1]}
    if log_scale is not None:
        found["lr_scale"] = _lr_scale(log_scale)
    return found
