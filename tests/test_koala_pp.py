"""KOALA++ against Algorithm 1 written out by hand in plain Python floats, on every path a step can take."""

import math
import warnings

import pytest
import torch

from kalmanopt import KOALAPlusPlus
from kalmanopt.optim import _koala_pp_fused, _koala_pp_triton

# The paths of a KOALA++ step on CPU: the single-tensor reference, the multi-tensor path, the default (fused=None with
# foreach=None: the C kernel where it is built) and the Triton kernels (CUDA's default), through Triton's interpreter.
PATHS = ["reference", "foreach", "default", "triton"]
PATH_KWARGS = {"reference": {"foreach": False}, "foreach": {"foreach": True}, "default": {}, "triton": {}}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton", reason="the Triton path needs triton")
        monkeypatch.setattr(_koala_pp_triton, "ON_CPU", True)  # the CPU tensors take the interpreted kernels
    return request.param


def assert_took(opt, path):
    """The step ran on ``path``'s kernel: a default that fell back to the multi-tensor path would test that again."""
    if path == "default" and _koala_pp_fused.load() is not None:
        assert "_fused_work" in opt.__dict__
    if path == "triton":
        assert "_triton_cache" in opt.__dict__


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
def test_matches_algorithm_by_hand(symmetric, path):
    theta0 = [0.1, -0.2, 0.3]
    p = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    opt = KOALAPlusPlus([p], lr=0.7, sigma=0.2, q=0.05, r=0.4, symmetric=symmetric, preset="paper", **PATH_KWARGS[path])
    for step, (g, L) in enumerate(zip(GRADS, LOSSES, strict=True)):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step(loss=torch.tensor(L, dtype=torch.float64))
        expected = koala_pp_by_hand(theta0, GRADS[: step + 1], LOSSES[: step + 1], lr=0.7, sigma=0.2, q=0.05,
                                    R=0.4, symmetric=symmetric)
        torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=1e-13)
    assert_took(opt, path)


def test_two_steps_worked_numerically(path):
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
    opt = KOALAPlusPlus([p], lr=lr, sigma=sigma, q=q, r=R, preset="paper", **PATH_KWARGS[path])
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
    assert_took(opt, path)


def test_estimated_R_follows_the_ema(path):
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = KOALAPlusPlus([p], alpha_r=0.9, preset="paper", **PATH_KWARGS[path])
    p.grad = torch.ones(2, dtype=torch.float64)
    losses = torch.tensor([1.0, 3.0], dtype=torch.float64)
    opt.step(loss=losses)
    # R = 0.9 * 1.0 + 0.1 * mean(loss_i^2) = 0.9 + 0.1 * 5
    assert math.isclose(opt.state[p]["measurement_noise"].item(), 1.4)
    assert_took(opt, path)


# ------------------------------------------------------------------------------------ the default ("adaptive") preset
def adaptive_by_hand(thetas, grads, losses, *, lr, sigma, q, max_step, momentum, beta2, eps, wd=0.0):
    """The default preset written out from its equations in plain Python floats, for one block: the given tensors
    concatenated (the default's per-tensor blocks are one call per tensor). The filter runs on h~ = D^1/2 h with
    Adam's second moment, R = 0, the step lr*l/S is capped at lr*max_step, and the corrections are averaged with
    bias-corrected momentum."""
    sizes = [len(t) for t in thetas]
    theta = [x for t in thetas for x in t]
    n = len(theta)
    s, m = [0.0] * n, [0.0] * n
    v_prev = H_prev = S_prev = None
    for k, (gs, L) in enumerate(zip(grads, losses, strict=True), start=1):
        g = [x for t in gs for x in t]
        h = [gi + wd * ti for gi, ti in zip(g, theta, strict=True)]
        ell = L + 0.5 * wd * dot(theta, theta)
        s = [beta2 * si + (1 - beta2) * hi * hi for si, hi in zip(s, h, strict=True)]
        root = [1 / math.sqrt(math.sqrt(si / (1 - beta2 ** k)) + eps) for si in s]  # D^1/2
        ht = [ri * hi for ri, hi in zip(root, h, strict=True)]
        if H_prev is None:  # prior P0 = sigma D: the same gradient seen before
            H_prev, v_prev = ht, [sigma * x for x in ht]
            S_prev = dot(ht, v_prev) + q * dot(ht, ht)
        alpha = dot(ht, H_prev) / dot(H_prev, H_prev)
        lam = dot(ht, axpy((1, v_prev), (q, H_prev))) / S_prev
        w = (dot(ht, v_prev) * dot(H_prev, H_prev) - dot(H_prev, v_prev) * dot(ht, H_prev)) / dot(H_prev, H_prev) ** 2
        v = axpy((alpha - lam, v_prev), (q, ht), (-q * lam, H_prev), (w, H_prev))
        S = dot(ht, v) + q * dot(ht, ht)
        gamma = min(lr * ell / S, lr * max_step)
        c = [gamma * ri * gi for ri, gi in zip(root, axpy((1, v), (q, ht)), strict=True)]
        m = [momentum * mi + (1 - momentum) * ci for mi, ci in zip(m, c, strict=True)]
        theta = [ti - mi / (1 - momentum ** k) for ti, mi in zip(theta, m, strict=True)]
        v_prev, H_prev, S_prev = v, ht, S
    out, i = [], 0
    for size in sizes:
        out.append(theta[i : i + size])
        i += size
    return out


