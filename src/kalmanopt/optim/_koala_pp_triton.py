"""The fused KOALA++ step on CUDA (``fused=True``, and the default there): Triton kernels over all tensors at once.

The same step as the C kernel (:mod:`kalmanopt.optim._koala_pp_fused`) in the same two passes, written in Triton
(:mod:`kalmanopt.kernels.koala_pp_triton`, which says what each of its five launches does). This module is the host
side: it checks the tensors the kernels will write through, builds the tables that map programs to tensors (one row
of data pointers per state key, one chunk table per kind of tensor) and launches the kernels.

No host synchronisation: the tables live on the device and are rebuilt only when a tensor, its storage or the set of
stepped tensors changes (the gradients' pointers, new tensors at most steps, are a table of their own). A table or a
hyperparameter row that changed goes to the device through pinned memory without waiting for it, as
``torch.optim``'s fused steps hand over their lists as kernel arguments. Every guard (non-finite loss, gradient,
statistic, R; GradScaler's found-inf) is decided on the device, and a skipped step writes nothing but its counter.
The kernels are compiled by Triton at their first launch (a few seconds per kind of tensor and option set, cached on
disk by Triton); not one GPU has run them yet in this project (``docs/benchmarks/gpu_check.sh`` is the check to run).

Triton's interpreter runs the same kernels on CPU tensors: with :data:`ON_CPU` (``KALMANOPT_TRITON_ON_CPU=1``, for the
tests only) the optimizer takes this path on CPU instead of the C kernel, and the kernels for CPU tensors are
loaded a second time with ``TRITON_INTERPRET=1`` (:func:`kernels`), so that interpreted and compiled kernels coexist
in one process.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["ON_CPU", "PARAM_DTYPES", "STATE_KEYS", "available", "compile_for_gpu", "fused_step", "kernels",
           "options_of", "planned_step", "ptxas_available", "unavailable_reason", "wanted"]

#: Parameter dtypes the kernels step (float32 state for the 16-bit ones, as the other paths keep it).
PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: Each stepped tensor's state in the caller's ``tensors`` list, in this order (None where the option is off):
#: the optimizer's ``_STATE_KEYS``, the C kernel's order.
STATE_KEYS = ("prev_grad", "gain", "exp_avg_sq", "momentum_buffer", "prev_S", "prev_grad_sq", "prev_grad_v",
              "prev_q", "step")
_PER_ELEMENT = ("prev_grad", "gain", "exp_avg_sq", "momentum_buffer")
_ROWS = 10  # the kernels' pointer table: the parameter, then the state keys in this order
_ROW = {key: k + 1 for k, key in enumerate(STATE_KEYS)}
_COEF, _SUMS = 8, 7
_NHP, _HP_FLAGS, _HP_WD = 15, 11, 3  # koala_pp._hyper's layout (the C kernel's KOALA_NHP)

#: Take the Triton path for CPU tensors too, through Triton's interpreter (the tests' switch; never faster).
ON_CPU = os.environ.get("KALMANOPT_TRITON_ON_CPU", "0").strip().lower() in ("1", "true", "yes", "on")

# Launch geometry. A chunk of BLOCK * ITERS elements per program of the two element passes (8 elements per thread at
# 4 warps, in 4 steps); BLOCK_C partial sums per iteration of the per-tensor sums; BLOCK_T tensors per iteration of
# the scalar pass. Under the interpreter, whose cost is per operation and not per element, one step per chunk of 1024
# (a few chunks for the tests' largest tensor) and small tiles.
_GEOMETRY = {False: dict(block=1024, iters=4, block_c=256, block_t=128, warps=4),
             True: dict(block=1024, iters=1, block_c=16, block_t=16, warps=1)}

_lock = threading.Lock()
_modules: dict[bool, Any] = {}
_reason: str | None = None
_checked = False


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def kernels(interpret: bool) -> Any:
    """The kernels module: compiled (CUDA tensors), or loaded again with ``TRITON_INTERPRET=1`` (CPU tensors).

    Triton decides between compiling and interpreting when a kernel is defined, so the interpreted copy is a second
    module built from the same file, under its own name.
    """
    module = _modules.get(interpret)
    if module is not None:
        return module
    with _lock:
        if interpret not in _modules:
            name = "kalmanopt.kernels.koala_pp_triton"
            if not interpret or _interpreted():
                module = importlib.import_module(name)
            else:
                spec = importlib.util.find_spec(name)
                module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
                    name + "_interpreted", spec.origin))
                saved = os.environ.get("TRITON_INTERPRET")
                os.environ["TRITON_INTERPRET"] = "1"
                try:
                    module.__spec__.loader.exec_module(module)
                finally:
                    if saved is None:
                        del os.environ["TRITON_INTERPRET"]
                    else:
                        os.environ["TRITON_INTERPRET"] = saved
                sys.modules[module.__name__] = module
                _direct_device_functions(module)
            _modules[interpret] = module
    return _modules[interpret]


def _check_triton() -> None:
    global _reason, _checked
    if _checked:
        return
    with _lock:
        if not _checked:
            if importlib.util.find_spec("triton") is None:
                _reason = "Triton is not installed (pip install triton)"
            _checked = True
    if _reason is None:
        try:
            kernels(False)
        except Exception as error:  # a broken installation: the multi-tensor path, and the reason for fused=True
            _reason = f"the Triton kernels could not be loaded ({type(error).__name__}: {error})"


def wanted(device: torch.device) -> bool:
    """Whether a step on ``device`` belongs to the Triton kernels: CUDA, and CPU under :data:`ON_CPU`."""
    return device.type == "cuda" or (device.type == "cpu" and ON_CPU)


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can step tensors on ``device`` (importing Triton at the first call). While dynamo
    traces: what an earlier call found (``KOALAPlusPlus._init_group``, which dynamo runs eagerly, asks first)."""
    if not wanted(device):
        return False
    if not torch.compiler.is_compiling():
        _check_triton()
    return _checked and _reason is None


