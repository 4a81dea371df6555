"""KOALA++'s ``lr_adaptation``: the step cap follows the hypergradient of the step size.

The oracle is the definition, written from parameter differences (not from the momentum buffer the optimizer reads):
before step k, log s += kappa * cos(h_k, -(theta_{k-1} - theta_{k-2})), clipped to [log lr_scale_min, log 1000], and
the cap is s * lr / q, i.e. the plain optimizer with its lr set to s * lr.
"""
import io
import math

import pytest
import torch

from kalmanopt import KOALAPlusPlus
from kalmanopt.optim import _koala_pp_fused
from kalmanopt.optim.koala_pp import LR_ADAPTATION

from conftest import (
    NoSync,
    assert_unchanged,
    batch,
    double_mlp,
    per_sample_loss,
    run_koala_pp,
    skipped_steps,
    snapshot,
    spoiled_step,
    tiny_mlp,
)

needs_kernel = pytest.mark.skipif(_koala_pp_fused.load() is None,
                                  reason=f"no fused kernel here: {_koala_pp_fused.unavailable_reason()}")

KAPPA = 0.3  # large, so that the multiplier moves far within a few steps and an error in it shows


def _h(model, weight_decay):
    return [p.grad + weight_decay * p.detach() for p in model.parameters()]


