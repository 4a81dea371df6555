"""A skipped step writes nothing, on every path: no masked write computes through a rejected value (issue 21).

The multi-tensor paths mask their writes by coefficients (``x * 1 + y * 0``, lerps of weight 0) to stay one pass;
that is exact only while every ``y`` is finite. A finite gradient whose square overflows the state dtype is one
that is not: the step is skipped (``||h||^2`` is not finite), but its second moment is infinite, and ``0 * inf``
used to write NaN into ``exp_avg_sq``, and then into the parameters at the next step. Each test runs on the
reference (``foreach=False``), the multi-tensor path (``foreach=True``) and the default (``fused=None`` with
``foreach=None``: KOALA++'s C kernel for dense float32/float64 CPU tensors, the multi-tensor path otherwise), and
KOALA++'s on the Triton kernels too (CUDA's default; here through Triton's interpreter).
"""


import pytest
import torch

from kalmanopt import KOALAM, KOALAV, KOALAPlusPlus
from kalmanopt.optim import _koala_pp_fused, _koala_pp_triton

from conftest import skipped_steps

PATHS = {"reference": {"foreach": False}, "foreach": {"foreach": True}, "default": {}}
KERNEL = _koala_pp_fused.load() is not None
KOALA_PP_PATHS = [*sorted(PATHS), "triton"]


@pytest.fixture
def kernel_path(request, monkeypatch):
    """KOALA++'s path (the test's ``path`` parameter), with the Triton kernels taking CPU tensors for "triton"."""
    path = request.node.callspec.params["path"]
    if path == "triton":
        pytest.importorskip("triton", reason="the Triton path needs triton")
        monkeypatch.setattr(_koala_pp_triton, "ON_CPU", True)
    return path


def _took(opt, path):
    """The step ran on ``path``'s kernel (a default that fell back would test the multi-tensor path again)."""
    if path == "default" and KERNEL:
        assert "_fused_work" in opt.__dict__
    if path == "triton":
        assert "_triton_cache" in opt.__dict__
KOALA_PP = {
    "adaptive": {},
    "paper": {"preset": "paper"},
    "metric_no_momentum": {"momentum": 0.0},
    "momentum_no_metric": {"precondition": False, "momentum": 0.5},
    "bf16_state": {"state_dtype": torch.bfloat16},
}
SCALAR_FILTERS = {"koala_v": (KOALAV, {}), "koala_m": (KOALAM, {}), "koala_m_online_qw": (KOALAM, {"qw": None})}
BIG = {torch.float32: 1e30, torch.float64: 1e200}  # finite, with a square that overflows the dtype


def _state(opt):
    return {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
            for i, p in enumerate(p for g in opt.param_groups for p in g["params"]) if opt.state[p]}


def _assert_same(params_a, opt_a, params_b, opt_b, *, skips=0):
    """Bit for bit the same parameters and state (NaN never equals itself here), except ``skips`` more skips."""
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a.detach(), b.detach())
    state_a, state_b = _state(opt_a), _state(opt_b)
    assert state_a.keys() == state_b.keys()
    for i, st in state_a.items():
        assert st.keys() == state_b[i].keys()
        for key, value in st.items():
            other = state_b[i][key]
            if key == "skipped_steps":
                assert int(value) == int(other) + skips
            elif isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), (i, key, value, other)
            else:
                assert value == other, (i, key)


def _twins(make, good_grads, loss):
    """Two identical optimizers (and parameters) after one good step each."""
    runs = []
    for _ in range(2):
        params, opt = make()
        for p, g in zip(params, good_grads, strict=True):
            p.grad = g.to(p.dtype)
        opt.step(loss=loss)
        runs.append((params, opt))
    return runs


def _check_skip_then_recover(make, bad_grads, dtype):
    """The bad step is a counted bit-for-bit no-op, and the next good step is the one of a twin that never saw it."""
    loss = torch.tensor(1.3, dtype=dtype)
    shapes = [p.shape for p in make()[0]]
    good = [torch.linspace(-0.4, 0.5, s.numel(), dtype=torch.float64).view(s) for s in shapes]
    (params, opt), (twin_params, twin) = _twins(make, good, loss)
    for p, g in zip(params, bad_grads, strict=True):
        p.grad = g.to(p.dtype)
    opt.step(loss=loss)
    assert skipped_steps(opt) == 1
    _assert_same(params, opt, twin_params, twin, skips=1)
    after = [torch.linspace(0.3, -0.2, s.numel(), dtype=torch.float64).view(s) for s in shapes]
    for ps, o in ((params, opt), (twin_params, twin)):
        for p, g in zip(ps, after, strict=True):
            p.grad = g.to(p.dtype)
        o.step(loss=loss)
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert skipped_steps(opt) == 1  # the good step was taken, not skipped
    _assert_same(params, opt, twin_params, twin, skips=1)


