"""LoKO's linearised predictive distribution: a linear-softmax model (where the linearisation is exact) against a
dense oracle and Monte Carlo, the probit and Laplace-bridge formulas, ``last_predictive``, no side effects."""

import copy
import math

import pytest
import torch
from test_loko import data, tiny
from test_loko_lowrank import set_lowrank_state

from kalmanopt.optim.loko import PREDICTIVE_METHODS, predictive_probs

from conftest import diagonal_loko as LoKO

D, C = 4, 3
N = C * D + C


def linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(D, C).double()


def inputs(seed=0, b=5):
    return torch.randn(b, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def set_diag_state(opt, model, p):
    i = 0
    for q in model.parameters():
        opt.state[q]["p"] = p[i:i + q.numel()].view(q.shape).clone()
        i += q.numel()


def linear_jacobian(x):
    """d logits_b / d (weight, bias) of a Linear layer, by hand: row j of sample b is [e_j (x) x_b, e_j]."""
    eye = torch.eye(C, dtype=torch.float64)
    return torch.stack([torch.cat([torch.kron(eye, xb.unsqueeze(0)), eye], dim=1) for xb in x])  # (b, C, N)


def random_state(opt, model, rank, seed=1):
    """A random diagonal or low-rank state; returns its dense covariance."""
    g = torch.Generator().manual_seed(seed)
    if rank == 0:
        p = torch.rand(N, generator=g, dtype=torch.float64) * 0.5 + 0.05
        set_diag_state(opt, model, p)
        return torch.diag(p)
    ups = torch.rand(N, generator=g, dtype=torch.float64) * 3 + 1.0
    W = torch.randn(N, rank, generator=g, dtype=torch.float64)
    set_lowrank_state(opt, model, ups, W)
    return torch.linalg.inv(torch.diag(ups) + W @ W.T)


@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("inflation,q", [(0.0, 0.0), (0.2, 0.01)])
def test_linear_model_covariance_is_x_P_x(rank, inflation, q):
    model = linear()
    opt = LoKO(model.parameters(), rank=rank, inflation=inflation, q=q)
    P = random_state(opt, model, rank)
    P_pred = (1 + inflation) * P + q * torch.eye(N, dtype=torch.float64)  # what the next step starts from
    x = inputs()
    pred = opt.predictive(lambda: model(x))
    J = linear_jacobian(x)
    torch.testing.assert_close(pred.cov, J @ P_pred @ J.transpose(1, 2), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(pred.mean, model(x))
    assert pred.cov.shape == (5, C, C) and pred.probs.shape == (5, C) and pred.probs.dtype == torch.float64


@pytest.mark.parametrize("rank", [0, 3])
def test_monte_carlo_over_the_parameters(rank):
    """Sampling theta ~ N(theta, P) and running the (linear) model gives the same logit moments, and the MC
    probabilities agree with the "mc" method and, approximately, with the probit approximation."""
    model = linear(seed=2)
    opt = LoKO(model.parameters(), rank=rank)
    P = random_state(opt, model, rank, seed=4)
    x = inputs(3, b=2)
    pred = opt.predictive(lambda: model(x), "mc", samples=20000, generator=torch.Generator().manual_seed(0))
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    g = torch.Generator().manual_seed(1)
    S = 40000
    thetas = theta + torch.randn(S, N, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(P).T
    Wt, bt = thetas[:, :C * D].view(S, C, D), thetas[:, C * D:]
    f = torch.einsum("scd,bd->sbc", Wt, x) + bt.unsqueeze(1)  # (S, b, C)
    emp_cov = torch.einsum("sbi,sbj->bij", f - f.mean(0), f - f.mean(0)) / (S - 1)
    scale = torch.diagonal(pred.cov, dim1=1, dim2=2).sqrt()
    assert ((emp_cov - pred.cov) / (scale.unsqueeze(2) * scale.unsqueeze(1))).abs().max() < 0.03
    truth = torch.softmax(f, dim=2).mean(0)
    assert (pred.probs - truth).abs().max() < 0.01
    probit = predictive_probs(pred.mean, pred.cov, "probit")
    assert (probit - truth).abs().max() < 0.05
    plugin = predictive_probs(pred.mean, pred.cov, "plugin")
    assert (probit - truth).abs().max() < (plugin - truth).abs().max()  # the variance matters here


def test_probit_is_its_formula_and_mackays_binary_approximation():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3
    A = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2)
    expected = torch.softmax(mu / torch.sqrt(1 + math.pi / 8 * torch.diagonal(cov, dim1=1, dim2=2)), 1)
    torch.testing.assert_close(predictive_probs(mu, cov, "probit"), expected, rtol=0, atol=0)
    # two classes, the second logit fixed at 0: E[sigmoid(f)] by quadrature, within the approximation's error
    for m, s2 in [(0.0, 4.0), (2.0, 1.0), (-1.5, 9.0), (3.0, 0.25)]:
        f = torch.linspace(-60, 60, 200001, dtype=torch.float64)
        dens = torch.exp(-0.5 * (f - m) ** 2 / s2) / math.sqrt(2 * math.pi * s2)
        exact = float(torch.trapezoid(torch.sigmoid(f) * dens, f))
        cov2 = torch.tensor([[[s2, 0.0], [0.0, 0.0]]], dtype=torch.float64)
        p = predictive_probs(torch.tensor([[m, 0.0]], dtype=torch.float64), cov2, "probit")
        assert float(p[0, 0]) == pytest.approx(1 / (1 + math.exp(-m / math.sqrt(1 + math.pi * s2 / 8))), abs=1e-15)
        assert abs(float(p[0, 0]) - exact) < 0.02


def test_laplace_bridge_is_its_formula():
    """Hobbhahn et al. (2022), eq. for alpha, after conditioning the logits on sum zero, written out by hand."""
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64)
    A = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    cov = A @ A.transpose(1, 2) + 0.1 * torch.eye(4, dtype=torch.float64)
    got = predictive_probs(mu, cov, "laplace_bridge")
    for b in range(3):
        one = torch.ones(4, dtype=torch.float64)
        s = cov[b] @ one
        m = mu[b] - s * (one @ mu[b]) / (one @ s)
        v = torch.diagonal(cov[b] - torch.outer(s, s) / (one @ s))
        alpha = [(1 - 2 / 4 + math.exp(m[i]) / 16 * float(torch.exp(-m).sum())) / float(v[i]) for i in range(4)]
        torch.testing.assert_close(got[b], torch.tensor(alpha, dtype=torch.float64) / sum(alpha))
    # isotropic covariance around equal logits: uniform
    flat = predictive_probs(torch.zeros(1, 5, dtype=torch.float64), torch.eye(5, dtype=torch.float64)[None],
                            "laplace_bridge")
    torch.testing.assert_close(flat, torch.full((1, 5), 0.2, dtype=torch.float64))


@pytest.mark.parametrize("method", PREDICTIVE_METHODS)
def test_probabilities_sum_to_one(method):
    model = tiny()
    opt = LoKO(model.parameters(), rank=2)
    for k in range(3):
        x, y = data(k)
        opt.step(lambda x=x: model(x), y)
    x, _ = data(7, n=9)
    pred = opt.predictive(lambda: model(x), method, samples=500, generator=torch.Generator().manual_seed(0))
    assert torch.all(pred.probs >= 0)
    torch.testing.assert_close(pred.probs.sum(1), torch.ones(9, dtype=torch.float64))


@pytest.mark.parametrize("rank", [0, 2])
def test_predictive_changes_nothing(rank):
    model = tiny()
    opt = LoKO(model.parameters(), rank=rank, p0="auto", noise="ema")
    x, _ = data(3)
    opt.predictive(lambda: model(x))  # before the first step: no state is created
    assert len(opt.state) == 0
    for k in range(3):
        xk, yk = data(k)
        opt.step(lambda xk=xk: model(xk), yk)
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    last = opt.last_predictive
    opt.predictive(lambda: model(x), noise=True)
    after = opt.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for key, values in before["state"].items():
        for name, value in values.items():
            assert torch.equal(value, after["state"][key][name]), name
    assert all(torch.equal(a, b.detach()) for a, b in zip(params, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert opt.last_predictive is last


@pytest.mark.parametrize("rank", [0, 3])
def test_last_predictive_is_the_prior_predictive_of_the_step(rank):
    """step() stores the distribution of the outputs it measured before learning them: the same as predictive()
    on those inputs just before the step (the same prior after the time update)."""
    model = tiny()
    opt = LoKO(model.parameters(), rank=rank, inflation=0.1, q=1e-3)
    for k in range(4):
        x, y = data(k, n=3)
        expected = opt.predictive(lambda x=x: model(x))
        out = opt.step(lambda x=x: model(x), y)
        last = opt.last_predictive
        assert torch.equal(last.mean, out) and not last.cov.requires_grad
        torch.testing.assert_close(last.cov, expected.cov, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(last.probs, expected.probs, rtol=1e-9, atol=1e-12)
    assert not torch.equal(last.cov, opt.predictive(lambda: model(x)).cov)  # the state moved: the check can fail


def test_noise_adds_R():
    model = tiny()
    opt = LoKO(model.parameters(), r0=0.7, r_min=0.01)
    x, _ = data()
    a, b = opt.predictive(lambda: model(x)), opt.predictive(lambda: model(x), noise=True)
    torch.testing.assert_close(b.cov - a.cov, 0.71 * torch.eye(3, dtype=torch.float64).expand(2, 3, 3))


def test_loss_observation_has_no_predictive():
    model = tiny()
    opt = LoKO(model.parameters(), observation="loss")
    x, y = data()
    opt.step(lambda: model(x), y)
    assert opt.last_predictive is None
    with pytest.raises(ValueError, match="observation='loss'"):
        opt.predictive(lambda: model(x))


def test_softmax_observation_stores_the_logit_predictive():
    # the softmax observation's rows are the logits' rows mapped through the softmax Jacobian, so the step has the
    # logits' Jacobian and stores their predictive, equal to predictive() taken just before the step
    for rank in (0, 4):
        model = tiny()
        opt = LoKO(model.parameters(), observation="softmax", noise="moment", rank=rank)
        x, y = data()

        def forward(model=model, x=x):
            return model(x)

        for _ in range(2):
            before = opt.predictive(forward)
            opt.step(forward, y)
            got = opt.last_predictive
            assert got is not None
            torch.testing.assert_close(got.mean, before.mean)
            torch.testing.assert_close(got.cov, before.cov, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(got.probs, before.probs, rtol=1e-6, atol=1e-9)
        with pytest.raises(ValueError, match="noise"):
            opt.predictive(forward, noise=True)


def test_bad_arguments():
    model = tiny()
    opt = LoKO(model.parameters())
    x, _ = data()
    with pytest.raises(ValueError, match="method"):
        opt.predictive(lambda: model(x), "sampling")
    with pytest.raises(ValueError, match="batch, classes"):
        opt.predictive(lambda: model(x).reshape(-1))
    with pytest.raises(ValueError, match="samples"):
        opt.predictive(lambda: model(x), "mc", samples=0)