@pytest.mark.parametrize("scale_min", [1.0, 1e-3])
@pytest.mark.parametrize("foreach", [False, True])
def test_the_cap_multiplier_is_the_hypergradient_definition(foreach, scale_min):
    wd = 1e-2
    adapted, plain = tiny_mlp(), tiny_mlp()
    # lr: the multiplier climbs over the first steps, then the steps overshoot and it falls below 1 (without the floor)
    opt = KOALAPlusPlus(adapted.parameters(), lr=3e-2, weight_decay=wd, lr_adaptation=KAPPA, foreach=foreach,
                        lr_scale_min=scale_min)
    oracle = KOALAPlusPlus(plain.parameters(), lr=3e-2, weight_decay=wd, foreach=foreach, lr_adaptation=None)
    log_s, before, scales, floored = 0.0, None, [], 0
    for k in range(14):
        x, y = batch(k)
        for model, o in ((adapted, opt), (plain, oracle)):
            o.zero_grad()
            per_sample_loss(model, x, y).mean().backward()
        if before is not None:
            delta = [p.detach() - b for p, b in zip(plain.parameters(), before, strict=True)]
            h = _h(plain, wd)
            dot = sum((a * d).sum() for a, d in zip(h, delta, strict=True))
            norms = math.sqrt(sum(a.square().sum() for a in h)) * math.sqrt(sum(d.square().sum() for d in delta))
            moved = log_s + KAPPA * float(-dot) / norms
            floored += moved < math.log(scale_min)
            log_s = min(max(moved, math.log(scale_min)), math.log(1000))
        log_s = float(torch.tensor(log_s, dtype=torch.float32))  # as the optimizer stores it
        oracle.param_groups[0]["lr"] = 3e-2 * math.exp(log_s)
        before = [p.detach().clone() for p in plain.parameters()]
        opt.step(loss=per_sample_loss(adapted, x, y).detach())
        oracle.step(loss=per_sample_loss(plain, x, y).detach())
        scales.append(float(opt.diagnostics()[0]["lr_scale"]))
        for a, b in zip(adapted.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        assert scales[-1] == pytest.approx(math.exp(log_s), rel=1e-12)
    assert scales[0] == 1.0 and max(abs(math.log(s)) for s in scales) > 0.1  # it moved
    if scale_min == 1.0:
        assert floored >= 1 and min(scales) == 1.0  # the floor held it where the cosine pulled it below 1
    else:
        assert floored == 0 and min(scales) < 0.97  # below 1: the lower floor never binds


def _quadratic_run(lr, start, steps, **options):
    """A quadratic whose loss (offset by 10, so that the cap always binds) is measured exactly. Returns the multiplier
    after each step."""
    torch.manual_seed(0)
    theta = torch.nn.Parameter(start * torch.randn(50, dtype=torch.float64))
    curvature = torch.logspace(-1, 1, 50, dtype=torch.float64)
    opt = KOALAPlusPlus([theta], lr=lr, lr_adaptation=0.1, **options)
    scales = []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (curvature * theta.square()).sum() + 10.0
        loss.backward()
        opt.step(loss=loss.detach())
        scales.append(float(opt.diagnostics()[0]["lr_scale"]))
    return scales


def test_the_cap_grows_when_the_steps_are_short_and_shrinks_when_they_overshoot():
    # far from the minimum with tiny steps: the gradient keeps pointing along the last update
    assert _quadratic_run(1e-5, start=1.0, steps=60)[-1] > 3.0
    # steps of 0.05 (the cap, Adam-like) around a minimum 0.01 away: each one overshoots, the gradient turns back;
    # with a floor below 1 the multiplier falls below 1
    assert _quadratic_run(0.05, start=0.01, steps=150, lr_scale_min=1e-3)[-1] < 0.5
    # with the default floor of 1 it comes down from above: tiny steps far away raise it, then it falls back
    climbed = _quadratic_run(1e-3, start=1.0, steps=250)
    assert max(climbed) > 5.0 and climbed[-1] < 0.5 * max(climbed)


OVERSHOOTING = dict(lr=0.05, start=0.01, steps=150)  # the quadratic run above whose multiplier falls below 1


@pytest.mark.parametrize("path", [
    {"foreach": False, "fused": False},
    {"foreach": True, "fused": False},
    pytest.param({"fused": True}, marks=needs_kernel),
], ids=["reference", "multi_tensor", "fused"])
def test_the_default_floor_keeps_the_multiplier_at_or_above_1(path):
    """lr_scale_min=1 (the default): the cap never falls below lr / q, on every path; where the cosine pulls s below
    1 it stays at 1 exactly (log s = 0)."""
    scales = _quadratic_run(**OVERSHOOTING, **path)
    assert min(scales) == 1.0 and scales.count(1.0) >= 20  # held at the floor on many steps
    lowered = _quadratic_run(**OVERSHOOTING, **path, lr_scale_min=0.5)
    assert min(lowered) == pytest.approx(0.5, rel=1e-6)  # another floor binds where it says


def test_a_skipped_step_leaves_the_multiplier_and_everything_else_alone():
    model = double_mlp()
    opt = KOALAPlusPlus(model.parameters(), lr=1e-3, lr_adaptation=KAPPA)
    for k in range(4):
        x, y = batch(k, n=6)
        opt.zero_grad()
        losses = torch.nn.functional.cross_entropy(model(x[:, :3]), y % 2, reduction="none")
        losses.mean().backward()
        opt.step(loss=losses.detach())
    before = snapshot(opt)
    opt.step(loss=torch.full((6,), float("nan"), dtype=torch.float64))
    assert_unchanged(opt, before)


def _run(model, opt, ks):
    for k in ks:
        x, y = batch(k, n=6)
        opt.zero_grad()
        losses = torch.nn.functional.cross_entropy(model(x[:, :3]), y % 2, reduction="none")
        losses.mean().backward()
        with NoSync():
            opt.step(loss=losses.detach())


def test_resume_is_bit_exact_and_the_multiplier_is_checked_on_load():
    model, twin = double_mlp(), double_mlp()
    opt = KOALAPlusPlus(model.parameters(), lr=1e-3, lr_adaptation=KAPPA)
    _run(model, opt, range(5))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin.load_state_dict(model.state_dict())
    resumed = KOALAPlusPlus(twin.parameters(), lr=1e-3, lr_adaptation=KAPPA)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    _run(model, opt, range(5, 9))
    _run(twin, resumed, range(5, 9))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state[model[0].weight]["lr_log_scale"], resumed.state[twin[0].weight]["lr_log_scale"])
    bad = opt.state_dict()
    bad["state"][0]["lr_log_scale"] = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="lr_log_scale"):
        KOALAPlusPlus(double_mlp().parameters(), lr=1e-3, lr_adaptation=KAPPA).load_state_dict(bad)


def test_lr_scale_min_is_saved_and_a_checkpoint_from_before_it_resumes_with_the_floor_1():
    model = double_mlp()
    opt = KOALAPlusPlus(model.parameters(), lr=1e-3, lr_adaptation=KAPPA, lr_scale_min=1e-3)
    assert KOALAPlusPlus(double_mlp().parameters()).param_groups[0]["lr_scale_min"] == 1.0  # the default
    _run(model, opt, range(3))
    saved = opt.state_dict()
    assert saved["param_groups"][0]["lr_scale_min"] == 1e-3
    del saved["param_groups"][0]["lr_scale_min"]  # as saved before the option
    resumed = KOALAPlusPlus(double_mlp().parameters(), lr=1e-3, lr_adaptation=KAPPA, lr_scale_min=1e-3)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr_scale_min"] == 1.0


