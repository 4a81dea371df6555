"""The :class:`LoKO` optimizer: the filter's state, its step (diagonal or low-rank), trust region and predictive.

The algorithm is described in :mod:`kalmanopt.optim.loko`; the pieces it is built from live in the sibling modules
(observation models, Jacobian rows, measurement noise, predictive, hyperparameter checks) and in
:mod:`kalmanopt.optim.lofi` (the low-rank-plus-diagonal algebra).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import lofi
from ..base import StateSpec, _check_number, load_state_keep_dtypes, state_dtype
from ..noise import R_CLIP
from .hyperparameters import AUTO_SCOPES, VARIANCE_UPDATES, check_numbers, validate_shared
from .jacobian import jacobian_rows
from .measurement_noise import categorical_covariance, noise_matrix, updated_noise_estimate
from .numerics import all_finite, cholesky_with_jitter
from .observation import class_subset, observe, softmax_rows, subset_logit_covariance
from .predictive import (
    CALIBRATION_STATE,
    CALIBRATIONS,
    PREDICTIVE_METHODS,
    Predictive,
    _best_scale,
    _candidates,
    _diagonal_blocks,
    _scaled,
    calibrated,
    calibration_candidate,
    predictive_probs,
)

__all__ = ["DEFAULT_CALIBRATION", "LoKO", "TRUST_CHECKS", "TRUST_MARGIN", "TRUNCATIONS"]

# The rule ``calibrate=True`` (the default) stands for; ``"scale"`` was the default before (issue 22: lower NLL and
# ECE on digits_shift, cv_mnist and nlp_bbc_long, docs/benchmarks/research/loko_calibration.md).
DEFAULT_CALIBRATION = "temperature"


def _calibration(group: dict[str, Any]) -> str | None:
    """The calibration rule of a param group: one of :data:`CALIBRATIONS`, or None (``calibrate=False``)."""
    rule = group["calibrate"]
    if rule is False:
        return None
    return DEFAULT_CALIBRATION if rule is True else rule


# How the trust region learns how far a step moved the logits: "forward" runs the model once more (exact),
# "predicted" reads the linearised change H_z delta off the step's own Jacobian and runs the forward only when that
# exceeds TRUST_MARGIN * trust, "linear" never runs it (the bound is applied to the linearised change).
TRUST_CHECKS = ("forward", "predicted", "linear")
TRUST_MARGIN = 0.5
# LoFi's rank truncation (see kalmanopt.optim.lofi.update): "gram" (the leading singular directions of W~, LoFi's),
# "whitened" (those of Upsilon^{-1/2} W~, from the Gram matrix the update already has: one n (k + m)^2 product less).
TRUNCATIONS = ("gram", "whitened")


@dataclass
class _Pending:
    """A computed step not yet written: the parameter moves and the closure that writes the filter's state."""

    moves: list[tuple[Tensor, Tensor]]
    state: Callable[[], None]
    logit_cov: Tensor | None = None  # (b, c, c) prior H_z P^- H_z^T, where the step computed it on the way
    logit_change: Tensor | None = None  # H_z delta of the measured logits, where the step computed it on the way

    def commit(self) -> None:
        for p, d in self.moves:  # empty when the trust region already moved the parameters
            p.add_(d)
        self.moves = []
        self.state()


@dataclass
class _JointState:
    """LoKO's low-rank state of every trainable tensor in one pair of buffers (``rank > 0``).

    ``upsilon`` ``(n,)`` and ``W`` ``(n, k)`` are LoFi's joint precision, the trainable tensors' rows stacked in
    parameter order; each tensor's ``state["upsilon"]`` and ``state["W"]`` *are* the views ``upsilon_views[i]``,
    ``W_views[i]`` of its rows. A step then hands the buffers to LoFi as they are and writes the new precision with
    two copies, instead of stacking and splitting the per-tensor state every step (the stacking took 75 us per step
    on cv_mnist and 130 us on nlp_bbc_long, 6 us now). Not in the state dict (which holds the views, i.e. the same
    numbers); after anything replaces a state tensor (``load_state_dict``, an assignment, a parameter set that
    changed) the views are no longer the state and the next commit joins the state into fresh buffers
    (:meth:`LoKO._join_state`).
    """

    params: tuple[Tensor, ...]
    upsilon: Tensor
    W: Tensor
    upsilon_views: tuple[Tensor, ...]
    W_views: tuple[Tensor, ...]


def _auto_priors_fit(pairs: list[tuple[dict[str, Any], Tensor]], init: list[float | None]) -> bool:
    """Whether every automatic prior variance this step would set is, with its inverse (the precision that
    ``rank > 0`` stores), a normal number of its tensor's state dtype.

    The automatic prior is ``p0_scale tr(R) / tr(H H^T)``: an input scaled by 1e20 into a float32 model makes
    ``tr(H H^T)`` ~1e40, beyond float32, and the prior ~1e-40, subnormal (its inverse overflows). Such a step
    overflows the state dtype and is skipped, as the other overflows are, rather than fixing a prior of 1e-40.
    """
    for (g, p), value in zip(pairs, init, strict=True):
        if value is None or g["p0"] != "auto":
            continue
        info = torch.finfo(state_dtype(p))
        if not (info.tiny <= value <= info.max and info.tiny <= 1.0 / value <= info.max):
            return False
    return True


