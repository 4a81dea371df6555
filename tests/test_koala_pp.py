"""KOALA++ against Algorithm 1 written out by hand in plain Python floats."""

import math

import pytest
import torch

from kalmanopt import KOALAPlusPlus


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def axpy(*terms):
    """sum of coefficient * vector over (coefficient, vector) pairs."""
    n = len(terms[0][1])
    return [sum(c * v[i] for c, v in terms) for i in range(n)]


def koala_pp_by_hand(theta, grads, losses, *, lr, sigma, q, R, symmetric):
    """Algorithm 1 of the KOALA++ paper, with the reference code's first step (prior P0 = sigma*I)."""
    H1 = grads[0]
    v_prev, H_prev = [sigma * x for x in H1], H1
    S_prev = dot(H1, v_prev) + q * dot(H1, H1) + R
    for H, L in zip(grads, losses, strict=True):
        alpha = dot(H, H_prev) / dot(H_prev, H_prev)
        lam = dot(H, axpy((1, v_prev), (q, H_prev))) / S_prev
        if symmetric:
            w = (dot(H, v_prev) * dot(H_prev, H_prev) - dot(H_prev, v_prev) * dot(H, H_prev)) \
                / dot(H_prev, H_prev) ** 2
        else:
            w = 0.0
        v = axpy((alpha - lam, v_prev), (q, H), (-q * lam, H_prev), (w, H_prev))
        S = dot(H, v) + q * dot(H, H) + R
        theta = axpy((1, theta), (-lr * L / S, axpy((1, v), (q, H))))
        v_prev, H_prev, S_prev = v, H, S
    return theta


GRADS = [[0.5, -1.0, 2.0], [0.3, -0.8, 2.5], [1.0, 0.2, -0.4]]
LOSSES = [2.0, 1.5, 1.2]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_algorithm_by_hand(symmetric, foreach):
    theta0 = [0.1, -0.2, 0.3]
    p = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    opt = KOALAPlusPlus([p], lr=0.7, sigma=0.2, q=0.05, r=0.4, symmetric=symmetric, foreach=foreach, preset="paper")
    for step, (g, L) in enumerate(zip(GRADS, LOSSES, strict=True)):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step(loss=torch.tensor(L, dtype=torch.float64))
        expected = koala_pp_by_hand(theta0, GRADS[: step + 1], LOSSES[: step + 1], lr=0.7, sigma=0.2, q=0.05,
                                    R=0.4, symmetric=symmetric)
        torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=1e-13)


def test_two_steps_worked_numerically():
    """Step 1 from the prior, step 2 from the stored v and H, each line of the algorithm spelled out."""
    sigma, q, R, lr = 0.1, 0.1, 1.0, 1.0
    H1, H2, L1, L2 = [1.0, 2.0], [2.0, 0.0], 3.0, 2.0
    # step 1: v0 = sigma*H1 = [0.1, 0.2]; ||H1||^2 = 5; S0 = 0.5 + 0.5 + 1 = 2
    # lambda = H1.(v0 + q H1)/S0 = (0.5 + 0.5)/2 = 0.5; alpha = 1; w = 0
    # v1 = 0.5*v0 + 0.1*(H1 - 0.5*H1) = [0.05, 0.1] + [0.05, 0.1] = [0.1, 0.2]
    # S1 = H1.v1 + q*5 + R = 0.5 + 0.5 + 1 = 2
    # theta1 = theta0 - 1*3/2*(v1 + q H1) = theta0 - 1.5*[0.2, 0.4] = theta0 - [0.3, 0.6]
    # step 2: alpha = H2.H1/5 = 0.4; lambda = H2.(v1 + q H1)/S1 = (2*0.2)/2 = 0.2
    # w = (H2.v1 * 5 - H1.v1 * H2.H1)/25 = (0.2*5 - 0.5*2)/25 = 0
    # v2 = (0.4 - 0.2)*v1 + 0.1*(H2 - 0.2*H1) = [0.02, 0.04] + [0.18, -0.04] = [0.2, 0.0]
    # S2 = H2.v2 + q*||H2||^2 + R = 0.4 + 0.4 + 1 = 1.8
    # theta2 = theta1 - 2/1.8*(v2 + q H2) = theta1 - (10/9)*[0.4, 0] = theta1 - [4/9, 0]
    theta0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    p = theta0.clone().requires_grad_()
    opt = KOALAPlusPlus([p], lr=lr, sigma=sigma, q=q, r=R, preset="paper")
    p.grad = torch.tensor(H1, dtype=torch.float64)
    opt.step(loss=torch.tensor(L1, dtype=torch.float64))
    torch.testing.assert_close(p.detach(), theta0 - torch.tensor([0.3, 0.6], dtype=torch.float64))
    st = opt.state[p]
    # the state keeps the gain numerator v + q H: [0.1, 0.2] + 0.1 * [1, 2]
    torch.testing.assert_close(st["gain"], torch.tensor([0.2, 0.4], dtype=torch.float64))
    assert math.isclose(st["prev_S"].item(), 2.0)
    p.grad = torch.tensor(H2, dtype=torch.float64)
    opt.step(loss=torch.tensor(L2, dtype=torch.float64))
    torch.testing.assert_close(p.detach(), theta0 - torch.tensor([0.3 + 4 / 9, 0.6], dtype=torch.float64))
    torch.testing.assert_close(st["gain"], torch.tensor([0.2, 0.0], dtype=torch.float64) + 0.1 * torch.tensor(H2))
    assert math.isclose(st["prev_S"].item(), 1.8)
    assert st["step"].item() == 2


def test_estimated_R_follows_the_ema():
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = KOALAPlusPlus([p], alpha_r=0.9, preset="paper")
    p.grad = torch.ones(2, dtype=torch.float64)
    losses = torch.tensor([1.0, 3.0], dtype=torch.float64)
    opt.step(loss=losses)
    # R = 0.9 * 1.0 + 0.1 * mean(loss_i^2) = 0.9 + 0.1 * 5
    assert math.isclose(opt.state[p]["measurement_noise"].item(), 1.4)
