"""KOALA++'s default step rule with losses below zero and a loss floor (README: "Losses below zero").

The filter measures the loss above ``loss_floor`` (default 0). A loss below the floor gives no distance to the
optimum: that step is the capped one, lr / q, never an uphill step (0.1 stepped -60 to -240 times the cap).
"""

import pytest
import torch
import torch.nn.functional as F

from kalmanopt import KOALAPlusPlus

PATHS = {"reference": {"foreach": False}, "foreach": {"foreach": True}, "default": {}}


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    return x, (x[:, :3]).argmax(1)


def _train(shift, steps=60, **kwargs):
    """Full-batch training of a small MLP; the filter is handed ``losses - shift(step)``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = KOALAPlusPlus(model.parameters(), **kwargs)
    x, y = _data()
    sizes, caps = [], []
    for step in range(steps):
        opt.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step(loss=losses - shift(step))
        d = opt.diagnostics()[0]
        sizes.append(d["step_size"].clone())
        # the cap lr / q, times lr_adaptation's multiplier (on by default) where it is on
        caps.append(torch.full_like(d["step_size"], opt.param_groups[0]["lr"] / opt.param_groups[0]["q"])
                    * d.get("lr_scale", torch.ones(())).to(d["step_size"]))
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    return final, torch.stack(sizes), torch.stack(caps), opt


# the default (lr_adaptation 0.2, the cap never below lr / q), a rate of 0.1, and the fixed cap
ADAPTATION = {"default": {}, "adapted 0.1": {"lr_adaptation": 0.1}, "fixed cap": {"lr_adaptation": None}}


@pytest.mark.parametrize("cap", ADAPTATION)
@pytest.mark.parametrize("path", PATHS)
def test_a_loss_below_the_floor_takes_the_capped_step(path, cap):
    lr, q = 2e-3, 0.1
    _, sizes, caps, opt = _train(lambda step: 10.0, steps=3, lr=lr, q=q, **PATHS[path], **ADAPTATION[cap])
    torch.testing.assert_close(sizes, caps)  # every tensor, every step: the cap
    if cap == "fixed cap":
        torch.testing.assert_close(sizes, torch.full_like(sizes, lr / q))
    assert int(opt.state[opt.param_groups[0]["params"][0]]["skipped_steps"]) == 0


@pytest.mark.parametrize("cap", ADAPTATION)
@pytest.mark.parametrize("path", PATHS)
def test_shifted_losses_neither_blow_up_nor_stall(path, cap):
    # With the fixed cap or a slow adaptation the cap binds on every step of the unshifted run (small tensors, full
    # batch), so a run whose losses are all shifted below zero, or one whose single loss is, trains exactly as the
    # unshifted run does (lr_adaptation's cosine does not see the loss). The default's cap grows until the filter's
    # own step is the smaller one now and then: there the shifted runs (always capped) must still train.
    plain, sizes, caps, _ = _train(lambda step: 0.0, lr=1e-2, **PATHS[path], **ADAPTATION[cap])
    if cap != "default":
        torch.testing.assert_close(sizes, caps)  # the cap binds throughout
    for shift in (lambda step: 10.0, lambda step: 10.0 if step == 5 else 0.0, lambda step: 1e6):
        final, _, _, opt = _train(shift, lr=1e-2, **PATHS[path], **ADAPTATION[cap])
        if cap != "default":
            assert final == pytest.approx(plain, rel=1e-5, abs=1e-6)
        assert final < 0.6 * 1.1  # it trained (the start is about ln 3 = 1.1)
        assert all(bool(torch.isfinite(p).all()) for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("path", PATHS)
def test_the_residual_is_the_loss_above_the_floor(path):
    # A loss of floor + 1e-6: the filter's own step, 1e-6 / S, far below the cap (a floor of 0 would give the cap).
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    opt = KOALAPlusPlus([w], lr=1e-3, loss_floor=-1.0, **PATHS[path])
    w.grad = torch.randn(5)
    opt.step(loss=torch.tensor(-1.0 + 1e-6, dtype=torch.float64))
    d = opt.diagnostics()[0]
    torch.testing.assert_close(d["step_size"], (1e-6 / d["S"]).to(d["step_size"]), rtol=1e-4, atol=0)
    assert float(d["step_size"]) < 1e-3 / 0.1


def test_the_paper_preset_keeps_the_papers_step():
    # Algorithm 1 has no floor: a negative loss steps along +gain (uphill), as the paper's rule says, bit for bit.
    w = torch.nn.Parameter(torch.ones(3))
    opt = KOALAPlusPlus([w], preset="paper")
    w.grad = torch.full((3,), 0.5)
    opt.step(loss=torch.tensor(-2.0))
    assert float(opt.diagnostics()[0]["step_size"]) < 0 and bool((w > 1).all())


def test_loss_floor_is_one_value_for_every_group():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="loss_floor"):
        KOALAPlusPlus([{"params": [a]}, {"params": [b], "loss_floor": -3.0}])
    with pytest.raises(ValueError, match="loss_floor"):
        KOALAPlusPlus([a], loss_floor=float("nan"))
