"""Regression tests for the bad-input bugs found by fuzzing (issue 14): each fails on the code before its fix."""

import copy
import math

import pytest
import torch

from kalmanopt import KOALAM, KOALAV, FullKalman, KOALAPlusPlus, LoKO
from kalmanopt.optim.noise import R_CLIP

from conftest import (
    NoSync,
    assert_unchanged,
    batch,
    per_sample_loss,
    same_step_lr,
    skipped_steps,
    snapshot,
    tiny_mlp,
    train,
)

INF, NAN = math.inf, math.nan
KOALAS = [KOALAPlusPlus, KOALAV, KOALAM]






def _backward(model, seed=99):
    x, y = batch(seed, dtype=next(model.parameters()).dtype)
    for p in model.parameters():
        p.grad = None
    losses = per_sample_loss(model, x, y)
    losses.mean().backward()
    return losses.detach()


def _state_equal(a, b):
    """Two optimizers' parameters and state, bit for bit (tensors by torch.equal, the rest by ==).

    ``a`` may hold state that ``b`` lacks for a tensor the filter never corrected (its ``step`` is 0): a skipped step
    creates the state of the tensors that had gradients (a device-side skip cannot avoid that), which must then
    change nothing.
    """
    pa = [p.detach() for g in a.param_groups for p in g["params"]]
    pb = [p.detach() for g in b.param_groups for p in g["params"]]
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    sa = {k: v for k, v in a.state_dict()["state"].items() if v}
    sb = {k: v for k, v in b.state_dict()["state"].items() if v}
    for key in set(sa) - set(sb):
        assert float(sa[key]["step"]) == 0, key
        del sa[key]
    assert sa.keys() == sb.keys()
    for key in sb:
        assert sa[key].keys() == sb[key].keys(), key
        for name, value in sa[key].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == sb[key][name].dtype and torch.equal(value, sb[key][name]), (key, name)
            else:
                assert value == sb[key][name], (key, name)


def _lin(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3).to(dtype)