def unavailable_reason(device: torch.device) -> str | None:
    """Why :func:`available` is False for ``device`` (None when it is True)."""
    if not wanted(device):
        return f"the Triton kernels run on CUDA tensors, not on {device.type}"
    _check_triton()
    return _reason


# ------------------------------------------------------------------------------------------------------ the plan
class _Plan(NamedTuple):
    """What the kernels read to find the tensors, on the device, with the scratch buffers of one step."""

    key: tuple
    tensors: list  # the tensors whose pointers are in the tables: the plan is reused only for these very objects
    options: tuple  # per group: (metric, momentum, weight decay, lr_adaptation), the constants of its kernels
    device: torch.device
    compute: torch.dtype
    storage: torch.dtype
    n_groups: int
    tables: Tensor  # [_ROWS, n] int64 data pointers (0 where an option is off)
    numels: Tensor  # [n] int64
    tensor_group: Tensor  # [n] int32
    chunk_tensor: Tensor  # [chunks] int32
    chunk_start: Tensor  # [chunks] int64
    chunk_range: Tensor  # [2, n] int32: each tensor's chunks lo .. hi - 1
    # [6, groups] int64: R, skipped_steps, noise_updates, lr_log_scale (0 without lr_adaptation) pointers; the
    # group's first and last + 1 tensor
    group_tables: Tensor
    # (param dtype, precondition, momentum, use_wd, lr_adaptation, first chunk, chunks, members, aligned) per kind
    launches: list
    partials: Tensor  # [chunks, 7] float64
    sums: Tensor  # [n, 7] float64
    inv_corrections: Tensor  # [n] compute dtype
    coefficients: Tensor  # [n, 8] compute dtype
    stored_partials: Tensor  # [chunks, 2] float64 (bfloat16 state)


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host table on ``device`` without waiting: through pinned memory, asynchronously, on CUDA."""
    table = torch.tensor(values if values else [0], dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _check(t: Tensor | None, name: str, dtype: torch.dtype, device: torch.device, numel: int) -> None:
    """The kernels write through ``t``'s data pointer: it must be exactly what they expect."""
    if t is None:
        raise ValueError(f"KOALAPlusPlus: state {name!r} is missing")
    if t.dtype != dtype or t.device != device or t.is_sparse or not t.is_contiguous() or t.numel() != numel:
        raise ValueError(f"KOALAPlusPlus: state {name!r} is {t.dtype} of {t.numel()} elements on {t.device} "
                         f"(contiguous: {t.is_contiguous()}), the step needs a contiguous {dtype} tensor of {numel} "
                         f"on {device}")


