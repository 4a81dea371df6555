"""Property-based tests of bad input for every optimizer (hypothesis, derandomized: deterministic, never flaky).

For each optimizer: some good steps (none: the bad step is the first), optionally a restart through
``state_dict``/``load_state_dict``, then one bad step (NaN/inf at random positions of a gradient or of the loss or
outputs, a finite gradient entry whose square overflows its state dtype, or a loss that overflows the float32 state
of any parameter of the group, whichever leads it), with mixed parameter dtypes and ``None``/zero gradients, on
every path (the reference, the multi-tensor path, and the default: KOALA++'s C kernel where it applies).
Asserted: the parameters and every state tensor that existed (per-tensor and group-level) are bit-for-bit
unchanged, exactly one skip is counted, the KOALA step does not synchronise with the host, and the run then goes
on bit for bit as a twin that never saw the bad step.

Losses below zero (a loss shifted by a constant, on one step or for a whole run) are valid input for every optimizer
that takes a loss (the KOALA family; LoKO and the dense filter form their own loss from the outputs): parameters and
state stay finite, and the default KOALA++ never steps further than its step cap allows.
"""

import copy

import pytest
import torch

pytest.importorskip("hypothesis", reason="needs hypothesis: install kalmanopt[test]")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kalmanopt import KOALAM, KOALAV, FullKalman, KOALAPlusPlus, LoKO  # noqa: E402

from conftest import NoSync, skipped_steps  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None)
SHAPES = [(3,), (2, 3), (4,)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
BAD = [float("nan"), float("inf"), float("-inf")]
PATHS = {"reference": False, "foreach": True, "default": None}  # foreach=None: KOALA++'s C kernel where it applies
SQUARE_OVERFLOWS = {torch.float64: 1e200}  # finite in the dtype, its square is not (else 1e30, for float32 state)

KOALA_CONFIGS = {
    "koala_pp": (KOALAPlusPlus, {"lr": 5e-4}),
    "koala_pp_wd": (KOALAPlusPlus, {"lr": 5e-4, "weight_decay": 1e-2, "r": 0.3}),
    "koala_v": (KOALAV, {"lr": 0.5, "weight_decay": 1e-2}),
    "koala_m": (KOALAM, {"lr": 0.5}),
    "koala_m_online_qw": (KOALAM, {"lr": 0.5, "qw": None, "weight_decay": 1e-2}),
}
OUTPUT_CONFIGS = {
    "loko": (LoKO, {}),
    "loko_ema_softmax": (LoKO, {"observation": "softmax", "noise": "ema", "p0": "auto"}),
    "full_kalman": (FullKalman, {}),
    "full_kalman_ema_loss": (FullKalman, {"observation": "loss", "noise": "ema"}),
}






def _snapshot(params, opt):
    values = [p.detach().clone() for p in params]
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for p, s in opt.state.items() if s}
    return values, state


def _assert_skipped(params, opt, before, skips_before):
    values, state = before
    for old, p in zip(values, params, strict=True):
        assert torch.equal(old, p.detach())
    for p, s in opt.state.items():
        old = state.get(id(p))
        if old is None:  # state created by the skipped step: never committed
            assert "step" not in s or float(s["step"]) == 0
            continue
        assert old.keys() <= s.keys()
        for k, v in old.items():
            if k == "skipped_steps":
                continue
            if isinstance(v, torch.Tensor):
                assert v.dtype == s[k].dtype and torch.equal(v, s[k]), k
            else:
                assert v == s[k], k
    assert skipped_steps(opt) == skips_before + 1


