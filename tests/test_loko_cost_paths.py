"""LoKO's cheaper step paths (issue 22): the trust region without its second forward pass (``trust_check``) and
LoFi's whitened rank truncation (``truncation``), each against the exact path it replaces or a dense oracle.

* ``trust_check="linear"`` bounds the *linearised* change of the logits, ``H_z delta``: on a model whose logits are
  linear in its parameters that is the change the forward pass measures, so it must give the parameters of
  ``"forward"`` whether the bound binds or not, without running the model again.
* ``trust_check="predicted"`` takes a step predicted well inside the bound as it is (no forward) and otherwise runs
  the forward exactly as ``"forward"`` does.
* ``truncation="whitened"`` keeps the ``k`` leading directions of ``Upsilon^{-1/2} W~``: checked against a dense
  eigendecomposition, with the mean and the diagonal of the precision exact, and the exact EKF when nothing is
  dropped.
"""

import copy

import pytest
import torch

from kalmanopt import FullKalman, LoKO
from kalmanopt.optim import lofi


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def linear_model(seed=0, n=4, c=3):
    torch.manual_seed(seed)
    return torch.nn.Linear(n, c).double()


def mlp(seed=0, n=4, c=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n, 6), torch.nn.Tanh(), torch.nn.Linear(6, c)).double()


def batches(count, seed=0, n=4, c=3, b=2, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(b, n, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g))
            for _ in range(count)]


# ---------------------------------------------------------------------------------------------------- trust_check
@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.parametrize("observation", ["softmax", "logits"])
@pytest.mark.parametrize("p0", [30.0, 1e-3])  # the bound binds at the first step / never binds
def test_linear_check_equals_the_forward_check_on_a_model_linear_in_its_parameters(rank, observation, p0):
    reference, model = linear_model(), linear_model()
    kw = dict(p0=p0, rank=rank, observation=observation, trust=0.5)
    opt_ref = LoKO(reference.parameters(), trust_check="forward", **kw)
    opt = LoKO(model.parameters(), trust_check="linear", **kw)
    calls = []

    def counted(x):
        calls.append(1)
        return model(x)

    for x, y in batches(4):
        opt_ref.step(lambda x=x: reference(x), y)
        opt.step(lambda x=x: counted(x), y)
        torch.testing.assert_close(flat(model), flat(reference), rtol=1e-10, atol=1e-12)
    assert len(calls) == 4  # the measurement's forward only
    assert opt.trust_forwards == 0 and opt_ref.trust_forwards == 4
    assert opt.trust_scaled_steps == opt_ref.trust_scaled_steps
    assert (opt.trust_scaled_steps > 0) == (p0 > 1)


@pytest.mark.parametrize("rank", [0, 8])
@pytest.mark.parametrize("p0,forwards", [(30.0, 1), (1e-4, 0)])
def test_predicted_check_runs_the_forward_only_near_the_bound_and_then_matches_it(rank, p0, forwards):
    """A large prior: the first step is predicted far beyond the bound, so the forward runs and the step equals
    ``"forward"``'s bit for bit; a tiny prior: every step is predicted well inside it, no forward, and (the bound
    not binding) the same parameters as ``"forward"``."""
    reference, model = mlp(), mlp()
    opt_ref = LoKO(reference.parameters(), p0=p0, rank=rank, trust=0.5, trust_check="forward")
    opt = LoKO(model.parameters(), p0=p0, rank=rank, trust=0.5, trust_check="predicted")
    (x, y), = batches(1)
    opt_ref.step(lambda: reference(x), y)
    opt.step(lambda: model(x), y)
    assert opt.trust_forwards == forwards
    assert torch.equal(flat(model), flat(reference))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        for key, value in opt_ref.state[q].items():
            assert torch.equal(opt.state[p][key], value), key


