"""The fused KOALA++ step in Triton (the CUDA default), run on CPU tensors through Triton's interpreter.

``_koala_pp_triton.ON_CPU`` sends the real optimizer's CPU step to the Triton kernels (interpreted) instead of the C
kernel; every test compares with the single-tensor reference (``foreach=False``) or checks a guard bit for bit.
The interpreter costs about 0.3 s per step here: few, small tensors (one of several chunks) and few steps.
"""

import copy
import functools
import math
import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install triton): the CUDA kernels cannot be run")

from kalmanopt import KOALAPlusPlus  # noqa: E402
from kalmanopt.optim import _koala_pp_triton  # noqa: E402

from conftest import NoSync, assert_unchanged, run_koala_pp, skipped_steps, snapshot, spoiled_step  # noqa: E402

SHAPES = [(3,), (4, 5), (2, 3, 3, 3), (1,), (2500,)]  # 2500: three chunks of the interpreter's 1024
CONFIGS = {
    "adaptive": {"lr": 2e-3},
    "adaptive_wd_fixed_r": {"lr": 2e-3, "weight_decay": 1e-2, "r": 0.3},
    "adaptive_below_floor": {"lr": 2e-3, "loss_floor": 1.0},  # losses in [0.5, 1.5): negative residuals too
    "metric_only_capped": {"loss_fraction": None, "lr": 0.4, "momentum": 0.0, "max_step": 0.05, "r": None,
                           "r_stat": "mean_variance"},
    "momentum_no_metric": {"lr": 2e-3, "precondition": False, "momentum": 0.5, "r_clip": None, "symmetric": False},
    "paper": {"preset": "paper", "lr": 0.5},
    "paper_wd_squared_mean": {"preset": "paper", "lr": 0.7, "weight_decay": 5e-3, "r_stat": "squared_mean"},
}
ROTATING = lambda k, i: (k + i) % 3 == 0  # noqa: E731 (a gradient of None now and then, per tensor)


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    monkeypatch.setattr(_koala_pp_triton, "ON_CPU", True)


@functools.cache
def _interpreter_problem():
    """Why this Triton's interpreter cannot run the kernels here (None: it can). Triton 3.6's interpreter converts a
    loop bound with ``int()`` of a one-element array, which numpy 2.4 no longer allows: the kernels' loops over a
    tensor's chunks or the tensors cannot run there (compiled for a GPU they can)."""
    width = _koala_pp_triton._SUMS  # the kernels' sums per chunk and tensor
    partials, chunk_range, sums = torch.zeros(2, width, dtype=torch.float64), \
        torch.tensor([0, 2], dtype=torch.int32), torch.empty(1, width, dtype=torch.float64)
    try:
        with _koala_pp_triton._launch_context(torch.device("cpu"), interpret=True):
            _koala_pp_triton.kernels(True).koala_pp_sums[(1,)](partials, chunk_range, sums, 1, BLOCK_C=16)
    except Exception as error:  # the interpreter's own failure, whatever its type
        import numpy as np
        import triton

        return f"Triton {triton.__version__}'s interpreter fails here (numpy {np.__version__}): {error}"
    return None


@pytest.fixture
def interpreter():
    problem = _interpreter_problem()
    if problem is not None:
        pytest.skip(problem)


needs_interpreter = pytest.mark.usefixtures("interpreter")


def _run(kwargs, *, steps=4, dtype=torch.float64, seed=0, none_schedule=None, groups=None, shapes=SHAPES):
    return run_koala_pp(shapes, kwargs, steps=steps, dtype=dtype, seed=seed, none_schedule=none_schedule,
                        groups=groups)


def _ran_triton(opt):
    return "_triton_cache" in opt.__dict__ and "_fused_work" not in opt.__dict__


