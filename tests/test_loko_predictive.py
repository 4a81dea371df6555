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


# ------------------------------------------------------------------------------------------------ calibration
def _under_confident_stream(n=200, c=4, sharpness=3.0, seed=0):
    """Logits whose softmax is under-confident: the labels are drawn from ``softmax(sharpness * mean)``, with a small
    logit covariance (a filter that has learned): only a temperature below 1 calibrates them."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 1, c, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(sharpness * mean[:, 0], 1), 1, generator=g).squeeze(1)
    a = 0.3 * torch.randn(n, c, c, generator=g, dtype=torch.float64)
    cov = (a @ a.transpose(1, 2)).unsqueeze(1)
    return mean, cov, labels


def _replay(rule, mean, cov, labels):
    """The calibrated predictive of every sample of a stream (batch 1), and the rule's final state."""
    from kalmanopt.optim.loko.predictive import calibrated

    gst, probs, temps = {}, [], []
    c = mean.shape[-1]
    for mu, sigma, y in zip(mean, cov, labels, strict=True):
        target = torch.nn.functional.one_hot(y.view(1), c).double()
        yhat = torch.softmax(mu, 1)
        pred = calibrated(mu, sigma, target - yhat, yhat, gst, rule)
        probs.append(pred.probs)
        temps.append(float((mu / pred.mean)[0, 0]))
    return torch.cat(probs), temps, gst


def test_temperature_calibration_sharpens_under_confident_logits():
    """Issue 22: LoKO's logits were under-confident, and the covariance scale (``"scale"``, the earlier default)
    can only lower the confidence, so its best is the plug-in softmax, still under-confident. ``"temperature"``, the
    default now, picks a temperature below 1 and has a lower NLL, Brier score and ECE on the same stream."""
    from kalmanopt.online import expected_calibration_error

    mean, cov, labels = _under_confident_stream()
    scores = {}
    for rule in ("scale", "temperature"):
        probs, temps, _ = _replay(rule, mean, cov, labels)
        conf, pred = probs.max(1)
        nll = float(-probs.gather(1, labels.view(-1, 1)).log().mean())
        onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
        brier = float((probs - onehot).square().sum(1).mean())
        ece = expected_calibration_error(conf.tolist(), (pred == labels).long().tolist())
        scores[rule] = (nll, brier, ece, temps[-1])
    assert scores["scale"][3] == 1.0  # the earlier rule never touches the mean
    assert scores["temperature"][3] < 0.6  # about 1 / 3, the stream's sharpness
    assert scores["temperature"][0] < scores["scale"][0] - 0.05
    assert scores["temperature"][1] < scores["scale"][1]
    assert scores["temperature"][2] < scores["scale"][2] - 0.05


def test_temperature_calibration_is_the_pair_with_the_lowest_past_brier_score():
    """Prequential: sample t's predictive is the (temperature, scale) pair with the lowest Brier score summed over
    samples 0..t-1 (ties: the first, T = s = 1), returned as N(mu / T, s Sigma) with its probit probabilities."""
    from kalmanopt.optim.loko import PREDICTIVE_SCALES, PREDICTIVE_TEMPERATURES, probit

    mean, cov, labels = _under_confident_stream(n=30, seed=1)
    pairs = [(t, s) for t in PREDICTIVE_TEMPERATURES for s in PREDICTIVE_SCALES]
    t_all = torch.tensor([t for t, _ in pairs], dtype=torch.float64).view(-1, 1)
    s_all = torch.tensor([s for _, s in pairs], dtype=torch.float64).view(-1, 1)
    past = torch.zeros(len(pairs), dtype=torch.float64)
    probs, temps, gst = _replay("temperature", mean, cov, labels)
    for i, (mu, sigma, y) in enumerate(zip(mean, cov, labels, strict=True)):
        var = torch.diagonal(sigma, dim1=1, dim2=2)
        best = min(range(len(pairs)), key=lambda j: (float(past[j]), j))
        t, s = pairs[best]
        torch.testing.assert_close(probs[i:i + 1], probit(mu / t, s * var), rtol=1e-12, atol=1e-15)
        assert temps[i] == pytest.approx(t, rel=1e-12)
        onehot = torch.nn.functional.one_hot(y.view(1), mu.shape[1]).double()
        every = torch.softmax(mu / t_all / torch.sqrt(1.0 + math.pi * s_all * var / 8.0), dim=1)  # (pairs, c)
        past += (every - onehot).square().sum(1)
    assert temps[0] == 1.0 and len(set(temps)) > 1
    torch.testing.assert_close(gst["predictive_brier"], past, rtol=1e-12, atol=1e-12)


