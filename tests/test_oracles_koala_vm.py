"""KOALA-V and KOALA-M against the AAAI 2022 equations written out in plain Python floats.

The oracles below use lists of floats and ``math`` only (no torch): every tensor is a flat list, the filter's
scalars are Python floats. They follow the equations of Davtyan et al. (AAAI 2022) with the conventions the
library documents:

* weight decay folded in: ``h_l = g_l + wd * theta_l`` and the layer loss ``l_l = L + wd/2 * ||theta_l||^2``
  (each tensor sees its own penalty, evaluated at the weights the gradient was taken at);
* R fixed (``r``) or an exponential average ``R <- alpha_r * R + (1 - alpha_r) * stat`` from ``R = 1``, updated
  before use, where ``stat`` is ``mean(l_i^2)``, ``mean(l_i)^2`` or ``var(l_i)/B`` (unbiased), per ``r_stat``;
* ``step`` is the measurement update followed by the next step's prediction (predict ahead), so the first step
  predicts from the prior first;
* KOALA-M's online ``q_w`` in the paper's form, ``q_w = ||theta - theta_bar||^2 / n`` over the whole group
  (theta: the posterior weights before the momentum move, theta_bar: an EMA (0.9) of those weights that starts at
  the initial weights and is updated after q_w is read).

Several tensors with gradients of different sizes make the max over tensors in the covariance update matter.
"""

import math

import pytest
import torch

from kalmanopt import KOALAM, KOALAV

SHAPES = [(3,), (2, 4), (5,), (1, 2)]
STEPS = 6


# ----------------------------------------------------------------------------------------------- plain-Python oracle
def dot(a, b):
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


def statistic(losses, r_stat):
    n = len(losses)
    mean = math.fsum(losses) / n
    if r_stat == "second_moment":
        return math.fsum(x * x for x in losses) / n
    if r_stat == "squared_mean":
        return mean * mean
    assert r_stat == "mean_variance"
    return math.fsum((x - mean) ** 2 for x in losses) / (n - 1) / n


def next_noise(R, losses, *, r, alpha_r, r_stat):
    if r is not None:
        return float(r)
    return alpha_r * R + (1 - alpha_r) * statistic(losses, r_stat)


def effective(theta, grads, wd, L):
    """h_l = g_l + wd * theta_l and l_l = L + wd/2 * ||theta_l||^2 for every tensor l."""
    hs = [[g + wd * t for g, t in zip(gl, tl, strict=True)] for gl, tl in zip(grads, theta, strict=True)]
    layer_losses = [L + 0.5 * wd * dot(tl, tl) for tl in theta]
    return hs, layer_losses


def koala_v_oracle(theta, grad_seq, loss_seq, *, lr, sigma, q, r, alpha_r, weight_decay, r_stat):
    """KOALA-V: P = sigma * I. Returns the weights and (sigma, R) after every step."""
    theta = [list(t) for t in theta]
    R = 1.0
    history = []
    for grads, losses in zip(grad_seq, loss_seq, strict=True):
        prior = sigma + q  # predict
        R = next_noise(R, losses, r=r, alpha_r=alpha_r, r_stat=r_stat)
        L = math.fsum(losses) / len(losses)
        hs, layer_losses = effective(theta, grads, weight_decay, L)
        largest = 0.0
        for i, (h, ell) in enumerate(zip(hs, layer_losses, strict=True)):
            hh = dot(h, h)
            S = prior * hh + R
            theta[i] = [t - lr * ell * prior / S * x for t, x in zip(theta[i], h, strict=True)]
            largest = max(largest, hh / S)
        sigma = prior - prior * prior * largest
        history.append(([list(t) for t in theta], sigma, R))
    return history