def test_on_in_the_default_preset_and_off_with_none_or_zero():
    model = double_mlp()
    opt = KOALAPlusPlus(model.parameters())
    assert opt.param_groups[0]["lr_adaptation"] == LR_ADAPTATION > 0 and opt.param_groups[0]["lr_scale_min"] == 1.0
    _run(model, opt, range(3))
    assert "lr_log_scale" in opt.state[model[0].weight] and "lr_scale" in opt.diagnostics()[0]
    for off in ({"lr_adaptation": None}, {"lr_adaptation": 0}, {"lr_adaptation": 0.0}):
        model = double_mlp()
        opt = KOALAPlusPlus(model.parameters(), **off)
        _run(model, opt, range(2))
        assert opt.param_groups[0]["lr_adaptation"] is None
        assert "lr_log_scale" not in opt.state[model[0].weight] and "lr_scale" not in opt.diagnostics()[0]


def test_the_preset_value_is_dropped_where_its_step_rule_is_not_there():
    # The paper's preset, momentum 0 or the paper's step rule have no cap to adapt or no last update: the preset's
    # lr_adaptation is not used there (asked for explicitly, it raises: test_invalid_uses_raise...).
    assert KOALAPlusPlus(double_mlp().parameters(), preset="paper").param_groups[0]["lr_adaptation"] is None
    assert KOALAPlusPlus(double_mlp().parameters(), momentum=0.0).param_groups[0]["lr_adaptation"] is None
    assert KOALAPlusPlus(double_mlp().parameters(), loss_fraction=None).param_groups[0]["lr_adaptation"] is None
    model = double_mlp()
    opt = KOALAPlusPlus([{"params": model[0].parameters(), "momentum": 0.0}, {"params": model[2].parameters()}])
    assert [g["lr_adaptation"] for g in opt.param_groups] == [None, LR_ADAPTATION]
    _run(model, opt, range(3))
    assert "lr_log_scale" not in opt.state[model[0].weight] and "lr_log_scale" in opt.state[model[2].weight]


@pytest.mark.parametrize("options, error, match", [
    (dict(lr_adaptation=-0.1), ValueError, "lr_adaptation"),
    (dict(lr_adaptation=0.05, lr_scale_min=0.0), ValueError, r"Invalid lr_scale_min: 0\.0"),
    (dict(lr_adaptation=0.05, lr_scale_min=-0.5), ValueError, "Invalid lr_scale_min"),
    (dict(lr_adaptation=0.05, lr_scale_min=1.5), ValueError, r"Invalid lr_scale_min: 1\.5"),
    (dict(lr_adaptation=0.05, lr_scale_min=float("nan")), ValueError, r"Invalid lr_scale_min: nan \(must be a finite"),
    (dict(lr_adaptation=0.05, lr_scale_min="0.5"), ValueError, "Invalid lr_scale_min"),
    (dict(lr_adaptation=0.05, lr_scale_min=torch.tensor(0.5)), ValueError, "lr_scale_min: must be a Python number"),
    (dict(lr_scale_min=0.0), ValueError, "Invalid lr_scale_min"),  # checked without lr_adaptation too
    (dict(lr_adaptation=float("nan")), ValueError, "lr_adaptation"),
    (dict(lr_adaptation=0.05, momentum=0.0), ValueError, "momentum"),
    (dict(lr_adaptation=0.05, preset="paper"), ValueError, "loss_fraction"),
    (dict(lr_adaptation=0.05, fused=True, block="group"), RuntimeError, "block"),
])
def test_invalid_uses_raise_before_anything_is_made(options, error, match):
    with pytest.raises(error, match=match):
        KOALAPlusPlus(double_mlp().parameters(), **options)


def test_bfloat16_state_and_float32_parameters():
    """The cosine in the compute dtype, a bfloat16 momentum buffer widened to it: same multiplier as float32 state
    up to the buffer's rounding."""
    scales = []
    for storage in (None, torch.bfloat16):
        model = tiny_mlp(torch.float32)
        opt = KOALAPlusPlus(model.parameters(), lr=1e-3, lr_adaptation=KAPPA, state_dtype=storage)
        for k in range(6):
            x, y = batch(k, dtype=torch.float32)
            opt.zero_grad()
            losses = per_sample_loss(model, x, y)
            losses.mean().backward()
            opt.step(loss=losses.detach())
        scales.append(float(opt.diagnostics()[0]["lr_scale"]))
    assert scales[0] != 1.0 and scales[1] == pytest.approx(scales[0], rel=2e-2)