ADAPTIVE_GRADS = [[[0.5, -1.0, 2.0], [0.1, 0.4]], [[0.3, -0.8, 2.5], [-0.2, 0.5]], [[1.0, 0.2, -0.4], [0.3, 0.1]],
                  [[-0.6, 0.9, 0.3], [0.05, -0.7]]]
ADAPTIVE_LOSSES = [2.0, 1.5, 1.2, 1.1]


@pytest.mark.parametrize(("lr", "max_step", "wd"),
                         [(1.0, 0.03, 0.0), (0.5, 10.0, 0.0), (1.0, 0.2, 0.1), (0.3, 0.05, 0.0)])
def test_default_preset_matches_its_equations_by_hand(path, lr, max_step, wd):
    """Both cap regimes (the cap binds / never binds; it scales with lr), with and without weight decay."""
    start = [[0.2, -0.1, 0.4], [0.3, -0.5]]
    hyper = dict(lr=lr, sigma=0.2, q=0.05, max_step=max_step, momentum=0.9, beta2=0.999, eps=1e-8, wd=wd)
    for block in ("tensor", "group"):
        params = [torch.tensor(t, dtype=torch.float64, requires_grad=True) for t in start]
        kwargs = {} if block == "tensor" else {"block": "group"}  # the default is per-tensor blocks
        opt = KOALAPlusPlus(params, lr=lr, sigma=0.2, q=0.05, max_step=max_step, weight_decay=wd,
                            **PATH_KWARGS[path], **kwargs)
        assert opt.param_groups[0]["block"] == block and opt.param_groups[0]["precondition"]
        for step, (gs, L) in enumerate(zip(ADAPTIVE_GRADS, ADAPTIVE_LOSSES, strict=True)):
            for p, g in zip(params, gs, strict=True):
                p.grad = torch.tensor(g, dtype=torch.float64)
            opt.step(loss=torch.tensor(L, dtype=torch.float64))
            seen = [[gs[i] for gs in ADAPTIVE_GRADS[: step + 1]] for i in range(len(start))]
            if block == "group":  # the two tensors form one block
                expected = adaptive_by_hand(start, ADAPTIVE_GRADS[: step + 1], ADAPTIVE_LOSSES[: step + 1], **hyper)
            else:  # each tensor is its own filter with its own residual L + wd/2 ||theta_i||^2
                expected = [adaptive_by_hand([start[i]], [[g] for g in seen[i]], ADAPTIVE_LOSSES[: step + 1],
                                             **hyper)[0] for i in range(len(start))]
            for p, e in zip(params, expected, strict=True):
                torch.testing.assert_close(p.detach(), torch.tensor(e, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        if block == "tensor":  # the kernels take per-tensor blocks only (a group block is the multi-tensor path's)
            assert_took(opt, path)


def test_group_block_is_the_paper_filter_on_the_concatenated_vector():
    """block='group' with everything else as in the paper = the per-tensor filter run on one flat tensor."""
    generator = torch.Generator().manual_seed(3)
    shapes = [(3, 2), (4,), (2, 2)]
    start = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes] for _ in range(5)]
    kw = dict(lr=0.6, sigma=0.3, q=0.07, r=0.2, preset="paper", weight_decay=0.01)
    for foreach in (False, True, None):  # None: the flat tensor's default path (the C kernel where it is built)
        split = [t.clone().requires_grad_(True) for t in start]
        flat = torch.cat([t.reshape(-1) for t in start]).requires_grad_(True)
        opt_split = KOALAPlusPlus(split, block="group", foreach=foreach, **kw)
        opt_flat = KOALAPlusPlus([flat], foreach=foreach, **kw)
        for k, gs in enumerate(grads):
            for p, g in zip(split, gs, strict=True):
                p.grad = g.clone()
            flat.grad = torch.cat([g.reshape(-1) for g in gs])
            loss = torch.tensor(1.0 + 0.1 * k, dtype=torch.float64)
            opt_split.step(loss=loss)
            opt_flat.step(loss=loss)
        torch.testing.assert_close(torch.cat([p.detach().reshape(-1) for p in split]), flat.detach(), rtol=1e-12,
                                   atol=1e-12)


def test_diagnostics_report_the_capped_step_without_synchronising():
    p = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    opt = KOALAPlusPlus([p], max_step=0.05)
    assert opt.diagnostics() == [{}]
    p.grad = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    opt.step(loss=torch.tensor(3.0, dtype=torch.float64))
    (d,) = opt.diagnostics()
    assert set(d) == {"step_size", "S", "h_dot_v", "grad_sq", "noise", "loss"}
    assert all(isinstance(v, torch.Tensor) for v in d.values())
    uncapped = 1.0 * 3.0 / d["S"]
    torch.testing.assert_close(d["step_size"], torch.minimum(uncapped, torch.tensor(0.05, dtype=torch.float64)))
    assert float(uncapped) > 0.05  # the cap binds here
    torch.testing.assert_close(d["S"], d["h_dot_v"] + 0.1 * d["grad_sq"] + d["noise"])