def koala_m_oracle(theta, grad_seq, loss_seq, *, lr, sw, sc, sv, a, qw, qv, r, alpha_r, weight_decay, r_stat):
    """KOALA-M: state (theta, p), P = [[P11, P12], [P12, P22]] (x) I. Returns weights, momenta, P, R per step."""
    theta = [list(t) for t in theta]
    momentum = [[0.0] * len(t) for t in theta]
    ema = [list(t) for t in theta]  # theta_bar starts at the initial weights
    n = sum(len(t) for t in theta)
    P11, P12, P22 = sw, sc, sv
    R = 1.0

    def predict():
        nonlocal P11, P12, P22
        if qw is None:
            q_w = math.fsum((x - e) ** 2 for t, m in zip(theta, ema, strict=True) for x, e in zip(t, m, strict=True))
            q_w /= n
            for t, m in zip(theta, ema, strict=True):
                m[:] = [0.9 * e + 0.1 * x for e, x in zip(m, t, strict=True)]
        else:
            q_w = qw
        # F P F^T + diag(q_w, q_v) with F = [[1, 1], [0, a]]
        P11, P12, P22 = P11 + 2 * P12 + P22 + q_w, a * (P12 + P22), a * a * P22 + qv
        for t, m in zip(theta, momentum, strict=True):
            t[:] = [x + v for x, v in zip(t, m, strict=True)]
            m[:] = [a * v for v in m]

    predict()  # the first step predicts from the prior (theta = theta_bar there, so q_w = 0)
    history = []
    for grads, losses in zip(grad_seq, loss_seq, strict=True):
        R = next_noise(R, losses, r=r, alpha_r=alpha_r, r_stat=r_stat)
        L = math.fsum(losses) / len(losses)
        hs, layer_losses = effective(theta, grads, weight_decay, L)
        largest = 0.0
        for i, (h, ell) in enumerate(zip(hs, layer_losses, strict=True)):
            hh = dot(h, h)
            S = hh * P11 + R
            theta[i] = [t - lr * ell * P11 / S * x for t, x in zip(theta[i], h, strict=True)]
            momentum[i] = [v - lr * ell * P12 / S * x for v, x in zip(momentum[i], h, strict=True)]
            largest = max(largest, hh / S)
        # P <- P^ - P^ diag(c, 0) P^T
        P11, P12, P22 = P11 - largest * P11 * P11, P12 - largest * P11 * P12, P22 - largest * P12 * P12
        posterior = ([list(t) for t in theta], [list(m) for m in momentum], (P11, P12, P22), R)
        predict()  # step() predicts ahead
        history.append((*posterior, [list(t) for t in theta]))
    return history


# ----------------------------------------------------------------------------------------------- the data
def problem(seed=0, steps=STEPS, batch=5):
    """Initial weights, gradients and per-sample losses as plain lists; tensor scales differ and change per step,
    so that the tensor with the largest ||h||^2/S is not always the same one."""
    gen = torch.Generator().manual_seed(seed)
    theta = [torch.randn(s, generator=gen, dtype=torch.float64).reshape(-1).tolist() for s in SHAPES]
    grads, losses = [], []
    for _ in range(steps):
        scales = (torch.rand(len(SHAPES), generator=gen, dtype=torch.float64) * 2.0 + 0.05).tolist()
        grads.append([(c * torch.randn(s, generator=gen, dtype=torch.float64)).reshape(-1).tolist()
                      for c, s in zip(scales, SHAPES, strict=True)])
        losses.append((torch.rand(batch, generator=gen, dtype=torch.float64) * 2.0 + 0.3).tolist())
    return theta, grads, losses


def as_tensor(flat, shape):
    return torch.tensor(flat, dtype=torch.float64).reshape(shape)


def run_optimizer(cls, kwargs, theta, grads, losses, *, foreach):
    """Yields (params, opt) after each step, with the given gradients preset; R is the papers' average (no clip)."""
    params = [as_tensor(t, s).requires_grad_() for t, s in zip(theta, SHAPES, strict=True)]
    opt = cls(params, foreach=foreach, **{"r_clip": None, **kwargs})
    for step_grads, step_losses in zip(grads, losses, strict=True):
        for p, g, s in zip(params, step_grads, SHAPES, strict=True):
            p.grad = as_tensor(g, s)
        opt.step(loss=torch.tensor(step_losses, dtype=torch.float64))
        yield params, opt


