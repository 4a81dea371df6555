"""The fused KOALA++ kernel as a PyTorch custom operator, ``torch.ops.kalmanopt.koala_pp_fused_step``.

Why an operator: ``torch.compile`` cannot trace a :mod:`ctypes` call (it works on raw data pointers), and tracing
the multi-tensor path instead gave a graph that took minutes to compile on ResNet-sized parameter lists and ran many
times slower than the kernel (docs/benchmarks/step.md, "torch.compile"). Registered with
:func:`torch.library.custom_op`, the kernel is one opaque node of the compiled graph: dynamo and inductor see its
schema (which tensors it writes) and its fake implementation (the shape of what it returns), never its insides.

The eager step (:meth:`KOALAPlusPlus._fused_step` outside compilation) calls the kernel directly, with pointer
arrays cached across steps; the operator is what the compiled step calls. Both run the same C function with the
same arguments (the operator forms the loss moments with the eager code too), so the two are bit for bit the same.

On CUDA the operator's implementation is the Triton step (:mod:`kalmanopt.optim._koala_pp_triton`, registered with
``register_kernel("cuda")``), which the eager CUDA step calls too: one operator, one node of the compiled graph and one
compilation on either device.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

import torch
from torch import Tensor

from . import _koala_pp_fused, _koala_pp_triton
from .noise import loss_moments

__all__ = ["F_LR_ADAPTATION", "GIVEN", "HP_FLAGS", "KINDS", "LOSS", "MOMENTS", "NAME", "NHP", "STATE_KEYS", "SUFFIXES",
           "SUMS", "adapts", "available", "build", "call_kernel", "fused_step", "triton_step", "uses"]

NAME = "kalmanopt::koala_pp_fused_step"
#: the kernel's measurement kinds by the measurement's dtype (+2: the mean and the statistic are given, ``update()``)
KINDS = {torch.float32: 0, torch.float64: 1}
#: what the operator's ``measurement`` holds: the loss moments, [mean, statistic], or the loss itself
MOMENTS, GIVEN, LOSS = 0, 1, 2
#: the kernel variant for (compute dtype, per-element state dtype)
SUFFIXES = {(torch.float32, torch.float32): "f32", (torch.float64, torch.float64): "f64",
            (torch.float32, torch.bfloat16): "f32_bf16", (torch.float64, torch.bfloat16): "f64_bf16"}
#: each stepped tensor's state in the operator's ``state`` list, in the kernel's order; the two optional buffers only
#: where the group uses them (see :func:`uses`)
STATE_KEYS = ("prev_grad", "gain", "exp_avg_sq", "momentum_buffer", "prev_S", "prev_grad_sq", "prev_grad_v",
              "prev_q", "step")
_PER_ELEMENT = 4  # the first four keys are per element, the rest 0-d
_GROUP_KEYS = ("measurement_noise", "skipped_steps", "noise_updates")
_OPTIONAL = {"exp_avg_sq": 2, "momentum_buffer": 4}  # the kernel's flag bits (F_PRECONDITION, F_MOMENTUM)
NHP, HP_FLAGS = 15, 11  # KOALA_NHP hyperparameters per group, and where the flags lie among them
F_LR_ADAPTATION = 64  # the kernel's flag for lr_adaptation: the group's lr_log_scale is in the state list
SUMS = 7  # KOALA_SUMS: the kernel's pass-1 sums per tensor (its scratch)


def adapts(flags: int) -> bool:
    """Whether a group with these kernel flags adapts its step cap (``lr_adaptation``): its ``lr_log_scale`` (0-d
    float32) is then in the operator's ``state`` list."""
    return bool(flags & F_LR_ADAPTATION)


def _entry(state: list[Tensor], position: int, limit: int) -> Tensor:
    """``state[position]`` while the walk through the per-tensor and per-group entries is below ``limit``; the one
    error otherwise (the list is shorter than the groups' options ask)."""
    if position >= limit:
        raise ValueError(f"{NAME}: {len(state)} state entries are too few for the groups' options")
    return state[position]


def uses(key: str, flags: int) -> bool:
    """Whether a group with these kernel flags reads the state ``key`` (the metric's and the momentum's buffers only
    with those options on); the operator's ``state`` list holds exactly these entries."""
    bit = _OPTIONAL.get(key)
    return bit is None or bool(flags & bit)


_built: bool | None = None  # what build() found (None: not asked yet)


def build() -> bool:
    """Whether the kernel is built, building it at the first call in a process (cached per machine)."""
    global _built
    _built = _koala_pp_fused.load() is not None
    return _built