def options_of(hyper: list[float]) -> tuple:
    """Per group, what the kernels are compiled for: (metric, momentum, weight decay, lr_adaptation), from
    ``koala_pp._hyper``."""
    return tuple((bool(int(hyper[j + _HP_FLAGS]) & 2), bool(int(hyper[j + _HP_FLAGS]) & 4), hyper[j + _HP_WD] != 0,
                  bool(int(hyper[j + _HP_FLAGS]) & 64))
                 for j in range(0, len(hyper), _NHP))


def _plan(params: list[Tensor], tensors: list[Tensor | None], shared: list[Tensor], first: list[int],
          hyper: list[float], compute: torch.dtype, storage: torch.dtype, device: torch.device, chunk: int,
          cache: dict, scales: list[Tensor | None]) -> _Plan | None:
    """The cached plan while the same tensors come back; else a new one, every tensor checked (ValueError for state
    the kernels cannot write through; None, nothing done, for group state of another dtype)."""
    width, n, n_groups = len(STATE_KEYS), len(params), len(first) - 1
    options = options_of(hyper)
    objects = params + tensors + shared + scales
    pointers = tuple(0 if t is None else t.data_ptr() for t in objects)
    key = (device, compute, storage, tuple(p.dtype for p in params), tuple(p.numel() for p in params), tuple(first),
           options, pointers, chunk)
    plan = cache.get("plan")
    if plan is not None and plan.key == key and all(a is b for a, b in zip(plan.tensors, objects, strict=True)):
        return plan
    cache.pop("plan", None)
    for j in range(n_groups):
        noise, skipped, updates = shared[3 * j:3 * j + 3]
        for t, want in ((noise, compute), (skipped, torch.int64), (updates, torch.int64)):
            if t.dtype != want or t.device != device or t.numel() != 1:
                return None
        scale = scales[j]  # lr_adaptation's log multiplier, where the group's flags say it adapts
        if (scale is None) == options[j][3] or (scale is not None and (
                scale.dtype != torch.float32 or scale.device != device or scale.numel() != 1)):
            return None
    rows: list[list[int]] = [[0] * n for _ in range(_ROWS)]
    group_of, numels = [0] * n, [p.numel() for p in params]
    for j in range(n_groups):
        precondition, momentum, _, _ = options[j]
        for i in range(first[j], first[j + 1]):
            group_of[i] = j
            rows[0][i] = params[i].data_ptr()
            for k, name in enumerate(STATE_KEYS):
                value = tensors[i * width + k]
                if (name == "exp_avg_sq" and not precondition) or (name == "momentum_buffer" and not momentum):
                    continue
                want = torch.float32 if name == "step" else storage if name in _PER_ELEMENT else compute
                _check(value, name, want, device, numels[i] if name in _PER_ELEMENT else 1)
                rows[_ROW[name]][i] = pointers[n + i * width + k]
    # One launch of each element pass per kind of tensor (parameter dtype and the group's options are constants of
    # the compiled kernel); a tensor's chunks are consecutive.
    kinds: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        kinds.setdefault((p.dtype, *options[group_of[i]]), []).append(i)
    chunk_tensor, chunk_start, lo, hi, launches = [], [], [0] * n, [0] * n, []
    for kind, members in kinds.items():
        base = len(chunk_tensor)
        for i in members:
            lo[i] = len(chunk_tensor)
            for start in range(0, numels[i], chunk):
                chunk_tensor.append(i)
                chunk_start.append(start)
            hi[i] = len(chunk_tensor)
        # Vectorised loads need 16-byte aligned tensors (views into a flat buffer may not be); the gradients are
        # checked at each step.
        aligned = all(rows[r][i] % 16 == 0 for i in members for r in range(5) if rows[r][i])
        launches.append((*kind, base, len(chunk_tensor) - base, members, aligned))
    chunks = len(chunk_tensor)
    plan = _Plan(
        key=key, tensors=objects, options=options, device=device, compute=compute, storage=storage, n_groups=n_groups,
        tables=_upload([x for row in rows for x in row], torch.int64, device),
        numels=_upload(numels, torch.int64, device), tensor_group=_upload(group_of, torch.int32, device),
        chunk_tensor=_upload(chunk_tensor, torch.int32, device), chunk_start=_upload(chunk_start, torch.int64, device),
        chunk_range=_upload(lo + hi, torch.int32, device),
        group_tables=_upload([shared[3 * j + k].data_ptr() for k in range(3) for j in range(n_groups)]
                             + [0 if t is None else t.data_ptr() for t in scales] + first[:-1] + first[1:],
                             torch.int64, device),
        launches=launches,
        partials=torch.empty(max(chunks, 1), _SUMS, dtype=torch.float64, device=device),
        sums=torch.empty(max(n, 1), _SUMS, dtype=torch.float64, device=device),
        inv_corrections=torch.empty(max(n, 1), dtype=compute, device=device),
        coefficients=torch.empty(max(n, 1), _COEF, dtype=compute, device=device),
        stored_partials=torch.empty(max(chunks, 1) if storage != compute else 1, 2, dtype=torch.float64,
                                    device=device))
    cache["plan"] = plan
    return plan