# ------------------------------------------------------------------------------------------------ 1. hyperparameters
@pytest.mark.parametrize("cls,kwargs", [
    (KOALAV, {"sigma": INF}),
    *[(cls, {"lr": INF}) for cls in KOALAS],
    *[(KOALAM, {name: INF}) for name in ("sw", "sv", "qw", "qv")],
    *[(cls, {"r": INF}) for cls in KOALAS],
    *[(cls, {"weight_decay": INF}) for cls in KOALAS],
    (KOALAPlusPlus, {"sigma": INF}), (KOALAPlusPlus, {"q": INF}), (KOALAV, {"q": INF}), (KOALAM, {"sc": -INF}),
    (KOALAV, {"r_clip": INF}),
    *[(LoKO, {name: INF}) for name in ("p0", "q", "r_min", "p_min", "inflation", "p0_scale", "r0")],
    *[(FullKalman, {name: INF}) for name in ("p0", "q", "r_min", "r0")],
])
def test_non_finite_hyperparameter_is_rejected(cls, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        cls(_lin().parameters(), **kwargs)


@pytest.mark.parametrize("cls", KOALAS)
@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_lr_set_after_construction_raises_before_any_write(cls, bad):
    model = tiny_mlp()
    opt = cls(model.parameters(), lr=same_step_lr(cls, 0.5))
    train(model, opt, 2)
    losses = _backward(model)
    opt.param_groups[0]["lr"] = bad
    before = snapshot(opt)
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.step(loss=losses)
    assert_unchanged(opt, before)
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.update(losses.mean(), losses.square().mean())
    assert_unchanged(opt, before)


@pytest.mark.parametrize("cls", KOALAS)
def test_non_finite_tensor_lr_skips_the_step_on_the_device(cls):
    model = tiny_mlp()
    opt = cls(model.parameters(), lr=torch.tensor(0.5, dtype=torch.float64))
    train(model, opt, 2)
    opt.param_groups[0]["lr"].fill_(NAN)  # as an LR scheduler writes a tensor lr
    losses = _backward(model)
    before = snapshot(opt)
    with NoSync():
        opt.step(loss=losses)
    assert_unchanged(opt, before)
    assert skipped_steps(opt) == 1


@pytest.mark.parametrize("cls", [LoKO, FullKalman])
def test_loko_hyperparameter_set_to_inf_later_raises(cls):
    model = _lin()
    opt = cls(model.parameters())
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    opt.step(lambda: model(x), y)
    opt.param_groups[0]["q"] = INF
    before = snapshot(opt)
    with pytest.raises(ValueError, match="Invalid q"):
        opt.step(lambda: model(x), y)
    assert_unchanged(opt, before)


def test_tensor_p0_scale_is_a_value_error():
    with pytest.raises(ValueError, match="p0_scale"):
        LoKO(_lin().parameters(), p0="auto", p0_scale=torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="p0_scale"):
        LoKO(_lin().parameters(), p0="auto", p0_scale=torch.tensor(2.0))
    model = _lin()
    opt = LoKO(model.parameters(), p0="auto")
    opt.param_groups[0]["p0_scale"] = torch.tensor([2.0, 1.0])
    with pytest.raises(ValueError, match="p0_scale"):
        opt.step(lambda: model(torch.randn(4, 4)), torch.tensor([0, 1, 2, 0]))


# ------------------------------------------------------------------------------------------------ 2. overflowing loss
def test_float64_loss_that_overflows_float32_state_is_skipped():
    p = torch.nn.Parameter(torch.ones(3))
    opt = KOALAV([p])
    p.grad = torch.ones(3)
    opt.step(loss=torch.tensor(1.0, dtype=torch.float64))
    before = snapshot(opt)
    opt.step(loss=torch.tensor(1e20, dtype=torch.float64))  # finite in float64, its square is not in float32
    assert_unchanged(opt, before)
    assert skipped_steps(opt) == 1
    assert torch.isfinite(opt.state[p]["measurement_noise"])
    opt.step(loss=torch.tensor(1.0, dtype=torch.float64))  # and it learns on
    assert not torch.equal(p.detach(), before[0][0])


def test_koala_m_huge_loss_with_fixed_r_is_skipped():
    p = torch.nn.Parameter(torch.ones(3))
    opt = KOALAM([p], r=0.5, qw=None)
    for k in range(5):
        p.grad = torch.ones(3) * (k + 1)
        before = snapshot(opt)
        opt.step(loss=torch.tensor(1e30 if k == 1 else 1.0, dtype=torch.float64))
        if k == 1:
            assert_unchanged(opt, before)
    assert skipped_steps(opt) == 1
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["P"]).all()


def test_update_that_would_overflow_a_float16_parameter_is_skipped():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = KOALAV([p], sigma=1.0, r=1e-6)
    p.grad = torch.full((3,), 1e-3, dtype=torch.float16)
    opt.step(loss=torch.tensor(0.0))
    before = snapshot(opt)
    opt.step(loss=torch.tensor(1e4))  # moves each weight by ~1e6: not representable in float16
    assert_unchanged(opt, before)
    assert skipped_steps(opt) == 1
    assert torch.isfinite(p).all()


# ------------------------------------------------------------------------------------------------ 3. KOALA-M, qw=None
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("where", ["first", "middle"])
def test_koala_m_online_qw_skipped_step_is_a_no_op(foreach, where):
    """The bad step is the only one in which the last tensor has a gradient (it creates its state, then skips)."""
    bad_at = 0 if where == "first" else 2

    def run(bad):
        model = tiny_mlp()
        params = list(model.parameters())
        opt = KOALAM(params, lr=0.5, qw=None, weight_decay=1e-2, foreach=foreach)
        for k in range(5):
            if bad and k == bad_at:
                losses = _backward(model, seed=k)
                losses[2] = NAN
                opt.step(loss=losses)
            losses = _backward(model, seed=k)
            params[3].grad = None
            opt.step(loss=losses)
        return opt

    with_bad, clean = run(True), run(False)
    assert skipped_steps(with_bad) == 1
    for st in with_bad.state.values():
        if "skipped_steps" in st:
            st["skipped_steps"].zero_()
    _state_equal(with_bad, clean)