def available() -> bool:
    """:func:`build`, except while dynamo traces: then what it last found (not asked yet: False). The build, a
    subprocess under a lock, is nothing dynamo can trace; :meth:`KOALAPlusPlus._init_group`, which dynamo runs
    before tracing, calls :func:`build`. (Not ``torch.compiler.assume_constant_result``: that imports dynamo, a second
    at every ``import kalmanopt``.)"""
    if torch.compiler.is_compiling():
        return bool(_built)
    return build()


def _array(values: list, ctype: Any = ctypes.c_void_p) -> Any:
    return (ctype * len(values))(*values)


def _check(t: Tensor | None, name: str, dtype: torch.dtype, numel: int) -> None:
    """The kernel reads and writes ``t`` through its data pointer: it must be exactly what the kernel expects."""
    if t is None:
        raise ValueError(f"{NAME}: {name} is missing")
    if t.dtype != dtype or t.device.type != "cpu" or t.is_sparse or not t.is_contiguous() or t.numel() != numel:
        raise ValueError(f"{NAME}: {name} is {t.dtype} of {t.numel()} elements on {t.device} "
                         f"(contiguous: {t.is_contiguous()}), the kernel needs a contiguous {dtype} CPU tensor of "
                         f"{numel}")


# Pointer arrays of the state, checked once and reused while the same tensors come back (the eager path keeps the
# equivalent cache on the optimizer). Found by the pointers, then confirmed through weak references: the very same
# tensor objects, and none is kept alive by the cache. A few entries, for a few optimizers compiled side by side.
_plans: dict[tuple, tuple[list[weakref.ref], tuple]] = {}
_plans_lock = threading.Lock()
_MAX_PLANS = 8


def _state_arrays(dtype: torch.dtype, storage: torch.dtype, numels: list[int], state: list[Tensor],
                  first: list[int], flags: list[int]) -> tuple:
    """The kernel's pointer arrays: one per group key (R, skipped, updates, lr_log_scale: NULL where the group does
    not adapt), one per state key (NULL where the group does not use it), and the sizes."""
    pointers = tuple(t.data_ptr() for t in state)
    key = (dtype, storage, tuple(numels), tuple(first), tuple(flags), pointers)
    cached = _plans.get(key)
    if cached is not None and all(ref() is t for ref, t in zip(cached[0], state, strict=True)):
        return cached[1]
    columns: list[list[int | None]] = [[] for _ in STATE_KEYS]
    position = 0
    for j, group_flags in enumerate(flags):
        for i in range(first[j], first[j + 1]):
            for k, name in enumerate(STATE_KEYS):
                if not uses(name, group_flags):
                    columns[k].append(None)
                    continue
                want = torch.float32 if name == "step" else storage if k < _PER_ELEMENT else dtype
                _check(_entry(state, position, len(state)), f"state {name!r} of tensor {i}", want,
                       numels[i] if k < _PER_ELEMENT else 1)
                columns[k].append(pointers[position])
                position += 1
    scales: list[int | None] = []
    for j, group_flags in enumerate(flags):
        if adapts(group_flags):
            _check(_entry(state, position, len(state)), f"group state 'lr_log_scale' of group {j}", torch.float32, 1)
            scales.append(pointers[position])
            position += 1
        else:
            scales.append(None)
    if len(state) != position + 3 * len(flags):
        raise ValueError(f"{NAME}: {len(state)} state entries, the groups' options ask for {position} + "
                         f"{3 * len(flags)}")
    for j in range(position, len(state), 3):
        for t, name, want in zip(state[j:j + 3], _GROUP_KEYS, (dtype, torch.int64, torch.int64), strict=True):
            _check(t, f"group state {name!r}", want, 1)
    groups = [list(pointers[position + k::3]) for k in range(3)] + [scales]
    plan = ([_array(c) for c in groups], [_array(c) for c in columns], _array(numels, ctypes.c_int64))
    with _plans_lock:
        _plans.pop(key, None)
        if len(_plans) >= _MAX_PLANS:
            _plans.pop(next(iter(_plans)))
        _plans[key] = ([weakref.ref(t) for t in state], plan)
    return plan


