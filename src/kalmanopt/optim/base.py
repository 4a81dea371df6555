"""What every KOALA optimizer shares.

* **How the loss arrives.** Three equivalent ways: ``step(closure)``; ``loss.backward(); step(loss=losses)``; and the
  papers' ``predict()`` / backward / ``update(loss_mean, loss_var)``. ``step`` is ``update`` followed by the *next*
  step's ``predict`` ("predict ahead"), so that a forward pass after ``step`` is evaluated at the predicted
  parameters, as the filter's measurement model requires (this matters for KOALA-M, whose prediction moves the
  parameters; for KOALA++ and KOALA-V it only moves scalars).
* **The measurement noise** R, per param group (see :mod:`kalmanopt.optim.noise`).
* **Guards without host synchronisation.** A non-finite loss, loss statistic or gradient anywhere turns a device-side
  flag ``ok`` off; every write of the step is then masked, so parameters and state stay bit-for-bit unchanged and the
  skip is counted in ``skipped_steps``. Nothing in ``step`` calls ``.item()`` or branches on a tensor. The checks
  are made in the dtype a value is stored in (what a group shares, in the narrowest state dtype of the group: see
  :func:`narrowest_state_dtype`), and cover what the step derives (R, the algorithm's covariance
  scalars and step coefficients, via :meth:`KalmanOptimizer._check_group`), all before the first write. Python-number
  hyperparameters are checked at every step (a non-finite one raises); tensor ones join ``ok``.
* **The effective gradient** ``h = g + weight_decay * theta`` in the state dtype (float32 for 16/32-bit parameters,
  float64 for float64 ones), with its per-tensor squared norms, computed once for every algorithm. The multi-tensor
  path writes it into one flat buffer per (device, dtype) bucket so that it can be sanitised in one kernel.
* **State-dict hygiene.** State holds only tensors, so ``torch.load(weights_only=True)``, distributed checkpointing
  and torch's comparisons take a checkpoint as they take AdamW's. Loading checks every state tensor's shape and dtype
  against what the optimizer creates for the parameter before anything is written (``ValueError`` for state of
  other parameters) and puts it in the state dtype (``torch.optim`` would cast it to the parameter dtype), casting
  where that is safe; a number ``step`` (older torch checkpoints) becomes the tensor it is now.
* **The filter's phase.** Whether each group's prediction for the next measurement has been made, and whether the
  last ``update()`` was skipped (its prediction then still stands, and the next one must not move KOALA-M's
  parameters again), decide what the next call does. They are host-side (Python bools and the device flag of the
  last update): ``step`` branches on them without a synchronisation and torch.compile guards on them.
  ``state_dict()`` carries them as 0-d bool tensors in each group's state (``predicted``, ``prediction_gate``), so
  that resuming is bit exact after any sequence of good, skipped and failed steps.

Group-level quantities (R, the skip counter, the count of R updates, KOALA-V's sigma, KOALA-M's 2x2 covariance) are
kept in the state of the group's first parameter, so that they travel with the standard ``state_dict`` layout (and
with tools that remap parameter state, such as distributed checkpointing).
"""

from __future__ import annotations

import contextvars
import math
import numbers
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ._inplace import copy_into
from ._reductions import squared_norms
from ._sharding import local_state, local_tensor, reduce_if, shard_reducer, shard_state
from .noise import (
    R_CLIP,
    R_INITIAL,
    R_STATISTICS,
    check_loss,
    check_statistic,
    loss_moments,
    loss_statistic,
    measurement_noise,
)

__all__ = ["KalmanOptimizer", "GradBucket"]

_NO_LOSS_MESSAGE = (
    "{name}.step() needs the loss: a Kalman filter measures it. Hand it over in one of three ways:\n"
    "  1. opt.step(closure)   where closure() zeroes the grads, computes the loss, calls backward on its mean "
    "and returns it (0-d mean or 1-d per-sample losses);\n"
    "  2. loss.mean().backward(); opt.step(loss=loss);\n"
    "  3. opt.predict(); loss.backward(); opt.update(loss_mean, loss_var)."
)


# The filter's phase, as each group's state in state_dict() holds it (the leader's entry; not in opt.state):
#: whether the group's prediction for the next measurement has been made (``step()`` predicts ahead, ``update()``
#: does not), a 0-d bool tensor;
_PREDICTED = "predicted"
#: the gate of that prediction, a 0-d bool tensor: False after a skipped ``update()``, whose prediction still stands,
#: so that the next prediction leaves everything as it is (KOALA-M's moves the parameters).
_PREDICTION_GATE = "prediction_gate"


def state_dtype(p: Tensor) -> torch.dtype:
    """Optimizer state is float64 for float64 parameters and float32 for every other floating dtype."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def narrowest_state_dtype(group: dict[str, Any]) -> torch.dtype:
    """The narrowest state dtype of a param group's parameters (float32 unless every parameter is float64).

    What the group shares (R, the loss and its statistic, KOALA-V's sigma, KOALA-M's covariance) is stored once, in
    the dtype of the group's first parameter, but every tensor of the group computes with it in its own state dtype:
    the checks of those values use this dtype, not the first parameter's, so that a float64 parameter listed first
    does not let a value through that a float32 one of the same group cannot hold.
    """
    dtypes = {state_dtype(p) for p in group["params"]}
    return torch.float32 if torch.float32 in dtypes else torch.float64


@dataclass
class GradBucket:
    """The parameters of one param group that have a gradient, on one device, with one state dtype.

    ``h`` holds the effective gradient ``g + weight_decay * theta`` per tensor, in the state dtype and the
    parameter's shape (contiguous). In the multi-tensor path they are views of ``h_flat``.
    ``grad_sq`` is ``||h||^2`` per tensor, ``param_sq`` is ``||theta||^2`` per tensor (only with weight decay),
    ``finite`` is a 0-d bool: every ``grad_sq`` and ``param_sq`` is finite. For sharded (DTensor) parameters,
    ``params`` and ``h`` are the local shards and ``grad_sq``/``param_sq`` are already summed over the shards.
    """

    params: list[Tensor]
    states: list[dict[str, Any]]
    h: list[Tensor]
    h_flat: Tensor | None
    grad_sq: Tensor
    param_sq: Tensor | None
    finite: Tensor
    shard_sum: Callable[[Tensor], Tensor] | None = None  # sums per-tensor partial reductions over shards
    plan: Any = None  # what an optimizer's _check_group derived for this bucket, reused by its _correct_group

    @property
    def device(self) -> torch.device:
        return self.grad_sq.device

    def layer_loss(self, loss_mean: Tensor, weight_decay: float) -> Tensor:
        """Each tensor's residual: ``L + weight_decay/2 * ||theta||^2`` (the coupled "layer loss" of KOALA)."""
        loss = loss_mean.to(self.grad_sq)
        if self.param_sq is None:
            return loss.expand_as(self.grad_sq)
        return loss + 0.5 * weight_decay * self.param_sq

    def sanitize(self) -> None:
        """Make ``h`` finite so that a masked (skipped) update multiplies zeros by finite numbers only."""
        if self.h_flat is not None:
            self.h_flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        else:
            for h in self.h:
                h.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


