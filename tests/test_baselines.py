"""Our K-FAC and AdaFisher (kalmanopt.bench.baselines) against hand computations on tiny layers, and the registry
entries of the new baselines and no-schedule peers (Schedule-Free AdamW, MoMo, MoMo-Adam)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kalmanopt.bench import baselines, common, models, registry
from kalmanopt.bench.baselines._layers import LayerHooks, grad_rows, input_rows
from kalmanopt.errors import MissingDependency, UsageError


@pytest.fixture(autouse=True, scope="module")
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def _batch(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)


def _mse_backward(layer: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over samples of 0.5 |y - t|^2; returns dL/dy, by hand: (y - t) / n."""
    y = layer(x)
    (0.5 * (y - t).square().sum(1)).mean().backward()
    return (y - t).detach() / len(x)


def _minmax(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min() + 1e-12)


# ------------------------------------------------------------------------------------------ the rows
def test_rows_reproduce_the_weight_gradient():
    """sum over rows of g a^T is [dW | db] (so the rows are ordered like the weight) for Conv2d and 3-D Linear."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=1)
    lin = nn.Linear(4, 5)
    for module, x in ((conv, torch.randn(2, 2, 5, 6)), (lin, torch.randn(2, 3, 4))):
        hooks = LayerHooks(module, capture=lambda: True)
        module(x).square().sum().backward()
        layer = hooks.layers[0]
        assert torch.allclose(layer.g.t() @ layer.a, layer.grad_matrix())
        assert layer.samples == (2 if module is conv else 6)
    # conv rows by hand: the patch at output position (0, 0) of sample 0 is the zero-padded top-left window
    x = torch.arange(1.0, 1 + 2 * 2 * 5 * 6).reshape(2, 2, 5, 6)
    rows = input_rows(conv, x)
    padded = F.pad(x, (1, 1, 1, 1))
    assert rows.shape == (2 * 6 * 3, 2 * 2 * 3 + 1)
    assert torch.equal(rows[0, :-1], padded[0, :, 0:2, 0:3].reshape(-1)) and rows[0, -1] == 1
    g = torch.randn(2, 3, 6, 3)
    assert torch.equal(grad_rows(conv, g)[0][1], g[0, :, 0, 1])


# ------------------------------------------------------------------------------------------ AdaFisher
def test_adafisher_matches_hand_computation_on_a_linear_layer():
    layer = _linear()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    lr, beta, gamma, lam = 0.1, 0.9, 0.92, 1e-3
    opt = baselines.AdaFisher(layer, lr=lr, beta=beta, gamma=gamma, damping=lam)
    x1, t1 = _batch(1)
    g1 = _mse_backward(layer, x1, t1)
    opt.step()
    # the factors' diagonals by hand: a = [x, 1], h = mean a^2, s = mean g^2, each min-max normalised
    a1 = torch.cat([x1, torch.ones(4, 1)], 1)
    h1, s1 = _minmax(a1.square().mean(0)), _minmax(g1.square().mean(0))
    st = opt.state[layer.weight]
    assert torch.allclose(st["H"], h1) and torch.allclose(st["S"], s1)
    fisher = torch.outer(s1, h1) + lam  # (2, 4): weight columns, then the bias
    grad = g1.t() @ a1  # [dW | db]
    # first step: m = (1 - beta) grad, bias-corrected to grad; theta -= lr * grad / F
    assert torch.allclose(layer.weight, w0 - lr * grad[:, :3] / fisher[:, :3])
    assert torch.allclose(layer.bias, b0 - lr * grad[:, 3] / fisher[:, 3])
    # second step: EMA of the factors, momentum with bias correction
    w1, b1 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt.zero_grad()
    x2, t2 = _batch(2)
    g2 = _mse_backward(layer, x2, t2)
    opt.step()
    a2 = torch.cat([x2, torch.ones(4, 1)], 1)
    h = gamma * h1 + (1 - gamma) * _minmax(a2.square().mean(0))
    s = gamma * s1 + (1 - gamma) * _minmax(g2.square().mean(0))
    assert torch.allclose(st["H"], h) and torch.allclose(st["S"], s)
    m = beta * (1 - beta) * grad + (1 - beta) * (g2.t() @ a2)
    step = lr / (1 - beta**2) * m / (torch.outer(s, h) + lam)
    assert torch.allclose(layer.weight, w1 - step[:, :3]) and torch.allclose(layer.bias, b1 - step[:, 3])


def test_adafisher_other_parameters_get_momentum_sgd_and_weight_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = baselines.AdaFisher(model, lr=0.1, weight_decay=0.01)
    assert len(opt.hooks.layers) == 2
    ln = model[1].weight
    before = ln.detach().clone()
    x, t = _batch(3)
    (0.5 * (model(x) - t).square().sum(1)).mean().backward()
    expected = before - 0.1 * (ln.grad + 0.01 * before)  # F = 1; first bias-corrected momentum step = the gradient
    opt.step()
    assert torch.allclose(ln, expected)
    # statistics are not collected under no_grad (evaluation)
    with torch.no_grad():
        model(x)
    assert all(layer.a is None for layer in opt.hooks.layers)


# ------------------------------------------------------------------------------------------ K-FAC
def test_kfac_matches_explicit_kronecker_solve():
    layer = _linear(1)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    lr, lam = 0.5, 0.1
    opt = baselines.KFAC(layer, lr=lr, momentum=0.0, damping=lam, kl_clip=None, stats_every=1, inverse_every=1)
    x, t = _batch(4, n=5)
    g = _mse_backward(layer, x, t)
    opt.step()
    n = len(x)
    a = torch.cat([x, torch.ones(n, 1)], 1)
    big_a = a.t() @ a / n  # E[a a^T]
    big_g = (n * g).t() @ (n * g) / n  # E[(per-sample dL/dy)(...)^T]
    st = opt.state[layer.weight]
    assert torch.allclose(st["A"], big_a) and torch.allclose(st["G"], big_g)
    d = g.t() @ a  # [dW | db], (2, 4)
    # row-major vec: vec(G D A) = (G kron A) vec(D); K-FAC solves (G kron A + damping I) v = vec(D)
    v = torch.linalg.solve(torch.kron(big_g, big_a) + lam * torch.eye(8), d.reshape(-1)).reshape(2, 4)
    assert torch.allclose(layer.weight, w0 - lr * v[:, :3]) and torch.allclose(layer.bias, b0 - lr * v[:, 3])


def test_kfac_kl_clip_momentum_and_stale_inverses():
    layer = _linear(2)
    opt = baselines.KFAC(layer, lr=0.5, momentum=0.9, damping=0.1, kl_clip=1e-4, stats_every=1, inverse_every=100)
    x, t = _batch(5)
    _mse_backward(layer, x, t)
    v = opt.preconditioned()  # nothing yet: no factors, no inverses
    assert v == {}
    w0 = layer.weight.detach().clone()
    opt._update_factors()
    opt._update_inverses()
    v = opt.preconditioned()
    vg = sum(float((v[p] * p.grad).sum()) for p in v) * 0.5**2
    nu = min(1.0, math.sqrt(1e-4 / vg))
    assert nu < 1.0
    opt.step()
    assert torch.allclose(layer.weight, w0 - 0.5 * nu * v[layer.weight])
    assert torch.allclose(opt.state[layer.weight]["momentum_buffer"], nu * v[layer.weight])


# ------------------------------------------------------------------------------------------ the registry
NEW = ("kfac", "adafisher", "adamw-schedulefree", "momo", "momo-adam")


def _toy_run(name: str, evaluate=None, steps: int = 4) -> dict:
    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g)

    def batches(gen):
        perm = torch.randperm(64, generator=gen)
        for i in range(0, 64, 64 // steps):
            yield x[perm[i : i + 64 // steps]], y[perm[i : i + 64 // steps]]

    try:
        return common.train_run(
            common.RunSpec(name, registry.get(name).lr["vision"], 0), task="vision",
            make_model=lambda: models.SmallCNN(1, 3, image_size=8, width=4, hidden=8), epoch_batches=batches,
            steps_per_epoch=steps, per_sample_loss=lambda m, a, b: F.cross_entropy(m(a), b, reduction="none"),
            evaluate=evaluate or (lambda m: {"valid_loss": 0.0}), budget=common.Budget(2), progress=False)
    finally:
        torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("name", NEW)
def test_new_entries_train_through_the_suite_loop(name):
    entry = registry.get(name)
    for package in entry.requires:
        pytest.importorskip(package, reason=f"needs {package}: install kalmanopt[test]")
    assert name in registry.DEFAULT and registry.available(name)
    assert registry.lr_grid(name, "vision") == [float(f"{entry.lr['vision'] * f:.3g}") for f in (1 / 3, 1, 3)]
    rec = _toy_run(name)
    assert rec["steps"] > 0 and not rec["diverged"] and math.isfinite(rec["history"][-1]["train_loss"])
    assert rec["optimizer_state_bytes"] > 0
    assert entry.scheduled == (name in ("kfac", "adafisher"))


def test_schedulefree_evaluates_at_the_average_and_trains_at_y():
    pytest.importorskip("schedulefree", reason="needs schedulefree: install kalmanopt[test]")
    modes = []

    def evaluate(model):
        opt_modes = [g["train_mode"] for g in seen[0].param_groups]
        modes.append(opt_modes[0])
        return {"valid_loss": 0.0}

    seen = []
    entry = registry.get("adamw-schedulefree")
    original = entry.build

    def spy(params, lr, wd):
        opt = original(params, lr, wd)
        seen.append(opt)
        return opt

    object.__setattr__(entry, "build", spy)
    try:
        rec = _toy_run("adamw-schedulefree", evaluate=evaluate)
    finally:
        object.__setattr__(entry, "build", original)
    assert modes == [False, False, False] and rec["steps"] == 8  # initial + one per epoch, all in eval mode
    assert seen[0].param_groups[0]["train_mode"] is True  # back in training mode after each evaluation
    # the other entries' hooks are no-ops
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    registry.get("sgd").to_eval(opt)
    registry.get("sgd").to_train(opt)


def test_momo_receives_the_batch_mean_loss():
    pytest.importorskip("momo", reason="needs momo-opt: install kalmanopt[test]")
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    entry = registry.get("momo")
    opt = entry.make(model, "vision")
    received = []
    step = opt.step
    opt.step = lambda closure=None, loss=None: (received.append(loss), step(closure=closure, loss=loss))[1]
    x, t = _batch(6)
    losses = (0.5 * (model(x) - t).square().sum(1))
    out = registry.backward_and_step(entry, opt, losses)
    assert received[0].ndim == 0 and torch.allclose(received[0], losses.mean().detach()) and out == received[0]


def test_registry_errors_are_usage_errors(monkeypatch):
    with pytest.raises(KeyError):
        registry.get("nope")
    with pytest.raises(UsageError, match="unknown optimizer 'nope'"):
        registry.get("nope")
    assert registry.parse_lr("adamw=0.003") == ("adamw", 0.003)
    for bad in ("adamw", "adamw=fast", "adamw=-1", "nope=1"):
        with pytest.raises(UsageError):
            registry.parse_lr(bad)
    with pytest.raises(TypeError, match="nn.Module"):
        registry.get("kfac").make(nn.Linear(2, 2).parameters(), "vision")
    fake = registry.OptimizerEntry("fake", "Fake", lambda p, lr, wd: None, "plain", {"vision": 1.0},
                                   requires=("kalmanopt_no_such_package",))
    monkeypatch.setitem(registry.REGISTRY, "fake", fake)
    assert not registry.available("fake")
    with pytest.raises(MissingDependency, match="pip install kalmanopt_no_such_package"):
        fake.make(nn.Linear(2, 2), "vision")