# Few schema arguments on purpose: torch.library's Python wrappers around the implementation (autograd, version
# counter bumps) cost time per argument on every call, quadratic in their number (fill_defaults), and a compiled step
# pays that on every step. Hence one flat list for all the optimizer state rather than one list per state key.
@torch.library.custom_op(NAME, mutates_args=("params", "state"), device_types="cpu")
def fused_step(params: list[Tensor], grads: list[Tensor], state: list[Tensor], first: list[int],
               hyper: list[float], measurement: Tensor, kind: int, grad_scale: Tensor | None,
               found_inf: Tensor | None) -> Tensor:
    """One fused KOALA++ step of every param group (``koala_pp_step`` in the kernel's source).

    ``params``, ``grads``: the stepped tensors (those with a gradient), in group order; group j holds
    ``first[j]:first[j + 1]`` and has the ``KOALA_NHP`` = 15 hyperparameters ``hyper[15 j:15 (j + 1)]``. ``state``:
    for each stepped tensor its :data:`STATE_KEYS` entries (the metric's and the momentum's buffers only where the
    group's flags ask for them, :func:`uses`), then the ``lr_log_scale`` of each group that adapts its cap
    (:func:`adapts`), then for each group R, the skipped-step counter and the committed-update counter (last, so that
    ``state[-3]`` is the last group's R). (No None entries for the options that are off: functionalization, as of
    torch 2.13, fails on a None in a mutated list.)
    ``measurement``: what ``kind`` says: :data:`MOMENTS`, the loss moments [sum, sum of squares, count];
    :data:`GIVEN`, [mean, statistic] (``update()``); :data:`LOSS`, the checked loss itself (0-d or 1-d), whose moments
    are formed here as the eager step forms them (:func:`~kalmanopt.optim.noise.loss_moments`), so that the compiled
    step is the eager one bit for bit (inductor sums in another order);
    ``grad_scale`` / ``found_inf``: GradScaler's, float32 of one element, or None. The kernel reads and writes
    through data pointers, so every tensor is checked first (dtype, CPU, contiguous, size).

    Returns the diagnostics buffer: step size, S, h.v and ||h~||^2 per tensor, then each group's R, then the loss.
    """
    library = _koala_pp_fused.load()
    if library is None:
        raise RuntimeError(f"{NAME}: the fused kernel is not available ({_koala_pp_fused.unavailable_reason()})")
    n, n_groups = len(params), len(first) - 1
    if n_groups < 1 or first[0] != 0 or first[-1] != n or len(hyper) != NHP * n_groups or len(state) < 3 * n_groups:
        raise ValueError(f"{NAME}: {n} tensors, {len(state)} state entries, {len(hyper)} hyperparameters and "
                         f"first={first} do not fit together")
    flags = [int(hyper[NHP * j + HP_FLAGS]) for j in range(n_groups)]
    dtype = state[-3].dtype  # the last group's R, kept in the compute dtype
    storage = state[1].dtype if n else dtype  # the first tensor's gain
    suffix = SUFFIXES.get((dtype, storage))
    if suffix is None:
        raise ValueError(f"{NAME}: no kernel for compute dtype {dtype} and state dtype {storage}")
    numels = [p.numel() for p in params]
    for p, g, numel in zip(params, grads, numels, strict=True):
        _check(p, "params", dtype, numel)
        _check(g, "grads", dtype, numel)
    for t in (grad_scale, found_inf):
        if t is not None:
            _check(t, "grad_scale/found_inf", torch.float32, 1)
    if kind == LOSS:
        measurement, kind = loss_moments(measurement), MOMENTS
    if kind not in (MOMENTS, GIVEN) or measurement.dtype not in KINDS or measurement.device.type != "cpu" \
            or measurement.numel() != (3 if kind == MOMENTS else 2):
        raise ValueError(f"{NAME}: measurement kind {kind}, {measurement.numel()} elements of {measurement.dtype} on "
                         f"{measurement.device}")
    measurement = measurement.contiguous()
    group_arrays, tensor_arrays, numel_array = _state_arrays(dtype, storage, numels, state, first, flags)
    out = torch.empty(4 * n + n_groups + 1, dtype=dtype)
    work = (ctypes.c_double * (SUMS * n + 2 * n_groups))()
    call_kernel(suffix, hyper, group_arrays, _array(first, ctypes.c_int32), params, grads, tensor_arrays, numel_array,
                measurement, kind == GIVEN, grad_scale, found_inf, work, out)
    return out