def test_paper_preset_is_todays_algorithm_and_explicit_arguments_win():
    opt = KOALAPlusPlus([torch.zeros(2, requires_grad=True)], preset="paper")
    g = opt.param_groups[0]
    assert (g["block"], g["precondition"], g["momentum"], g["max_step"], g["r"], g["r_clip"]) == \
        ("tensor", False, 0.0, None, None, None)
    assert (g["lr"], g["loss_fraction"], g["loss_floor"]) == (1.0, None, None)
    g = KOALAPlusPlus([torch.zeros(2, requires_grad=True)]).param_groups[0]
    assert (g["block"], g["precondition"], g["momentum"], g["max_step"], g["r"]) == ("tensor", True, 0.9, None, 0.0)
    assert (g["lr"], g["loss_fraction"], g["loss_floor"]) == (1e-3, 1.0, 0.0)
    # an explicit max_step alone asks for the paper's step rule, where lr is the paper's eta
    g = KOALAPlusPlus([torch.zeros(2, requires_grad=True)], max_step=0.02).param_groups[0]
    assert (g["lr"], g["loss_fraction"], g["max_step"], g["precondition"]) == (1.0, None, 0.02, True)
    opt = KOALAPlusPlus([torch.zeros(2, requires_grad=True)], preset="paper", momentum=0.5, r=0.3)
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["r"] == 0.3
    with pytest.raises(ValueError, match="preset"):
        KOALAPlusPlus([torch.zeros(2, requires_grad=True)], preset="fast")
    with pytest.raises(ValueError, match="block"):
        KOALAPlusPlus([torch.zeros(2, requires_grad=True)], block="layer")
    with pytest.raises(ValueError, match="momentum"):
        KOALAPlusPlus([torch.zeros(2, requires_grad=True)], momentum=1.0)


@pytest.mark.parametrize("key", ["q", "sigma", "lr"])
def test_a_hyperparameter_beyond_the_state_dtype_raises_before_anything_is_written(key):
    # q = 1e300 fits a Python float but not the float32 state: refused at construction, and when a param group is
    # changed to it between steps, before R or a counter is written.
    with pytest.raises(ValueError, match=key):
        KOALAPlusPlus([torch.nn.Parameter(torch.ones(3))], **{key: 1e300})
    if key == "lr":
        return  # a huge lr set between steps only lifts the cap lr / q: the filter's own step decides, no overflow
    w = torch.nn.Parameter(torch.ones(3))
    opt = KOALAPlusPlus([w], r=0.1)
    w.grad = torch.ones(3)
    opt.step(loss=torch.tensor(1.0))
    before = {k: v.clone() for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}
    opt.param_groups[0][key] = 1e300
    with pytest.raises(ValueError, match=key):
        opt.step(loss=torch.tensor(1.0))
    assert all(torch.equal(before[k], opt.state[w][k]) for k in before)


def test_a_checkpoint_of_the_old_lr_units_resumes_with_its_own_hyperparameters():
    # A 0.1 state dict holds lr=1.0, max_step=0.01 and no loss_fraction / loss_floor / lr_adaptation: loaded, its
    # param groups keep the paper's step rule with that cap, which is the 0.1 default, so it continues as the
    # default with a fixed cap (lr_adaptation=None) would.
    torch.manual_seed(0)
    model, x, y = torch.nn.Linear(4, 3), torch.randn(16, 4), torch.randint(0, 3, (16,))

    def step(opt, m):
        opt.zero_grad()
        losses = torch.nn.functional.cross_entropy(m(x), y, reduction="none")
        losses.mean().backward()
        opt.step(loss=losses)

    opt = KOALAPlusPlus(model.parameters(), lr_adaptation=None)
    for _ in range(3):
        step(opt, model)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.update(lr=1.0, max_step=0.01)
        del group["loss_fraction"], group["loss_floor"], group["lr_adaptation"]
    other = torch.nn.Linear(4, 3)
    other.load_state_dict(model.state_dict())
    old = KOALAPlusPlus(other.parameters())
    old.load_state_dict(saved)
    for _ in range(3):
        step(opt, model)
        step(old, other)
    torch.testing.assert_close(other.weight, model.weight, rtol=1e-6, atol=1e-7)
    assert old.param_groups[0]["lr"] == 1.0 and old.param_groups[0].get("loss_fraction") is None
    assert old.param_groups[0]["lr_adaptation"] is None


def test_an_lr_of_the_old_units_warns_and_the_new_ones_do_not():
    # lr=0.5 was a common KOALA++ lr before lr took AdamW's units: now 500x AdamW's step, so it warns; AdamW-like
    # values and the paper's rule (where lr is the paper's eta) do not.
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match="AdamW's units"):
        KOALAPlusPlus([w], lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KOALAPlusPlus([w], lr=5e-3)
        KOALAPlusPlus([w], lr=0.5, preset="paper")
        KOALAPlusPlus([w], lr=0.5, max_step=0.01)