def _assert_same_run(a_params, a, b_params, b):
    """Bit-for-bit the same parameters and state, except the skip counter and never-committed fresh state."""
    for x, y in zip(a_params, b_params, strict=True):
        assert torch.equal(x.detach(), y.detach())
    sa = {i: a.state[p] for i, p in enumerate(a_params) if a.state.get(p)}
    sb = {i: b.state[p] for i, p in enumerate(b_params) if b.state.get(p)}
    for i in set(sa) - set(sb):
        assert float(sa[i]["step"]) == 0
    for i, s in sb.items():
        assert i in sa and s.keys() <= sa[i].keys(), i
        if sa[i].keys() != s.keys():  # the leader's fresh per-tensor state, made by the skipped step, never committed
            assert float(sa[i]["step"]) == 0 and "step" not in s, i
        for k, v in s.items():
            if k == "skipped_steps":
                continue
            if isinstance(v, torch.Tensor):
                assert v.dtype == sa[i][k].dtype and torch.equal(v, sa[i][k]), (i, k)
            else:
                assert v == sa[i][k], (i, k)


# ------------------------------------------------------------------------------------------------ KOALA family
def _draw_dtypes(data):
    """Mixed parameter dtypes, or (half the time) one dtype for all: only then does KOALA++'s default path run its C
    kernel (float32 or float64), which mixed dtypes would almost never reach."""
    if data.draw(st.booleans(), label="one dtype"):
        return [data.draw(st.sampled_from(DTYPES), label="dtype")] * 3
    return data.draw(st.lists(st.sampled_from(DTYPES), min_size=3, max_size=3), label="dtypes")


def _koala_params(dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(d))
            for s, d in zip(SHAPES, dtypes, strict=True)]


def _good_step(opt, params, k, seed):
    g = torch.Generator().manual_seed(seed * 1000 + k)
    for p in params:
        mode = int(torch.randint(0, 6, (), generator=g))  # 0: None, 1: zero, else a gradient
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5
        p.grad = None if mode == 0 else (torch.zeros_like(p) if mode == 1 else grad.to(p.dtype))
    losses = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    opt.step(loss=losses)


@pytest.mark.parametrize("name", sorted(KOALA_CONFIGS))
@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_koala_bad_step_is_a_no_op(name, data):
    cls, kwargs = KOALA_CONFIGS[name]
    dtypes = _draw_dtypes(data)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    warmup = data.draw(st.integers(0, 3), label="warmup")
    restart = data.draw(st.booleans(), label="restart via load_state_dict")
    foreach = PATHS[data.draw(st.sampled_from(sorted(PATHS)), label="path")]
    # "overflow": a loss whose square overflows float32, which every group with a non-float64 parameter must refuse
    # (whichever parameter leads the group and holds R); "square": a finite gradient entry whose square overflows.
    kinds = ["loss", "grad", "square"] + (["overflow"] if any(d != torch.float64 for d in dtypes) else [])
    kind = data.draw(st.sampled_from(kinds), label="bad")
    modes = data.draw(st.lists(st.sampled_from(["grad", "none", "zero"]), min_size=3, max_size=3), label="grads")
    value = data.draw(st.sampled_from(BAD), label="bad value")

    runs = []
    for _ in range(2):  # a: sees the bad step, b: its twin that never does
        params = _koala_params(dtypes, seed)
        opt = cls(params, foreach=foreach, **kwargs)
        for k in range(warmup):
            _good_step(opt, params, k, seed)
        if restart:
            saved = copy.deepcopy(opt.state_dict())
            opt = cls(params, foreach=foreach, **kwargs)
            opt.load_state_dict(saved)
        runs.append((params, opt))
    (params, opt), (twin_params, twin) = runs

    g = torch.Generator().manual_seed(seed + 7)
    if kind in ("grad", "square"):
        target = data.draw(st.integers(0, 2), label="bad tensor")
        modes[target] = "grad"
    for p, mode in zip(params, modes, strict=True):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        p.grad = None if mode == "none" else (torch.zeros_like(p) if mode == "zero" else grad)
    losses = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    if kind in ("grad", "square"):
        flat = params[target].grad.view(-1)
        big = SQUARE_OVERFLOWS.get(flat.dtype, 1e30) * (-1 if data.draw(st.booleans(), label="negative") else 1)
        flat[data.draw(st.integers(0, flat.numel() - 1), label="position")] = value if kind == "grad" else big
    elif kind == "loss":
        losses[data.draw(st.integers(0, 4), label="position")] = value
    else:
        losses[data.draw(st.integers(0, 4), label="position")] = 1e20  # finite in float64, not squared in float32

    before, skips = _snapshot(params, opt), skipped_steps(opt)
    with NoSync():
        opt.step(loss=losses)
    _assert_skipped(params, opt, before, skips)

    for k in range(warmup, warmup + 2):
        _good_step(opt, params, k, seed)
        _good_step(twin, twin_params, k, seed)
    _assert_same_run(params, opt, twin_params, twin)