def assert_params(params, expected, step):
    for k, (p, e) in enumerate(zip(params, expected, strict=True)):
        torch.testing.assert_close(p.detach().reshape(-1), torch.tensor(e, dtype=torch.float64), rtol=1e-12,
                                   atol=1e-12, msg=lambda m, k=k: f"step {step}, tensor {k}: {m}")


def assert_scalar(value, expected, name, step):
    assert math.isclose(float(value), expected, rel_tol=1e-12, abs_tol=1e-14), (name, step, float(value), expected)


# ----------------------------------------------------------------------------------------------- KOALA-V
KOALA_V_CASES = {
    "defaults": dict(lr=1.0, sigma=0.1, q=1.0, r=None, alpha_r=0.9, weight_decay=0.0, r_stat="second_moment"),
    "small_q_fixed_r": dict(lr=0.7, sigma=0.5, q=0.02, r=0.3, alpha_r=0.9, weight_decay=0.0, r_stat="second_moment"),
    "weight_decay": dict(lr=0.6, sigma=0.3, q=0.1, r=None, alpha_r=0.8, weight_decay=0.05, r_stat="second_moment"),
    "squared_mean": dict(lr=0.5, sigma=0.2, q=0.05, r=None, alpha_r=0.7, weight_decay=0.02, r_stat="squared_mean"),
    "mean_variance": dict(lr=0.5, sigma=0.2, q=0.05, r=None, alpha_r=0.5, weight_decay=0.0, r_stat="mean_variance"),
}


def check_koala_v(case, foreach, seed=0, cls=KOALAV):
    hp = KOALA_V_CASES[case]
    theta, grads, losses = problem(seed)
    expected = koala_v_oracle(theta, grads, losses, **hp)
    run = run_optimizer(cls, hp, theta, grads, losses, foreach=foreach)
    for step, ((params, opt), (e_theta, e_sigma, e_R)) in enumerate(zip(run, expected, strict=True)):
        assert_params(params, e_theta, step)
        leader = opt.state[params[0]]
        assert_scalar(leader["sigma"], e_sigma, "sigma", step)
        assert_scalar(leader["measurement_noise"], e_R, "R", step)


@pytest.mark.parametrize("foreach", [False, True, None], ids=["reference", "foreach", "default"])
@pytest.mark.parametrize("case", sorted(KOALA_V_CASES))
def test_koala_v_matches_the_paper_by_hand(case, foreach):
    check_koala_v(case, foreach)


def test_koala_v_oracle_covariance_shrinks_and_max_matters():
    """The oracle itself: sigma shrinks below the prediction, and the max is not the first or last tensor only."""
    hp = KOALA_V_CASES["small_q_fixed_r"]
    theta, grads, losses = problem(0)
    history = koala_v_oracle(theta, grads, losses, **hp)
    sigma = hp["sigma"]
    arg_max = set()
    for (_, new_sigma, R), step_grads in zip(history, grads, strict=True):
        prior = sigma + hp["q"]
        assert new_sigma < prior
        ratios = [dot(g, g) / (prior * dot(g, g) + R) for g in step_grads]
        arg_max.add(ratios.index(max(ratios)))
        sigma = new_sigma
    assert len(arg_max) >= 2


# ----------------------------------------------------------------------------------------------- KOALA-M
KOALA_M_CASES = {
    "defaults": dict(lr=1.0, sw=0.1, sc=0.0, sv=0.1, a=0.9, qw=0.01, qv=0.01, r=None, alpha_r=0.9,
                     weight_decay=0.0, r_stat="second_moment"),
    "cross_term_fixed_r": dict(lr=0.6, sw=0.4, sc=0.05, sv=0.2, a=0.8, qw=0.02, qv=0.03, r=0.5, alpha_r=0.9,
                               weight_decay=0.0, r_stat="second_moment"),
    "weight_decay": dict(lr=0.5, sw=0.3, sc=-0.02, sv=0.1, a=0.7, qw=0.01, qv=0.02, r=None, alpha_r=0.8,
                         weight_decay=0.05, r_stat="squared_mean"),
    "online_qw": dict(lr=0.8, sw=0.2, sc=0.0, sv=0.2, a=0.9, qw=None, qv=0.01, r=None, alpha_r=0.9,
                      weight_decay=0.01, r_stat="second_moment"),
    "online_qw_mean_variance": dict(lr=0.5, sw=0.1, sc=0.01, sv=0.05, a=0.5, qw=None, qv=0.0, r=None, alpha_r=0.6,
                                    weight_decay=0.0, r_stat="mean_variance"),
}