def _tensors(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


def _assert_same(run_a, run_b, *, rtol, atol, state_rtol=None, state_atol=None):
    (pa, oa), (pb, ob) = run_a, run_b
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        sa, sb = _tensors(oa, a), _tensors(ob, b)
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            assert value.dtype == sb[key].dtype, key
            torch.testing.assert_close(value, sb[key], rtol=state_rtol or rtol, atol=state_atol or atol, msg=key)


@needs_interpreter
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_reference_float64(config):
    schedule = ROTATING if config in ("adaptive", "paper") else None
    reference = _run({**CONFIGS[config], "foreach": False}, none_schedule=schedule)
    triton = _run({**CONFIGS[config], "fused": True}, none_schedule=schedule)
    assert _ran_triton(triton[1])
    _assert_same(reference, triton, rtol=1e-12, atol=1e-12)
    for a, b in zip(reference[1].diagnostics(), triton[1].diagnostics(), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12, msg=key)


@needs_interpreter
def test_param_groups_with_their_own_options():
    def groups(params):
        return [{"params": params[:2], "lr": 1e-3, "q": 0.05, "weight_decay": 1e-2},
                {"params": params[2:4], "precondition": False, "momentum": 0.0, "r": 0.2, "symmetric": False},
                {"params": params[4:], "sigma": 0.3, "beta2": 0.9, "eps": 1e-6}]
    reference = _run({"lr": 2e-3, "foreach": False}, groups=groups, none_schedule=ROTATING)
    triton = _run({"lr": 2e-3, "fused": True}, groups=groups, none_schedule=ROTATING)
    assert _ran_triton(triton[1])
    # three kinds of tensors (options), three launches of each element-wise pass
    assert len(triton[1]._triton_cache["plan"].launches) == 3
    _assert_same(reference, triton, rtol=1e-12, atol=1e-12)


@needs_interpreter
@pytest.mark.parametrize("config", ["adaptive", "adaptive_wd_fixed_r", "paper"])
def test_matches_reference_float32(config):
    """float32: the same step up to the order of summation (the kernels sum in chunks, torch in its own order)."""
    reference = _run({**CONFIGS[config], "foreach": False}, dtype=torch.float32)
    triton = _run({**CONFIGS[config], "fused": True}, dtype=torch.float32)
    assert _ran_triton(triton[1])
    # parameters to 1e-6 relative; the state holds differences of nearly equal numbers (gain = v + q H), whose
    # float32 rounding is relative to the terms, not to the (small) difference
    _assert_same(reference, triton, rtol=1e-6, atol=1e-6, state_rtol=1e-4, state_atol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_parameters_with_float32_state(dtype):
    """16-bit parameters: the step in float32 state, the parameter rounded to nearest on store, as the reference
    does it (a value within a float32 ulp of a rounding boundary may round the other way: a few elements, by one
    unit of the parameter's dtype)."""
    reference = _run({**CONFIGS["adaptive"], "foreach": False}, dtype=dtype)
    triton = _run({**CONFIGS["adaptive"], "fused": True}, dtype=dtype)
    assert _ran_triton(triton[1])
    for a, b in zip(reference[0], triton[0], strict=True):
        assert a.dtype == b.dtype == dtype
        assert (a != b).sum() <= 0.01 * a.numel()
        torch.testing.assert_close(a.float(), b.float(), rtol=torch.finfo(dtype).eps, atol=1e-5)
        assert _tensors(triton[1], b)["gain"].dtype == torch.float32
    start = torch.randn(SHAPES[-1], generator=torch.Generator().manual_seed(0)).to(dtype)
    assert not torch.equal(triton[0][-1], start)  # it moved


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_bfloat16_state(dtype):
    """float64 compute: every stored bfloat16 element is the reference's, bit for bit (the rounding to nearest even
    is exercised exactly); float32: to rounding (see test_koala_pp_bf16)."""
    kw = {**CONFIGS["adaptive_wd_fixed_r"], "state_dtype": torch.bfloat16}
    reference = _run({**kw, "foreach": False}, dtype=dtype, none_schedule=ROTATING)
    triton = _run({**kw, "fused": True}, dtype=dtype, none_schedule=ROTATING)
    assert _ran_triton(triton[1])
    differ = total = 0
    for a, b in zip(reference[0], triton[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12 if dtype == torch.float64 else 1e-4, atol=1e-12)
        sa, sb = _tensors(reference[1], a), _tensors(triton[1], b)
        for key in ("prev_grad", "gain", "exp_avg_sq", "momentum_buffer"):
            assert sa[key].dtype == sb[key].dtype == torch.bfloat16
            if dtype == torch.float64:
                assert torch.equal(sa[key], sb[key]), key
            differ, total = differ + int((sa[key] != sb[key]).sum()), total + sa[key].numel()
        for key in ("prev_S", "prev_grad_sq", "prev_grad_v"):
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-12 if dtype == torch.float64 else 1e-3, atol=1e-9)
    assert differ <= 0.01 * total


@needs_interpreter
@pytest.mark.parametrize("bad", ["loss", "grad", "grad_overflow", "found_inf"])
def test_a_skipped_step_leaves_everything_bit_for_bit(bad):
    params, opt = _run({**CONFIGS["adaptive_wd_fixed_r"], "fused": True}, steps=2)
    before = snapshot(opt)
    loss = spoiled_step(opt, params, bad, inf_at=(4, (7,)))
    with NoSync():
        opt.step(loss=loss)
    assert _ran_triton(opt)
    assert_unchanged(opt, before)  # everything but the skip counter
    assert skipped_steps(opt) == 1


@needs_interpreter
def test_zero_and_missing_gradients_leave_their_tensors_alone():
    params, opt = _run({**CONFIGS["adaptive"], "fused": True}, steps=2)
    group_keys = ("measurement_noise", "skipped_steps", "noise_updates", "lr_log_scale")  # held by the first tensor
    saved = [{k: v.clone() for k, v in _tensors(opt, p).items() if k not in group_keys} for p in params[:2]]
    before = [p.detach().clone() for p in params[:2]]
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad = None
    params[1].grad.zero_()
    with NoSync():
        opt.step(loss=torch.tensor(1.2, dtype=torch.float64))
    for p, b, st in zip(params[:2], before, saved, strict=True):
        assert torch.equal(p, b)
        assert all(torch.equal(v, opt.state[p][k]) for k, v in st.items())
    assert float(opt.state[params[2]]["step"]) == 3.0  # the others stepped


@needs_interpreter
def test_grad_scaler_matches_reference():
    """``torch.amp.GradScaler`` hands over its scale and found-inf flag; the kernels unscale while they read the
    gradient. An overflowing step (scale too large for float16 gradients) is skipped and the scale backs off."""
    runs = []
    for kw in ({"fused": True}, {"foreach": False}):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
        opt = KOALAPlusPlus(model.parameters(), **CONFIGS["adaptive"], **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14)
        gen = torch.Generator().manual_seed(1)
        for k in range(3):
            x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad()
            losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            scaler.scale(losses.mean()).backward()
            if k == 1:
                model[0].weight.grad[0, 0] = math.inf  # an overflow in the scaled gradients
            scaler.step(opt, loss=losses.detach())
            scaler.update()
        runs.append((list(model.parameters()), opt))
    assert _ran_triton(runs[0][1])
    assert skipped_steps(runs[0][1]) == skipped_steps(runs[1][1]) == 1
    _assert_same(runs[1], runs[0], rtol=1e-6, atol=1e-6, state_rtol=1e-4, state_atol=1e-6)


@needs_interpreter
def test_update_with_the_loss_statistic_given():
    """``predict()`` / ``update(mean, statistic)``: the kernels take [mean, statistic] instead of the moments."""
    runs = []
    for kw in ({"fused": True}, {"foreach": False}):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES[:3]]
        opt = KOALAPlusPlus(params, preset="paper", lr=0.5, **kw)
        for _ in range(3):
            opt.predict()
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            losses = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
            opt.update(losses.mean(), losses.square().mean())
        runs.append((params, opt))
    assert _ran_triton(runs[0][1])
    _assert_same(runs[1], runs[0], rtol=1e-12, atol=1e-12)


@needs_interpreter
def test_dispatch():
    """ON_CPU (CUDA's dispatch): the default and fused=True take the Triton kernels, 16-bit parameters included;
    foreach opts out; where Triton cannot run, fused=True raises and the default falls back."""
    assert _ran_triton(_run({"lr": 2e-3}, steps=1)[1])
    assert not _ran_triton(_run({"lr": 2e-3, "foreach": True}, steps=1)[1])
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    KOALAPlusPlus(model.parameters(), fused=True)  # the C kernel would refuse bfloat16 parameters


@needs_interpreter
def test_without_triton_fused_raises_and_the_default_falls_back(monkeypatch):
    monkeypatch.setattr(_koala_pp_triton, "_checked", True)
    monkeypatch.setattr(_koala_pp_triton, "_reason", "Triton is not installed (test)")
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        KOALAPlusPlus([torch.zeros(3, requires_grad=True)], fused=True)
    default = _run({"lr": 2e-3}, steps=2)
    assert "_triton_cache" not in default[1].__dict__
    _assert_same(default, _run({"lr": 2e-3, "foreach": True}, steps=2), rtol=0, atol=0)


@needs_interpreter
def test_replaced_state_is_checked_before_the_kernels_write_through_it():
    params, opt = _run({**CONFIGS["adaptive"], "fused": True}, steps=2)
    plan = opt._triton_cache["plan"]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # every state tensor is a new one: a new plan
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step(loss=torch.tensor(1.0, dtype=torch.float64))
    assert opt._triton_cache["plan"] is not plan
    # a state tensor of another size, put in place of the old one, or under it (the same tensor object, whose storage
    # is another): never written through
    good = copy.deepcopy(opt.state_dict())
    for replace in (lambda st: st.__setitem__("gain", torch.zeros(5, dtype=torch.float64)),
                    lambda st: setattr(st["prev_grad"], "data", torch.zeros(5, dtype=torch.float64))):
        opt.load_state_dict(copy.deepcopy(good))
        opt.step(loss=torch.tensor(1.0, dtype=torch.float64))  # a plan for these state tensors
        before = [p.detach().clone() for p in params]
        replace(opt.state[params[1]])
        with pytest.raises(ValueError, match="'gain'|'prev_grad'"):
            opt.step(loss=torch.tensor(1.0, dtype=torch.float64))
        assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))