# ------------------------------------------------------------------------------------------------ LoKO, FullKalman
def _model(dtype, seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3).to(dtype)


def _observe(opt, model, k, seed, bad=None):
    g = torch.Generator().manual_seed(seed * 1000 + k)
    dtype = model.weight.dtype
    x = torch.randn(2, 4, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (2,), generator=g)
    if bad is None:
        return opt.step(lambda: model(x), y)
    where, position, value = bad
    if where == "input":
        x.view(-1)[position % x.numel()] = value
        return opt.step(lambda: model(x), y)
    spoil = torch.zeros(2, 3, dtype=dtype)
    spoil.view(-1)[position % spoil.numel()] = value
    return opt.step(lambda: model(x) + spoil, y)


@pytest.mark.parametrize("name", sorted(OUTPUT_CONFIGS))
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_output_filter_bad_step_is_a_no_op(name, data):
    cls, kwargs = OUTPUT_CONFIGS[name]
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    warmup = data.draw(st.integers(0, 2), label="warmup")
    restart = data.draw(st.booleans(), label="restart via load_state_dict")
    bad = (data.draw(st.sampled_from(["input", "output"]), label="where"), data.draw(st.integers(0, 11)),
           data.draw(st.sampled_from(BAD), label="bad value"))

    runs = []
    for _ in range(2):
        model = _model(dtype, seed)
        opt = cls(model.parameters(), **kwargs)
        for k in range(warmup):
            _observe(opt, model, k, seed)
        if restart:
            saved = copy.deepcopy(opt.state_dict())
            opt = cls(model.parameters(), **kwargs)
            opt.load_state_dict(saved)
        runs.append((model, opt))
    (model, opt), (twin_model, twin) = runs
    params, twin_params = list(model.parameters()), list(twin_model.parameters())

    before, skips = _snapshot(params, opt), skipped_steps(opt)
    _observe(opt, model, 99, seed, bad)
    _assert_skipped(params, opt, before, skips)

    for k in range(warmup, warmup + 2):
        _observe(opt, model, k, seed)
        _observe(twin, twin_model, k, seed)
    _assert_same_run(params, opt, twin_params, twin)


# ------------------------------------------------------------------------------------------------ losses below zero
SHIFTED = {**KOALA_CONFIGS, "koala_pp_default": (KOALAPlusPlus, {}),
           "koala_pp_paper": (KOALAPlusPlus, {"preset": "paper"})}
# Configurations whose step is linear in the loss (no cap): R is an average of the squared losses or fixed, so the
# step with losses l lies between those with |l| and -|l| (same squares, hence the same R and S).
LINEAR = ("koala_m", "koala_m_online_qw", "koala_pp_paper", "koala_v")


def _fork(cls, kwargs, params, opt):
    """An optimizer in the same state as ``opt``, over copies of ``params`` (through ``state_dict``)."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = cls(copies, **kwargs)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    return copies, twin


def _step_from(cls, kwargs, params, opt, grads, losses):
    """The parameters after one step with ``losses`` from ``opt``'s state (on a fork: ``opt`` is left as it is)."""
    copies, twin = _fork(cls, kwargs, params, opt)
    for p, g in zip(copies, grads, strict=True):
        p.grad = None if g is None else g.clone()
    twin.step(loss=losses)
    return [p.detach().double() for p in copies]


def _slack(params):
    return [4 * torch.finfo(p.dtype).eps * p.detach().double().abs() + 1e-30 for p in params]


