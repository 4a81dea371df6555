"""KOALA++'s ``lr_adaptation``: the step cap follows the hypergradient of the step size.

The oracle is the definition, written from parameter differences (not from the momentum buffer the optimizer reads):
before step k, log s += kappa * cos(h_k, -(theta_{k-1} - theta_{k-2})), clipped to +-log 1000, and the cap is
s * lr / q, i.e. the plain optimizer with its lr set to s * lr.
"""
import io
import math

import pytest
import torch

from kalmanopt import KOALAPlusPlus

from conftest import NoSync, assert_unchanged, batch, double_mlp, per_sample_loss, snapshot, tiny_mlp

KAPPA = 0.3  # large, so that the multiplier moves far within a few steps and an error in it shows


def _h(model, weight_decay):
    return [p.grad + weight_decay * p.detach() for p in model.parameters()]


@pytest.mark.parametrize("foreach", [False, True])
def test_the_cap_multiplier_is_the_hypergradient_definition(foreach):
    wd = 1e-2
    adapted, plain = tiny_mlp(), tiny_mlp()
    opt = KOALAPlusPlus(adapted.parameters(), lr=3e-3, weight_decay=wd, lr_adaptation=KAPPA, foreach=foreach)
    oracle = KOALAPlusPlus(plain.parameters(), lr=3e-3, weight_decay=wd, foreach=foreach)
    log_s, before, scales = 0.0, None, []
    for k in range(12):
        x, y = batch(k)
        for model, o in ((adapted, opt), (plain, oracle)):
            o.zero_grad()
            per_sample_loss(model, x, y).mean().backward()
        if before is not None:
            delta = [p.detach() - b for p, b in zip(plain.parameters(), before, strict=True)]
            h = _h(plain, wd)
            dot = sum((a * d).sum() for a, d in zip(h, delta, strict=True))
            norms = math.sqrt(sum(a.square().sum() for a in h)) * math.sqrt(sum(d.square().sum() for d in delta))
            log_s = min(max(log_s + KAPPA * float(-dot) / norms, -math.log(1000)), math.log(1000))
        log_s = float(torch.tensor(log_s, dtype=torch.float32))  # as the optimizer stores it
        oracle.param_groups[0]["lr"] = 3e-3 * math.exp(log_s)
        before = [p.detach().clone() for p in plain.parameters()]
        opt.step(loss=per_sample_loss(adapted, x, y).detach())
        oracle.step(loss=per_sample_loss(plain, x, y).detach())
        scales.append(float(opt.diagnostics()[0]["lr_scale"]))
        for a, b in zip(adapted.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
        assert scales[-1] == pytest.approx(math.exp(log_s), rel=1e-12)
    assert scales[0] == 1.0 and max(abs(math.log(s)) for s in scales) > 0.1  # it moved


def _quadratic_run(lr, start, steps):
    """A quadratic whose loss (offset by 10, so that the cap always binds) is measured exactly."""
    torch.manual_seed(0)
    theta = torch.nn.Parameter(start * torch.randn(50, dtype=torch.float64))
    curvature = torch.logspace(-1, 1, 50, dtype=torch.float64)
    opt = KOALAPlusPlus([theta], lr=lr, lr_adaptation=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * (curvature * theta.square()).sum() + 10.0
        loss.backward()
        opt.step(loss=loss.detach())
    return float(opt.diagnostics()[0]["lr_scale"])


def test_the_cap_grows_when_the_steps_are_short_and_shrinks_when_they_overshoot():
    # far from the minimum with tiny steps: the gradient keeps pointing along the last update
    assert _quadratic_run(1e-5, start=1.0, steps=60) > 3.0
    # steps of 0.05 (the cap, Adam-like) around a minimum 0.01 away: each one overshoots, the gradient turns back
    assert _quadratic_run(0.05, start=0.01, steps=150) < 0.5


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


def test_off_by_default_and_the_default_path_is_untouched():
    model = double_mlp()
    opt = KOALAPlusPlus(model.parameters())
    _run(model, opt, range(2))
    assert "lr_log_scale" not in opt.state[model[0].weight] and "lr_scale" not in opt.diagnostics()[0]


@pytest.mark.parametrize("options, error, match", [
    (dict(lr_adaptation=-0.1), ValueError, "lr_adaptation"),
    (dict(lr_adaptation=float("nan")), ValueError, "lr_adaptation"),
    (dict(lr_adaptation=0.05, momentum=0.0), ValueError, "momentum"),
    (dict(lr_adaptation=0.05, preset="paper"), ValueError, "loss_fraction"),
    (dict(lr_adaptation=0.05, fused=True), RuntimeError, "lr_adaptation"),
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