def test_predicted_change_is_the_linearised_change_of_the_logits():
    """``_predicted_change`` against ``torch.func.jvp`` of the logits along the step the filter took."""
    model = mlp(seed=3)
    opt = LoKO(model.parameters(), p0=0.3, rank=4, trust=100.0, trust_check="linear")  # never binds
    (x, y), = batches(1, seed=3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    seen = {}
    original = opt._predicted_change

    def spy(pending, rows, all_params):
        seen["value"] = original(pending, rows, all_params)
        return seen["value"]

    opt._predicted_change = spy
    opt.step(lambda: model(x), y)
    tangent = {k: v.detach() - before[k] for k, v in model.named_parameters()}
    _, change = torch.func.jvp(lambda p: torch.func.functional_call(model, p, (x,)), (before,), (tangent,))
    assert seen["value"] == pytest.approx(float(change.abs().max()), rel=1e-10)
    assert opt.trust_forwards == 0


def test_loss_observation_has_no_logit_rows_and_keeps_the_forward():
    reference, model = mlp(), mlp()
    opt_ref = LoKO(reference.parameters(), observation="loss", trust=0.5, p0=30.0)
    opt = LoKO(model.parameters(), observation="loss", trust=0.5, p0=30.0, trust_check="linear")
    for x, y in batches(2):
        opt_ref.step(lambda x=x: reference(x), y)
        opt.step(lambda x=x: model(x), y)
    assert opt.trust_forwards == 2
    assert torch.equal(flat(model), flat(reference))


# ---------------------------------------------------------------------------------------------------- truncation
def random_system(seed, n=30, k=4, m=3):
    g = torch.Generator().manual_seed(seed)
    ups = torch.rand(n, generator=g, dtype=torch.float64) * 5 + 0.2  # a diagonal that varies 25-fold
    W = torch.randn(n, k, generator=g, dtype=torch.float64)
    H = torch.randn(m, n, generator=g, dtype=torch.float64)
    A = torch.randn(m, m, generator=g, dtype=torch.float64)
    R = A @ A.T + 0.5 * torch.eye(m, dtype=torch.float64)
    e = torch.randn(m, generator=g, dtype=torch.float64)
    return ups, W, H, R, e


@pytest.mark.parametrize("seed", [0, 1])
def test_whitened_truncation_against_a_dense_eigendecomposition(seed):
    ups, W, H, R, e = random_system(seed)
    k = W.shape[1]
    res = lofi.update(ups, W, H, torch.linalg.cholesky(R), e, truncation="whitened")
    ref = lofi.update(ups, W, H, torch.linalg.cholesky(R), e)
    # the information appended: W~ W~^T = W W^T + H^T R^-1 H; its whitened form's best rank-k approximation
    low = W @ W.T + H.T @ torch.linalg.solve(R, H)
    s = ups.rsqrt()
    evals, vecs = torch.linalg.eigh(s[:, None] * low * s[None, :])
    best = (vecs[:, -k:] * evals[-k:]) @ vecs[:, -k:].T
    kept = res.W @ res.W.T
    torch.testing.assert_close(s[:, None] * kept * s[None, :], best, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(kept, ref.W @ ref.W.T, atol=1e-3)  # a different truncation than LoFi's
    # the mean does not depend on the truncation; the diagonal of the precision is exact
    torch.testing.assert_close(res.delta, ref.delta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.upsilon + res.W.square().sum(1), ups + torch.diagonal(low), rtol=1e-10,
                               atol=1e-12)
    # the new W is orthogonal in the old diagonal's metric, in order of decreasing weight
    gram = res.W.T @ (res.W / ups[:, None])
    torch.testing.assert_close(gram, torch.diag(evals[-k:].flip(0)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("observation,noise", [("softmax", "moment"), ("logits", "fixed")])
def test_whitened_truncation_at_full_rank_is_the_exact_ekf(observation, noise):
    torch.manual_seed(0)
    model_full, model_low = mlp(seed=5), mlp(seed=5)
    n = sum(p.numel() for p in model_low.parameters())
    full = FullKalman(model_full.parameters(), p0=0.2, r0=0.3, observation=observation, noise=noise)
    low = LoKO(model_low.parameters(), p0=0.2, r0=0.3, observation=observation, noise=noise, rank=n, trust=0.0,
               truncation="whitened")
    for x, y in batches(5, seed=5):
        full.step(lambda x=x: model_full(x), y)
        low.step(lambda x=x: model_low(x), y)
        torch.testing.assert_close(flat(model_low), flat(model_full), rtol=1e-9, atol=1e-12)
    ups = torch.cat([low.state[p]["upsilon"].reshape(-1) for p in model_low.parameters()])
    W = torch.cat([low.state[p]["W"].reshape(-1, n) for p in model_low.parameters()])
    torch.testing.assert_close(torch.linalg.inv(torch.diag(ups) + W @ W.T), full.covariance(), rtol=1e-8,
                               atol=1e-12)


@pytest.mark.parametrize("truncation", ["gram", "whitened"])
def test_float32_follows_float64_with_either_truncation(truncation):
    """A rank below the information's (truncation at every step) on a float32 model: the state stays finite,
    nothing is skipped, and the parameters follow the same filter in float64."""
    models = {dt: mlp(seed=7).to(dt) for dt in (torch.float32, torch.float64)}
    opts = {dt: LoKO(m.parameters(), rank=3, truncation=truncation) for dt, m in models.items()}
    for x, y in batches(12, seed=7, scale=1.0):
        for dt, m in models.items():
            xd = x.to(dt)
            opts[dt].step(lambda m=m, xd=xd: m(xd), y)
    for opt in opts.values():
        assert opt.skipped_steps == 0
        assert all(torch.isfinite(v).all() for st in opt.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))
    torch.testing.assert_close(flat(models[torch.float32]).double(), flat(models[torch.float64]), rtol=1e-4,
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------------- options
def test_invalid_options_are_refused():
    model = mlp()
    with pytest.raises(ValueError, match="trust_check"):
        LoKO(model.parameters(), trust_check="sometimes")
    with pytest.raises(ValueError, match="truncation"):
        LoKO(model.parameters(), truncation="svd")
    with pytest.raises(ValueError, match="trust_check"):
        LoKO([{"params": [model[0].weight]}, {"params": [model[2].weight], "trust_check": "linear"}])


def test_a_state_dict_from_before_the_options_loads_with_their_defaults():
    model = mlp()
    opt = LoKO(model.parameters(), trust_check="linear", truncation="gram")
    (x, y), = batches(1)
    opt.step(lambda: model(x), y)
    saved = copy.deepcopy(opt.state_dict())
    for key in ("trust_check", "truncation"):
        del saved["param_groups"][0][key]
    fresh = LoKO(model.parameters(), trust_check="linear", truncation="gram")
    fresh.load_state_dict(saved)
    assert (fresh.param_groups[0]["trust_check"], fresh.param_groups[0]["truncation"]) == ("predicted", "whitened")
    fresh.step(lambda: model(x), y)
    assert fresh.skipped_steps == 0


# ---------------------------------------------------------------------------------------------------- classes
def wide_mlp(seed=0, n=4, c=6):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n, 3), torch.nn.Tanh(), torch.nn.Linear(3, c)).double()


def test_class_subset_gives_the_softmax_rows_of_the_observed_classes():
    from kalmanopt.optim.loko.jacobian import jacobian_rows
    from kalmanopt.optim.loko.observation import class_subset

    model = wide_mlp()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 5, 2])
    params = list(model.parameters())
    logits = model(x)
    yhat = torch.softmax(logits.detach(), 1)
    e = torch.nn.functional.one_hot(y, 6).double() - yhat
    subset = class_subset(yhat, e, 2)
    assert subset.index.shape == (3, 3)
    for b in range(3):
        top = yhat[b].argsort(descending=True).tolist()
        assert subset.index[b, :2].tolist() == top[:2]  # the two most probable first
        assert subset.index[b, 2].item() == (top[2] if y[b].item() in top[:2] else y[b].item())
    rows = jacobian_rows(logits.reshape(-1), params, "vmap", subset.vectors)
    mixed = subset.mix @ torch.cat([r.reshape(r.shape[0], -1) for r in rows], 1)
    softmax = torch.softmax(logits, 1)
    for b in range(3):
        for j, cls in enumerate(subset.index[b].tolist()):
            grads = torch.autograd.grad(softmax[b, cls], params, retain_graph=True)
            torch.testing.assert_close(mixed[3 * b + j], torch.cat([g.reshape(-1) for g in grads]), rtol=1e-12,
                                       atol=1e-14)