def test_compiled_step_adapts_as_the_eager_one():
    """torch.compile (AOT autograd's functionalisation, where an in-place write to 0-d float64 CPU state was lost)."""
    models = [tiny_mlp(torch.float32), tiny_mlp(torch.float32)]
    opts = [KOALAPlusPlus(m.parameters(), lr=1e-3, lr_adaptation=KAPPA, foreach=True) for m in models]
    compiled = torch.compile(lambda losses: opts[1].step(loss=losses), fullgraph=True, backend="aot_eager")
    for k in range(4):
        x, y = batch(k, dtype=torch.float32)
        for model, opt, step in zip(models, opts, (lambda losses: opts[0].step(loss=losses), compiled), strict=True):
            opt.zero_grad()
            losses = per_sample_loss(model, x, y)
            losses.mean().backward()
            step(losses.detach())
    eager, traced = (o.state[m[0].weight]["lr_log_scale"] for o, m in zip(opts, models, strict=True))
    assert float(eager) != 0.0
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- the fused C kernel
SHAPES = [(3,), (4, 5), (2, 3, 3, 3), (1,), (16, 8), (3000,)]  # 3000: several of the kernel's blocks
ROTATING = lambda k, i: (k + i) % 4 == 0  # noqa: E731 (a gradient of None now and then, per tensor)


def _groups(params):
    """kappas and floors (lr_scale_min) of their own, one group without the metric, one without adaptation (same
    hyperparameters otherwise: its cap must stay lr / q). The second group's multiplier falls below 1 and to its floor
    0.9 within the steps of ``_fused_run`` (float64, its gradients): a kernel clipping to another bound (the default
    1, another group's, 1 / 1000) strays from the reference."""
    return [{"params": params[:2], "lr_adaptation": 0.3, "weight_decay": 1e-2, "lr_scale_min": 1e-3},
            {"params": params[2:4], "lr_adaptation": 0.7, "precondition": False, "lr_scale_min": 0.9},
            {"params": params[4:5], "lr_adaptation": None},
            {"params": params[5:], "lr_adaptation": 0.05}]


def _log_scales(params, opt):
    """Each group's lr_log_scale (None without adaptation), from the state of its first parameter."""
    return [opt.state[params[i]].get("lr_log_scale") for i in (0, 2, 4, 5)]


def _fused_run(kwargs, *, dtype=torch.float64, steps=8, none_schedule=ROTATING, seed=0):
    return run_koala_pp(SHAPES, {"lr": 2e-3, **kwargs}, steps=steps, dtype=dtype, seed=seed, groups=_groups,
                        none_schedule=none_schedule)


