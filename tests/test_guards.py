"""Bad input gets a clear error, or the step is skipped and nothing changes."""

import math

import pytest
import torch

from kalmanopt import KOALAM, KOALAV, KOALAPlusPlus

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


def _trained(optimizer_spec, steps=3):
    cls, kwargs = optimizer_spec
    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, steps)
    return model, opt


def _backward(model, seed=99):
    x, y = batch(seed)
    for p in model.parameters():
        p.grad = None
    losses = per_sample_loss(model, x, y)
    losses.mean().backward()
    return losses.detach()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_skips_the_step(optimizer_spec, bad):
    model, opt = _trained(optimizer_spec)
    losses = _backward(model)
    losses[3] = bad
    before = snapshot(opt)
    opt.step(loss=losses)
    assert_unchanged(opt, before)
    assert skipped_steps(opt) == 1
    opt.step(loss=_backward(model))  # and the filter carries on
    assert skipped_steps(opt) == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gradient_in_one_tensor_skips_every_tensor(optimizer_spec, bad):
    model, opt = _trained(optimizer_spec)
    losses = _backward(model)
    list(model.parameters())[2].grad[1, 1] = bad
    before = snapshot(opt)
    opt.step(loss=losses)
    assert_unchanged(opt, before)
    assert skipped_steps(opt) == 1


def test_update_rejects_negative_variance_number():
    p = torch.zeros(2, requires_grad=True)
    opt = KOALAPlusPlus([p])
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="loss_var must be non-negative"):
        opt.update(1.0, -0.5)


def test_update_skips_negative_variance_tensor(optimizer_spec):
    model, opt = _trained(optimizer_spec)
    losses = _backward(model)
    opt.predict()
    before = snapshot(opt)
    opt.update(losses.mean(), torch.tensor(-1.0, dtype=torch.float64))
    for st in opt.state.values():  # update() consumes the prediction whatever the outcome; the rest must hold
        if "predicted" in st:
            st["predicted"] = True
    assert_unchanged(opt, before)
    assert skipped_steps(opt) == 1


def test_none_gradient_leaves_tensor_and_state_alone(optimizer_spec):
    model, opt = _trained(optimizer_spec)
    losses = _backward(model)
    frozen = list(model.parameters())[0]
    frozen.grad = None
    value, state = frozen.detach().clone(), {k: v.clone() for k, v in opt.state[frozen].items()
                                             if isinstance(v, torch.Tensor) and k not in _GROUP_KEYS}
    opt.step(loss=losses)
    moves_by_prediction = "momentum" in opt.state[frozen]  # KOALA-M's predict moves every started tensor
    if not moves_by_prediction:
        assert torch.equal(frozen.detach(), value)
    for k, v in state.items():
        if k not in ("momentum", "weight_ema"):
            assert torch.equal(opt.state[frozen][k], v), k


_GROUP_KEYS = {"measurement_noise", "skipped_steps", "noise_updates", "sigma", "sigma_prior", "P", "P_prior",
               "lr_log_scale"}


def test_parameter_never_given_a_gradient_gets_no_state(optimizer_spec):
    cls, kwargs = optimizer_spec
    model = tiny_mlp()
    extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = cls([*model.parameters(), extra], **kwargs)
    train(model, opt, 3)
    assert torch.equal(extra.detach(), torch.ones(3, dtype=torch.float64))
    assert "step" not in opt.state[extra]


@pytest.mark.parametrize("cls", [KOALAPlusPlus, KOALAV, KOALAM])
def test_zero_gradient_leaves_tensor_and_state_alone(cls):
    model = tiny_mlp()
    opt = cls(model.parameters(), lr=same_step_lr(cls, 0.5))
    train(model, opt, 3)
    losses = _backward(model)
    zero = list(model.parameters())[1]
    zero.grad.zero_()
    value = zero.detach().clone()
    state = {k: v.clone() for k, v in opt.state[zero].items() if isinstance(v, torch.Tensor)}
    if cls is KOALAM:  # its prediction moves every tensor by its momentum; freeze that part
        opt.state[zero]["momentum"].zero_()
        state["momentum"].zero_()
    opt.step(loss=losses)
    assert torch.equal(zero.detach(), value)
    for k in ("step", "prev_grad", "gain", "prev_q", "prev_S", "prev_grad_sq", "prev_grad_v", "momentum"):
        if k in state:
            assert torch.equal(opt.state[zero][k], state[k]), k