def _assert_finite(params, opt):
    assert all(bool(torch.isfinite(p).all()) for p in params)
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert bool(torch.isfinite(value).all()), key


def _shifted_run(name, data, *, check):
    """A short run with the loss shifted below zero on one drawn step or on every step; ``check(cls, kwargs, params,
    opt, grads, losses)`` is called before each shifted step."""
    cls, kwargs = SHIFTED[name]
    kwargs = {**kwargs, "foreach": PATHS[data.draw(st.sampled_from(sorted(PATHS)), label="path")]}
    dtypes = _draw_dtypes(data)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    shift = data.draw(st.sampled_from([0.75, 1.5, 4.0, 50.0, 1e4]), label="shift")  # losses in [0.5, 1.5) - shift
    steps = 5
    shifted = set(range(steps)) if data.draw(st.booleans(), label="whole run") else \
        {data.draw(st.integers(0, steps - 1), label="shifted step")}
    params = _koala_params(dtypes, seed)
    opt = cls(params, **kwargs)
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        grads = []
        for p in params:
            mode = int(torch.randint(0, 6, (), generator=g))  # 0: None, 1: zero, else a gradient
            grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5).to(p.dtype)
            grads.append(None if mode == 0 else (torch.zeros_like(p) if mode == 1 else grad))
        losses = torch.rand(5, generator=g, dtype=torch.float64) + 0.5 - (shift if k in shifted else 0.0)
        if k in shifted:
            check(cls, kwargs, params, opt, grads, losses)
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        opt.step(loss=losses)
        _assert_finite(params, opt)


def _between_mirrored_steps(cls, kwargs, params, opt, grads, losses):
    if not any(g is not None for g in grads):
        return
    shifted = _step_from(cls, kwargs, params, opt, grads, losses)
    up = _step_from(cls, kwargs, params, opt, grads, losses.abs())
    down = _step_from(cls, kwargs, params, opt, grads, -losses.abs())
    for a, b, c, slack in zip(shifted, up, down, _slack(params), strict=True):
        assert bool((a >= torch.minimum(b, c) - slack).all() and (a <= torch.maximum(b, c) + slack).all())


@pytest.mark.parametrize("name", sorted(SHIFTED))
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_koala_loss_below_zero_stays_finite(name, data):
    """Every path, mixed dtypes: parameters and state stay finite; where the step is linear in the loss (no cap), a
    shifted step lies between the steps for the mirrored losses |l| and -|l|."""
    _shifted_run(name, data, check=_between_mirrored_steps if name in LINEAR else lambda *args: None)


def _within_the_cap(cls, kwargs, params, opt, grads, losses):
    """With R fixed (the default R = 0) S does not depend on the loss, and the step is linear in the step size
    gamma = min(loss_fraction * l / S, cap): |theta(l) - theta(0)| <= |theta(huge) - theta(0)| says |gamma| <= cap."""
    assert opt.param_groups[0]["r"] is not None, "the cap contract needs a fixed R"
    if not any(g is not None for g in grads):
        return
    shifted = _step_from(cls, kwargs, params, opt, grads, losses)
    still = _step_from(cls, kwargs, params, opt, grads, torch.zeros_like(losses))  # gamma = 0
    capped = _step_from(cls, kwargs, params, opt, grads, torch.full_like(losses, 1e15))  # gamma = the cap
    for a, zero, cap, slack in zip(shifted, still, capped, _slack(params), strict=True):
        assert bool(((a - zero).abs() <= (cap - zero).abs() * (1 + 1e-6) + slack).all()), (a - zero, cap - zero)


@pytest.mark.parametrize("name", ["koala_pp_default", "koala_pp"])
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_koala_pp_loss_below_zero_never_steps_past_the_cap(name, data):
    """The default KOALA++ step (a capped Polyak-type step): a loss below zero never asks for more than the cap, on
    any path (issue 21, item 5: the step was -60 to -240 times the loss against a cap of 0.01)."""
    _shifted_run(name, data, check=_within_the_cap)