# name -> (shape, dtype) of the state tensors an optimizer creates for one parameter; -1 in a shape: any size
StateSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _is_dtensor(t: Tensor) -> bool:
    return dist.is_available() and isinstance(t, dist.tensor.DTensor)


def spec_of(probe: dict[str, Any]) -> StateSpec:
    """The :data:`StateSpec` of a state dict built on meta tensors (or any tensors)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in probe.items() if isinstance(v, Tensor)}


def _checked_dtype(opt: Optimizer, key: Any, name: str, value: Tensor, want: torch.dtype) -> torch.dtype:
    """The dtype ``value`` is loaded in: ``want`` where the cast is safe, else ValueError."""
    if value.dtype == want:
        return want
    where = f"{type(opt).__name__}.load_state_dict: state {name!r} of parameter {key}"
    if value.is_floating_point() and want.is_floating_point:
        if bool((torch.isfinite(value) & ~torch.isfinite(value.to(want))).any()):
            raise ValueError(f"{where} does not fit in {want} (saved as {value.dtype})")
        return want
    integral = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    if value.dtype in integral and want in integral:
        return want
    raise ValueError(f"{where} is {value.dtype}, the optimizer needs {want}: the state dict is not this optimizer's")


def load_state_keep_dtypes(opt: Optimizer, state_dict: dict[str, Any],
                           expected: Callable[[dict[str, Any], Tensor], StateSpec] | None = None) -> None:
    """``Optimizer.load_state_dict`` that checks the state first and keeps the state dtypes.

    ``expected(group, p)`` gives the shape and dtype of every state tensor the optimizer creates for ``p``. Before
    anything is loaded, each saved tensor it names is checked: a different shape raises ``ValueError`` (the state
    belongs to other parameters; the optimizer is left untouched), a different dtype is cast to the expected one
    where that is safe (between floating dtypes when the values stay finite, e.g. a float32 checkpoint into a
    float64 model; between integer dtypes), else ``ValueError``. Tensors it does not name are loaded as saved.
    (torch.optim would cast floating state to the parameter dtype; ours is float32 for low-precision parameters.)
    A Python number where it names a 0-d tensor (``step`` as older torch optimizers saved it) is converted to that
    tensor, as ``torch.optim``'s optimizers convert a number ``step`` on load; any other non-tensor there raises
    ``ValueError``. The shapes and dtypes of the state of DTensor parameters are not checked here (see
    ``_sharding``).
    """
    saved, groups, saved_groups = state_dict["state"], opt.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    by_id: dict[Any, tuple[dict[str, Any], Tensor]] = {}
    for group, saved_group in zip(groups, saved_groups, strict=True):
        if len(group["params"]) != len(saved_group["params"]):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        by_id.update(zip(saved_group["params"], ((group, p) for p in group["params"]), strict=True))
    dtypes: dict[tuple[Any, str], torch.dtype] = {}
    numbers_as_tensors: dict[tuple[Any, str], Tensor] = {}
    for key, values in saved.items():
        if key not in by_id:
            continue
        group, p = by_id[key]
        spec = {} if expected is None else expected(group, p)
        for name, value in values.items():
            if name in spec and not isinstance(value, Tensor):
                numbers_as_tensors[key, name] = _number_as_state(opt, key, name, value, *spec[name])
                continue
            if not isinstance(value, Tensor) or name not in spec or _is_dtensor(value) or _is_dtensor(p):
                continue
            shape, dtype = spec[name]
            if value.dim() != len(shape) or any(s not in (-1, v) for s, v in zip(shape, value.shape, strict=True)):
                want = tuple("*" if s == -1 else s for s in shape)
                raise ValueError(
                    f"{type(opt).__name__}.load_state_dict: state {name!r} of parameter {key} has shape "
                    f"{tuple(value.shape)}, but the parameter (shape {tuple(p.shape)}, {p.dtype}) needs {want}: "
                    "the state dict belongs to other parameters")
            dtypes[key, name] = _checked_dtype(opt, key, name, value, dtype)
    Optimizer.load_state_dict(opt, state_dict)
    for key, values in saved.items():
        if key not in by_id:
            continue
        p = by_id[key][1]
        for name, value in values.items():
            if isinstance(value, Tensor):
                dtype = dtypes.get((key, name), value.dtype)
                opt.state[p][name] = value.to(device=p.device, dtype=dtype, copy=True)
            elif (key, name) in numbers_as_tensors:
                opt.state[p][name] = numbers_as_tensors[key, name].to(p.device)


def _number_as_state(opt: Optimizer, key: Any, name: str, value: Any, shape: tuple[int, ...],
                     dtype: torch.dtype) -> Tensor:
    """A state entry saved as a Python number (``step`` in older torch checkpoints) as the 0-d tensor it is now;
    ValueError where it cannot be one (another type, another shape, a value the dtype cannot hold)."""
    where = f"{type(opt).__name__}.load_state_dict: state {name!r} of parameter {key} is {value!r}"
    if shape != () or isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}, the optimizer needs a tensor of shape {shape} and dtype {dtype}")
    try:
        if dtype.is_floating_point:
            converted = torch.tensor(float(value), dtype=dtype)
            fits = not math.isfinite(float(value)) or bool(torch.isfinite(converted))
        else:
            fits = float(value).is_integer()
            converted = torch.tensor(int(value), dtype=dtype) if fits else None
    except (OverflowError, RuntimeError):
        fits = False
    if not fits:
        raise ValueError(f"{where}, which does not fit in the {dtype} tensor the optimizer needs")
    return converted


def _read_phase(opt: Optimizer, state_dict: dict[str, Any]) -> tuple[dict[int, bool], bool, dict[str, Any]]:
    """The filter's phase in a state dict: ``(predicted per group index, whether the gate is open, the state dict
    without the phase)``. Nothing is written; a malformed entry raises ``ValueError``.

    Reads the two flags on the host (a checkpoint is loaded outside ``step``). A checkpoint from before the phase
    was saved as tensors holds ``predicted`` as a Python bool and no gate (open).
    """
    name = type(opt).__name__
    saved, predicted, gate_open = state_dict["state"], {}, True
    stripped: dict[Any, Any] = {}
    leaders = {group["params"][0]: index for index, group in enumerate(state_dict["param_groups"]) if group["params"]}
    for key, values in saved.items():
        if not isinstance(values, dict) or key not in leaders or not ({_PREDICTED, _PREDICTION_GATE} & set(values)):
            stripped[key] = values
            continue
        flag = values.get(_PREDICTED, False)
        if isinstance(flag, Tensor) and flag.numel() == 1 and flag.dtype == torch.bool:
            flag = bool(flag)
        if not isinstance(flag, bool):
            raise ValueError(f"{name}.load_state_dict: state {_PREDICTED!r} of parameter {key} must be a bool or a "
                             f"one-element bool tensor, got {flag!r}")
        gate = values.get(_PREDICTION_GATE, True)
        if isinstance(gate, Tensor) and gate.numel() == 1 and gate.dtype == torch.bool:
            gate = bool(gate)
        if not isinstance(gate, bool):
            raise ValueError(f"{name}.load_state_dict: state {_PREDICTION_GATE!r} of parameter {key} must be a "
                             f"one-element bool tensor, got {gate!r}")
        predicted[leaders[key]] = flag
        gate_open = gate_open and gate
        stripped[key] = {k: v for k, v in values.items() if k not in (_PREDICTED, _PREDICTION_GATE)}
    return predicted, gate_open, {**state_dict, "state": stripped}


#: True while a param group is validated again inside ``step``: tensor hyperparameters are not read then.
_IN_STEP: contextvars.ContextVar[bool] = contextvars.ContextVar("kalmanopt_validating_in_step", default=False)


def _group_kinds(group: dict[str, Any]) -> tuple[list[tuple[str, Any]], list[Any]]:
    """What :meth:`KalmanOptimizer._validate_changed_groups` compares: per hyperparameter its value where that is a
    number, string or None, except a float ``lr``, of which only the type (a schedule changes it at every step, and
    only its finiteness, checked at every step, can break a step); its identity for anything else (tensors are never
    compared by value: that would read them). Second: the objects behind the identities, kept alive so that an
    identity is not reused."""
    kinds, held = [], []
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, float) and key == "lr":
            kinds.append((key, float))
        elif value is None or isinstance(value, bool | int | float | str):
            kinds.append((key, (type(value), value)))
        else:
            kinds.append((key, (type(value), id(value))))
            held.append(value)
    return kinds, held


def _check_number(name: str, value: Any, low: float, *, low_inclusive: bool = True, high: float | None = None,
                  high_inclusive: bool = True, optional: bool = False, tensor_ok: bool = True) -> None:
    """Check of one hyperparameter: a finite number in the given range.

    A one-element tensor is accepted when ``tensor_ok``. Its value is read here at construction only: when a group
    is validated again inside ``step`` (see :meth:`KalmanOptimizer._validate_changed_groups`) only its size and
    dtype are, and its value is checked on the device (see :func:`check_group_numbers`).
    """
    if value is None and optional:
        return
    if isinstance(value, Tensor):
        if not tensor_ok:
            raise ValueError(f"Invalid {name}: must be a Python number, got a tensor {value!r}")
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: must be a number, got a tensor of shape {tuple(value.shape)}")
        if _IN_STEP.get():
            if value.dtype == torch.bool or value.is_complex():
                raise ValueError(f"Invalid {name}: must be a number, got a tensor of dtype {value.dtype}")
            return
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"Invalid {name}: must be a number, got {value!r}")
    if isinstance(value, int) and abs(value) > sys.float_info.max:  # math.isfinite would raise OverflowError
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number)")
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number)")
    ok = value >= low if low_inclusive else value > low
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        rng = f"{lo}{low}, {high if high is not None else 'inf'}{hi if high is not None else ')'}"
        raise ValueError(f"Invalid {name}: {value!r} (must lie in {rng})")


def check_group_numbers(group: dict[str, Any]) -> list[Tensor]:
    """Step-time check of a param group's hyperparameters, which may change between steps (schedulers, users).

    A Python number that is not finite raises ``ValueError`` (before anything is written). Tensor hyperparameters
    (e.g. a tensor ``lr``) are not read on the host: they are returned, and ``step`` folds ``isfinite`` of them into
    its device-side guard, so a non-finite one skips the step and counts it.

    A tensor hyperparameter is one real number: a tensor of another size (or a bool or complex one) raises
    ``ValueError``; a one-element tensor of any shape (``torch.tensor([[0.5]])``, which torch.optim accepts) is
    replaced in the group by a 0-d view of it (torch.optim's ``_to_scalar``), so that every path computes with a
    scalar, and an in-place change of the caller's tensor (a scheduler's ``fill_``) still reaches the step.
    """
    tensors = []
    for key, value in group.items():
        if key == "params":
            continue
        # -inf < x < inf, not math.isfinite: under torch.compile a float that changed between calls (a schedule) is
        # symbolic, and a comparison is what dynamo can trace (as a guard) without specialising to the value.
        if isinstance(value, float) and not -math.inf < value < math.inf:
            raise ValueError(f"Invalid {key}: {value!r} in a param group (must be a finite number)")
        if not isinstance(value, Tensor):
            continue
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"Invalid {key}: a tensor hyperparameter must hold one real number, got shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        if value.dim() != 0:
            value = group[key] = value.reshape(())
        if value.is_floating_point():
            tensors.append(value)
    return tensors


def _to_device(value: Tensor, device: torch.device) -> Tensor:
    """``value`` on ``device``. A loss (or a tensor hyperparameter's flag) on the CPU for a model on CUDA is copied
    from pinned memory without blocking: a plain copy waits for the device's queue (a host synchronisation), and
    left on the CPU it would pull every flag of the step back to the CPU (one synchronisation each);
    ``torch.distributed``'s NCCL backend sums CUDA tensors only."""
    if value.device == device:
        return value
    if value.device.type == "cpu" and device.type == "cuda" and not torch.compiler.is_compiling():
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)