@pytest.mark.parametrize("corrupt", ["zero_prev_grad", "non_positive_S"])
def test_restart_from_prior(corrupt):
    """A zero previous gradient or S <= 0 restarts the tensor as if it were its first step."""
    g1, g2 = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), torch.tensor([0.1, 0.4, -0.3], dtype=torch.float64)
    p = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    opt = KOALAPlusPlus([p], r=0.5, foreach=True, preset="paper")  # the guard of Algorithm 1 (no momentum, metric)
    p.grad = g1
    opt.step(loss=torch.tensor(1.0, dtype=torch.float64))
    if corrupt == "zero_prev_grad":
        opt.state[p]["prev_grad"].zero_()
        opt.state[p]["prev_grad_sq"].zero_()
    else:
        opt.state[p]["prev_S"].fill_(-1.0)
    start = p.detach().clone()
    p.grad = g2
    opt.step(loss=torch.tensor(2.0, dtype=torch.float64))

    fresh = start.clone().requires_grad_()
    ref = KOALAPlusPlus([fresh], r=0.5, preset="paper")
    fresh.grad = g2
    ref.step(loss=torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(p.detach(), fresh.detach(), rtol=1e-14, atol=1e-14)
    assert torch.isfinite(opt.state[p]["gain"]).all()


@pytest.mark.parametrize("shape", [(2, 3), (1, 1, 4)])
def test_loss_of_wrong_shape_raises(optimizer_spec, shape):
    model, opt = _trained(optimizer_spec, steps=1)
    _backward(model)
    with pytest.raises(ValueError, match="0-d .* or 1-d"):
        opt.step(loss=torch.ones(shape, dtype=torch.float64))


def test_empty_loss_raises(optimizer_spec):
    model, opt = _trained(optimizer_spec, steps=1)
    _backward(model)
    with pytest.raises(ValueError, match="empty"):
        opt.step(loss=torch.ones(0, dtype=torch.float64))


@pytest.mark.parametrize("cls,kwargs,name", [
    (KOALAPlusPlus, {"lr": -1.0}, "lr"),
    (KOALAPlusPlus, {"sigma": 0.0}, "sigma"),
    (KOALAPlusPlus, {"q": -0.1}, "q"),
    (KOALAPlusPlus, {"r": -1.0}, "r"),
    (KOALAPlusPlus, {"alpha_r": 1.0}, "alpha_r"),
    (KOALAPlusPlus, {"weight_decay": -1e-4}, "weight_decay"),
    (KOALAPlusPlus, {"symmetric": "yes"}, "symmetric"),
    (KOALAPlusPlus, {"r_stat": "variance"}, "r_stat"),
    (KOALAPlusPlus, {"q": 0.0, "r": 0.0}, "q and r"),
    (KOALAPlusPlus, {"lr": float("nan")}, "lr"),
    (KOALAV, {"sigma": -1.0}, "sigma"),
    (KOALAV, {"q": -1.0}, "q"),
    (KOALAM, {"sw": 0.0}, "sw"),
    (KOALAM, {"a": 1.5}, "a"),
    (KOALAM, {"sc": 1.0}, "sc"),
    (KOALAM, {"qw": -1.0}, "qw"),
    (KOALAM, {"qv": -1.0}, "qv"),
])
def test_invalid_hyperparameter_names_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError):
        KOALAPlusPlus([torch.zeros(2, requires_grad=True)], betas=(0.9, 0.999))


def test_integer_parameters_are_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        KOALAPlusPlus([torch.zeros(2, dtype=torch.int64)])


def test_invalid_param_group_added_later_is_rejected():
    opt = KOALAPlusPlus([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="sigma"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "sigma": -1.0})




@pytest.mark.parametrize("foreach", [True, False])
def test_step_never_synchronises_with_the_host(optimizer_spec, foreach):
    cls, kwargs = optimizer_spec
    model = tiny_mlp()
    opt = cls(model.parameters(), foreach=foreach, **kwargs)
    train(model, opt, 1)
    for k in range(3):
        losses = _backward(model, seed=k)
        if k == 1:
            losses[0] = math.nan
        with NoSync():
            opt.step(loss=losses)
    assert skipped_steps(opt) == 1