@needs_interpreter
def test_hyperparameters_changed_between_steps_take_effect():
    """A schedule's lr, weight decay switched on, a group's momentum switched off: the next step's, as in the
    reference (the kernels' options are part of the cached plan, the hyperparameters go to the device each step)."""
    def changes(opt, k):
        if k == 1:
            opt.param_groups[0]["lr"] = 5e-4
        if k == 2:
            opt.param_groups[0]["weight_decay"] = 1e-2
        if k == 3:
            opt.param_groups[0]["momentum"] = 0.0

    runs = []
    for kw in ({"fused": True}, {"foreach": False}):
        gen = torch.Generator().manual_seed(6)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
        opt = KOALAPlusPlus(params, **CONFIGS["adaptive"], **kw)
        for k in range(5):
            changes(opt, k)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step(loss=torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
        runs.append((params, opt))
    assert _ran_triton(runs[0][1])
    _assert_same(runs[1], runs[0], rtol=1e-12, atol=1e-12)


def _adapting_groups(params):
    """lr_adaptation with kappas and floors (lr_scale_min) of their own, one group without the metric, one without
    adaptation. The second group's multiplier falls to its floor 0.9 at the third float64 step of ``_run``: a kernel
    clipping to another bound strays from the reference."""
    return [{"params": params[:2], "lr_adaptation": 0.3, "weight_decay": 1e-2, "lr_scale_min": 1e-3},
            {"params": params[2:3], "lr_adaptation": 0.7, "precondition": False, "lr_scale_min": 0.9},
            {"params": params[3:4], "lr_adaptation": None},
            {"params": params[4:], "lr_adaptation": 0.05}]


def _log_scales(params, opt):
    return [opt.state[params[i]].get("lr_log_scale") for i in (0, 2, 3, 4)]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_lr_adaptation_matches_reference(dtype):
    """The cap's multiplier (the cosine summed over each group in the reduction and scalar passes): the reference's
    step, float64 to rounding, float32 up to the order of summation; float32 without missing gradients, so that the
    steps after the first take the cached plan."""
    schedule = ROTATING if dtype == torch.float64 else None
    reference = _run({"lr": 2e-3, "foreach": False}, groups=_adapting_groups, none_schedule=schedule, dtype=dtype)
    triton = _run({"lr": 2e-3, "fused": True}, groups=_adapting_groups, none_schedule=schedule, dtype=dtype)
    assert _ran_triton(triton[1])
    if dtype == torch.float64:
        _assert_same(reference, triton, rtol=1e-12, atol=1e-12)
        for a, b in zip(reference[1].diagnostics(), triton[1].diagnostics(), strict=True):
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12, msg=key)
    else:
        _assert_same(reference, triton, rtol=1e-6, atol=1e-6, state_rtol=1e-4, state_atol=1e-6)
    scales = _log_scales(*triton)
    assert scales[2] is None and all(abs(float(x)) > 0.02 for x in scales if x is not None)  # they moved
    assert len({float(x) for x in scales if x is not None}) == 3  # each group its own
    assert all(torch.allclose(x, y, rtol=1e-5, atol=0) for x, y in zip(scales, _log_scales(*reference), strict=True)
               if x is not None)