def dense_subset_step(model, x, y, count, p0, r_min, P=None):
    """The exact EKF step (dense P) with the softmax observation of ``class_subset``'s classes, by hand."""
    from kalmanopt.optim.loko.observation import class_subset

    theta = flat(model)
    n = theta.numel()
    P = p0 * torch.eye(n, dtype=torch.float64) if P is None else P
    logits = model(x)
    yhat = torch.softmax(logits.detach(), 1)
    e_all = torch.nn.functional.one_hot(y, logits.shape[1]).double() - yhat
    index = class_subset(yhat, e_all, count).index
    softmax = torch.softmax(logits, 1)
    rows, es, blocks = [], [], []
    for b in range(x.shape[0]):
        for cls in index[b].tolist():
            grads = torch.autograd.grad(softmax[b, cls], list(model.parameters()), retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
            es.append(e_all[b, cls])
        p = yhat[b, index[b]]
        blocks.append(torch.diag(p) - torch.outer(p, p) + r_min * torch.eye(p.numel(), dtype=torch.float64))
    H, e, R = torch.stack(rows), torch.stack(es), torch.block_diag(*blocks)
    S = H @ P @ H.T + R
    K = P @ H.T @ torch.linalg.inv(S)
    return theta + K @ e, P - K @ H @ P


@pytest.mark.parametrize("count", [1, 2])
def test_classes_at_full_rank_is_the_exact_ekf_of_the_observed_classes(count):
    model, oracle = wide_mlp(seed=2), wide_mlp(seed=2)
    n = sum(p.numel() for p in model.parameters())
    opt = LoKO(model.parameters(), p0=0.3, rank=n, trust=0.0, classes=count)
    P = None
    for x, y in batches(3, seed=2, c=6, b=2, scale=1.0):
        theta, P = dense_subset_step(oracle, x, y, count, 0.3, 1e-3, P)
        torch.nn.utils.vector_to_parameters(theta, oracle.parameters())
        opt.step(lambda x=x: model(x), y)
        torch.testing.assert_close(flat(model), theta, rtol=1e-9, atol=1e-12)
    ups = torch.cat([opt.state[p]["upsilon"].reshape(-1) for p in model.parameters()])
    W = torch.cat([opt.state[p]["W"].reshape(-1, n) for p in model.parameters()])
    torch.testing.assert_close(torch.linalg.inv(torch.diag(ups) + W @ W.T), P, rtol=1e-8, atol=1e-12)


def test_classes_with_the_diagonal_filter_uses_the_observed_classes_rows():
    """rank=0 (not fused): the fd update with the subset's softmax rows, against the dense formula's diagonal."""
    model, oracle = wide_mlp(seed=4), wide_mlp(seed=4)
    opt = LoKO(model.parameters(), p0=0.3, rank=0, trust=0.0, classes=1)
    (x, y), = batches(1, seed=4, c=6, b=2, scale=1.0)
    theta, P = dense_subset_step(oracle, x, y, 1, 0.3, 1e-3)
    opt.step(lambda: model(x), y)
    torch.testing.assert_close(flat(model), theta, rtol=1e-9, atol=1e-12)
    p = torch.cat([opt.state[q]["p"].reshape(-1) for q in model.parameters()])
    torch.testing.assert_close(p, torch.diagonal(P), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rank", [0, 8])
def test_classes_predictive_does_not_depend_on_the_label(rank):
    """The predictive of a step is made before the label is learnt: the label's row (measured when it is not among
    the most probable classes) must not enter it."""
    model = wide_mlp(seed=6)
    x = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    order = torch.softmax(model(x), 1).argsort(descending=True)[0]
    probs = []
    for label in (order[0], order[-1]):  # among the top class / the least probable one
        twin = wide_mlp(seed=6)
        opt = LoKO(twin.parameters(), rank=rank, classes=1, calibrate=False)
        opt.step(lambda twin=twin: twin(x), label.view(1))
        probs.append(opt.last_predictive.probs)
        cov = opt.last_predictive.cov[0]
        assert torch.count_nonzero(cov - torch.diag(torch.diagonal(cov))) == 0  # one class measured: diagonal
    torch.testing.assert_close(probs[0], probs[1], rtol=0, atol=0)


def test_classes_needs_the_moment_matched_softmax_and_covering_every_class_is_the_full_observation():
    model = wide_mlp()
    for kw in (dict(observation="logits"), dict(noise="fixed"), dict(observation="loss")):
        with pytest.raises(ValueError, match="classes"):
            LoKO(model.parameters(), classes=2, **kw)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="classes"):
            LoKO(model.parameters(), classes=bad)
    reference, subset = wide_mlp(seed=8), wide_mlp(seed=8)
    opt_ref = LoKO(reference.parameters(), rank=4)
    opt = LoKO(subset.parameters(), rank=4, classes=4)  # 4 + 2 >= 6 classes: every class
    for x, y in batches(2, seed=8, c=6):
        opt_ref.step(lambda x=x: reference(x), y)
        opt.step(lambda x=x: subset(x), y)
    assert torch.equal(flat(subset), flat(reference))


# ---------------------------------------------------------------------------------------------------- workspace
def test_the_cpu_workspace_changes_no_number_and_is_no_state():
    """LoFi's temporaries written into persistent buffers (CPU) give the same steps bit for bit as fresh ones; the
    state never aliases a buffer (the next step overwrites them), and the buffers are not part of the state dict."""
    import pickle

    with_ws, without = mlp(seed=9), mlp(seed=9)
    opt = LoKO(with_ws.parameters(), rank=3)
    plain = LoKO(without.parameters(), rank=3)
    plain._workspace = lambda device: None
    for x, y in batches(5, seed=9):
        opt.step(lambda x=x: with_ws(x), y)
        plain.step(lambda x=x: without(x), y)
    assert torch.equal(flat(with_ws), flat(without))
    buffers = opt._workspace(torch.device("cpu"))
    assert {"W", "H", "Wz", "U", "rotated"} <= set(buffers)
    pointers = {b.untyped_storage().data_ptr() for b in buffers.values()}
    for p, q in zip(with_ws.parameters(), without.parameters(), strict=True):
        for key in ("upsilon", "W"):
            assert torch.equal(opt.state[p][key], plain.state[q][key])
            assert opt.state[p][key].untyped_storage().data_ptr() not in pointers
    assert "_lofi_workspace" not in str(opt.state_dict().keys())
    copied = pickle.loads(pickle.dumps(opt))
    assert "_lofi_workspace" not in vars(copied) and copied._workspace(torch.device("cpu")) == {}


# ---------------------------------------------------------------------------------------------------- joint state
def joint_storage(opt, model):
    """The one storage every trainable tensor's ``upsilon`` and ``W`` are views of (AssertionError otherwise), with
    the rows in parameter order: ``upsilon`` (n,) and ``W`` (n, k) of the joint precision, contiguous."""
    params = list(model.parameters())
    ups = [opt.state[p]["upsilon"] for p in params]
    Ws = [opt.state[p]["W"] for p in params]
    k = Ws[0].shape[-1]
    assert len({t.untyped_storage().data_ptr() for t in ups}) == 1
    assert len({t.untyped_storage().data_ptr() for t in Ws}) == 1
    offset = 0
    for p, u, w in zip(params, ups, Ws, strict=True):
        assert u.is_contiguous() and w.is_contiguous()
        assert u.storage_offset() == offset and w.storage_offset() == offset * k
        offset += p.numel()
    return ups[0].untyped_storage().data_ptr(), Ws[0].untyped_storage().data_ptr()


def test_the_low_rank_state_is_views_of_one_joint_buffer_and_steps_as_the_stacked_state():
    """After a step, every tensor's ``upsilon`` and ``W`` are views of two joint buffers (no stacking per step), and
    the steps equal bit for bit those of the same optimizer whose state is stacked and split every step (the
    joint buffers dropped before each step: the path of the state before it was joined)."""
    model, stacked_model = mlp(seed=4), mlp(seed=4)
    opt = LoKO(model.parameters(), rank=3, inflation=0.01)
    stacked = LoKO(stacked_model.parameters(), rank=3, inflation=0.01)
    pointers = set()
    for x, y in batches(6, seed=4):
        opt.step(lambda x=x: model(x), y)
        stacked.__dict__.pop("_lofi_joint", None)  # its state tensors stay as they are, only not known as views
        stacked.step(lambda x=x: stacked_model(x), y)
        pointers.add(joint_storage(opt, model))
        assert torch.equal(flat(model), flat(stacked_model))
        for p, q in zip(model.parameters(), stacked_model.parameters(), strict=True):
            for key in ("upsilon", "W"):
                assert torch.equal(opt.state[p][key], stacked.state[q][key])
    assert len(pointers) == 1  # joined once, written in place since


def test_a_loaded_state_is_joined_into_fresh_buffers_that_alias_nothing():
    """``load_state_dict`` (after ``torch.save`` / ``torch.load(weights_only=True)``, and of a state dict of
    separate tensors as saved before the state was joined) joins the loaded tensors into buffers of the loading
    optimizer's own: resuming is bit for bit, and neither optimizer's later steps touch the other's state."""
    import io

    model = mlp(seed=5)
    opt = LoKO(model.parameters(), rank=3)
    data = batches(6, seed=5)
    for x, y in data[:3]:
        opt.step(lambda x=x: model(x), y)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    separate = copy.deepcopy(opt.state_dict())  # a state dict of separate tensors, as before the joint buffers
    for values in separate["state"].values():
        for key in ("upsilon", "W"):
            if key in values:
                values[key] = values[key].clone()
    for state_dict in (saved, separate):
        resumed = mlp(seed=5)
        resumed.load_state_dict(model.state_dict())
        opt2 = LoKO(resumed.parameters(), rank=3)
        opt2.load_state_dict(state_dict)
        mine, theirs = joint_storage(opt2, resumed), joint_storage(opt, model)
        assert not set(mine) & set(theirs)
        loaded = {t.untyped_storage().data_ptr() for v in state_dict["state"].values() for t in v.values()
                  if isinstance(t, torch.Tensor)}
        assert not set(mine) & loaded
        reference = copy.deepcopy(model)
        reference_opt = LoKO(reference.parameters(), rank=3)
        reference_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for x, y in data[3:]:
            reference_opt.step(lambda x=x, m=reference: m(x), y)
            opt2.step(lambda x=x, m=resumed: m(x), y)
        assert torch.equal(flat(resumed), flat(reference))
        assert joint_storage(opt2, resumed) == mine  # still its own buffers, written in place
    for x, y in data[3:]:  # the source steps on: the resumed optimizers saw it before, alias nothing
        opt.step(lambda x=x: model(x), y)
    assert torch.equal(flat(model), flat(reference))


def test_a_state_tensor_replaced_by_assignment_is_the_one_the_next_step_uses():
    """A state tensor set by hand (not a view of the joint buffers any more) is read, not the stale buffer row;
    the step then joins the state anew."""
    model, other = mlp(seed=6), mlp(seed=6)
    opt, opt_other = LoKO(model.parameters(), rank=3), LoKO(other.parameters(), rank=3)
    (x0, y0), (x1, y1) = batches(2, seed=6)
    opt.step(lambda: model(x0), y0)
    opt_other.step(lambda: other(x0), y0)
    first, first_other = next(model.parameters()), next(other.parameters())
    doubled = opt.state[first]["upsilon"] * 2
    opt.state[first]["upsilon"] = doubled
    opt_other.state[first_other]["upsilon"].mul_(2)  # the same numbers, in place in its buffers
    opt.step(lambda: model(x1), y1)
    opt_other.step(lambda: other(x1), y1)
    assert torch.equal(flat(model), flat(other))
    joint_storage(opt, model)
    assert opt.state[first]["upsilon"] is not doubled