@needs_kernel
def test_fused_kernel_matches_the_reference_float64():
    """Several groups, kappas of their own, one without the metric, one without adaptation, gradients missing now
    and then: the fused kernel (fused=True) is the reference's step to float64 rounding, the multiplier too."""
    reference = _fused_run({"foreach": False})
    fused = _fused_run({"fused": True})
    assert "_fused_work" in fused[1].__dict__  # the kernel really ran
    for a, b in zip(reference[0], fused[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        sa, sb = reference[1].state[a], fused[1].state[b]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == sb[key].dtype, key
                torch.testing.assert_close(value, sb[key], rtol=1e-12, atol=1e-12, msg=key)
    scales = _log_scales(*fused)
    assert scales[2] is None and all(abs(float(s)) > 5e-3 for s in scales if s is not None)  # they moved
    assert len({float(s) for s in scales if s is not None}) == 3  # each group its own
    for a, b in zip(reference[1].diagnostics(), fused[1].diagnostics(), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12, msg=key)


def _normwise(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30))


@needs_kernel
@pytest.mark.parametrize("storage", [None, torch.bfloat16], ids=["float32_state", "bfloat16_state"])
def test_fused_kernel_close_to_the_multi_tensor_path_float32(storage):
    """float32 parameters (and bfloat16 state): the kernel and the multi-tensor path sum the cosine's dot products in
    another order; the multipliers agree to a few float32 ulps, the parameters and state as in
    test_koala_pp_fused.test_fused_float32_close_to_multi_tensor_path."""
    fused = _fused_run({"fused": True, "state_dtype": storage}, dtype=torch.float32, none_schedule=None)
    multi = _fused_run({"foreach": True, "state_dtype": storage}, dtype=torch.float32, none_schedule=None)
    assert "_fused_work" in fused[1].__dict__
    tol = 2e-6 if storage is None else 1e-3  # bfloat16: a stored element may round the other way
    for a, b in zip(fused[0], multi[0], strict=True):
        assert _normwise(a, b) <= tol
        for key in ("prev_S", "gain", "prev_grad", "exp_avg_sq", "momentum_buffer"):
            if key in fused[1].state[a]:
                assert _normwise(fused[1].state[a][key], multi[1].state[b][key]) <= tol, key
    for x, y in zip(_log_scales(*fused), _log_scales(*multi), strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert abs(float(x)) > 0.05
            torch.testing.assert_close(x, y, rtol=1e-5, atol=0)


@needs_kernel
@pytest.mark.parametrize("bad", ["loss", "grad", "found_inf"])
def test_fused_skipped_step_leaves_the_multiplier_and_everything_bit_for_bit(bad):
    params, opt = _fused_run({"fused": True}, steps=4)
    before = snapshot(opt)
    torch.manual_seed(0)
    # an infinite gradient in the group without adaptation: the adapting groups' cosines are finite
    loss = spoiled_step(opt, params, bad, inf_at=(4, (0, 0)))
    with NoSync():
        opt.step(loss=loss)
    assert_unchanged(opt, before)  # the multipliers too: everything but the skip counters
    assert skipped_steps(opt) == 4  # one per group
    opt.grad_scale = opt.found_inf = None
    params[4].grad[0, 0] = 0.0
    for p in params:  # along the momentum: every cosine near +1, so that a multiplier at its floor moves too
        if "momentum_buffer" in opt.state[p]:
            p.grad = 1e6 * opt.state[p]["momentum_buffer"]
    opt.step(loss=torch.rand(6, dtype=torch.float64) + 0.5)  # a good step is accepted: the multipliers move
    assert all(not torch.equal(s, before[1][id(params[i])]["lr_log_scale"])
               for s, i in zip(_log_scales(params, opt), (0, 2, 4, 5), strict=True) if s is not None)


@needs_kernel
def test_fused_resume_from_a_checkpoint_is_bit_exact():
    """state_dict through torch.save / torch.load(weights_only=True) mid-run: the fused run continues bit for bit."""
    def run(interrupt_at=None):
        gen = torch.Generator().manual_seed(4)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
        opt = KOALAPlusPlus(_groups(params), lr=2e-3, fused=True)
        for k in range(7):
            if k == interrupt_at:
                buffer = io.BytesIO()
                torch.save(opt.state_dict(), buffer)
                opt = KOALAPlusPlus(_groups(params), lr=2e-3, fused=True)
                opt.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
            for p in params:
                g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.grad = g if p.grad is None else 0.7 * p.grad + 0.3 * g
            opt.step(loss=torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
        assert "_fused_work" in opt.__dict__
        return params, opt

    (pa, oa), (pb, ob) = run(), run(interrupt_at=4)
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)
        for key, value in oa.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, ob.state[b][key]), key
    assert all(float(s) != 0.0 for s in _log_scales(pa, oa) if s is not None)


@needs_kernel
def test_fused_true_runs_the_kernel_and_the_multiplier_switched_on_later_is_made():
    """fused=True with lr_adaptation runs on the C kernel; a group that turns lr_adaptation on after its state was
    made (e.g. a checkpoint from before it) gets its multiplier at the next step, as on the multi-tensor path."""
    runs = []
    for kwargs in ({"fused": True}, {"foreach": True}):
        params, opt = run_koala_pp(SHAPES, {"lr": 2e-3, **kwargs}, steps=2)
        opt.param_groups[0]["lr_adaptation"] = 0.4
        gen = torch.Generator().manual_seed(9)
        for _ in range(4):
            for p in params:
                p.grad = 0.5 * p.grad + torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step(loss=torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
        runs.append((params, opt))
    (pf, of), (pm, om) = runs
    assert "_fused_work" in of.__dict__
    assert float(of.state[pf[0]]["lr_log_scale"]) != 0.0
    torch.testing.assert_close(of.state[pf[0]]["lr_log_scale"], om.state[pm[0]]["lr_log_scale"], rtol=1e-12,
                               atol=0)
    for a, b in zip(pf, pm, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