class LoKO(Optimizer):
    r"""LoKO: an extended Kalman filter over a model's outputs for online fine-tuning (Abdi et al., 2024), with a
    low-rank-plus-diagonal precision (default) or a diagonal covariance.

    Call it with the model's outputs, not a loss::

        opt = LoKO(model.parameters())         # or kalmanopt.integrations.peft.wrap(model, LoraConfig(...))
        for x, y in stream:
            logits = opt.step(lambda: model(x), y)   # logits *before* the update: predict, then learn

    Args:
        params: iterable of parameters or of dicts defining param groups (only ``requires_grad`` ones are filtered).
        p0 (float or "auto"): prior variance per param group, or ``"auto"`` (see module docs). Default 0.1.
        r0 (float): fixed (``"fixed"``) or initial (``"ema"``) observation noise scale, ``R = r0 I``. Default 1.
        beta (float): EMA coefficient of R for ``noise="ema"``/``"ema_diag"``. Default 0.95.
        observation (str): ``"softmax"`` (default), ``"logits"`` or ``"loss"``.
        q (float): process noise added to the covariance before every step (per group). Default 0.
        noise (str or None): ``"moment"`` (the categorical variance, softmax only), ``"fixed"``, ``"ema"`` (the
            paper's adaptive estimate) or ``"ema_diag"``. Default None: ``"moment"`` with the softmax
            observation, ``"fixed"`` otherwise.
        variance_update (str): ``"fd"`` (variance matching, default) or ``"vd"`` (precision matching); the
            diagonal filter (``rank=0``) only.
        r_min (float): floor added to R, keeps S positive definite. Default 1e-3.
        p_min (float): floor of ``p`` after the ``"fd"`` update. Default 1e-12.
        inflation (float): multiplicative inflation ``p <- (1 + inflation) p`` before every step. Default 0.
        p0_scale (float): the constant of ``p0="auto"``. Default 1.
        auto_scope (str): ``"joint"`` (one scalar for all ``"auto"`` groups, default), ``"group"`` or ``"tensor"``
            (one scalar per group / per tensor, each explaining an equal share; see ``_initial_variances``).
        jacobian (str): ``"vmap"`` (default; ``torch.func.vmap``), ``"batched"`` (PyTorch's legacy batched
            backward) or ``"loop"``; see :func:`jacobian_rows`.
        rank (int): ``k > 0`` (default 64): a low-rank-plus-diagonal precision with ``k`` columns over all
            trainable parameters (LoFi; memory ``n (k + 1)``); ``0``: the diagonal covariance. Shared by every
            group. On the CPU the step's ``n (k + m)`` temporaries are kept between steps (about
            ``4 n (k + m)`` numbers, not in the state dict; see :func:`kalmanopt.optim.lofi.workspace_buffer`):
            writing them afresh cost 4-6 ms of page faults per step at ``n = 14,213``.
        trust (float): the trust region on the logits: the largest change of a logit of the measured batch one
            step may cause (one extra forward pass per step; ``0`` turns it off). Default 3.
        calibrate (bool or str): calibrate the linearised predictive online, prequentially (each prediction by
            the candidate with the lowest cumulative score on the samples already seen; see
            :func:`~kalmanopt.optim.loko.predictive.calibrated`). ``"temperature"`` (what ``True``, the default,
            stands for): the mean divided by a temperature :math:`T \in` ``PREDICTIVE_TEMPERATURES`` (1/2 to 2) and
            the covariance scaled by :math:`s \in` ``PREDICTIVE_SCALES`` (:math:`2^{-j}`, ``j <= 10``, and 0, the
            plug-in), the pair with the lowest cumulative Brier score; LoKO's logits are often under-confident,
            which only a temperature below 1 corrects. ``"scale"``: the covariance scale alone, by the lowest
            cumulative NLL (the default before issue 22: under-confident, ECE 0.05-0.17 on the benchmark streams
            against 0.03-0.09 for ``"temperature"``, whose NLL is lower on each). ``False``: the filter's own
            predictive. Only the predictive changes, never the filter. A sample whose score is not finite under
            some candidate is left out of the sums. Default True.
        trust_check (str): how the trust region measures the step's change of the logits. ``"forward"``: runs
            ``forward_fn`` once more after the step (exact). ``"predicted"`` (default): first predicts the change
            from the step's own Jacobian, :math:`\max_j |(H_z \delta)_j|` (no extra pass, ``O(n m)``), and runs the
            forward only when the prediction exceeds ``TRUST_MARGIN * trust`` (0.5 trust): a step predicted well
            inside the bound is taken as it is (on the benchmark streams the forward ran on 2-20 % of the steps and
            every result was that of ``"forward"``, bit for bit on two of three streams; a step taken without the
            forward is not checked for non-finite outputs). ``"linear"``: never runs the forward; the mean step is
            scaled by ``trust / max|H_z delta|`` when the predicted change exceeds ``trust`` (a bound on the
            linearised change). Without logit rows (``observation="loss"``) both fall back to ``"forward"``.
        classes (int): ``0`` (default): the softmax observation measures every class (``C`` vector-Jacobian
            products per sample). ``c > 0``: it measures the softmax probabilities of the ``c`` most probable classes
            and the label (``c + 1`` classes; the ``(c + 1)``-th most probable when the label is among the first
            ``c``), exactly, with ``c + 2`` vector-Jacobian products: those classes' logit rows and the
            probability-weighted mean logit's (see :func:`~kalmanopt.optim.loko.observation.class_subset`). The
            classes left out are the least probable, whose information is weighted by their probability. The
            predictive uses the logit covariance of the ``c`` most probable classes and, for the others, the mean of
            their variances; the trust region's ``"predicted"`` change covers the measured logits. Needs
            ``observation="softmax"`` with ``noise="moment"``; a ``c`` with ``c + 2 >= C`` measures every class.
            For a large adapter in a transformer, where each row is a backward pass, ``classes=1`` with ``rank=16``
            cost 2.0x a LoRA/AdamW step per sample instead of 3.1x (LoRA on MiniLM's last block) and 3.0x instead
            of 8.1x (LoRA on every linear layer, 665k parameters) at the same online accuracy (NLL +0.007-0.010);
            on 10-class image streams with small adapters it lost 3-4 points (docs/algorithms.md, "Cost and
            guards").
        truncation (str): LoFi's rank truncation (``rank > 0``): ``"gram"`` (LoFi's: the ``k`` leading
            singular directions of :math:`\tilde W`, from its Gram matrix) or ``"whitened"`` (default; those of
            :math:`\Upsilon^{-1/2}\tilde W`: the directions that carry most information relative to the diagonal,
            read off the matrix :math:`\tilde W^\top\Upsilon^{-1}\tilde W` the mean update already formed; one
            ``n (k + m)^2`` product less per step; online accuracy and NLL equal to ``"gram"``'s within 0.003 on the
            benchmark streams). Either keeps the diagonal of the precision exact and the mean update exact.
        r_clip (float or None): outlier guard of the R estimate (``noise="ema"``/``"ema_diag"``; the other noise
            models estimate nothing): the sample stored into the average is bounded to ``[0, r_clip * R]`` in R's
            metric, R the noise the step used (see the module docs). ``>= 1``; None: no upper bound (the paper's
            average, kept positive semi-definite). Default 100, as KOALA's.

    ``step(forward_fn, target)``: ``forward_fn()`` returns logits ``(batch, classes)``; ``target`` holds class
    indices ``(batch,)`` (or probabilities ``(batch, classes)``). Returns the detached logits computed before the
    update. The state holds ``p`` per parameter (``upsilon`` and ``W`` for ``rank > 0``: views of one ``(n,)`` and one
    ``(n, k)`` buffer over every trainable tensor, joined afresh after ``load_state_dict``) and, in the first
    parameter's state, ``step``, ``skipped_steps``, the R estimate ``noise_estimate`` and ``p0_auto``.

    After every ``step``, ``opt.last_predictive`` is the :class:`Predictive` (logits, their covariance
    :math:`H P^- H^\top` per sample; when ``calibrate``, the logits divided by :attr:`predictive_temperature` and
    the covariance scaled by :attr:`predictive_scale`; probit probabilities)
    of the outputs the step measured, computed from the
    prior of that step (before the update) and the step's own Jacobian (with the softmax observation the step
    takes the logits' Jacobian and maps it through the softmax's); it is None for ``observation="loss"`` (the step
    has no Jacobian of the logits) and after a skipped sample.
    :meth:`predictive` computes the same for any inputs without changing anything.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], p0: float | str = 0.1, r0: float = 1.0,
                 beta: float = 0.95, observation: str = "softmax", q: float = 0.0, *, noise: str | None = None,
                 variance_update: str = "fd", r_min: float = 1e-3, p_min: float = 1e-12, inflation: float = 0.0,
                 p0_scale: float = 1.0, auto_scope: str = "joint", jacobian: str = "vmap",
                 rank: int = 64, trust: float = 3.0, calibrate: bool | str = True, r_clip: float | None = R_CLIP,
                 trust_check: str = "predicted", truncation: str = "whitened", classes: int = 0) -> None:
        if noise is None:  # the categorical variance goes with the softmax observation; a fixed R otherwise
            noise = "moment" if observation == "softmax" else "fixed"
        defaults = dict(p0=p0, r0=r0, beta=beta, observation=observation, q=q, noise=noise,
                        variance_update=variance_update, r_min=r_min, p_min=p_min, inflation=inflation,
                        p0_scale=p0_scale, auto_scope=auto_scope, jacobian=jacobian, rank=rank, trust=trust,
                        calibrate=calibrate, r_clip=r_clip, trust_check=trust_check, truncation=truncation,
                        classes=classes)
        self.last_predictive: Predictive | None = None
        self.trust_scaled_steps = 0  # steps whose mean step the trust region shortened (this process only)
        self.trust_forwards = 0  # forward passes the trust region ran (this process only)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["calibrate"] is True:  # the rule that ran, in the group (and in reports of the defaults)
            group["calibrate"] = DEFAULT_CALIBRATION
        validate_shared(self, group)
        if not (isinstance(group["p0"], str) and group["p0"] == "auto"):
            _check_number("p0", group["p0"], 0.0, low_inclusive=False, tensor_ok=False)
        _check_number("p_min", group["p_min"], 0.0, tensor_ok=False)
        _check_number("trust", group["trust"], 0.0, tensor_ok=False)
        _check_number("r_clip", group["r_clip"], 1.0, optional=True, tensor_ok=False)
        if group["trust_check"] not in TRUST_CHECKS:
            raise ValueError(f"Invalid trust_check: {group['trust_check']!r} (expected one of {TRUST_CHECKS})")
        if group["truncation"] not in TRUNCATIONS:
            raise ValueError(f"Invalid truncation: {group['truncation']!r} (expected one of {TRUNCATIONS})")
        classes = group["classes"]
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
            raise ValueError(f"Invalid classes: {classes!r} (a non-negative int; 0 measures every class)")
        if classes and (group["observation"] != "softmax" or group["noise"] != "moment"):
            raise ValueError(f"Invalid classes: {classes} needs observation='softmax' with noise='moment', got "
                             f"observation={group['observation']!r}, noise={group['noise']!r}")
        if not isinstance(group["calibrate"], bool) and group["calibrate"] not in CALIBRATIONS:
            raise ValueError(f"Invalid calibrate: {group['calibrate']!r} (True, False or one of {CALIBRATIONS})")
        _check_number("inflation", group["inflation"], 0.0, tensor_ok=False)
        _check_number("p0_scale", group["p0_scale"], 0.0, low_inclusive=False, tensor_ok=False)
        if group["auto_scope"] not in AUTO_SCOPES:
            raise ValueError(f"Invalid auto_scope: {group['auto_scope']!r} (expected one of {AUTO_SCOPES})")
        if group["variance_update"] not in VARIANCE_UPDATES:
            raise ValueError(f"Invalid variance_update: {group['variance_update']!r} (expected one of "
                             f"{VARIANCE_UPDATES})")
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"Invalid rank: {rank!r} (a non-negative int; 0 is the diagonal filter)")
        precision = group["variance_update"] == "vd" or rank > 0
        if precision and group["r_min"] <= 0 and group["noise"] != "fixed":
            raise ValueError("Invalid r_min: variance_update='vd' and rank > 0 need R positive definite, use r_min > 0")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts from before r_clip existed (torch's convention for new keys)
            group.setdefault("r_clip", R_CLIP)
            group.setdefault("trust_check", "predicted")
            group.setdefault("truncation", "whitened")
            group.setdefault("classes", 0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank = self.param_groups[0]["rank"]
        for values in state_dict["state"].values():
            if not isinstance(values, dict):
                continue
            if ("p" in values and rank > 0) or ("upsilon" in values and rank == 0):
                saved = "the diagonal filter (rank=0)" if "p" in values else "a low-rank filter (rank > 0)"
                raise ValueError(f"LoKO.load_state_dict: the state dict is of {saved}, this optimizer has "
                                 f"rank={rank}")
        load_state_keep_dtypes(self, state_dict, self._expected_state)
        # the loaded tensors are copies of the saved ones: joined into fresh buffers, they alias nothing
        self.__dict__.pop("_lofi_joint", None)
        pairs = self._trainable()
        if rank > 0 and pairs:
            self._join_state(pairs, keep=True)

    def _expected_state(self, group: dict[str, Any], p: Tensor) -> StateSpec:
        rank = group["rank"]
        if rank > 0:
            spec: StateSpec = {"upsilon": (tuple(p.shape), state_dtype(p)),
                               "W": ((*p.shape, rank), state_dtype(p))}
        else:
            spec = {"p": (tuple(p.shape), state_dtype(p))}
        pairs = self._trainable()
        if pairs and p is pairs[0][1]:
            spec |= {"step": ((), torch.int64), "skipped_steps": ((), torch.int64),
                     "noise_estimate": ((-1, -1), torch.float64), "p0_auto": ((), torch.float64),
                     **{key: ((count,), torch.float64) for key, count in CALIBRATION_STATE.values()}}
        return spec

    # ------------------------------------------------------------------ state
    def _trainable(self) -> list[tuple[dict[str, Any], Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _global_state(self, leader: Tensor, classes: int) -> dict[str, Any]:
        st = self.state[leader]
        if "step" not in st:
            g = self.param_groups[0]
            c = 1 if g["observation"] == "loss" else classes
            st["step"] = torch.zeros((), dtype=torch.int64)
            st["skipped_steps"] = torch.zeros((), dtype=torch.int64)
            st["noise_estimate"] = g["r0"] * torch.eye(c, dtype=torch.float64, device=leader.device)
            st["p0_auto"] = torch.zeros((), dtype=torch.float64)  # 0: not set yet
        return st

    @property
    def skipped_steps(self) -> int:
        """Samples skipped because of bad input (0 before the first step)."""
        pairs = self._trainable()
        if not pairs or "skipped_steps" not in self.state[pairs[0][1]]:
            return 0
        return int(self.state[pairs[0][1]]["skipped_steps"])

    # ------------------------------------------------------------------ step
    def step(self, forward_fn: Callable[[], Tensor] | None = None,  # type: ignore[override]
             target: Tensor | None = None) -> Tensor:
        """Observe one batch: returns the outputs computed before the update (detached)."""
        if not callable(forward_fn) or target is None:
            raise TypeError("LoKO.step(forward_fn, target) measures the model's outputs, not a loss: forward_fn() must "
                            "return logits (batch, classes) with autograd enabled, target the class indices")
        pairs = self._trainable()
        if not pairs:
            raise ValueError("LoKO has no parameter with requires_grad=True")
        check_numbers(self)
        g0 = self.param_groups[0]
        self._check_rank_state(pairs)
        self.last_predictive = None
        observation = g0["observation"]
        params = [p for _, p in pairs]
        with torch.enable_grad():
            outputs = forward_fn()
            h, e, yhat = observe(outputs, target, observation)
            finite = bool(torch.isfinite(outputs).all())
            rows = logit_rows = subset = None
            e_all, yhat_all = e, yhat  # every class: the calibration's target and the predictive's mean
            # rank > 0 with the softmax observation and no "auto" prior: one LoFi pass does the update and the
            # logit covariance (the softmax mapping applied to small matrices, see _update_lowrank)
            fused = (observation == "softmax" and g0["rank"] > 0
                     and all(not (isinstance(g["p0"], str) and g["p0"] == "auto") for g, _ in pairs))
            if finite and h.requires_grad:
                if observation == "softmax" and 0 < g0["classes"] and g0["classes"] + 2 < outputs.shape[1]:
                    # the marginal observation of a few classes: their logit rows and the mean logit's, mixed into
                    # their softmax rows (in LoFi's small matrices where fused)
                    subset = class_subset(yhat, e, g0["classes"])
                    logit_rows = jacobian_rows(outputs.reshape(-1), params, g0["jacobian"], subset.vectors)
                    e = e.reshape(yhat.shape).gather(1, subset.index).reshape(-1)
                    yhat = yhat.gather(1, subset.index)
                    rows = logit_rows if fused else [
                        (subset.mix.to(r.dtype) @ r.reshape(r.shape[0], -1)).reshape(-1, *r.shape[1:])
                        for r in logit_rows]
                elif observation == "softmax":
                    # the logits' Jacobian, mapped through the softmax's (same number of VJPs): the rows of the
                    # measurement and, for free, the linearised predictive of the logits
                    logit_rows = jacobian_rows(outputs.reshape(-1), params, g0["jacobian"])
                    rows = logit_rows if fused else softmax_rows(logit_rows, yhat)
                else:
                    rows = jacobian_rows(h, params, g0["jacobian"])
        returned = outputs.detach()
        gst = self._global_state(params[0], outputs.shape[1])
        if rows is None:
            if finite:
                raise RuntimeError("forward_fn's outputs do not depend on the optimizer's parameters")
            gst["skipped_steps"] += 1
            return returned
        with torch.no_grad():
            prior_cov = None
            if fused:
                pending = self._update_lowrank(pairs, rows, e, yhat, gst, returned, logit_rows=True,
                                               mix=None if subset is None else subset.mix)
                prior_cov = None if pending is None else pending.logit_cov
            else:
                if logit_rows is not None and subset is not None:
                    b = returned.shape[0]
                    prior_cov = self._logit_covariance(pairs, logit_rows, b, logit_rows[0].shape[0] // b)
                elif logit_rows is not None:
                    prior_cov = self._logit_covariance(pairs, logit_rows, *returned.shape)
                update = self._update_lowrank if g0["rank"] > 0 else self._update
                # H_z P^- H_z^T is this step's O(n m) work in the state dtype: where it overflows (a huge but finite
                # input) the step is skipped, as where S overflows (observation="logits") or KOALA's squared gradient
                pending = (update(pairs, rows, e, yhat, gst, returned)
                           if prior_cov is None or all_finite(prior_cov) else None)
            if pending is not None and g0["trust"] > 0:
                # the logits' Jacobian, where the step has it: the trust region can predict the step's change
                trust_rows = logit_rows if observation == "softmax" else (rows if observation == "logits" else None)
                pending = self._trust_region(pending, forward_fn, returned, g0["trust"], trust_rows, params,
                                             g0["trust_check"])
            if pending is None:
                self.last_predictive = None
                gst["skipped_steps"] += 1
                return returned
            pending.commit()
            if subset is not None and prior_cov is not None:  # the measured rows' covariance -> every class's
                prior_cov = subset_logit_covariance(prior_cov, subset.index, g0["classes"], returned.shape[1])
            e, yhat = e_all, yhat_all
            if prior_cov is not None and _calibration(g0):  # its batch of candidates includes scale 1's probit
                self.last_predictive = self._calibrated(returned, prior_cov, e, yhat, gst)
            elif prior_cov is not None:
                self.last_predictive = Predictive(returned, prior_cov,
                                                  predictive_probs(returned, prior_cov, "probit"))
            elif self.last_predictive is not None and _calibration(g0):  # the logit observation's
                pred = self.last_predictive
                self.last_predictive = self._calibrated(pred.mean, pred.cov, e, yhat, gst)
        return returned

    def _calibrated(self, mean: Tensor, cov: Tensor, e: Tensor, yhat: Tensor, gst: dict[str, Any]) -> Predictive:
        """The step's calibrated predictive (see :func:`~kalmanopt.optim.loko.predictive.calibrated`)."""
        cache = self.__dict__.setdefault("_calibration_candidates", {})  # not state: made again after a pickle
        candidates = cache.get(mean.device)
        if candidates is None:
            candidates = cache[mean.device] = _candidates(mean.device)
        return calibrated(mean, cov, e, yhat, gst, _calibration(self.param_groups[0]), candidates)

    def _calibration_choice(self) -> tuple[float, float]:
        """The ``(temperature, scale)`` the calibration uses for the next prediction ((1, 1) before any step)."""
        rule = _calibration(self.param_groups[0])
        pairs = self._trainable()
        if rule is None or not pairs:
            return 1.0, 1.0
        sums = self.state.get(pairs[0][1], {}).get(CALIBRATION_STATE[rule][0])
        if sums is None:
            return 1.0, 1.0
        return calibration_candidate(rule, int(_best_scale(sums)))

    @property
    def predictive_scale(self) -> float:
        """The covariance scale ``calibrate`` uses for the next prediction (1 before any step)."""
        return self._calibration_choice()[1]

    @property
    def predictive_temperature(self) -> float:
        """The temperature that divides the logits of the next prediction (``calibrate="temperature"``; 1 before
        any step, and always 1 for ``calibrate="scale"`` or ``False``)."""
        return self._calibration_choice()[0]

    def _trust_region(self, pending: _Pending, forward_fn: Callable[[], Tensor], before: Tensor,
                      trust: float, rows: list[Tensor] | None = None, all_params: list[Tensor] | None = None,
                      check: str = "forward") -> _Pending | None:
        r"""Bound the step in function space: if a logit of the measured batch moved by more than ``trust``, keep
        the fraction ``trust / max|z+ - z|`` of the mean step (the covariance update is kept as computed).

        ``check="forward"``: one more forward pass, without gradients. Non-finite outputs after the step undo it bit
        for bit (the parameters are restored from copies and no state is written): the sample counts as skipped.
        ``"predicted"``/``"linear"`` first compute the linearised change :math:`H_z \delta` from ``rows`` (the
        logits' Jacobian rows of ``all_params``); see the class docs.
        """
        params, steps = [p for p, _ in pending.moves], [d for _, d in pending.moves]
        predicted = self._predicted_change(pending, rows, all_params) if check != "forward" else None
        if predicted is not None and (check == "linear" or predicted <= TRUST_MARGIN * trust):
            if params:
                alpha = 1.0
                if predicted > trust:  # "linear" only
                    alpha = trust / predicted
                    self.trust_scaled_steps += 1
                torch._foreach_add_(params, steps, alpha=alpha)
            pending.moves = []  # applied
            return pending
        self.trust_forwards += 1
        saved = [p.detach().clone() for p in params]
        if params:
            torch._foreach_add_(params, steps)  # = p.add_(d) for each, in one dispatch
        after = forward_fn()
        if not isinstance(after, Tensor) or after.shape != before.shape:
            for (p, _), old in zip(pending.moves, saved, strict=True):
                p.copy_(old)
            raise ValueError(f"forward_fn returned {tuple(after.shape) if isinstance(after, Tensor) else after!r} "
                             f"on its second call, {tuple(before.shape)} on its first: it must be deterministic")
        moved = float((after.detach().to(torch.float64) - before.to(torch.float64)).abs().max())
        if not math.isfinite(moved):
            for (p, _), old in zip(pending.moves, saved, strict=True):
                p.copy_(old)
            return None
        if moved > trust:
            if params:
                torch._foreach_copy_(params, saved)
                torch._foreach_add_(params, steps, alpha=trust / moved)  # = p.copy_(old).add_(d, alpha=...)
            self.trust_scaled_steps += 1
        pending.moves = []  # applied
        return pending

    @staticmethod
    def _predicted_change(pending: _Pending, rows: list[Tensor] | None,
                          all_params: list[Tensor] | None) -> float | None:
        """``max_j |(H_z delta)_j|``, the linearised change of the measured logits under the pending mean step
        (``O(n m)``; read off LoFi's small matrices where the fused low-rank step did, ``pending.logit_change``), or
        None without logit rows or where it is not finite (the forward decides then)."""
        if pending.logit_change is not None:
            value = float(pending.logit_change.abs().max())
            return value if math.isfinite(value) else None
        if rows is None or all_params is None:
            return None
        index = {id(p): i for i, p in enumerate(all_params)}
        change = None
        for p, d in pending.moves:
            dtype = torch.promote_types(d.dtype, torch.float32)
            row = rows[index[id(p)]]
            term = row.reshape(row.shape[0], -1).to(dtype) @ d.reshape(-1).to(dtype)
            change = term.to(torch.float64) if change is None else change + term.to(torch.float64)
        if change is None:
            return 0.0
        value = float(change.abs().max())
        return value if math.isfinite(value) else None

    def _check_rank_state(self, pairs: list[tuple[dict[str, Any], Tensor]]) -> None:
        """``rank`` changed after state exists (groups are mutable): refuse rather than restart silently."""
        rank = self.param_groups[0]["rank"]
        for _, p in pairs:
            st = self.state.get(p, {})
            if ("p" in st and rank > 0) or ("upsilon" in st and (rank == 0 or st["W"].shape[-1] != rank)):
                raise ValueError(f"Invalid rank: {rank} does not match the optimizer's state (rank changed after "
                                 "the first step)")

    def _store_predictive(self, outputs: Tensor, hph: Tensor) -> None:
        """``last_predictive`` from the prior ``H P^- H^T`` of this step (logit observation only)."""
        if self.param_groups[0]["observation"] != "logits":
            return
        cov = _diagonal_blocks(hph, *outputs.shape)
        self.last_predictive = Predictive(outputs, cov, predictive_probs(outputs, cov, "probit"))

    def _initial_variances(self, pairs: list[tuple[dict[str, Any], Tensor]], H: list[Tensor], R: Tensor,
                           gst: dict[str, Any]) -> list[float | None]:
        """The prior variance of every not-yet-started parameter (None: started, or "auto" still undetermined).

        ``"auto"`` with ``auto_scope="joint"``: one scalar for every auto parameter, ``p0_scale * tr(R) / tr(H H^T)``
        over all of them; ``"group"``/``"tensor"``: each auto group/tensor u of the U that exist gets
        ``p0_scale * tr(R) / (U * tr(H_u H_u^T))`` at its first non-zero Jacobian, so every unit explains an equal
        share of ``p0_scale * tr(R)`` whatever the scale of its derivatives.
        """
        g0 = self.param_groups[0]
        out: list[float | None] = [None] * len(pairs)
        units: dict[Any, list[int]] = {}
        scope = g0["auto_scope"]
        for i, (g, p) in enumerate(pairs):
            if "p" in self.state[p] or "upsilon" in self.state[p]:
                continue
            if g["p0"] != "auto":
                out[i] = float(g["p0"])
            elif scope == "joint" and bool(gst["p0_auto"] > 0):
                out[i] = float(gst["p0_auto"])
            else:
                key = 0 if scope == "joint" else (id(g) if scope == "group" else i)
                units.setdefault(key, []).append(i)
        if not units:
            return out
        auto = [i for i, (g, _) in enumerate(pairs) if g["p0"] == "auto"]
        count = {"joint": 1, "group": len({id(pairs[i][0]) for i in auto}), "tensor": len(auto)}[scope]
        target = g0["p0_scale"] * float(torch.trace(R)) / count
        for members in units.values():
            tr = sum(float(H[i].double().square().sum()) for i in members)
            if tr > 0 and tr != float("inf"):
                for i in members:
                    out[i] = target / tr
        return out

    @torch.no_grad()
    def _update(self, pairs: list[tuple[dict[str, Any], Tensor]], rows: list[Tensor], e: Tensor, yhat: Tensor,
                gst: dict[str, Any], outputs: Tensor) -> _Pending | None:
        """One diagonal-filter step: the parameter moves and the state commit, or None to skip (nothing written)."""
        g0 = self.param_groups[0]
        m = e.numel()
        if not bool(torch.isfinite(e).all()):
            return None
        H = []
        for (_, p), r in zip(pairs, rows, strict=True):
            # a non-finite H is caught by the check of S below (each of its entries reaches a diagonal entry of S
            # as p * h^2: inf, or nan where p = 0), before anything is written
            H.append(r.reshape(m, -1).to(state_dtype(p)))
        R = noise_matrix(g0["noise"], gst["noise_estimate"], yhat, g0["r_min"], g0["observation"])

        # prior variances (time update), with the automatic p0 where asked for
        init = self._initial_variances(pairs, H, R, gst)
        if not _auto_priors_fit(pairs, init):
            return None
        prior = []
        for (g, p), value in zip(pairs, init, strict=True):
            st = self.state[p]
            if "p" in st:
                pp = st["p"].reshape(-1) * (1.0 + g["inflation"]) + g["q"]
            else:  # value None: an "auto" prior still waiting for a non-zero Jacobian (it contributes nothing)
                pp = torch.full((p.numel(),), 0.0 if value is None else value, dtype=state_dtype(p), device=p.device)
            prior.append(pp)

        S = R.clone()
        for hr, pp in zip(H, prior, strict=True):
            S += ((hr * pp) @ hr.T).to(torch.float64)
        if not bool(torch.isfinite(S).all()):
            return None
        self._store_predictive(outputs, S - R)
        vd = g0["variance_update"] == "vd"
        L = cholesky_with_jitter(R if vd else S)
        if L is None:
            warnings.warn("LoKO: the innovation covariance is not positive definite; sample skipped",
                          RuntimeWarning, stacklevel=3)
            return None
        a = torch.cholesky_solve(e.unsqueeze(1), L).squeeze(1)  # S^-1 e (fd) or R^-1 e (vd)
        deltas, posts = [], []
        for hr, pp in zip(H, prior, strict=True):
            W = torch.linalg.solve_triangular(L, hr.to(torch.float64), upper=False)
            d = W.square().sum(0).to(pp.dtype)  # diag(H^T S^-1 H) or diag(H^T R^-1 H)
            if vd:
                post = torch.where(pp > 0, 1.0 / (1.0 / pp + d), torch.zeros_like(pp))
            else:
                post = pp - pp.square() * d
            deltas.append((post if vd else pp) * (hr.T @ a.to(hr.dtype)))
            posts.append(post)
        for (g, _), i in zip(pairs, range(len(posts)), strict=True):
            if not vd:
                posts[i] = posts[i].clamp_min(g["p_min"])
        if not bool(torch.isfinite(torch.cat(deltas + posts)).all()):  # one check, one host sync
            return None

        # R estimate from the first-order post-update residual
        new_r = None
        if g0["noise"] in ("ema", "ema_diag"):
            hdelta = sum((hr @ d).to(torch.float64) for hr, d in zip(H, deltas, strict=True))
            hph = sum(((hr * q) @ hr.T).to(torch.float64) for hr, q in zip(H, posts, strict=True))
            blocks = 1 if g0["observation"] == "loss" else yhat.shape[0]
            new_r = updated_noise_estimate(g0["noise"], gst["noise_estimate"], e - hdelta, hph, g0["beta"], blocks,
                                           g0["r_min"], g0["r_clip"])
            if not bool(torch.isfinite(new_r).all()):
                return None

        moves = []
        for (_, p), d, value in zip(pairs, deltas, init, strict=True):
            if "p" in self.state[p] or value is not None:  # else its Jacobian was zero and d is zero
                moves.append((p, d.view(p.shape).to(p.dtype)))

        def commit() -> None:
            for (_, p), post, value in zip(pairs, posts, init, strict=True):
                st = self.state[p]
                if "p" not in st:
                    if value is None:
                        continue  # initialise at the first informative step
                    st["p"] = torch.empty(p.shape, dtype=state_dtype(p), device=p.device)
                st["p"].copy_(post.view(p.shape))
            self._commit_global(gst, pairs, init, new_r)

        return _Pending(moves, commit)

    # ------------------------------------------------------------------ rank > 0 (LoFi)
    def _joint_prior(self, pairs: list[tuple[dict[str, Any], Tensor]], init: list[float | None],
                     dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | float, Tensor | float, list[bool]]:
        """The stacked precision ``(upsilon (n,), W (n, k))`` before the time update, with the time update's
        inflation and process noise per row (numbers when every row shares them) and which tensors count.

        A started tensor brings its state; a new one its prior ``1 / p0`` and zero rows of ``W`` (independent of
        the rest); an ``"auto"`` one whose prior is still undetermined (``init`` None: its Jacobian is zero) a
        placeholder ``1`` that nothing reads (zero Jacobian and zero ``W`` rows keep it out of the update).
        """
        k = self.param_groups[0]["rank"]
        device = pairs[0][1].device

        def rows(values: list[tuple[float, int]]) -> Tensor | float:
            if len({v for v, _ in values}) == 1:
                return values[0][0]
            return torch.cat([torch.full((n,), v, dtype=dtype, device=device) for v, n in values])

        joint = self._joint_state(pairs)
        if joint is not None and joint.upsilon.dtype == dtype:
            # every tensor started, its state the buffers' rows: the stacked precision is the buffers (read only:
            # LoFi's update returns new tensors, and the commit writes the buffers after the step is accepted)
            infl = rows([(float(g["inflation"]), p.numel()) for g, p in pairs])
            q = rows([(float(g["q"]), p.numel()) for g, p in pairs])
            return joint.upsilon, joint.W, infl, q, [True] * len(pairs)
        ups, Ws, infl, qs, live, sizes = [], [], [], [], [], []
        for (g, p), value in zip(pairs, init, strict=True):
            st = self.state.get(p, {})
            n = p.numel()
            sizes.append(n)
            if "upsilon" in st:
                ups.append(st["upsilon"].reshape(-1).to(dtype))
                Ws.append(st["W"].reshape(n, k).to(dtype))
                a, q = float(g["inflation"]), float(g["q"])
            else:
                ups.append(torch.full((n,), 1.0 if value is None else 1.0 / value, dtype=dtype, device=device))
                Ws.append(torch.zeros((n, k), dtype=dtype, device=device))
                a, q = 0.0, 0.0  # the prior of a new tensor is its p0, as in the diagonal filter
            infl.append((a, n))
            qs.append((q, n))
            live.append("upsilon" in st or value is not None)

        W = torch.cat(Ws, out=lofi.workspace_buffer(self._workspace(device), "W", (sum(sizes), k), Ws[0]))
        return torch.cat(ups), W, rows(infl), rows(qs), live

    def _joint_state(self, pairs: list[tuple[dict[str, Any], Tensor]]) -> _JointState | None:
        """The joint buffers of :class:`_JointState` while every trainable tensor's ``upsilon`` and ``W`` are still
        their views, in the order of ``pairs``; None otherwise (the state is then stacked and joined afresh)."""
        joint = self.__dict__.get("_lofi_joint")
        if joint is None or len(joint.params) != len(pairs):
            return None
        for (_, p), q, u, w in zip(pairs, joint.params, joint.upsilon_views, joint.W_views, strict=True):
            st = self.state.get(p)
            if p is not q or st is None or st.get("upsilon") is not u or st.get("W") is not w:
                return None
        return joint

    def _join_state(self, pairs: list[tuple[dict[str, Any], Tensor]], keep: bool) -> _JointState | None:
        """Make every trainable tensor's ``upsilon`` and ``W`` views of fresh joint buffers (:class:`_JointState`),
        with their values where ``keep`` (else the caller writes every row at once); None, and nothing changed,
        unless every tensor shares one state dtype and device (and, with ``keep``, has its low-rank state)."""
        self.__dict__.pop("_lofi_joint", None)  # the old buffers go with the views that still hold them
        k = self.param_groups[0]["rank"]
        dtypes = {state_dtype(p) for _, p in pairs}
        if k <= 0 or len(dtypes) != 1 or len({p.device for _, p in pairs}) != 1:
            return None
        if keep and not all("upsilon" in self.state.get(p, {}) and self.state[p]["upsilon"].shape == p.shape
                            and self.state[p]["W"].shape == (*p.shape, k) for _, p in pairs):
            return None  # a tensor not started yet, or a state of another rank (the next step refuses it)
        dtype, device = dtypes.pop(), pairs[0][1].device
        sizes = [p.numel() for _, p in pairs]
        upsilon = torch.empty(sum(sizes), dtype=dtype, device=device)
        W = torch.empty((sum(sizes), k), dtype=dtype, device=device)
        if keep:  # the saved values, cast to the state dtype as the state is
            torch.cat([self.state[p]["upsilon"].reshape(-1) for _, p in pairs], out=upsilon)
            torch.cat([self.state[p]["W"].reshape(-1, k) for _, p in pairs], out=W)
        ups_views = tuple(u.view(p.shape) for (_, p), u in zip(pairs, upsilon.split(sizes), strict=True))
        W_views = tuple(w.view(*p.shape, k) for (_, p), w in zip(pairs, W.split(sizes), strict=True))
        for (_, p), u, w in zip(pairs, ups_views, W_views, strict=True):
            st = self.state[p]
            st["upsilon"], st["W"] = u, w
        joint = _JointState(tuple(p for _, p in pairs), upsilon, W, ups_views, W_views)
        self.__dict__["_lofi_joint"] = joint
        return joint

    def _workspace(self, device: torch.device) -> dict[str, Tensor] | None:
        """The persistent buffers of LoFi's ``n (k + m)`` temporaries on the CPU (see
        :func:`kalmanopt.optim.lofi.workspace_buffer`: a fresh multi-megabyte temporary is re-faulted page by page);
        None elsewhere (CUDA's caching allocator keeps its blocks). Not part of the state dict."""
        if device.type != "cpu":
            return None
        return self.__dict__.setdefault("_lofi_workspace", {})

    @torch.no_grad()
    def _update_lowrank(self, pairs: list[tuple[dict[str, Any], Tensor]], rows: list[Tensor], e: Tensor,
                        yhat: Tensor, gst: dict[str, Any], outputs: Tensor, logit_rows: bool = False,
                        mix: Tensor | None = None) -> _Pending | None:
        """One LoFi step over every trainable parameter jointly (see :mod:`kalmanopt.optim.lofi`).

        ``logit_rows``: ``rows`` are the logits' Jacobian of the softmax observation (no ``"auto"`` prior). The
        measurement's rows, the softmax's ``Lambda H_z`` per sample, then enter LoFi as the small ``mix`` matrix
        instead of ``n``-dimensional rows, and the same pass returns the prior logit covariance
        ``H_z P^- H_z^T`` (``_Pending.logit_cov``) that :meth:`_logit_covariance` would compute: one pass over the
        state instead of two, the same numbers up to rounding.
        """
        g0 = self.param_groups[0]
        k = g0["rank"]
        dtype = torch.float64 if any(state_dtype(p) == torch.float64 for _, p in pairs) else torch.float32
        # (m, n); with ``mix`` given, the rows it mixes (``classes``: m + batch rows)
        H = torch.cat([r.reshape(r.shape[0], -1).to(dtype) for r in rows], dim=1,
                      out=lofi.workspace_buffer(self._workspace(e.device), "H",
                                                (rows[0].shape[0], sum(p.numel() for _, p in pairs)),
                                                torch.empty(0, dtype=dtype, device=e.device)))
        # with logit rows: Lambda is finite, and a non-finite H_z makes Lambda H_z non-finite (0 * inf = nan)
        if not all_finite(e, H):  # one host read for both
            return None
        sizes = [p.numel() for _, p in pairs]
        # the categorical covariance Lambda of the softmax: noise="moment"'s R and the softmax rows' mix
        lam = categorical_covariance(yhat) if g0["noise"] == "moment" or (logit_rows and mix is None) else None
        R = noise_matrix(g0["noise"], gst["noise_estimate"], yhat, g0["r_min"], g0["observation"], lam)
        L_R = cholesky_with_jitter(R)
        if L_R is None:
            warnings.warn("LoKO: the observation noise R is not positive definite; sample skipped",
                          RuntimeWarning, stacklevel=3)
            return None
        if self._joint_state(pairs) is not None:  # every tensor started: no prior to set
            init: list[float | None] = [None] * len(pairs)
        else:
            init = self._initial_variances(pairs, list(H.split(sizes, dim=1)), R, gst)
            if not _auto_priors_fit(pairs, init):
                return None
        ups, W, infl, q, live = self._joint_prior(pairs, init, dtype)
        ups, W = lofi.predict(ups, W, infl, q)
        ema = g0["noise"] in ("ema", "ema_diag")
        if logit_rows and mix is None:  # block-diagonal over the batch: Lambda_b = diag(yhat_b) - yhat_b yhat_b^T
            mix = lam[0] if lam.shape[0] == 1 else torch.block_diag(*lam)
        res = lofi.update(ups, W, H, L_R, e, prior=g0["observation"] == "logits", posterior=ema, mix=mix,
                          rows_prior=logit_rows, truncation=g0["truncation"], workspace=self._workspace(W.device))
        if res is None or not all_finite(res.delta, res.upsilon, res.W,
                                         *(t for t in (res.prior_hph, res.post_hph, res.h_delta, res.rows_hph)
                                           if t is not None)):
            return None
        if res.prior_hph is not None:
            self._store_predictive(outputs, res.prior_hph)

        new_r = None
        if ema:
            blocks = 1 if g0["observation"] == "loss" else yhat.shape[0]
            new_r = updated_noise_estimate(g0["noise"], gst["noise_estimate"], e - res.h_delta, res.post_hph,
                                           g0["beta"], blocks, g0["r_min"], g0["r_clip"])
            if not bool(torch.isfinite(new_r).all()):
                return None

        # an "auto" prior still undetermined (not live): its Jacobian and W rows are zero, nothing moves
        moves = [(p, d.view(p.shape).to(p.dtype))
                 for (_, p), d, ok in zip(pairs, res.delta.split(sizes), live, strict=True) if ok]

        def commit() -> None:
            joint = self._joint_state(pairs)
            if joint is None and all(live):  # the first step, or the state was replaced: join it (fresh buffers)
                joint = self._join_state(pairs, keep=False)
            if joint is not None:  # every row at once, into the buffers whose views the state tensors are
                torch._foreach_copy_([joint.upsilon, joint.W], [res.upsilon, res.W])
                self._commit_global(gst, pairs, init, new_r)
                return
            dst, src = [], []
            for (_, p), u, w, ok in zip(pairs, res.upsilon.split(sizes), res.W.split(sizes, dim=0), live,
                                        strict=True):
                if not ok:
                    continue
                st = self.state[p]
                if "upsilon" not in st:
                    st["upsilon"] = torch.empty(p.shape, dtype=state_dtype(p), device=p.device)
                    st["W"] = torch.empty((*p.shape, k), dtype=state_dtype(p), device=p.device)
                dst += [st["upsilon"], st["W"]]
                src += [u.view(p.shape), w.view(*p.shape, k)]
            if dst:
                torch._foreach_copy_(dst, src)  # = copy_ for each, in one dispatch
            self._commit_global(gst, pairs, init, new_r)

        logit_cov = None
        if logit_rows:
            b = outputs.shape[0]  # c: the rows per sample (every class, or those of ``classes`` and the mean)
            logit_cov = _diagonal_blocks(res.rows_hph, b, res.rows_hph.shape[0] // b)
        return _Pending(moves, commit, logit_cov, res.rows_delta if logit_rows else None)

    def _commit_global(self, gst: dict[str, Any], pairs: list[tuple[dict[str, Any], Tensor]],
                       init: list[float | None], new_r: Tensor | None) -> None:
        """The shared part of a step's state: the R estimate, the joint automatic prior, the step count."""
        g0 = self.param_groups[0]
        if new_r is not None:
            gst["noise_estimate"].copy_(new_r)
        joint = [v for (g, p), v in zip(pairs, init, strict=True) if g["p0"] == "auto" and v is not None]
        if joint and g0["auto_scope"] == "joint":
            gst["p0_auto"].fill_(joint[0])
        gst["step"] += 1

    # ------------------------------------------------------------------ predictive
    def predictive(self, forward_fn: Callable[[], Tensor], method: str = "probit", *, noise: bool = False,
                   samples: int = 1000, generator: torch.Generator | None = None) -> Predictive:
        r"""The linearised predictive distribution of the logits ``forward_fn()`` returns, at the current state.

        .. math::
            f \sim \mathcal{N}\bigl(h(\theta; x),\; H P^- H^\top\ (+ R)\bigr)

        per sample, with :math:`H` the logits' Jacobian and :math:`P^-` the covariance the next step would start
        from (the state after the time update: :math:`(1 + \alpha) p + q`; for ``rank > 0``
        :math:`(\Upsilon^- + W^- W^{-\top})^{-1}` by Woodbury, never formed). Tensors not yet started use their
        ``p0``; an ``"auto"`` prior not yet determined contributes nothing. Nothing is written: parameters, state
        and gradients are untouched (the Jacobian comes from ``autograd.grad``). With ``calibrate``, the mean is
        divided by :attr:`predictive_temperature` and the covariance scaled by :attr:`predictive_scale` (before
        ``R`` is added), as in ``last_predictive``.

        Args:
            forward_fn: returns logits ``(batch, classes)`` with autograd enabled (any inputs).
            method: ``"probit"`` (default), ``"laplace_bridge"``, ``"mc"`` or ``"plugin"`` (see
                :func:`predictive_probs`).
            noise: add the observation noise ``R`` (``observation="logits"`` only, where ``R`` lives on the
                logits).
            samples, generator: for ``method="mc"``.

        Raises:
            ValueError: with ``observation="loss"`` (the filter never saw the logits), an unknown method,
                ``noise=True`` without the logit observation, or inputs whose logit covariance is not finite
                (non-finite logits or Jacobian, or finite ones so large that ``H P H^T`` overflows the state
                dtype; not at :attr:`predictive_scale` 0, the plug-in, which reads no covariance).
        """
        g0 = self.param_groups[0]
        if g0["observation"] == "loss":
            raise ValueError("LoKO.predictive needs a filter over the logits or probabilities; with "
                             "observation='loss' it measured one scalar loss and has no predictive distribution "
                             "of the outputs")
        if method not in PREDICTIVE_METHODS:
            raise ValueError(f"Invalid method: {method!r} (expected one of {PREDICTIVE_METHODS})")
        if noise and g0["observation"] != "logits":
            raise ValueError(f"Invalid noise: R lives on the logits only with observation='logits', got "
                             f"{g0['observation']!r}")
        if not callable(forward_fn):
            raise TypeError("LoKO.predictive(forward_fn): forward_fn() must return logits (batch, classes)")
        pairs = self._trainable()
        if not pairs:
            raise ValueError("LoKO has no parameter with requires_grad=True")
        params = [p for _, p in pairs]
        with torch.enable_grad():
            outputs = forward_fn()
            if not isinstance(outputs, Tensor) or outputs.dim() != 2:
                shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs)
                raise ValueError(f"forward_fn must return logits of shape (batch, classes), got {shape}")
            if not outputs.requires_grad:
                raise RuntimeError("forward_fn's outputs do not depend on the optimizer's parameters")
            rows = jacobian_rows(outputs.reshape(-1), params, g0["jacobian"])
        b, c = outputs.shape
        temperature, scale = self._calibration_choice()
        mean = outputs.detach() if temperature == 1.0 else outputs.detach() / temperature
        with torch.no_grad():
            cov = _scaled(scale, self._logit_covariance(pairs, rows, b, c))
            if not all_finite(cov):  # the probabilities would be NaN (or an eigh failure for "mc")
                if not all_finite(mean):
                    raise ValueError("LoKO.predictive: forward_fn returned non-finite logits")
                raise ValueError("LoKO.predictive: the logit covariance H P H^T of these inputs overflows the state "
                                 "dtype (a huge input; step() skips such a sample)")
            if noise:
                leader = self.state.get(params[0], {})
                est = leader.get("noise_estimate")
                if est is None:
                    est = g0["r0"] * torch.eye(c, dtype=torch.float64, device=cov.device)
                cov = cov + est.to(torch.float64) + g0["r_min"] * torch.eye(c, dtype=torch.float64,
                                                                            device=cov.device)
        return Predictive(mean, cov, predictive_probs(mean, cov, method, samples=samples, generator=generator))

    def _logit_covariance(self, pairs: list[tuple[dict[str, Any], Tensor]], rows: list[Tensor], b: int,
                          c: int) -> Tensor:
        """``H P^- H^T`` per sample, ``(b, c, c)`` float64, from the state without writing to it."""
        g0 = self.param_groups[0]
        leader = self.state.get(pairs[0][1], {})
        auto = float(leader["p0_auto"]) if "p0_auto" in leader else 0.0
        init: list[float | None] = []
        for g, _ in pairs:
            if g["p0"] != "auto":
                init.append(float(g["p0"]))
            else:
                init.append(auto if auto > 0 and g0["auto_scope"] == "joint" else None)
        dtype = torch.float64 if any(state_dtype(p) == torch.float64 for _, p in pairs) else torch.float32
        m = b * c
        Hs = []
        for (_, p), r, value in zip(pairs, rows, init, strict=True):
            hr = r.reshape(m, -1).to(dtype)
            st = self.state.get(p, {})
            if value is None and "p" not in st and "upsilon" not in st:
                hr = torch.zeros_like(hr)  # an undetermined "auto" prior: no variance yet
            Hs.append(hr)
        H = torch.cat(Hs, dim=1).reshape(b, c, -1)
        if g0["rank"] > 0:
            ups, W, infl, q, _ = self._joint_prior(pairs, init, dtype)
            ups, W = lofi.predict(ups, W, infl, q)
            return lofi.quadratic_form(ups, W, H)
        prior = []
        for (g, p), value in zip(pairs, init, strict=True):
            st = self.state.get(p, {})
            if "p" in st:
                prior.append(st["p"].reshape(-1).to(dtype) * (1.0 + g["inflation"]) + g["q"])
            else:
                prior.append(torch.full((p.numel(),), 0.0 if value is None else value, dtype=dtype,
                                        device=p.device))
        P = torch.cat(prior)
        out = ((H * P) @ H.transpose(1, 2)).to(torch.float64)
        return 0.5 * (out + out.transpose(1, 2))