def _both(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The conjunction of two optional device flags (None: no condition)."""
    if a is None or b is None:
        return a if b is None else b
    return a & b.to(a.device)


class KalmanOptimizer(Optimizer):
    """Base class of the KOALA optimizers: loss intake, R, guards and state-dict hygiene.

    Subclasses implement :meth:`_init_group_state`, :meth:`_init_param_state`, :meth:`_predict_group` and
    :meth:`_correct_group`.

    Data parallelism: when ``torch.distributed`` is initialised, the loss statistics (sum of losses, sum of
    squares, count) are summed over ``process_group`` (default: the world), so that with DDP's averaged gradients
    every rank takes the identical step, the one a single process would take on the whole batch. (A rank that hands
    over a 0-d batch mean contributes it as one sample, so R then averages the squared rank means.) Pass a group of
    one rank to keep ranks independent.

    Mixed precision: ``torch.amp.GradScaler`` is supported through its optimizer protocol
    (``_step_supports_amp_scaling``): ``scaler.step(opt, loss=losses)`` hands over the scale and the found-inf flag,
    the gradients are unscaled while the effective gradient is formed, and an overflowing step is skipped and
    counted on the device, without a host synchronisation.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any], *,
                 process_group: Any = None) -> None:
        defaults.setdefault("r_clip", R_CLIP)  # for subclasses that do not take it as an argument
        super().__init__(params, defaults)
        self._process_group = process_group
        # The filter's phase, per param group (by index): whether the prediction for the next measurement has been
        # made (absent: not yet). Host-side Python bools, not optimizer state: they decide which operations step()
        # runs (torch.compile guards on them), so reading them must not synchronise with a device. state_dict()
        # carries them, and the pending gate of update(), as tensors (see _PREDICTED and _PREDICTION_GATE).
        self._predicted_groups: dict[int, bool] = {}

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles (and deep-copies) only defaults, state and param_groups; the phase decides the next step
        state = {**super().__getstate__(), "_predicted_groups": dict(self._predicted_groups)}
        if self.__dict__.get("_pending_gate") is not None:
            state["_pending_gate"] = self.__dict__["_pending_gate"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict, with the state and param groups only
        self.__dict__.setdefault("_predicted_groups", {})

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check the hyperparameters every KOALA optimizer shares (subclasses extend)."""
        _check_number("lr", group["lr"], 0.0)
        _check_number("r", group["r"], 0.0, optional=True)
        _check_number("r_clip", group["r_clip"], 1.0, optional=True)
        _check_number("alpha_r", group["alpha_r"], 0.0, high=1.0, high_inclusive=False)
        _check_number("weight_decay", group["weight_decay"], 0.0)
        if group["r_stat"] not in R_STATISTICS:
            raise ValueError(f"Invalid r_stat: {group['r_stat']!r} (expected one of {R_STATISTICS})")
        if group["foreach"] not in (None, True, False):
            raise ValueError(f"Invalid foreach: {group['foreach']!r} (expected None, True or False)")
        for p in group["params"]:
            if not p.is_floating_point() or p.is_complex():
                raise ValueError(f"{type(self).__name__} optimizes real floating-point tensors, got {p.dtype}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        check_group_numbers(group)  # one-element tensor hyperparameters made 0-d from the start
        self.__dict__.setdefault("_validated_groups", {})[len(self.param_groups) - 1] = _group_kinds(group)

    def _validate_changed_groups(self) -> None:
        """Validate again, before anything is written, every param group whose hyperparameters changed since they
        were validated (see :func:`_group_kinds`): a None, a string, a complex number, a value out of range or a new
        tensor put into a group after construction raises here what construction raises, not halfway through a step
        (after R and the counters were written). Tensor values are not read (:data:`_IN_STEP`). Under torch.compile
        this is skipped (and :func:`check_group_numbers` still runs).
        """
        if torch.compiler.is_compiling():
            return
        validated = self.__dict__.setdefault("_validated_groups", {})
        for index, group in enumerate(self.param_groups):
            kinds = _group_kinds(group)
            if index in validated and validated[index][0] == kinds[0]:
                continue
            token = _IN_STEP.set(True)
            try:
                self._validate_group(group)
            finally:
                _IN_STEP.reset(token)
            validated[index] = kinds

    # ------------------------------------------------------------------ state
    def _group_state(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group-level state, kept in the state of the group's first parameter (see module docstring)."""
        leader = group["params"][0]
        st = self.state[leader]
        if "measurement_noise" not in st:
            kw = {"device": leader.device, "dtype": state_dtype(leader)}
            st["measurement_noise"] = torch.full((), R_INITIAL, **kw)  # a fill: torch.tensor copies from the host
            st["skipped_steps"] = torch.zeros((), dtype=torch.int64, device=leader.device)
            st["noise_updates"] = torch.zeros((), dtype=torch.int64, device=leader.device)  # committed R updates
            self._init_group_state(group, st, kw)
            # A group state made afresh (first step, or state cleared by the user) has not been predicted.
            for index, other in enumerate(self.param_groups):
                if other is group:
                    self._predicted_groups[index] = False
        return st

    def _init_group_state(self, group: dict[str, Any], st: dict[str, Any], kw: dict[str, Any]) -> None:
        """Create the algorithm's group-level state tensors (dtype/device in ``kw``)."""

    def _init_param_state(self, group: dict[str, Any], p: Tensor, st: dict[str, Any]) -> None:
        """Create the algorithm's per-tensor state (called once, at the tensor's first gradient)."""
        raise NotImplementedError

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        """Create ``p``'s per-tensor state; for a DTensor ``p``, per-element state is a DTensor laid out like it."""
        st = self.state[p]
        before = set(st)
        self._init_param_state(group, local_tensor(p), st)
        shard_state(p, st, [key for key in st if key not in before])
        return st

    def _checkpoint_probe(self) -> bool:
        """Create the whole state if this ``step()`` without a loss is ``torch.distributed.checkpoint``'s probe.

        ``get_state_dict`` / ``set_state_dict`` give an optimizer without state all-zero gradients and lr 0 and call
        ``step()``, to create the state they then save or load into. A filter step cannot run without a loss, so the
        state is created here without a step (nothing moves). Outside training: the zero test reads the gradients.
        """
        if self.state or any(float(group["lr"]) != 0 for group in self.param_groups):
            return False
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads or any(bool(local_tensor(g).count_nonzero()) for g in grads):
            return False
        with torch.no_grad():
            for group in self.param_groups:
                self._group_state(group)
                for p in group["params"]:
                    if p.grad is not None:
                        self._init_state(group, p)
        return True

    def _param_state_spec(self, group: dict[str, Any], p: Tensor) -> StateSpec:
        """Shapes and dtypes of ``p``'s per-tensor state, made on meta (nothing is allocated)."""
        probe: dict[str, Any] = {}
        self._init_param_state(group, torch.empty_like(local_tensor(p), device="meta"), probe)
        return spec_of(probe)

    def _expected_state(self, group: dict[str, Any], p: Tensor) -> StateSpec:
        """Shapes and dtypes of ``p``'s state (and of the group state if ``p`` leads its group), made on meta."""
        spec = self._param_state_spec(group, p)
        if p is group["params"][0]:
            kw = {"device": torch.device("meta"), "dtype": state_dtype(p)}
            probe: dict[str, Any] = {"measurement_noise": torch.empty((), **kw),
                                     "skipped_steps": torch.empty((), dtype=torch.int64, device="meta"),
                                     "noise_updates": torch.empty((), dtype=torch.int64, device="meta")}
            self._init_group_state(group, probe, kw)
            spec.update(spec_of(probe))
        return spec

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict, with the filter's phase in each group's state (see :data:`_PREDICTED`).

        Every value in ``state`` is a tensor, so ``torch.load(weights_only=True)``, ``torch.distributed.checkpoint``
        and torch's comparisons take it as they take AdamW's.
        """
        packed = super().state_dict()
        gate = self.__dict__.get("_pending_gate")
        for index, saved_group in enumerate(packed["param_groups"]):
            key = saved_group["params"][0] if saved_group["params"] else None
            values = packed["state"].get(key)
            if values is None or "measurement_noise" not in values:  # no group state yet
                continue
            device = values["measurement_noise"].device
            packed["state"][key] = {  # a new dict: super().state_dict() hands out the live one
                **values,
                _PREDICTED: torch.tensor(self._predicted_groups.get(index, False)),
                _PREDICTION_GATE: (torch.ones((), dtype=torch.bool, device=device) if gate is None
                                   else gate.to(device, copy=True)),
            }
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        predicted, gate_open, state_dict = _read_phase(self, state_dict)  # checked before anything is loaded
        load_state_keep_dtypes(self, state_dict, self._expected_state)
        self._predicted_groups.clear()
        self._predicted_groups.update(predicted)
        # The outcome of an update() before the load says nothing about the loaded state: the loaded gate replaces
        # it. Only a closed gate (a skipped update() whose prediction still stands) changes what comes next.
        self._take_pending_gate()
        if not gate_open and not all(predicted.get(i, False) for i in range(len(self.param_groups))):
            device = self.param_groups[0]["params"][0].device
            self.__dict__["_pending_gate"] = torch.zeros((), dtype=torch.bool, device=device)
        # A state dict saved per rank (or before state was sharded) holds local shards as plain tensors: make the
        # per-element state of DTensor parameters DTensors again, or a later distributed checkpoint would save them
        # as replicated (see _sharding).
        for group in self.param_groups:
            for p in group["params"]:
                if _is_dtensor(p) and p in self.state:
                    shard_state(p, self.state[p], self._param_state_spec(group, p))

    # ------------------------------------------------------------------ the three ways in
    def step(self, closure: Callable[[], Tensor | float] | None = None, *,
             loss: Tensor | float | None = None) -> Tensor | float | None:
        """One filter step: measure the loss, correct the parameters, predict the next step.

        Args:
            closure: re-evaluates the model: zeroes the gradients, computes the loss, calls ``backward`` on its
                mean and returns the loss (0-d batch mean, or 1-d per-sample losses; as in ``torch.optim``, a
                Python number or any one-element tensor is a batch mean too). Its return value is returned.
            loss: the loss whose gradient has already been computed by ``loss.mean().backward()``, 0-d or 1-d (or
                a Python number / one-element tensor: the batch mean).
        """
        if closure is not None and loss is not None:
            raise TypeError(f"{type(self).__name__}.step() takes a closure or loss=, not both")
        if closure is None and loss is None:
            if self._checkpoint_probe():
                return None
            raise TypeError(_NO_LOSS_MESSAGE.format(name=type(self).__name__))
        self._validate_changed_groups()
        hyper_ok = self._hyperparameters_ok()  # raises on a non-finite number before anything is written
        returned = loss
        if closure is None:
            measured = self._checked_loss(loss, "loss")  # before anything is written
        with torch.no_grad():
            # The pending prediction comes first: the closure's forward pass is the measurement of the predicted
            # parameters. (Should the closure raise, the prediction stands and is not made again.)
            self._ensure_predicted(ends_predicted=True)
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
            measured = self._checked_loss(returned, "the closure's return value")
        with torch.no_grad():
            ok = self._measure(measured, hyper_ok)
            self._measured()
            self._time_update(gate=ok)
        return returned

    def _measurement_device(self) -> torch.device:
        """Where the loss is measured: the device of the first parameter, which holds the first group's R."""
        return self.param_groups[0]["params"][0].device

    def _checked_loss(self, loss: Any, what: str) -> Tensor:
        """The loss handed to :meth:`step` as a checked tensor (see :func:`~kalmanopt.optim.noise.check_loss`).

        As ``torch.optim`` types the closure ``Callable[[], float]`` (LBFGS takes ``float(closure())``), a Python
        number is a batch mean (a float64 0-d tensor: no precision is lost) and so is a one-element tensor of any
        shape, e.g. ``(1, 1)``; 0-d and 1-d tensors are taken as they are.
        """
        if isinstance(loss, Tensor):
            if loss.dim() > 1 and loss.numel() == 1:
                loss = loss.reshape(())
        elif isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            loss = torch.full((), float(loss), dtype=torch.float64, device=self._measurement_device())
        else:
            raise TypeError(f"{type(self).__name__}.step(): {what} must be the loss, a tensor (0-d batch mean or 1-d "
                            f"per-sample losses) or a Python number, got {type(loss)!r}")
        measured = _to_device(check_loss(loss), self._measurement_device())
        for group in self.param_groups:
            check_statistic(measured, group["r_stat"])
        return measured

    def _measure(self, measured: Tensor, hyper_ok: Tensor | None) -> Tensor | None:
        """The measurement update of :meth:`step` from a checked loss; returns the gate of the next prediction.

        A subclass may take the whole update on a faster path (KOALA++'s fused kernel), with the same semantics.
        """
        moments = self._all_reduce(loss_moments(measured))
        loss_mean = moments[0] / moments[2]
        return self._measurement_update(loss_mean, lambda group: loss_statistic(moments, group["r_stat"]), hyper_ok)

    def _measure_given(self, loss_mean: Tensor, statistic: Tensor, hyper_ok: Tensor | None) -> Tensor | None:
        """The measurement update of :meth:`update` (mean and R statistic given, summed over ranks); returns ``ok``
        (None where a subclass's faster path took it: the gate of the next prediction is then not needed)."""
        return self._measurement_update(loss_mean, lambda group: statistic, hyper_ok)

    def predict(self) -> None:
        """The filter's time update (the papers' ``predict()``); call it before the forward pass.

        After an :meth:`update` that was skipped (bad input), the prediction it consumed is still current, so this
        call is then a no-op on the device: a skipped ``predict``/``update`` pair leaves no trace.
        """
        self._validate_changed_groups()
        hyper_ok = self._hyperparameters_ok()
        with torch.no_grad():
            self._time_update(gate=_both(self._take_pending_gate(), hyper_ok))

    def update(self, loss_mean: Tensor | float, loss_var: Tensor | float) -> None:
        """The filter's measurement update (the papers' ``update``), after ``backward`` on the mean loss.

        ``loss_mean`` is the batch-mean loss; ``loss_var`` is fed to the average that estimates R as it is (the
        original KOALA passes ``mean(loss_i ** 2)``). If :meth:`predict` was not called since the last update,
        it is called first.
        """
        device = self._measurement_device()
        mean = _to_device(self._as_scalar("loss_mean", loss_mean), device)
        var = _to_device(self._as_scalar("loss_var", loss_var), device)
        if not isinstance(loss_var, Tensor) and loss_var < 0:
            raise ValueError(f"loss_var must be non-negative, got {loss_var}")
        self._validate_changed_groups()
        hyper_ok = self._hyperparameters_ok()
        with torch.no_grad():
            self._ensure_predicted(ends_predicted=False)
            mean, var, ranks = self._all_reduce(torch.stack([mean, var.to(mean), torch.ones_like(mean)])).unbind(0)
            ok = self._measure_given(mean / ranks, var / ranks, hyper_ok)
            self._measured()
        # The next prediction (explicit, or the one step()/update() make first) is gated by this outcome: after a
        # skipped update the current prediction still stands, and predicting again would move KOALA-M twice.
        # (None: no gate; a path that took the whole update reports no outcome, its prediction changes nothing.)
        self.__dict__["_pending_gate"] = ok

    def _take_pending_gate(self) -> Tensor | None:
        return self.__dict__.pop("_pending_gate", None)

    def _hyperparameters_ok(self) -> Tensor | None:
        """Check every group's hyperparameters (see :func:`check_group_numbers`); the device flag for tensor ones."""
        flags = [torch.isfinite(t.detach()).all() for g in self.param_groups for t in check_group_numbers(g)]
        if not flags:
            return None
        device = self._measurement_device()  # a CPU tensor lr for a CUDA model: its flag goes there, unblocking
        return torch.stack([_to_device(f, device) for f in flags]).all()

    def _distributed(self) -> bool:
        """Whether the loss statistics are summed over more than one rank (see :meth:`_all_reduce`)."""
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self._process_group) > 1

    def _all_reduce(self, values: Tensor) -> Tensor:
        """Sum ``values`` over the data-parallel group when running distributed; identity otherwise."""
        if not self._distributed():
            return values
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self._process_group)
        return values

    @staticmethod
    def _as_scalar(name: str, value: Tensor | float) -> Tensor:
        if isinstance(value, Tensor):
            if value.numel() != 1:  # one element in any shape is that number, as for step's loss
                raise ValueError(f"{name} must be a scalar (0-d tensor or number), got shape {tuple(value.shape)}")
            value = value.detach().reshape(())
            return value.to(torch.promote_types(value.dtype, torch.float32))
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a tensor or a number, got {type(value)!r}")
        return torch.tensor(float(value), dtype=torch.float64)

    # ------------------------------------------------------------------ the filter
    def _ensure_predicted(self, *, ends_predicted: bool) -> None:
        """Make the pending prediction; ``ends_predicted``: whether the caller leaves the filter predicted (step()
        does, update() does not), which is what the next call will find."""
        if torch.compiler.is_compiling():
            self._init_group(ends_predicted)
        self._predict_pending()

    def _predict_pending(self) -> None:
        gate = self._take_pending_gate()
        for group in self.param_groups:
            self._group_state(group)  # a group state made here is not predicted yet
        if not all(self._predicted_groups.get(index, False) for index in range(len(self.param_groups))):
            self._time_update(gate=_both(gate, self._hyperparameters_ok()), only_pending=True)

    def _init_group(self, predict: bool) -> None:
        """Create the missing state (groups, and tensors with a gradient); with ``predict``, make the pending
        prediction too.

        Under ``torch.compile`` dynamo runs a method of this name eagerly, while tracing, instead of tracing it (as
        for ``torch.optim.Adam._init_group``; ``torch._dynamo.variables.optimizer``), and then guards on the state it
        made. Traced instead, lazy state creation becomes part of the first graph, which guards on the state being
        empty (``not opt.state``) and fails that guard at the second step: a second compilation. The graph also
        guards on each group's phase (``_predicted_groups``, host-side bools), so the first call has to find it as
        every later call will:
        ``step()`` ends predicted, so the pending prediction of a fresh state is made here (``predict``);
        ``update()`` ends unpredicted, so its graph makes the prediction itself. Where dynamo cannot intercept the
        call it traces it: correct, only compiled twice.
        """
        with torch.no_grad():
            for index, group in enumerate(self.param_groups):
                self._group_state(group)
                self._predicted_groups.setdefault(index, False)  # the graph guards on the entry: make it now
                for p in group["params"]:
                    if p.grad is not None and "step" not in self.state[p]:
                        self._init_state(group, p)
            if predict:
                self._predict_pending()

    def _time_update(self, gate: Tensor | None, only_pending: bool = False) -> None:
        predicted = self._predicted_groups
        for index, group in enumerate(self.param_groups):
            st = self._group_state(group)
            if only_pending and predicted.get(index, False):
                continue
            self._predict_group(group, st, None if gate is None else gate.to(st["measurement_noise"].device))
            predicted[index] = True

    def _measured(self) -> None:
        """Mark every group's prediction as consumed by the measurement just made."""
        predicted = self._predicted_groups
        for index in range(len(self.param_groups)):
            predicted[index] = False

    def _predict_group(self, group: dict[str, Any], group_state: dict[str, Any], gate: Tensor | None) -> None:
        """Time update of one group. ``gate`` (0-d bool or None) masks it: False leaves everything unchanged."""

    def _measurement_update(self, loss_mean: Tensor, statistic_for: Callable[[dict[str, Any]], Tensor],
                            hyper_ok: Tensor | None = None) -> Tensor:
        """Correct every group with the measured loss; returns the device flag ``ok`` (False: step skipped).

        Every check comes before the first write: the inputs, then what is derived from them, each in the dtype it
        is stored or computed in (a float64 loss of 1e20 is finite, its square in float32 state is not).
        """
        ok = torch.isfinite(loss_mean)
        if hyper_ok is not None:  # tensor hyperparameters (see check_group_numbers)
            ok = ok & hyper_ok.to(ok.device)
        # Set by torch.amp.GradScaler.step for optimizers with _step_supports_amp_scaling.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None:
            ok = ok & (found_inf.to(ok.device) == 0)
        pending = []
        for index, group in enumerate(self.param_groups):
            st = self._group_state(group)
            previous = st["measurement_noise"]
            statistic = statistic_for(group)
            stat = statistic.to(previous)  # the statistic in the state dtype of R
            # The loss and its statistic must fit every state dtype of the group (a float64 loss of 1e30 is finite,
            # its square in a float32 tensor's state is not), whichever parameter holds R.
            narrowest = narrowest_state_dtype(group)
            fits = torch.isfinite(statistic.to(narrowest)) & torch.isfinite(loss_mean.to(narrowest))
            ok = ok & (fits.to(previous.device) & torch.isfinite(stat) & (stat >= 0)).to(ok.device)
            buckets = self._gather(group, grad_scale, index)
            for b in buckets:
                ok = ok & b.finite.to(ok.device)
            pending.append((group, st, stat, buckets))
        planned = []
        for group, st, stat, buckets in pending:
            previous = st["measurement_noise"]
            if "noise_updates" not in st:  # a checkpoint from before the counter: R has been measured
                st["noise_updates"] = torch.ones((), dtype=torch.int64, device=previous.device)
            noise, stored = measurement_noise(previous, stat, group["r"], group["alpha_r"], group.get("r_clip"),
                                              first=st["noise_updates"] == 0)
            narrowest = narrowest_state_dtype(group)  # R is used in every tensor's state dtype
            ok = ok & (torch.isfinite(noise.to(narrowest)) & torch.isfinite(stored.to(narrowest))).to(ok.device)
            group_loss = loss_mean.to(previous.device)
            for b in buckets:
                b.sanitize()
                ok = ok & torch.isfinite(b.layer_loss(group_loss, group["weight_decay"])).all().to(ok.device)
            derived = self._check_group(group, st, buckets, group_loss, noise)
            if derived is not None:
                ok = ok & derived.to(ok.device)
            planned.append((group, st, noise, stored, buckets, group_loss))
        for group, st, noise, stored, buckets, group_loss in planned:
            previous = st["measurement_noise"]
            group_ok = ok.to(previous.device)
            noise = torch.where(group_ok, noise, previous)
            copy_into(previous, torch.where(group_ok, stored, previous))
            st["skipped_steps"].add_((~group_ok).to(torch.int64))
            st["noise_updates"].add_(group_ok.to(torch.int64))
            self._correct_group(group, st, buckets, group_loss, noise, group_ok)
        return ok

    def _check_group(self, group: dict[str, Any], group_state: dict[str, Any], buckets: list[GradBucket],
                     loss_mean: Tensor, noise: Tensor) -> Tensor | None:
        """The algorithm's checks of what this step would write, before anything is written (a 0-d bool or None).

        Called for every group before any group is corrected; False skips the whole step. A subclass may stash what
        it computed here in ``bucket.plan`` for :meth:`_correct_group` to reuse.
        """
        return None

    def _correct_group(self, group: dict[str, Any], group_state: dict[str, Any], buckets: list[GradBucket],
                       loss_mean: Tensor, noise: Tensor, ok: Tensor) -> None:
        """Measurement update of one group (all on the group leader's device, ``ok`` masks every write)."""
        raise NotImplementedError

    def _use_foreach(self, group: dict[str, Any]) -> bool:
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return all(p.device.type in ("cpu", "cuda") for p in group["params"])

    def _scratch(self, key: tuple, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat buffer for ``h``, reused across steps; not optimizer state (neither saved nor loaded).

        Reuse matters on CPU: an allocation of tens of MB is mapped fresh and page-faulted on every step (measured
        35 ms for 47 MB with one thread, close to a whole ``AdamW(foreach=True)`` step on the same parameters).
        The buffer costs one float per parameter, as AdamW's per-step temporaries do.
        """
        if torch.compiler.is_compiling():
            return torch.empty(numel, dtype=dtype, device=device)  # the compiler plans its own buffers
        cache = self.__dict__.setdefault("_scratch_buffers", {})
        buf = cache.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def _gather(self, group: dict[str, Any], grad_scale: Tensor | None = None, index: int = 0) -> list[GradBucket]:
        """Collect the parameters with gradients into (device, state dtype) buckets and form ``h``."""
        by_key: dict[tuple, tuple[list[Tensor], list[Tensor], list[dict], Callable | None]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            local = local_tensor(p)
            st = self.state[p]
            if "step" not in st:
                st = self._init_state(group, p)
            shard_key, shard_sum = shard_reducer(p)
            key = (local.device, state_dtype(p), shard_key)
            params, grads, states, _ = by_key.setdefault(key, ([], [], [], shard_sum))
            params.append(local)
            grads.append(local_tensor(p.grad))
            states.append(st if local is p else local_state(st))  # the kernels work on local shards
        foreach = self._use_foreach(group)
        if not foreach and any(key[2] is not None for key in by_key):
            raise ValueError("sharded (DTensor) parameters need the multi-tensor path: foreach=True")
        wd = group["weight_decay"]
        buckets = []
        for key, (ps, gs, sts, shard_sum) in by_key.items():
            scratch = None
            if foreach:
                scratch = self._scratch((index, *key[:2], id(key[2])), sum(p.numel() for p in ps), key[1], key[0])
            buckets.append(_effective_gradient(ps, gs, sts, key[1], wd, foreach, grad_scale, shard_sum, scratch))
        return buckets


def _effective_gradient(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], dtype: torch.dtype,
                        weight_decay: float, foreach: bool, grad_scale: Tensor | None = None,
                        shard_sum: Callable[[Tensor], Tensor] | None = None,
                        scratch: Tensor | None = None) -> GradBucket:
    """h = g / grad_scale + weight_decay * theta, in ``dtype``, with the per-tensor squared norms."""
    device = params[0].device
    inv_scale = None if grad_scale is None else grad_scale.to(device=device, dtype=dtype).reciprocal()
    if foreach:
        sizes = [p.numel() for p in params]
        h_flat = torch.empty(sum(sizes), dtype=dtype, device=device) if scratch is None else scratch
        h = [chunk.view(p.shape) for chunk, p in zip(h_flat.split(sizes), params, strict=True)]
        torch._foreach_copy_(h, grads)  # casts to the state dtype, reads any memory layout
        if inv_scale is not None:
            h_flat.mul_(inv_scale)
        param_sq = None
        if weight_decay != 0:
            torch._foreach_add_(h, params, alpha=weight_decay)
            param_sq = squared_norms(params).to(dtype)
        grad_sq = squared_norms(h)
    else:
        h_flat = None
        h = [g.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True) for g in grads]
        if inv_scale is not None:
            for hi in h:
                hi.mul_(inv_scale)
        param_sq = None
        if weight_decay != 0:
            for hi, p in zip(h, params, strict=True):
                hi.add_(p.to(dtype), alpha=weight_decay)
            param_sq = torch.stack([p.to(dtype).square().sum() for p in params])
        grad_sq = torch.stack([hi.square().sum() for hi in h])
    if shard_sum is not None:
        grad_sq, param_sq = (shard_sum(grad_sq), None) if param_sq is None else reduce_if(shard_sum, grad_sq, param_sq)
    finite = torch.isfinite(grad_sq).all()
    if param_sq is not None:
        finite = finite & torch.isfinite(param_sq).all()
    return GradBucket(params, states, h, h_flat, grad_sq, param_sq, finite, shard_sum)