@pytest.mark.parametrize("path", KOALA_PP_PATHS)
@pytest.mark.parametrize("config", sorted(KOALA_PP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_koala_pp_gradient_with_an_overflowing_square(path, config, dtype, kernel_path):
    """Issue 21, item 1: ``w.grad = [1e30, .1, .1]`` on float32 wrote NaN into exp_avg_sq on the multi-tensor path."""
    made = []

    def make():
        params = [torch.nn.Parameter(torch.ones(3, dtype=dtype)), torch.nn.Parameter(torch.ones(2, 2, dtype=dtype))]
        made.append(KOALAPlusPlus(params, **KOALA_PP[config], **PATHS.get(path, {})))
        return params, made[-1]

    bad = [torch.tensor([BIG[dtype], 0.1, 0.1], dtype=dtype), torch.full((2, 2), 0.1, dtype=dtype)]
    _check_skip_then_recover(make, bad, dtype)
    _took(made[-1], path)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(SCALAR_FILTERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_scalar_filters_gradient_with_an_overflowing_square(path, name, dtype):
    cls, kwargs = SCALAR_FILTERS[name]

    def make():
        params = [torch.nn.Parameter(torch.ones(3, dtype=dtype)), torch.nn.Parameter(torch.ones(2, 2, dtype=dtype))]
        return params, cls(params, **kwargs, **PATHS[path])

    bad = [torch.full((3,), 0.1, dtype=dtype), torch.tensor([[0.1, -BIG[dtype]], [0.1, 0.1]], dtype=dtype)]
    _check_skip_then_recover(make, bad, dtype)


def test_the_issue_example_foreach():
    w = torch.nn.Parameter(torch.ones(3))
    opt = KOALAPlusPlus([w], foreach=True)
    w.grad = torch.tensor([1e30, 0.1, 0.1])
    opt.step(loss=torch.tensor(1.0))
    assert torch.equal(opt.state[w]["exp_avg_sq"], torch.zeros(3))
    w.grad = torch.full((3,), 0.1)
    opt.step(loss=torch.tensor(1.0))
    assert bool(torch.isfinite(w).all()) and skipped_steps(opt) == 1 and float(opt.state[w]["step"]) == 1


# ------------------------------------------------------------------------------------ mixed state dtypes (item 2)
MIXED = {
    "koala_m": (KOALAM, {"r": 0.5}),
    "koala_v": (KOALAV, {"r": 0.5}),
    "koala_pp_paper": (KOALAPlusPlus, {"preset": "paper", "r": 0.5}),
    "koala_pp_default": (KOALAPlusPlus, {}),
    "koala_m_estimated_r": (KOALAM, {}),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
@pytest.mark.parametrize("loss", [1e30, 1e20], ids=["loss_1e30", "square_1e40"])
@pytest.mark.parametrize("name", sorted(MIXED))
def test_loss_must_fit_every_state_dtype_of_the_group(name, loss, foreach):
    """A float64 loss that fits float64 but whose square (the R statistic) does not fit float32 is skipped whether
    the float32 or the float64 parameter leads the group (and holds R): it used to move the float32 weights to
    about -5.9e28 with the float64 one first (issue 21, item 2)."""
    cls, kwargs = MIXED[name]
    outcomes = []
    for float64_first in (True, False):
        w32 = torch.nn.Parameter(torch.ones(3))
        s64 = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        opt = cls([s64, w32] if float64_first else [w32, s64], foreach=foreach, **kwargs)
        w32.grad, s64.grad = torch.full((3,), 0.1), torch.full((3,), 0.1, dtype=torch.float64)
        opt.step(loss=torch.tensor(loss, dtype=torch.float64))
        assert torch.equal(w32.detach(), torch.ones(3)) and torch.equal(s64.detach(), torch.ones(3).double())
        assert skipped_steps(opt) == 1
        w32.grad, s64.grad = torch.full((3,), 0.1), torch.full((3,), 0.1, dtype=torch.float64)
        opt.step(loss=torch.tensor(1.0, dtype=torch.float64))
        assert skipped_steps(opt) == 1
        outcomes.append((w32.detach().clone(), s64.detach().clone()))
    torch.testing.assert_close(outcomes[0], outcomes[1])  # the order of the parameters does not matter


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
def test_koala_m_prediction_checks_every_state_dtype(foreach):
    """KOALA-M's prior P is kept in the leader's dtype: a prior that overflows float32 (q_w estimated from a float64
    weight far from its average) is not made, whichever parameter leads; float64 first, it was made, and the
    float32 tensor then met an infinite P11 (S not finite: silently never corrected)."""
    results = []
    for float64_first in (True, False):
        w32 = torch.nn.Parameter(torch.ones(3))
        s64 = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        opt = KOALAM([s64, w32] if float64_first else [w32, s64], qw=None, foreach=foreach)
        for k in range(4):
            if k == 2:
                with torch.no_grad():
                    s64.fill_(1e100)  # ||theta - theta_bar||^2 ~ 1e200: finite in float64, not in float32
            w32.grad, s64.grad = torch.full((3,), 0.1 + k), torch.full((3,), 0.2, dtype=torch.float64)
            opt.step(loss=torch.tensor(1.0, dtype=torch.float64))
        group = opt.state[opt.param_groups[0]["params"][0]]
        assert bool(torch.isfinite(group["P_prior"].float()).all())
        results.append((w32.detach().clone(), group["P_prior"].double()))
    torch.testing.assert_close(results[0], results[1])


# ------------------------------------------------------------------------------------ KOALA-M's weight average
@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
def test_koala_m_gated_prediction_leaves_the_weight_average_finite(foreach):
    """A non-finite weight makes q_w infinite and gates the prediction off; the weight average was then updated with
    weight 0 (theta_bar + 0 * (theta - theta_bar) = NaN) and q_w stayed NaN for good."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = KOALAM([a, b], qw=None, foreach=foreach)
    for _ in range(3):
        a.grad, b.grad = torch.full((3,), 0.1), torch.full((2,), 0.2)
        opt.step(loss=torch.tensor(1.0))
    averages = [opt.state[p]["weight_ema"].clone() for p in (a, b)]
    with torch.no_grad():
        a[0] = float("inf")
    a.grad, b.grad = torch.full((3,), 0.1), torch.full((2,), 0.2)
    opt.step(loss=torch.tensor(1.0))
    for p, before in zip((a, b), averages, strict=True):
        assert torch.equal(opt.state[p]["weight_ema"], before)  # the gated prediction left it as it was


# ------------------------------------------------------------------------------------ committed steps stay finite
@pytest.mark.parametrize("path", KOALA_PP_PATHS)
def test_tiny_float32_gradient_is_corrected(path, kernel_path):
    """||H||^4 underflowed float32 for ||H||^2 < 1e-19 in the Python paths' scalar algebra: S was NaN and the tensor
    was silently never corrected (the kernel, in double, corrected it). The scalars are now formed in float64."""
    runs = []
    for scale in (1e-12, 1.0):
        w = torch.nn.Parameter(torch.ones(3))
        opt = KOALAPlusPlus([w], preset="paper", r=0.5 * scale**2, **PATHS.get(path, {}))  # R scales with ||h||^2
        for k in range(3):
            w.grad = scale * torch.tensor([0.3, -0.2 + 0.1 * k, 0.1])
            opt.step(loss=torch.tensor(1.0))
        assert float(opt.state[w]["step"]) == 3
        _took(opt, path)
        runs.append(opt.state[w]["prev_S"] / scale**2)
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=0)  # the filter is invariant to the scale


@pytest.mark.parametrize("path", KOALA_PP_PATHS)
def test_a_step_size_beyond_the_dtype_writes_nothing(path, kernel_path):
    """A huge loss over a tiny S (R = 0, a gradient of 1e-20 in float32): the step size overflows float32. The
    tensor is left alone (as for a non-finite S), never moved to inf or NaN."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = KOALAPlusPlus([w], preset="paper", r=0.0, **PATHS.get(path, {}))
    w.grad = torch.tensor([1e-20, 0.0, 0.0])
    opt.step(loss=torch.tensor(1e19))
    _took(opt, path)
    assert bool(torch.isfinite(w).all())
    assert all(bool(torch.isfinite(v).all()) for v in opt.state[w].values() if isinstance(v, torch.Tensor))