def call_kernel(suffix: str, hyper: list[float], group_arrays: list, first_array: Any, params: list[Tensor],
                grads: list[Tensor], tensor_arrays: list, numel_array: Any, measurement: Tensor, given: bool,
                grad_scale: Tensor | None, found_inf: Tensor | None, work: Any, out: Tensor) -> None:
    """The C call itself, shared by the operator and the eager step (which keeps its own checked, cached pointer
    arrays: see :meth:`KOALAPlusPlus._fused_plan`). Every tensor must have been checked: the kernel writes through
    the pointers. ``measurement``: contiguous loss moments, or [mean, statistic] when ``given``."""
    kernel = getattr(_koala_pp_fused.load(), f"koala_pp_step_{suffix}")
    kernel(len(group_arrays[0]), _array(hyper, ctypes.c_double), *group_arrays, first_array,
           _array([p.data_ptr() for p in params]), _array([g.data_ptr() for g in grads]), *tensor_arrays,
           numel_array, measurement.data_ptr(), KINDS[measurement.dtype] + (2 if given else 0),
           None if grad_scale is None else grad_scale.data_ptr(), None if found_inf is None else found_inf.data_ptr(),
           work, out.data_ptr(), torch.get_num_threads())


@fused_step.register_fake
def _(params, grads, state, first, hyper, measurement, kind, grad_scale, found_inf) -> Tensor:
    # the diagnostics buffer, in the compute dtype (that of R, the last group's state at the end of the list)
    return state[-3].new_empty(4 * len(params) + len(first))


# A few device-table caches for the CUDA implementation, one per set of stepped tensors (their pointers): a few
# optimizers compiled side by side keep theirs. The Triton step confirms a cached plan by the very tensor objects.
_triton_caches: dict[tuple, dict] = {}


@fused_step.register_kernel("cuda")
def _(params, grads, state, first, hyper, measurement, kind, grad_scale, found_inf) -> Tensor:
    """The CUDA implementation: the Triton kernels, with the same arguments and the same diagnostics buffer."""
    return triton_step(params, grads, state, first, hyper, measurement, kind, grad_scale, found_inf)


def triton_step(params: list[Tensor], grads: list[Tensor], state: list[Tensor], first: list[int], hyper: list[float],
                measurement: Tensor, kind: int, grad_scale: Tensor | None, found_inf: Tensor | None) -> Tensor:
    """:func:`fused_step`'s arguments (the optional buffers only where used) on the Triton step, whose layout has
    every state key of every tensor (None where unused). Raises where the Triton step declines these tensors: a
    compiled graph has no other path to take."""
    n, n_groups = len(params), len(first) - 1
    if n_groups < 1 or first[0] != 0 or first[-1] != n or len(hyper) != NHP * n_groups or len(state) < 3 * n_groups:
        raise ValueError(f"{NAME}: {n} tensors, {len(state)} state entries, {len(hyper)} hyperparameters and "
                         f"first={first} do not fit together")
    tensors: list[Tensor | None] = []
    position = 0
    for j in range(n_groups):
        flags = int(hyper[NHP * j + HP_FLAGS])
        for _ in range(first[j], first[j + 1]):
            for key in STATE_KEYS:
                if not uses(key, flags):
                    tensors.append(None)
                    continue
                tensors.append(_entry(state, position, len(state) - 3 * n_groups))
                position += 1
    scales: list[Tensor | None] = []  # each group's lr_log_scale, None where it does not adapt
    for j in range(n_groups):
        if not adapts(int(hyper[NHP * j + HP_FLAGS])):
            scales.append(None)
            continue
        scales.append(_entry(state, position, len(state) - 3 * n_groups))
        position += 1
    if position != len(state) - 3 * n_groups:
        raise ValueError(f"{NAME}: {len(state)} state entries, the groups' options ask for {position} + "
                         f"{3 * n_groups}")
    if kind == LOSS:
        measurement, kind = loss_moments(measurement), MOMENTS
    if kind not in (MOMENTS, GIVEN):
        raise ValueError(f"{NAME}: measurement kind {kind}")
    key = tuple(p.data_ptr() for p in params)
    cache = _triton_caches.get(key)
    if cache is None:
        if len(_triton_caches) >= _MAX_PLANS:
            _triton_caches.pop(next(iter(_triton_caches)))
        cache = _triton_caches[key] = {}
    out = _koala_pp_triton.fused_step(params, grads, tensors, state[position:], first, hyper, measurement,
                                      kind == GIVEN, grad_scale, found_inf, cache, scales)
    if out is None:
        reason = _koala_pp_triton.unavailable_reason(state[-3].device)
        raise ValueError(f"{NAME}: the Triton step cannot take these tensors (it needs parameters of one device and "
                         "compute dtype, gradients like their parameters, dense and contiguous, group state in the "
                         f"compute dtype){f': {reason}' if reason else ''}")
    return out