def _cached_table(cache: dict, name: str, values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small table on the device, uploaded again only when its values change (the gradients' pointers, a
    scheduler's lr)."""
    entry = cache.get(name)
    if entry is None or entry[0] != values or entry[1].device != device:
        entry = cache[name] = (values, _upload(list(values), dtype, device))
    return entry[1]


# ------------------------------------------------------------------------------------------------------ the step
def fused_step(params: list[Tensor], grads: list[Tensor], tensors: list[Tensor | None], shared: list[Tensor],
               first: list[int], hyper: list[float], measurement: Tensor, given: bool, grad_scale: Tensor | None,
               found_inf: Tensor | None, cache: dict, scales: list[Tensor | None] | None = None) -> Tensor | None:
    """One fused KOALA++ step of every param group on the Triton kernels (the C kernel's ``koala_pp_step``).

    ``params``/``grads``: the stepped tensors (those with a gradient) in group order, group j holding
    ``first[j]:first[j + 1]`` with the 15 hyperparameters ``hyper[15 j:15 (j + 1)]`` (``koala_pp._hyper``);
    ``tensors``: each one's :data:`STATE_KEYS` entries (None where the option is off); ``shared``: each group's R,
    skipped-step counter and committed-update counter. ``measurement``: the loss moments [sum, sum of squares,
    count], or [mean, statistic] when ``given``; ``grad_scale``/``found_inf``: GradScaler's, or None. ``cache``: a
    dict the caller keeps across steps (the device tables). ``scales``: each group's ``lr_log_scale`` (0-d float32)
    where its flags ask for ``lr_adaptation``, else None (None: no group adapts).

    Returns the diagnostics buffer (the C kernel's layout: step size, S, h.v and ||h~||^2 per tensor, then each
    group's R, then the loss), or None where these tensors are not the kernels' (nothing is done then): parameters
    of several devices or compute dtypes, gradients unlike their parameters, group state of another dtype.
    Raises ValueError for per-tensor state the kernels cannot write through.
    """
    if not shared:
        return None
    scales = [None] * (len(first) - 1) if scales is None else list(scales)
    device = shared[0].device
    compute = shared[0].dtype
    if compute not in (torch.float32, torch.float64) or not available(device):
        return None
    for p, g in zip(params, grads, strict=True):
        if p.device != device or p.dtype not in PARAM_DTYPES or g.dtype != p.dtype or g.device != device \
                or p.is_sparse or g.is_sparse or not (p.is_contiguous() and g.is_contiguous()) \
                or (torch.float64 if p.dtype == torch.float64 else torch.float32) != compute:
            return None
    storage = tensors[STATE_KEYS.index("gain")].dtype if params else compute
    if storage not in (compute, torch.bfloat16):
        return None
    if measurement.dtype not in (torch.float32, torch.float64) or measurement.device != device \
            or measurement.numel() != (2 if given else 3):
        return None
    for t in (grad_scale, found_inf):
        if t is not None and (t.dtype != torch.float32 or t.device != device or t.numel() != 1):
            return None
    geometry = _GEOMETRY[device.type != "cuda"]
    plan = _plan(params, tensors, shared, first, hyper, compute, storage, device,
                 geometry["block"] * geometry["iters"], cache, scales)
    if plan is None:
        return None
    return planned_step(plan, grads, hyper, measurement, given, grad_scale, found_inf, cache)


def planned_step(plan: _Plan, grads: list[Tensor], hyper: list[float], measurement: Tensor, given: bool,
                 grad_scale: Tensor | None, found_inf: Tensor | None, cache: dict) -> Tensor:
    """:func:`fused_step` once its plan is known: the gradients and the hyperparameters (this step's, with the
    plan's options) go to the device, then the five launches. Every tensor must have been checked against the plan
    (the optimizer's cached step does it: ``KOALAPlusPlus._fused_triton_cached``)."""
    device, interpret = plan.device, plan.device.type != "cuda"
    n = len(grads)
    grad_pointers = tuple([g.data_ptr() for g in grads])
    grad_table = _cached_table(cache, "grads", grad_pointers, torch.int64, device)
    hyper_table = _cached_table(cache, "hyper", tuple(hyper), torch.float64, device)
    out = torch.empty(4 * n + plan.n_groups + 1, dtype=plan.compute, device=device)
    _launch(kernels(interpret), plan, grad_table, grad_pointers, hyper_table, n, plan.n_groups, plan.compute,
            plan.storage, measurement.contiguous(), given, grad_scale, found_inf, out, _GEOMETRY[interpret],
            interpret)
    return out


def _launch(k: Any, plan: _Plan, grad_table: Tensor, grad_pointers: tuple, hyper_table: Tensor, n: int,
            n_groups: int, compute: torch.dtype, storage: torch.dtype, measurement: Tensor, given: bool,
            grad_scale: Tensor | None, found_inf: Tensor | None, out: Tensor, geometry: dict, interpret: bool) -> None:
    import triton.language as tl

    dtypes = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}
    COMPUTE, STATE = dtypes[compute], dtypes[storage]  # noqa: N806 (the kernels' constant names)
    stored_sums = storage != compute
    scale = out if grad_scale is None else grad_scale  # any pointer where there is none: not read then
    found = out if found_inf is None else found_inf
    # Multiply-adds contracted (as the C kernel is compiled), said explicitly: Triton's default is changing.
    chunked = dict(BLOCK=geometry["block"], ITERS=geometry["iters"], num_warps=geometry["warps"],
                   enable_fp_fusion=True)
    small = dict(num_warps=geometry["warps"], enable_fp_fusion=True)
    common = (plan.tables, grad_table, plan.numels, plan.tensor_group, plan.chunk_tensor, plan.chunk_start,
              hyper_table, scale, plan.inv_corrections)
    # the vectorised kernels only where every tensor of the launch, this step's gradients too, is 16-byte aligned
    aligned = [launch[8] and all(grad_pointers[i] % 16 == 0 for i in launch[7]) for launch in plan.launches]
    with _launch_context(out.device, interpret):
        for (dtype, precondition, _, use_wd, adapt, base, chunks, _, _), align in zip(plan.launches, aligned,
                                                                                     strict=True):
            if chunks:
                k.koala_pp_reduce[(chunks,)](*common, plan.partials, base, n, PARAM=dtypes[dtype], STATE=STATE,
                                             COMPUTE=COMPUTE, PRECONDITION=precondition, USE_WD=use_wd,
                                             ADAPT=adapt, HAS_SCALE=grad_scale is not None, ALIGNED=align, **chunked)
        if n:
            k.koala_pp_sums[(n,)](plan.partials, plan.chunk_range, plan.sums, n, BLOCK_C=geometry["block_c"],
                                  **small)
        k.koala_pp_scalars[(1,)](plan.tables, plan.numels, plan.tensor_group, plan.sums, hyper_table,
                                 plan.group_tables, measurement, found, plan.coefficients, out, n, n_groups,
                                 GIVEN=given, MEAS=dtypes[measurement.dtype], COMPUTE=COMPUTE,
                                 HAS_FOUND_INF=found_inf is not None, STORED_SUMS=stored_sums,
                                 BLOCK_T=geometry["block_t"], **small)
        for (dtype, precondition, momentum, use_wd, _, base, chunks, _, _), align in zip(plan.launches, aligned,
                                                                                        strict=True):
            if chunks:
                k.koala_pp_update[(chunks,)](*common, plan.coefficients, plan.stored_partials, base, n,
                                             PARAM=dtypes[dtype], STATE=STATE, COMPUTE=COMPUTE,
                                             PRECONDITION=precondition, MOMENTUM=momentum, USE_WD=use_wd,
                                             HAS_SCALE=grad_scale is not None, STORED_SUMS=stored_sums,
                                             ALIGNED=align, **chunked)
        if stored_sums and n:
            k.koala_pp_stored_sums[(n,)](plan.tables, plan.tensor_group, hyper_table, plan.coefficients,
                                         plan.stored_partials, plan.chunk_range, n, COMPUTE=COMPUTE,
                                         BLOCK_C=geometry["block_c"], **small)


@contextlib.contextmanager
def _launch_context(device: torch.device, interpret: bool):
    """The launches on ``device``'s own CUDA context; under the interpreter, numpy's warnings for what the guards
    discard anyway (0/0 of a restart's unused branch) silenced, and Triton's own library interpreted too."""
    if interpret:
        import numpy as np

        with np.errstate(all="ignore"), _interpreted_library():
            yield
    else:
        with torch.cuda.device(device):
            yield


def _direct_device_functions(module: Any) -> None:
    """The interpreted module's device functions (``_round``, ``_finite``, ...) called as the plain functions the
    interpreter made of them: an interpreted call would patch ``triton.language`` again at every call (most of the
    interpreter's time), which the kernel's launch has already done for its whole duration."""
    from triton.runtime.interpreter import InterpretedFunction

    for name, value in list(vars(module).items()):
        if isinstance(value, InterpretedFunction) and name.startswith("_"):
            setattr(module, name, value.rewrite())


@contextlib.contextmanager
def _interpreted_library():
    """``triton.language``'s functions written in Triton (``tl.sum``, ``tl.zeros``) interpreted while they run.

    Triton made them compiled kernels' functions when it was imported without ``TRITON_INTERPRET=1``; an interpreted
    kernel calling one would fail. For the duration of the interpreted launches they are replaced by interpreted
    copies of the same Python functions (the interpreter itself patches ``triton.language`` the same way per launch).
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = {name: value for name, value in vars(tl).items() if isinstance(value, JITFunction)}
    try:
        for name, value in saved.items():
            setattr(tl, name, InterpretedFunction(value.fn).rewrite())
        yield
    finally:
        for name, value in saved.items():
            setattr(tl, name, value)


# ------------------------------------------------------------------------------------- compiling without a GPU
def ptxas_available() -> bool:
    """Whether Triton's CUDA backend (with the ``ptxas`` it bundles) is installed: :func:`compile_for_gpu` can then
    compile the kernels for a GPU on a machine without one."""
    spec = importlib.util.find_spec("triton")
    return spec is not None and spec.origin is not None and \
        (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def compile_for_gpu(arch: int = 90, param: torch.dtype = torch.float32, storage: torch.dtype | None = None) -> dict:
    """Compile every kernel for CUDA ``sm_<arch>`` without a GPU (Triton's front end, LLVM and ptxas): what the
    interpreter cannot check, that the kernels are valid Triton for the device. One specialisation per kernel: the
    default preset's (metric and momentum, no weight decay), for ``param`` parameters and ``storage`` state
    (default: the compute dtype). Returns the compiled kernels by name."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = kernels(False)
    names = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
    dtypes = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}
    compute = torch.float64 if param == torch.float64 else torch.float32
    storage = storage or compute
    c, s = "*" + names[compute], dict(PARAM=dtypes[param], STATE=dtypes[storage], COMPUTE=dtypes[compute])
    tables = {"tables": "*i64", "grads": "*i64", "numels": "*i64", "tensor_group": "*i32", "chunk_tensor": "*i32",
              "chunk_start": "*i64", "hyper": "*fp64", "grad_scale": "*fp32", "inv_corrections": c}
    flags = dict(PRECONDITION=True, USE_WD=False, HAS_SCALE=False, ALIGNED=True, BLOCK=1024, ITERS=4)
    stored_sums = storage != compute
    kernels_and_arguments = {
        "koala_pp_reduce": ({**tables, "partials": "*fp64", "chunk_base": "i32", "n": "i32"},
                            {**s, **flags, "ADAPT": True}),
        "koala_pp_sums": ({"partials": "*fp64", "chunk_range": "*i32", "sums": "*fp64", "n": "i32"},
                          dict(BLOCK_C=256)),
        "koala_pp_scalars": ({"tables": "*i64", "numels": "*i64", "tensor_group": "*i32", "sums": "*fp64",
                              "hyper": "*fp64", "group_tables": "*i64", "measurement": "*fp32", "found_inf": "*fp32",
                              "coefficients": c, "out": c, "n": "i32", "n_groups": "i32"},
                             dict(GIVEN=False, MEAS=tl.float32, COMPUTE=s["COMPUTE"], HAS_FOUND_INF=True,
                                  STORED_SUMS=stored_sums, BLOCK_T=128)),
        "koala_pp_update": ({**tables, "coefficients": c, "stored_partials": "*fp64", "chunk_base": "i32", "n": "i32"},
                            {**s, **flags, "MOMENTUM": True, "STORED_SUMS": stored_sums}),
        "koala_pp_stored_sums": ({"tables": "*i64", "tensor_group": "*i32", "hyper": "*fp64", "coefficients": c,
                                  "stored_partials": "*fp64", "chunk_range": "*i32", "n": "i32"},
                                 dict(COMPUTE=s["COMPUTE"], BLOCK_C=256)),
    }
    compiled = {}
    for name, (signature, constants) in kernels_and_arguments.items():
        source = ASTSource(fn=getattr(k, name), signature={**signature, **{key: "constexpr" for key in constants}},
                           constexprs=constants)
        options = {"num_warps": 4, "enable_fp_fusion": True}
        compiled[name] = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled
