"""LoKO rank=k (LoFi): the exact EKF when the rank covers the information, LoFi's invariants against a dense oracle
written from the equations, options, guards and checkpoints."""

import io

import pytest
import torch
from test_loko import _assert_unchanged, _snapshot, data, flat_params, tiny

from kalmanopt import FullKalman
from kalmanopt.optim import lofi

from conftest import diagonal_loko as LoKO

N_TINY = 4 * 6 + 6 + 6 * 3 + 3  # 51 parameters


def lowrank_state(opt, model):
    """The joint (upsilon (n,), W (n, k)) of a rank-k LoKO, in parameter order."""
    ps = list(model.parameters())
    k = opt.param_groups[0]["rank"]
    ups = torch.cat([opt.state[p]["upsilon"].reshape(-1) for p in ps])
    W = torch.cat([opt.state[p]["W"].reshape(-1, k) for p in ps])
    return ups, W


def set_lowrank_state(opt, model, ups, W):
    k = W.shape[1]
    i = 0
    for p in model.parameters():
        opt.state[p]["upsilon"] = ups[i:i + p.numel()].view(p.shape).clone()
        opt.state[p]["W"] = W[i:i + p.numel()].reshape(*p.shape, k).clone()
        i += p.numel()


def dense_jacobian(model, x):
    """d logits / d theta, (b * c, n), by plain autograd one row at a time (independent of LoKO's code)."""
    out = model(x).reshape(-1)
    rows = []
    for j in range(out.numel()):
        gs = torch.autograd.grad(out[j], list(model.parameters()), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return out.detach(), torch.stack(rows)


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("observation,noise,q", [("logits", "fixed", 0.0), ("softmax", "moment", 0.0),
                                                 ("logits", "ema", 0.0), ("softmax", "ema_diag", 0.0),
                                                 ("loss", "fixed", 0.0), ("logits", "fixed", 1e-3)])
def test_full_rank_is_the_exact_ekf(observation, noise, q):
    """k >= n: nothing is ever dropped, so mean and covariance equal FullKalman's over several steps (LoKO's first
    step uses p0 as the prior, FullKalman's p0 + q: the priors are matched)."""
    model_full, model_low = tiny(), tiny()
    full = FullKalman(model_full.parameters(), p0=0.2 - q, r0=0.3, observation=observation, noise=noise, q=q)
    low = LoKO(model_low.parameters(), p0=0.2, r0=0.3, observation=observation, noise=noise, q=q, rank=N_TINY)
    for k in range(5):
        x, y = data(k)
        full.step(lambda x=x: model_full(x), y)
        low.step(lambda x=x: model_low(x), y)
        torch.testing.assert_close(flat_params(model_low), flat_params(model_full), rtol=1e-9, atol=1e-12)
    ups, W = lowrank_state(low, model_low)
    P = torch.linalg.inv(torch.diag(ups) + W @ W.T)
    torch.testing.assert_close(P, full.covariance(), rtol=1e-8, atol=1e-12)
    if noise != "moment":
        leader = next(iter(model_low.parameters()))
        torch.testing.assert_close(low.state[leader]["noise_estimate"],
                                   full.state[next(iter(model_full.parameters()))]["noise_estimate"])
    assert low.skipped_steps == 0


def test_rank_covering_the_information_is_exact():
    """k < n but k >= steps x outputs (4 x 6 = 24 < 51): the information has rank <= k, the filter is exact."""
    model_full, model_low = tiny(), tiny()
    full = FullKalman(model_full.parameters(), p0=0.2)
    low = LoKO(model_low.parameters(), p0=0.2, rank=24)
    for k in range(4):
        x, y = data(k)
        full.step(lambda x=x: model_full(x), y)
        low.step(lambda x=x: model_low(x), y)
    torch.testing.assert_close(flat_params(model_low), flat_params(model_full), rtol=1e-9, atol=1e-12)
    ups, W = lowrank_state(low, model_low)
    torch.testing.assert_close(torch.linalg.inv(torch.diag(ups) + W @ W.T), full.covariance(), rtol=1e-8,
                               atol=1e-12)
    # one more step exceeds the rank: no longer exact (the check above can fail)
    x, y = data(4)
    full.step(lambda: model_full(x), y)
    low.step(lambda: model_low(x), y)
    ups, W = lowrank_state(low, model_low)
    assert (torch.linalg.inv(torch.diag(ups) + W @ W.T) - full.covariance()).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------------- dense oracle
def dense_lofi_step(theta, ups, W, H, R, e, k, a, q, truncation="gram"):
    """LoFi written densely from its definition: exact predicted precision, exact posterior mean, and the
    posterior precision's rank-k truncation by eigendecomposition of the n x n information beyond the diagonal
    (``"whitened"``: of that information whitened by the predicted diagonal, ``Ups^-1/2 low Ups^-1/2``)."""
    n = theta.numel()
    Sigma = torch.linalg.inv(torch.diag(ups) + W @ W.T)
    Sigma_pred = torch.diag(a.sqrt()) @ Sigma @ torch.diag(a.sqrt()) + torch.diag(q)
    Lam_pred = torch.linalg.inv(Sigma_pred)
    ups_pred = ups / (a + q * ups)  # the diagonal part's own prediction
    Rinv = torch.linalg.inv(R)
    Lam_post = Lam_pred + H.T @ Rinv @ H
    theta_new = theta + torch.linalg.solve(Lam_post, H.T @ Rinv @ e)
    low = Lam_post - torch.diag(ups_pred)  # PSD, rank <= k + m
    scale = ups_pred.rsqrt() if truncation == "whitened" else torch.ones_like(ups_pred)
    lam, vec = torch.linalg.eigh(scale[:, None] * low * scale[None, :])
    keep = (vec[:, n - k:] * lam[n - k:].clamp_min(0).sqrt()) / scale[:, None]
    drop = low - keep @ keep.T
    return theta_new, ups_pred + torch.diagonal(drop), keep, Lam_post, Lam_pred, ups_pred


@pytest.mark.parametrize("truncation", ["gram", "whitened"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_one_step_from_a_random_state_against_dense_oracle(k, truncation):
    """From an arbitrary (upsilon, W) with two param groups of different inflation and q: exact mean, the
    predicted precision exact, the new W W^T the best rank-k part of the information, and the diagonal of the
    precision exact (LoFi's invariant)."""
    model = tiny()
    ps = list(model.parameters())
    groups = [{"params": ps[:2], "inflation": 0.1, "q": 1e-3}, {"params": ps[2:], "inflation": 0.0, "q": 0.02}]
    opt = LoKO(groups, p0=0.3, r0=0.5, rank=k, truncation=truncation)
    g = torch.Generator().manual_seed(3)
    ups = torch.rand(N_TINY, generator=g, dtype=torch.float64) * 3 + 0.5
    W = torch.randn(N_TINY, k, generator=g, dtype=torch.float64)
    set_lowrank_state(opt, model, ups, W)
    n0 = ps[0].numel() + ps[1].numel()
    f64 = torch.float64
    a = torch.cat([torch.full((n0,), 1.1, dtype=f64), torch.ones(N_TINY - n0, dtype=f64)])
    q = torch.cat([torch.full((n0,), 1e-3, dtype=f64), torch.full((N_TINY - n0,), 0.02, dtype=f64)])
    x, y = data(2)
    logits, H = dense_jacobian(model, x)
    e = (torch.nn.functional.one_hot(y, 3).double() - torch.softmax(logits.view(2, 3), 1)).reshape(-1)
    R = (0.5 + 1e-3) * torch.eye(6, dtype=torch.float64)
    theta_ref, ups_ref, keep, Lam_post, Lam_pred, ups_pred = dense_lofi_step(flat_params(model), ups, W, H, R, e,
                                                                             k, a, q, truncation)
    # the time update alone is exact
    up, Wp = lofi.predict(ups, W, a - 1, q)
    torch.testing.assert_close(torch.diag(up) + Wp @ Wp.T, Lam_pred, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(up, ups_pred, rtol=1e-12, atol=0)

    opt.step(lambda: model(x), y)
    torch.testing.assert_close(flat_params(model), theta_ref, rtol=1e-9, atol=1e-11)
    ups_new, W_new = lowrank_state(opt, model)
    assert W_new.shape == (N_TINY, k)
    torch.testing.assert_close(W_new @ W_new.T, keep @ keep.T, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(ups_new, ups_ref, rtol=1e-8, atol=1e-9)
    # LoFi's invariant: the diagonal of the precision is that of the full update
    torch.testing.assert_close(ups_new + W_new.square().sum(1), torch.diagonal(Lam_post), rtol=1e-10, atol=1e-10)
    # columns of W ordered by decreasing norm (in the predicted diagonal's metric for "whitened")
    norms = (W_new * (ups_pred.rsqrt()[:, None] if truncation == "whitened" else 1.0)).norm(dim=0)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-12)


def test_lofi_update_invariants_on_random_inputs():
    """The pure update: quadratic forms read off the small system equal their dense definitions."""
    g = torch.Generator().manual_seed(0)
    n, k, m = 40, 5, 4
    ups = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    W = torch.randn(n, k, generator=g, dtype=torch.float64)
    H = torch.randn(m, n, generator=g, dtype=torch.float64)
    A = torch.randn(m, m, generator=g, dtype=torch.float64)
    R = A @ A.T + 0.5 * torch.eye(m, dtype=torch.float64)
    e = torch.randn(m, generator=g, dtype=torch.float64)
    res = lofi.update(ups, W, H, torch.linalg.cholesky(R), e)
    prior = torch.linalg.inv(torch.diag(ups) + W @ W.T)
    post = torch.linalg.inv(torch.linalg.inv(prior) + H.T @ torch.linalg.solve(R, H))
    delta = post @ H.T @ torch.linalg.solve(R, e)
    torch.testing.assert_close(res.delta, delta, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(res.prior_hph, H @ prior @ H.T, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(res.post_hph, H @ post @ H.T, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(res.h_delta, H @ delta, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(res.upsilon + res.W.square().sum(1),
                               ups + W.square().sum(1) + torch.diagonal(H.T @ torch.linalg.solve(R, H)))
    blocks = lofi.quadratic_form(ups, W, H.view(2, 2, n))
    torch.testing.assert_close(blocks[1], (H @ prior @ H.T)[2:, 2:], rtol=1e-9, atol=1e-11)


def test_lofi_update_with_mix_equals_the_mixed_rows():
    """``mix`` (the softmax mapping of LoKO's fused step) applied to the small matrices gives the update of the
    rows ``mix @ H``, and ``rows_prior`` the prior quadratic form of the unmixed rows."""
    g = torch.Generator().manual_seed(1)
    n, k, m = 40, 5, 4
    ups = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    W = torch.randn(n, k, generator=g, dtype=torch.float64)
    H = torch.randn(m, n, generator=g, dtype=torch.float64)
    yhat = torch.softmax(torch.randn(2, 2, generator=g, dtype=torch.float64), 1)
    mix = torch.block_diag(*(torch.diag_embed(yhat) - yhat.unsqueeze(2) * yhat.unsqueeze(1)))
    R = mix + 1e-3 * torch.eye(m, dtype=torch.float64)
    e = torch.randn(m, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(R)
    ref = lofi.update(ups, W, mix @ H, L, e)
    res = lofi.update(ups, W, H, L, e, mix=mix, rows_prior=True)
    for a, b in [(res.delta, ref.delta), (res.upsilon, ref.upsilon), (res.W @ res.W.T, ref.W @ ref.W.T),
                 (res.prior_hph, ref.prior_hph), (res.post_hph, ref.post_hph), (res.h_delta, ref.h_delta)]:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert ref.rows_hph is None
    prior = torch.linalg.inv(torch.diag(ups) + W @ W.T)
    torch.testing.assert_close(res.rows_hph, H @ prior @ H.T, rtol=1e-9, atol=1e-11)
    # rows_delta: H delta of the unmixed rows (the trust region's predicted change), from the small matrices
    assert ref.rows_delta is None
    torch.testing.assert_close(res.rows_delta, H @ res.delta, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_directions_without_information_are_exact_zeros(dtype):
    """While the information gathered has rank < k, the unfilled columns of W are exactly zero (their exact value),
    not rounding noise: noise whose products underflow to subnormals made the first steps 5-10x slower."""
    from kalmanopt import LoKO as DefaultLoKO

    model = tiny(dtype=dtype)
    opt = DefaultLoKO(model.parameters(), rank=8)
    x, y = data(0, n=1, dtype=dtype)
    opt.step(lambda: model(x), y)  # one sample, 3 classes: the softmax information has rank 2
    _, W = lowrank_state(opt, model)
    nonzero = (W != 0).any(0)
    assert int(nonzero.sum()) == 2 and bool(nonzero[:2].all())
    assert torch.isfinite(W).all()


# ---------------------------------------------------------------------------------------------------- behaviour
def test_learns_a_separable_stream():
    """As the diagonal filter's test: at least 40 hits above the switched-off filter (31). rank=4 gets 73, the
    exact EKF (FullKalman, and rank >= n) 75, the diagonal filter 79."""
    from test_loko import _separable_stream_hits

    assert _separable_stream_hits(rank=4) >= _separable_stream_hits(p0=1e-9) + 40


def test_auto_p0_with_lora_style_zero_jacobian_group():
    torch.manual_seed(0)
    A = torch.nn.Parameter(torch.randn(2, 4, dtype=torch.float64))
    B = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    x, y = data(n=1)
    opt = LoKO([A, B], p0="auto", rank=3)
    opt.step(lambda: x @ A.T @ B.T, y)
    assert torch.all(opt.state[A]["upsilon"] > 0) and torch.all(opt.state[B]["upsilon"] > 0)
    assert not torch.equal(B.detach(), torch.zeros_like(B))


def test_undetermined_auto_tensor_waits_for_its_first_jacobian():
    """auto_scope="tensor": a tensor with a zero Jacobian gets no state and does not move until it has one."""
    torch.manual_seed(0)
    A = torch.nn.Parameter(torch.randn(2, 4, dtype=torch.float64))
    B = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    x, y = data(n=1)
    opt = LoKO([A, B], p0="auto", auto_scope="tensor", rank=2)
    a0 = A.detach().clone()
    opt.step(lambda: x @ A.T @ B.T, y)
    assert "upsilon" not in opt.state[A] and torch.equal(A.detach(), a0)
    opt.step(lambda: x @ A.T @ B.T, y)
    assert "upsilon" in opt.state[A] and opt.state[A]["W"].shape == (2, 4, 2)


def test_float32_and_bfloat16_params_keep_float32_state():
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny(dtype=dtype)
        x, y = data(dtype=dtype)
        opt = LoKO(model.parameters(), rank=4)
        opt.step(lambda model=model, x=x: model(x), y)
        for p in model.parameters():
            assert opt.state[p]["upsilon"].dtype == torch.float32 and opt.state[p]["W"].shape == (*p.shape, 4)


def test_float32_follows_float64():
    models = {dt: tiny(dtype=dt) for dt in (torch.float32, torch.float64)}
    opts = {dt: LoKO(m.parameters(), rank=4, noise="ema") for dt, m in models.items()}
    for k in range(10):
        for dt, m in models.items():
            x, y = data(k, dtype=dt)
            opts[dt].step(lambda m=m, x=x: m(x), y)
    torch.testing.assert_close(flat_params(models[torch.float32]).double(), flat_params(models[torch.float64]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [-1, 1.5, True, "4"])
def test_invalid_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        LoKO(tiny().parameters(), rank=rank)


def test_groups_must_share_the_rank():
    ps = list(tiny().parameters())
    with pytest.raises(ValueError, match="rank"):
        LoKO([{"params": ps[:2]}, {"params": ps[2:], "rank": 2}])


def test_precision_form_needs_r_min_with_estimated_noise():
    with pytest.raises(ValueError, match="r_min"):
        LoKO(tiny().parameters(), rank=2, noise="ema", r_min=0.0)


def test_changing_rank_after_the_first_step_raises():
    model = tiny()
    opt = LoKO(model.parameters(), rank=2)
    x, y = data()
    opt.step(lambda: model(x), y)
    for g in opt.param_groups:
        g["rank"] = 3
    with pytest.raises(ValueError, match="rank"):
        opt.step(lambda: model(x), y)


# ---------------------------------------------------------------------------------------------------- guards
# bad input at rank > 0: a case of tests/test_loko.py::test_bad_input_skips_and_changes_nothing


def test_non_positive_definite_R_skips_with_warning():
    model = tiny()
    x, y = data(n=1)
    opt = LoKO(model.parameters(), rank=2, r0=0.1)
    opt.step(lambda: model(x), y)
    snap = _snapshot(model, opt)
    leader = next(iter(model.parameters()))
    opt.state[leader]["noise_estimate"].fill_(-1e6)
    snap[1][id(leader)]["noise_estimate"] = opt.state[leader]["noise_estimate"].clone()
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        opt.step(lambda: model(x), y)
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1


# ---------------------------------------------------------------------------------------------------- checkpoints
def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# the bit-exact state_dict round trip of rank > 0 is a case of tests/test_loko.py's


def test_loading_state_of_another_rank_or_shape_raises():
    model = tiny()
    opt = LoKO(model.parameters(), rank=3)
    x, y = data()
    opt.step(lambda: model(x), y)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="other parameters"):
        LoKO(tiny().parameters(), rank=4).load_state_dict(sd)
    with pytest.raises(ValueError, match="rank"):
        LoKO(tiny().parameters()).load_state_dict(sd)
    diag = LoKO(model.parameters())
    diag.step(lambda: model(x), y)
    target = LoKO(tiny().parameters(), rank=3)
    with pytest.raises(ValueError, match="rank"):
        target.load_state_dict(diag.state_dict())
    assert not target.state


def test_all_finite_by_sums_is_exact():
    """The finite check by sums: a sum of finite terms that overflows still passes (the exact check), a single inf
    or nan anywhere fails, whatever the other tensors."""
    from kalmanopt.optim.loko import all_finite

    big = torch.full((4,), 3e38)  # finite float32, their sum overflows to inf
    assert not bool(torch.isfinite(big.sum()))
    assert all_finite(big) and all_finite(torch.ones(3), big.double(), big)
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.ones(5, dtype=torch.float64)
        t[3] = bad
        assert not all_finite(t) and not all_finite(torch.ones(2), t)
    pair = torch.tensor([float("inf"), float("-inf")])  # sums to nan, as one nan would
    assert not all_finite(pair)


def test_lofi_quadratic_forms_are_exactly_symmetric():
    """prior_hph, post_hph and rows_hph are covariances the step factorises or samples from: symmetric bit for bit,
    not only up to rounding (Tz itself is left unsymmetrised since the fused pass)."""
    g = torch.Generator().manual_seed(1)
    n, k, m = 50, 4, 6
    for dtype in (torch.float64, torch.float32):
        ups = (torch.rand(n, generator=g, dtype=torch.float64) + 0.2).to(dtype)
        W = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype)
        H = torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)
        A = torch.randn(m, m, generator=g, dtype=torch.float64)
        R = A @ A.T + 0.5 * torch.eye(m, dtype=torch.float64)
        mix = torch.randn(m, m, generator=g, dtype=torch.float64)
        e = torch.randn(m, generator=g, dtype=torch.float64)
        res = lofi.update(ups, W, H, torch.linalg.cholesky(R), e, mix=mix, rows_prior=True)
        for name in ("prior_hph", "post_hph", "rows_hph"):
            value = getattr(res, name)
            assert torch.equal(value, value.T), (dtype, name)