@needs_interpreter
@pytest.mark.parametrize("bad", ["loss", "found_inf"])
def test_lr_adaptation_skipped_step_leaves_the_multiplier_bit_for_bit(bad):
    params, opt = _run({"lr": 2e-3, "fused": True}, groups=_adapting_groups, steps=3)
    before = snapshot(opt)
    loss = spoiled_step(opt, params, bad)
    with NoSync():
        opt.step(loss=loss)
    assert _ran_triton(opt)
    assert_unchanged(opt, before)  # the multipliers too: everything but the skip counters
    assert skipped_steps(opt) == 4  # one per group


@needs_interpreter
def test_unaligned_tensors_take_the_unvectorised_kernels():
    """Vectorised loads need 16-byte aligned tensors: parameters that are views into a flat buffer at an odd offset
    are stepped by the kernels compiled without that promise (and correctly)."""
    runs = []
    for kw in ({"fused": True}, {"foreach": False}):
        flat = torch.randn(1 + 20 + 2500, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        params = [torch.nn.Parameter(flat[1:21].view(4, 5)), torch.nn.Parameter(flat[21:])]
        assert params[0].data_ptr() % 16 != 0
        opt = KOALAPlusPlus(params, **CONFIGS["adaptive"], **kw)
        gen = torch.Generator().manual_seed(5)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step(loss=torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
        runs.append((params, opt))
    assert [launch[-1] for launch in runs[0][1]._triton_cache["plan"].launches] == [False]  # aligned: no
    _assert_same(runs[1], runs[0], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not _koala_pp_triton.ptxas_available(),
                    reason="no ptxas here (Triton's CUDA backend) to compile the kernels for a GPU")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="TRITON_INTERPRET=1 for the whole process: every kernel is interpreted, none compiles")
def test_kernels_compile_for_a_gpu():
    """What the interpreter does not check: the kernels are valid Triton for the GPU (compiled for sm_90, no GPU
    needed), in the default configuration's specialisations."""
    compiled = _koala_pp_triton.compile_for_gpu(arch=90)
    assert {"koala_pp_reduce", "koala_pp_sums", "koala_pp_scalars", "koala_pp_update",
            "koala_pp_stored_sums"} <= set(compiled)


def test_the_operator_has_a_cuda_implementation_and_its_fake_works_for_cuda_tensors():
    """torch.compile on CUDA: the same custom operator as on CPU, one node; its fake implementation (what the
    compiler traces) gives the diagnostics buffer on the parameters' device, with CUDA tensors that do not exist."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kalmanopt.optim import _koala_pp_op

    assert torch._C._dispatch_has_kernel_for_dispatch_key(_koala_pp_op.NAME, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(_koala_pp_op.NAME, "CPU")
    with FakeTensorMode():
        p = torch.empty(3, 4, device="cuda", dtype=torch.bfloat16)
        per_element = [torch.empty(3, 4, device="cuda") for _ in range(4)]
        scalars = [torch.empty((), device="cuda") for _ in range(4)] + [torch.empty((), device="cuda")]
        group = [torch.empty((), device="cuda"), *(torch.empty((), dtype=torch.int64, device="cuda"),) * 2]
        flags = 1 | 2 | 4  # symmetric, metric, momentum: all four per-element buffers
        hyper = [0.0] * _koala_pp_op.NHP
        hyper[_koala_pp_op.HP_FLAGS] = float(flags)
        out = _koala_pp_op.fused_step([p], [p], per_element + scalars + group, [0, 1], hyper,
                                      torch.empty(3, device="cuda"), _koala_pp_op.MOMENTS, None, None)
        assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == (4 + 2,)


@needs_interpreter
def test_the_operators_triton_implementation_is_the_eager_step(monkeypatch):
    """The operator's CUDA implementation takes the operator's layout (the optional buffers only where used, the
    adapting groups' lr_log_scale), the eager Triton step the optimizer's: run through the operator's layout here, the
    steps are the same bit for bit."""
    from kalmanopt.optim import _koala_pp_op

    eager, calls = _koala_pp_triton.fused_step, []

    def through_the_operator(params, grads, tensors, shared, first, hyper, measurement, given, grad_scale,
                             found_inf, cache, scales=None):
        calls.append(len(params))
        state = [t for t in tensors if t is not None] + [t for t in scales or [] if t is not None] + shared
        kind = _koala_pp_op.GIVEN if given else _koala_pp_op.MOMENTS
        _koala_pp_triton.fused_step = eager  # what the operator calls
        try:
            return _koala_pp_op.triton_step(params, grads, state, first, hyper, measurement, kind, grad_scale,
                                            found_inf)
        finally:
            _koala_pp_triton.fused_step = through_the_operator

    def groups(params):
        return [{"params": params[:2], "precondition": False, "momentum": 0.0},
                {"params": params[2:4], "lr_adaptation": 0.3, "lr_scale_min": 1e-3},
                {"params": params[4:], "lr_adaptation": None}]

    direct = _run({"lr": 2e-3, "fused": True}, groups=groups, steps=3, none_schedule=ROTATING)
    assert float(direct[1].state[direct[0][2]]["lr_log_scale"]) != 0.0
    monkeypatch.setattr(_koala_pp_triton, "fused_step", through_the_operator)
    operator = _run({"lr": 2e-3, "fused": True}, groups=groups, steps=3, none_schedule=ROTATING)
    assert len(calls) == 3
    _assert_same(direct, operator, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ on a GPU (skipped here)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (the kernels compiled for it); the tests above run the same "
                                "kernels on CPU through Triton's interpreter")
CUDA_SHAPES = [(3,), (64, 3, 7, 7), (1000, 512), (1000,), (300_001,)]  # several chunks, an odd tail


def _run_cuda(kwargs, *, dtype=torch.float32, steps=4, seed=0, bad_step=None, scaler=False, compiled=False):
    """KOALA++ on CUDA tensors drawn on CPU (the same numbers for every run); at ``bad_step`` a NaN loss, with
    ``scaler`` GradScaler's scale and its found-inf flag instead."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to("cuda", dtype).requires_grad_() for s in CUDA_SHAPES]
    opt = KOALAPlusPlus(params, **kwargs)

    def step(losses):
        opt.step(loss=losses)

    if compiled:
        step = torch.compile(step, fullgraph=True)
    for k in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen).to("cuda", dtype)
            p.grad = (256.0 * g if scaler else g) if p.grad is None else 0.7 * p.grad + 0.3 * g
        losses = (torch.rand(8, generator=gen) + 0.5).to("cuda")
        if scaler:
            opt.grad_scale = torch.tensor(256.0, device="cuda")
            opt.found_inf = torch.tensor(1.0 if k == bad_step else 0.0, device="cuda")
        elif k == bad_step:
            losses[3] = math.nan
        step(losses)
    return params, opt


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("config", ["adaptive", "adaptive_wd_fixed_r", "paper"])
def test_cuda_default_is_the_triton_step_and_matches_the_reference(config, dtype):
    reference = _run_cuda({**CONFIGS[config], "foreach": False}, dtype=dtype, bad_step=2)
    triton = _run_cuda(CONFIGS[config], dtype=dtype, bad_step=2)
    assert _ran_triton(triton[1]) and skipped_steps(triton[1]) == 1
    tight = dtype == torch.float64
    _assert_same(reference, triton, rtol=1e-12 if tight else 1e-5, atol=1e-12 if tight else 1e-6,
                 state_rtol=1e-10 if tight else 1e-3, state_atol=1e-12 if tight else 1e-6)


@needs_cuda
@pytest.mark.parametrize(("dtype", "storage"), [(torch.bfloat16, None), (torch.float16, None),
                                                (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_cuda_low_precision(dtype, storage):
    kw = {**CONFIGS["adaptive"], "state_dtype": storage}
    reference = _run_cuda({**kw, "foreach": False}, dtype=dtype)
    triton = _run_cuda(kw, dtype=dtype)
    assert _ran_triton(triton[1])
    for a, b in zip(reference[0], triton[0], strict=True):
        assert (a != b).float().mean() <= 0.01
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-3)


@needs_cuda
def test_cuda_skipped_steps_are_bit_for_bit_without_synchronising():
    params, opt = _run_cuda(CONFIGS["adaptive_wd_fixed_r"], steps=2)
    before = snapshot(opt)
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad[5, 5] = math.inf
    with NoSync():
        opt.step(loss=torch.rand(4, device="cuda") + 0.5)
    torch.cuda.synchronize()
    assert_unchanged(opt, before)  # everything but the skip counter
    assert skipped_steps(opt) == 1


@needs_cuda
def test_cuda_grad_scaler_protocol():
    reference = _run_cuda({**CONFIGS["adaptive"], "foreach": False}, scaler=True, bad_step=1)
    triton = _run_cuda(CONFIGS["adaptive"], scaler=True, bad_step=1)
    assert skipped_steps(triton[1]) == 1
    _assert_same(reference, triton, rtol=1e-5, atol=1e-6, state_rtol=1e-3, state_atol=1e-6)


@needs_cuda
def test_cuda_lr_adaptation_matches_the_reference():
    kw = {**CONFIGS["adaptive"], "lr_adaptation": 0.3, "lr_scale_min": 1e-3}  # a floor far below: it moves
    reference = _run_cuda({**kw, "foreach": False}, bad_step=2)
    triton = _run_cuda(kw, bad_step=2)
    assert _ran_triton(triton[1]) and skipped_steps(triton[1]) == 1
    assert float(triton[1].state[triton[0][0]]["lr_log_scale"]) != 0.0
    _assert_same(reference, triton, rtol=1e-5, atol=1e-6, state_rtol=1e-3, state_atol=1e-6)


@needs_cuda
def test_cuda_compiled_step_is_one_operator_node_and_the_eager_step():
    from test_koala_pp_compile import OP, Graphs

    graphs = Graphs()
    torch._dynamo.reset()
    eager = _run_cuda(CONFIGS["adaptive"], bad_step=2)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to("cuda").requires_grad_() for s in CUDA_SHAPES]
    opt = KOALAPlusPlus(params, **CONFIGS["adaptive"])
    step = torch.compile(lambda losses: opt.step(loss=losses), fullgraph=True, backend=graphs)
    for k in range(4):
        for p in params:
            g = torch.randn(p.shape, generator=gen).to("cuda")
            p.grad = g if p.grad is None else 0.7 * p.grad + 0.3 * g
        losses = (torch.rand(8, generator=gen) + 0.5).to("cuda")
        if k == 2:
            losses[3] = math.nan
        step(losses)
    assert len(graphs.graphs) == 1 and graphs.targets().count(OP) == 1
    _assert_same(eager, (params, opt), rtol=0, atol=0)


@needs_cuda
def test_cuda_update_with_python_numbers():
    """``update(mean, statistic)`` with Python numbers on a CUDA model: the measurement goes to the device (pinned,
    asynchronously) and the Triton step takes it, as the reference does."""
    runs = []
    for kw in ({}, {"foreach": False}):
        gen = torch.Generator().manual_seed(2)
        params = [torch.randn(s, generator=gen).to("cuda").requires_grad_() for s in CUDA_SHAPES]
        opt = KOALAPlusPlus(params, preset="paper", lr=0.5, **kw)
        for k in range(3):
            opt.predict()
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to("cuda")
            opt.update(1.0 + 0.1 * k, (1.0 + 0.1 * k) ** 2)
        runs.append((params, opt))
    assert _ran_triton(runs[0][1])
    _assert_same(runs[1], runs[0], rtol=1e-5, atol=1e-6, state_rtol=1e-3, state_atol=1e-6)