def test_loko_calibrate_options_and_predictive_use_the_chosen_temperature():
    """``calibrate=True`` is ``"temperature"`` (in the param group); ``"scale"`` is the earlier rule, bit for bit
    the earlier state (``predictive_nll`` only, temperature 1); neither touches training; ``predictive()`` and
    ``last_predictive`` divide the logits by the chosen temperature; the state dict carries the sums."""
    from kalmanopt.optim.loko import LoKO as DefaultLoKO
    from kalmanopt.optim.loko import predictive_probs

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    twins = {rule: copy.deepcopy(model) for rule in ("scale", False)}
    opts = {True: DefaultLoKO(model.parameters(), rank=4)}
    opts |= {rule: DefaultLoKO(twins[rule].parameters(), rank=4, calibrate=rule) for rule in twins}
    models = {True: model, **twins}
    assert opts[True].param_groups[0]["calibrate"] == "temperature"
    g = torch.Generator().manual_seed(0)
    xs = 2.0 * torch.randn(10, 1, 4, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (10, 1), generator=g)
    for x, y in zip(xs, ys, strict=True):
        for rule, opt in opts.items():
            opt.step(lambda x=x, m=models[rule]: m(x), y)
        raw = opts[False].last_predictive
        got = opts[True].last_predictive
        torch.testing.assert_close(got.probs, predictive_probs(got.mean, got.cov, "probit"), rtol=1e-12, atol=1e-15)
        ratio = raw.mean / got.mean
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0, 0])), rtol=1e-12, atol=0.0)
    for rule in ("scale", False):
        for p, q in zip(model.parameters(), twins[rule].parameters(), strict=True):
            assert torch.equal(p, q)  # the calibration never touches the filter
    leader = lambda opt: opt.state[next(iter(opt.param_groups[0]["params"]))]  # noqa: E731
    assert "predictive_brier" in leader(opts[True]) and "predictive_nll" not in leader(opts[True])
    assert "predictive_nll" in leader(opts["scale"]) and "predictive_brier" not in leader(opts["scale"])
    assert opts["scale"].predictive_temperature == 1.0 and opts[False].predictive_temperature == 1.0
    temperature, scale = opts[True].predictive_temperature, opts[True].predictive_scale
    assert temperature != 1.0
    x = xs[0]
    got = opts[True].predictive(lambda: model(x))
    raw = opts[False].predictive(lambda: twins[False](x))
    torch.testing.assert_close(got.mean, raw.mean / temperature, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got.cov, scale * raw.cov, rtol=1e-9, atol=1e-15)
    restored = DefaultLoKO(copy.deepcopy(model).parameters(), rank=4)
    restored.load_state_dict(opts[True].state_dict())
    assert (restored.predictive_temperature, restored.predictive_scale) == (temperature, scale)


def test_bad_calibrate():
    from kalmanopt.optim.loko import LoKO as DefaultLoKO
    from kalmanopt.optim.loko.predictive import calibrated

    model = tiny()
    for bad in ("nll", 1, None, "Temperature"):
        with pytest.raises(ValueError, match="calibrate"):
            DefaultLoKO(model.parameters(), calibrate=bad)
    z = torch.zeros(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="rule"):
        calibrated(z, torch.zeros(1, 3, 3, dtype=torch.float64), z, z, {}, "brier")


def test_temperature_calibration_leaves_a_non_finite_sample_out_of_every_sum():
    """A sample whose Brier score is NaN under some candidate (a NaN covariance) adds nothing to any sum (once in a
    sum, a NaN would decide every later choice); the next finite sample adds to all of them."""
    from kalmanopt.optim.loko.predictive import calibrated

    mean, cov, labels = _under_confident_stream(n=3, seed=2)
    _, _, gst = _replay("temperature", mean, cov, labels)
    before = gst["predictive_brier"].clone()
    bad = cov[0].clone()
    bad[0, 1, 1] = math.nan
    target = torch.nn.functional.one_hot(labels[:1], mean.shape[-1]).double()
    yhat = torch.softmax(mean[0], 1)
    calibrated(mean[0], bad, target - yhat, yhat, gst, "temperature")
    assert torch.equal(gst["predictive_brier"], before)
    calibrated(mean[0], cov[0], target - yhat, yhat, gst, "temperature")
    assert torch.isfinite(gst["predictive_brier"]).all() and (gst["predictive_brier"] > before).all()