# ------------------------------------------------------------------------------------------------ 4. load_state_dict
def _other_shapes():
    """Same number of tensors as tiny_mlp (4), other shapes."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5)).double()


@pytest.mark.parametrize("cls", [KOALAPlusPlus, KOALAM])  # KOALA-V's state is all scalars: it fits any parameters
def test_load_state_of_other_parameters_raises_and_leaves_the_optimizer_alone(cls):
    source = tiny_mlp()
    opt = cls(source.parameters(), lr=same_step_lr(cls, 0.5))
    train(source, opt, 2)
    saved = opt.state_dict()

    other = _other_shapes()
    target = cls(other.parameters(), lr=same_step_lr(cls, 0.5))
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    losses = per_sample_loss(other, x, y)
    losses.mean().backward()
    target.step(loss=losses.detach())
    before = snapshot(target)
    state_before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="other parameters"):
        target.load_state_dict(saved)
    assert_unchanged(target, before)
    assert target.state_dict()["param_groups"] == state_before["param_groups"]


@pytest.mark.parametrize("cls", KOALAS)
def test_float32_checkpoint_loads_into_a_float64_model(cls):
    model32 = tiny_mlp(dtype=torch.float32)
    opt32 = cls(model32.parameters(), lr=same_step_lr(cls, 0.5))
    train(model32, opt32, 2)
    model64 = tiny_mlp(dtype=torch.float64)
    model64.load_state_dict(model32.state_dict())
    opt64 = cls(model64.parameters(), lr=same_step_lr(cls, 0.5))
    opt64.load_state_dict(opt32.state_dict())
    for p in model64.parameters():
        for name, value in opt64.state[p].items():
            # "lr_log_scale" (KOALA++'s lr_adaptation) is float32 whatever the parameters' dtype
            if isinstance(value, torch.Tensor) and value.is_floating_point() and name not in ("step", "lr_log_scale"):
                assert value.dtype == torch.float64, name
    train(model64, opt64, 2, seed=2)
    assert all(torch.isfinite(p).all() for p in model64.parameters())
    assert skipped_steps(opt64) == 0


def test_load_rejects_state_of_another_dtype_kind():
    model = tiny_mlp()
    opt = KOALAV(model.parameters())
    train(model, opt, 1)
    sd = opt.state_dict()
    sd["state"][0]["sigma"] = torch.tensor(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="sigma"):
        KOALAV(tiny_mlp().parameters()).load_state_dict(sd)


@pytest.mark.parametrize("cls", [LoKO, FullKalman])
def test_loko_load_state_of_other_parameters_raises(cls):
    source = _lin()
    opt = cls(source.parameters())
    opt.step(lambda: source(torch.randn(4, 4)), torch.tensor([0, 1, 2, 0]))
    torch.manual_seed(2)
    other = torch.nn.Linear(5, 3)
    target = cls(other.parameters())
    before = snapshot(target)
    with pytest.raises(ValueError, match="other parameters"):
        target.load_state_dict(opt.state_dict())
    assert_unchanged(target, before)
    assert not target.state


# ------------------------------------------------------------------------------------------------ smaller ones
@pytest.mark.parametrize("path", ["loss", "predict_update"])
def test_koala_m_skipped_update_then_step_predicts_once(path):
    """A skipped update() followed by step() (or by the papers' predict/update) is as if it never happened."""
    def run(bad):
        model = tiny_mlp()
        opt = KOALAM(model.parameters(), lr=0.5)
        train(model, opt, 2, path=path)
        if bad:
            if path == "predict_update":
                opt.predict()
            losses = _backward(model, seed=7)
            opt.update(torch.tensor(NAN, dtype=torch.float64), losses.square().mean())
        train(model, opt, 2, seed=5, path=path)
        return opt

    with_bad, clean = run(True), run(False)
    assert skipped_steps(with_bad) == 1
    for st in with_bad.state.values():
        if "skipped_steps" in st:
            st["skipped_steps"].zero_()
    _state_equal(with_bad, clean)


def test_koala_v_sigma_stays_non_negative_after_a_huge_gradient():
    # Found by search: with q = 0 the old prior - prior^2 * ||h||^2 / S rounds to -7e-9 here (float32).
    p = torch.nn.Parameter(torch.zeros(1))
    opt = KOALAV([p], sigma=0.083, q=0.0, r=0.0309)
    p.grad = torch.tensor([789061.7])
    opt.step(loss=torch.tensor(1.0))
    assert opt.state[p]["sigma"] >= 0


def test_koala_m_p11_stays_non_negative_after_a_huge_gradient():
    # Found by search: the old P11 - c * P11 * P11 rounds to -5e-10 here (float32).
    p = torch.nn.Parameter(torch.zeros(1))
    opt = KOALAM([p], sw=0.0032, sc=0.0, sv=0.0, qw=0.0, qv=0.0, r=0.0092)
    p.grad = torch.tensor([165167.3])
    opt.step(loss=torch.tensor(1.0))
    assert (opt.state[p]["P"] >= 0).all()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_loko_accepts_any_integer_class_indices(dtype):
    labels = torch.tensor([0, 2, 1, 0])
    results = []
    for target in (labels, labels.to(dtype)):
        model = _lin()
        opt = LoKO(model.parameters())
        opt.step(lambda m=model: m(torch.ones(4, 4)), target)
        results.append(model.weight.detach().clone())
    assert torch.equal(*results)


def test_loko_bool_targets_are_classes_0_and_1():
    results = []
    for target in (torch.tensor([0, 1, 1, 0]), torch.tensor([False, True, True, False])):
        model = _lin()
        opt = LoKO(model.parameters())
        opt.step(lambda m=model: m(torch.ones(4, 4)), target)
        results.append(model.weight.detach().clone())
    assert torch.equal(*results)


@pytest.mark.parametrize("target,match", [
    (torch.tensor([0.0, 1.0, 2.0, 0.0]), "integer class indices"),
    (torch.tensor([0, 1, 3, 0]), r"outside \[0, 3\)"),
    (torch.tensor([0, -1, 2, 0]), r"outside \[0, 3\)"),
])
def test_loko_rejects_bad_class_targets_clearly(target, match):
    model = _lin()
    opt = LoKO(model.parameters())
    with pytest.raises(ValueError, match=match):
        opt.step(lambda: model(torch.ones(4, 4)), target)


def _noise_after_outlier(r_clip, steps=60):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = KOALAV([p], r_clip=r_clip)
    history = []
    for k in range(steps):
        p.grad = torch.full((3,), 0.1, dtype=torch.float64)
        opt.step(loss=torch.tensor(1e30 if k == 10 else 1.0, dtype=torch.float64))
        history.append(float(opt.state[p]["measurement_noise"]))
    return history


def test_outlier_loss_does_not_linger_in_r():
    clipped, paper = _noise_after_outlier(R_CLIP), _noise_after_outlier(None)
    assert clipped[:10] == paper[:10]  # no outlier yet: the papers' average bit for bit
    assert paper[-1] > 1e30  # the papers' average still holds the outlier 50 steps later
    assert clipped[-1] < 1.1  # the clipped one forgot it (from 10.9 times the normal R, 50 steps at 0.9)
    assert max(clipped) < 11.0 * clipped[9]


# Every implementation of the clip: noise.measurement_noise (KOALA-V, KOALA-M, KOALA++'s Python paths) and KOALA++'s
# fused kernel (the default path on CPU), each with R averaged at alpha_r = 0.5 and the default r_clip.
R_CLIP_PATHS = {
    "koala_v": lambda params: KOALAV(params, alpha_r=0.5),
    "koala_m": lambda params: KOALAM(params, alpha_r=0.5),
    **{f"koala_pp_{path}": (lambda params, kw=kw: KOALAPlusPlus(params, preset="paper", alpha_r=0.5, r_clip=R_CLIP,
                                                                  **kw))
       for path, kw in {"reference": {"foreach": False}, "foreach": {"foreach": True}, "default": {}}.items()},
}


def _noise_history(make, scale, outlier_at=None, steps=45):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = make([p])
    history = []
    for k in range(steps):
        p.grad = torch.full((3,), 0.1, dtype=torch.float64)
        loss = scale * (1e10 if k == outlier_at else 1.0)
        opt.step(loss=torch.tensor([loss, 2 * loss], dtype=torch.float64))  # the statistic: 2.5 * loss^2
        history.append(float(opt.state[p]["measurement_noise"]))
    return history


@pytest.mark.parametrize("scale", [1e-3, 1e3])
@pytest.mark.parametrize("name", sorted(R_CLIP_PATHS))
def test_r_clip_bounds_the_outlier_relative_to_the_current_r(name, scale):
    """At loss scales where R has moved far from its initial 1 (to 2.5e-6 and 2.5e6): without an outlier R is the
    papers' average (nothing clipped), and an outlier's statistic is stored clipped at r_clip times the *current* R.
    A clip against the initial R would clip every statistic at 1e3 and none at 1e-3."""
    make, alpha, outlier_at = R_CLIP_PATHS[name], 0.5, 40
    clean, hit = _noise_history(make, scale), _noise_history(make, scale, outlier_at)
    R, statistic = 1.0, 2.5 * scale**2
    for k in range(len(clean)):
        R = R * alpha + statistic * (1 - alpha)
        assert clean[k] == pytest.approx(R, rel=1e-12), k
    assert hit[:outlier_at] == clean[:outlier_at]
    before = hit[outlier_at - 1]
    assert before == pytest.approx(statistic, rel=1e-6)  # far from the initial R = 1
    assert hit[outlier_at] == pytest.approx(before * alpha + R_CLIP * before * (1 - alpha), rel=1e-12)


def test_r_clip_none_is_the_papers_average_bit_for_bit():
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = KOALAV([p], r_clip=None)
    R = 1.0
    for k, loss in enumerate([1.0, 3.0, 1e30, 2.0, 1e-3]):
        p.grad = torch.full((2,), 0.5 + k, dtype=torch.float64)
        losses = torch.tensor([loss, 2 * loss], dtype=torch.float64)
        opt.step(loss=losses)
        R = R * 0.9 + float(losses.square().mean()) * (1 - 0.9)
        assert float(opt.state[p]["measurement_noise"]) == R


def test_first_statistic_is_not_clipped():
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = KOALAV([p])
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.step(loss=torch.tensor(1e4, dtype=torch.float64))
    assert float(opt.state[p]["measurement_noise"]) == 0.9 + 1e8 * (1 - 0.9)


def test_skipped_update_does_not_gate_the_prediction_after_a_load():
    def run(skip_first):
        model = tiny_mlp()
        opt = KOALAM(model.parameters(), lr=0.5)
        train(model, opt, 2)
        checkpoint = copy.deepcopy((model.state_dict(), opt.state_dict()))
        if skip_first:
            opt.update(torch.tensor(NAN, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        model.load_state_dict(checkpoint[0])
        opt.load_state_dict(checkpoint[1])
        train(model, opt, 2, seed=5, path="predict_update")
        return opt

    _state_equal(run(True), run(False))