def check_koala_m(case, foreach, seed=0, cls=KOALAM):
    hp = KOALA_M_CASES[case]
    theta, grads, losses = problem(seed)
    expected = koala_m_oracle(theta, grads, losses, **hp)
    run = run_optimizer(cls, hp, theta, grads, losses, foreach=foreach)
    for step, ((params, opt), (_, e_momentum, e_P, e_R, e_predicted)) in enumerate(zip(run, expected, strict=True)):
        assert_params(params, e_predicted, step)  # after step(): the prediction for the next measurement
        for k, (p, m) in enumerate(zip(params, e_momentum, strict=True)):
            got = opt.state[p]["momentum"].reshape(-1)
            want = torch.tensor([hp["a"] * v for v in m], dtype=torch.float64)  # predicted ahead too
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda s, k=k, i=step: f"p[{k}] {i}: {s}")
        leader = opt.state[params[0]]
        for name, got, want in zip(("P11", "P12", "P22"), leader["P"].tolist(), e_P, strict=True):
            assert_scalar(got, want, name, step)
        assert_scalar(leader["measurement_noise"], e_R, "R", step)


@pytest.mark.parametrize("foreach", [False, True, None], ids=["reference", "foreach", "default"])
@pytest.mark.parametrize("case", sorted(KOALA_M_CASES))
def test_koala_m_matches_the_paper_by_hand(case, foreach):
    check_koala_m(case, foreach)


def test_koala_m_oracle_online_qw_is_not_zero():
    """The oracle itself: with q_w estimated online the prior P11 gets more than the constant part."""
    hp = {**KOALA_M_CASES["online_qw"], "qv": 0.0}
    theta, grads, losses = problem(0)
    online = koala_m_oracle(theta, grads, losses, **hp)
    fixed = koala_m_oracle(theta, grads, losses, **{**hp, "qw": 0.0})
    assert online[-1][2][0] > fixed[-1][2][0] + 1e-3


# ----------------------------------------------------------------------------------------------- broken optimizers
class KOALAVNoShrink(KOALAV):
    """A KOALA-V whose covariance never shrinks: the posterior sigma is reset to the prediction sigma + q."""

    def _correct_group(self, group, group_state, *args, **kwargs):
        super()._correct_group(group, group_state, *args, **kwargs)
        group_state["sigma"].copy_(group_state["sigma_prior"])


class KOALAMPosteriorIsPrior(KOALAM):
    """A KOALA-M whose posterior covariance equals its prior F P F^T + Q."""

    def _correct_group(self, group, group_state, *args, **kwargs):
        super()._correct_group(group, group_state, *args, **kwargs)
        group_state["P"].copy_(group_state["P_prior"])


@pytest.mark.parametrize("foreach", [False, True, None], ids=["reference", "foreach", "default"])
def test_oracle_catches_a_koala_v_whose_covariance_never_shrinks(foreach):
    with pytest.raises(AssertionError):
        check_koala_v("small_q_fixed_r", foreach, cls=KOALAVNoShrink)


@pytest.mark.parametrize("foreach", [False, True, None], ids=["reference", "foreach", "default"])
def test_oracle_catches_a_koala_m_whose_posterior_is_its_prior(foreach):
    with pytest.raises(AssertionError):
        check_koala_m("cross_term_fixed_r", foreach, cls=KOALAMPosteriorIsPrior)
