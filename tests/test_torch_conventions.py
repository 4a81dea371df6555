"""torch.optim's conventions, as PyTorch's own optimizer tests (OptimizerInfo) hold AdamW to them.

* A closure may return a Python number (torch types it ``Callable[[], float]``) or a one-element tensor.
* A hyperparameter may be a one-element tensor of any shape (``lr=torch.tensor([[0.5]])``); a step never fails after
  it has written: what construction refuses, put into a param group later, raises before anything is written.
* A state dict whose ``step`` is a Python number (as older torch optimizers saved it) is converted on load.
* The optimizer state holds tensors only (the filter's phase is host-side, carried by ``state_dict()`` as tensors),
  and a checkpoint from before that still loads.
"""

import copy
import io

import pytest
import torch
from torch import nn

from kalmanopt import KOALAM, KOALAV, FullKalman, KOALAPlusPlus, LoKO
from kalmanopt.optim import _koala_pp_op

from conftest import double_losses, double_mlp

KOALAS = {
    "koala_pp": (KOALAPlusPlus, {}),
    "koala_pp_foreach": (KOALAPlusPlus, {"foreach": True}),
    "koala_pp_reference": (KOALAPlusPlus, {"foreach": False}),
    "koala_pp_paper": (KOALAPlusPlus, {"preset": "paper", "lr": 0.5}),
    "koala_v": (KOALAV, {"lr": 0.5}),
    "koala_v_reference": (KOALAV, {"lr": 0.5, "foreach": False}),
    "koala_m": (KOALAM, {"lr": 0.5}),
    "koala_m_reference": (KOALAM, {"lr": 0.5, "foreach": False}),
}
# Hyperparameters that construction checks as numbers (a tensor is accepted), with a valid value each.
NUMBERS = {
    KOALAPlusPlus: {"lr": 1e-3, "weight_decay": 1e-2, "alpha_r": 0.8, "r_clip": 50.0, "beta2": 0.99, "eps": 1e-8,
                    "momentum": 0.5},
    KOALAV: {"lr": 0.5, "weight_decay": 1e-2, "alpha_r": 0.8, "r_clip": 50.0, "sigma": 0.2, "q": 0.5},
    KOALAM: {"lr": 0.5, "weight_decay": 1e-2, "alpha_r": 0.8, "r_clip": 50.0, "a": 0.8, "qv": 0.02, "sw": 0.2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _everything(model, opt):
    """Parameters and the whole state dict, cloned."""
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_same(a, b):
    (params_a, sd_a), (params_b, sd_b) = a, b
    for x, y in zip(params_a, params_b, strict=True):
        assert torch.equal(x, y)
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for key, values in sd_a["state"].items():
        assert values.keys() == sd_b["state"][key].keys()
        for name, value in values.items():
            assert torch.equal(value, sd_b["state"][key][name]), (key, name)


def _save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------------------------------------------------------------------------------------------- the closure's loss
@pytest.mark.parametrize("name", sorted(KOALAS))
@pytest.mark.parametrize("kind", ["float", "int", "tensor_1x1", "tensor_1x1x1"])
def test_closure_may_return_a_number_or_a_one_element_tensor(name, kind):
    """As with torch.optim (LBFGS takes ``float(closure())``): the loss is the batch mean, the same step as with
    the 0-d float64 tensor of that value, and ``step`` returns what the closure returned."""
    cls, kwargs = KOALAS[name]
    runs = []
    for reference in (False, True):
        model = double_mlp()
        opt = cls(model.parameters(), **kwargs)
        for k in range(3):
            def closure(k=k, model=model, opt=opt, reference=reference):
                mean = double_losses(model, opt, k).mean()
                value = {"float": mean.item(), "int": round(mean.item() * 4),
                         "tensor_1x1": mean.reshape(1, 1), "tensor_1x1x1": mean.reshape(1, 1, 1)}[kind]
                if reference:
                    return torch.as_tensor(value, dtype=torch.float64).reshape(())
                closure.returned = value
                return value

            returned = opt.step(closure)
            if not reference:
                assert returned is closure.returned
        runs.append(_everything(model, opt))
    _assert_same(*runs)


@pytest.mark.parametrize("name", ["koala_pp", "koala_m"])
def test_loss_keyword_takes_a_number_too(name):
    cls, kwargs = KOALAS[name]
    runs = []
    for as_number in (False, True):
        model = double_mlp()
        opt = cls(model.parameters(), **kwargs)
        for k in range(2):
            mean = double_losses(model, opt, k).mean()
            opt.step(loss=mean.item() if as_number else mean)
        runs.append(_everything(model, opt))
    _assert_same(*runs)


@pytest.mark.parametrize("name", ["koala_pp_foreach", "koala_m"])
def test_update_takes_one_element_tensors_of_any_shape(name):
    cls, kwargs = KOALAS[name]
    runs = []
    for shape in ((), (1, 1)):
        model = double_mlp()
        opt = cls(model.parameters(), **kwargs)
        for k in range(2):
            losses = double_losses(model, opt, k)
            opt.update(losses.mean().reshape(shape), losses.square().mean().reshape(shape))
        runs.append(_everything(model, opt))
    _assert_same(*runs)


@pytest.mark.parametrize("bad", [True, "1.0", None, [1.0]], ids=["bool", "str", "none", "list"])
def test_closure_returning_no_loss_is_a_type_error(bad):
    model = double_mlp()
    opt = KOALAM(model.parameters())
    with pytest.raises(TypeError, match="must be the loss"):
        opt.step(lambda: (double_losses(model, opt, 0), bad)[1])


# ----------------------------------------------------------------------------------------------- hyperparameters
@pytest.mark.parametrize("name", sorted(KOALAS))
def test_one_element_tensor_hyperparameters_of_any_shape(name):
    """Every hyperparameter given as a (1, 1) tensor, at construction or put into the group after a step, runs
    as the 0-d tensor of that value does (torch.optim accepts such an lr; it used to crash the multi-tensor step
    after R and the counters were written)."""
    cls, kwargs = KOALAS[name]
    for key, value in NUMBERS[cls].items():
        runs = []
        for shape in ((), (1, 1), "later"):
            model = double_mlp()
            tensor = torch.tensor(value, dtype=torch.float64)
            opt = cls(model.parameters(), **{**kwargs, key: tensor if shape == "later" else tensor.reshape(shape)})
            for k in range(3):
                if shape == "later" and k == 1:
                    opt.param_groups[0][key] = tensor.reshape(1, 1, 1)
                opt.step(loss=double_losses(model, opt, k))
            runs.append(_everything(model, opt))
        _assert_same(runs[0], runs[1])
        _assert_same(runs[0], runs[2])


@pytest.mark.parametrize("name", sorted(KOALAS))
def test_a_hyperparameter_construction_refuses_raises_before_anything_is_written(name):
    """A None, a string, a list, a complex number, an int beyond float range, a bool or a two-element tensor put
    into a param group after construction, or a number out of range (but lr: a schedule's, only its finiteness is
    checked at every step): ValueError from step/update/predict, parameters and state unchanged."""
    cls, kwargs = KOALAS[name]
    bad_values = [None, "0.1", [0.1], 1j, 10**400, torch.tensor(True), torch.tensor([0.1, 0.2]), -1.0]
    for key, value in NUMBERS[cls].items():
        model = double_mlp()
        opt = cls(model.parameters(), **kwargs)
        opt.step(loss=double_losses(model, opt, 0))
        for bad in bad_values:
            if (bad is None and key == "r_clip") or (isinstance(bad, float) and key == "lr"):  # None: no clip
                continue
            losses = double_losses(model, opt, 1)
            before = _everything(model, opt)
            opt.param_groups[0][key] = bad
            for call in (lambda opt=opt, losses=losses: opt.step(loss=losses),
                         lambda opt=opt, losses=losses: opt.update(losses.mean(), losses.square().mean()),
                         opt.predict):
                with pytest.raises(ValueError, match=f"Invalid {key}"):
                    call()
                _assert_same(before, _everything(model, opt))
            opt.param_groups[0][key] = value
        opt.step(loss=double_losses(model, opt, 2))  # and the optimizer goes on


# -------------------------------------------------------------------------------------------- loading a checkpoint
def _output_model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 3).double()


def _observe(model, opt, k):
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (2,), generator=g)
    opt.step(lambda: model(x), y)


@pytest.mark.parametrize("name", [*sorted(KOALAS), "loko", "full_kalman"])
def test_a_number_step_in_a_loaded_state_dict_is_converted(name):
    """torch's test_load_nontensor_step: every ``step`` in the checkpoint made a Python number; the loaded state
    holds the tensor of the optimizer's own dtype and the run goes on as the uninterrupted one."""
    if name in ("loko", "full_kalman"):
        cls, kwargs, make, advance = (LoKO if name == "loko" else FullKalman), {}, _output_model, _observe
    else:
        (cls, kwargs), make = KOALAS[name], double_mlp

        def advance(model, opt, k):
            opt.step(loss=double_losses(model, opt, k))

    model = make()
    opt = cls(model.parameters(), **kwargs)
    for k in range(2):
        advance(model, opt, k)
    saved = _save_load({"model": model.state_dict(), "optim": opt.state_dict()})
    dtypes = {}
    for key, values in saved["optim"]["state"].items():
        if "step" in values:
            dtypes[key] = values["step"].dtype
            values["step"] = values["step"].item()
    assert dtypes
    twin = make(seed=1)
    twin.load_state_dict(saved["model"])
    twin_opt = cls(twin.parameters(), **kwargs)
    twin_opt.load_state_dict(saved["optim"])
    params = list(twin.parameters())
    for key, dtype in dtypes.items():
        step = twin_opt.state[params[key]]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == dtype and step.dim() == 0
    for k in range(2, 4):
        advance(model, opt, k)
        advance(twin, twin_opt, k)
    _assert_same(_everything(model, opt), _everything(twin, twin_opt))


@pytest.mark.parametrize("bad", ["3", None, True, 2.5, [3.0]], ids=["str", "none", "bool", "fraction", "list"])
def test_a_step_that_is_no_number_refuses_the_state_dict(bad):
    """KOALA's ``step`` counts (float32), LoKO's (int64): anything else is not this optimizer's state, refused before
    anything is loaded."""
    for cls, make, advance in ((KOALAM, double_mlp, lambda m, o, k: o.step(loss=double_losses(m, o, k))),
                               (LoKO, _output_model, _observe)):
        model = make()
        opt = cls(model.parameters())
        advance(model, opt, 0)
        saved = copy.deepcopy(opt.state_dict())
        key = next(k for k, v in saved["state"].items() if "step" in v)
        if bad == 2.5 and cls is KOALAM:
            continue  # a float32 count may hold 2.5
        saved["state"][key]["step"] = bad
        fresh = cls(make(seed=1).parameters())
        with pytest.raises(ValueError, match="'step'"):
            fresh.load_state_dict(saved)
        assert not fresh.state


# ---------------------------------------------------------------------------------------------- the filter's phase
@pytest.mark.parametrize("name", sorted(KOALAS))
def test_the_state_holds_tensors_only_and_the_state_dict_carries_the_phase(name):
    cls, kwargs = KOALAS[name]
    model = double_mlp()
    opt = cls(model.parameters(), **kwargs)
    expect = []
    for k, how in enumerate(["step", "predict", "update", "update_nan", "predict"]):
        if how == "step":
            opt.step(loss=double_losses(model, opt, k))
        elif how == "predict":
            opt.predict()
        else:
            losses = double_losses(model, opt, k)
            mean = torch.tensor(float("nan"), dtype=torch.float64) if how == "update_nan" else losses.mean()
            opt.update(mean, losses.square().mean())
        for values in opt.state.values():
            assert all(isinstance(v, torch.Tensor) for v in values.values()), values.keys()
        leader = opt.state_dict()["state"][0]
        assert leader["predicted"].dtype == torch.bool and leader["prediction_gate"].dtype == torch.bool
        expect.append((bool(leader["predicted"]), bool(leader["prediction_gate"])))
    # step() and predict() end predicted; update() does not, and a skipped one closes the gate of the next
    # prediction (KOALA++'s fused update reports no outcome: its prediction is a no-op either way).
    gate_after_skip = name not in ("koala_pp", "koala_pp_paper") or not _koala_pp_op.available()
    assert expect[:3] == [(True, True), (True, True), (False, True)]
    assert expect[3] == (False, not gate_after_skip)
    assert expect[4] == (True, True)


@pytest.mark.parametrize("name", ["koala_m", "koala_v", "koala_pp_foreach"])
@pytest.mark.parametrize("then", ["step", "update"])
def test_a_checkpoint_with_the_phase_as_a_python_bool_still_loads(name, then):
    """Checkpoints from before the phase was saved as tensors hold ``predicted`` as a bool and no gate."""
    cls, kwargs = KOALAS[name]
    model = double_mlp()
    opt = cls(model.parameters(), **kwargs)
    opt.step(loss=double_losses(model, opt, 0))
    if then == "update":
        losses = double_losses(model, opt, 1)
        opt.update(losses.mean(), losses.square().mean())
    saved = _save_load({"model": model.state_dict(), "optim": opt.state_dict()})
    leader = saved["optim"]["state"][0]
    leader["predicted"] = bool(leader.pop("predicted"))
    del leader["prediction_gate"]
    twin = double_mlp(seed=1)
    twin.load_state_dict(saved["model"])
    twin_opt = cls(twin.parameters(), **kwargs)
    twin_opt.load_state_dict(saved["optim"])
    for run in ((model, opt), (twin, twin_opt)):
        for k in range(2, 4):
            run[1].step(loss=double_losses(*run, k))
    _assert_same(_everything(model, opt), _everything(twin, twin_opt))


@pytest.mark.parametrize("bad", [torch.tensor([True, False]), torch.tensor(1.0), "yes"], ids=["two", "float", "str"])
def test_a_malformed_phase_refuses_the_state_dict(bad):
    model = double_mlp()
    opt = KOALAM(model.parameters())
    opt.step(loss=double_losses(model, opt, 0))
    for key in ("predicted", "prediction_gate"):
        saved = copy.deepcopy(opt.state_dict())
        saved["state"][0][key] = bad
        fresh = KOALAM(double_mlp(seed=1).parameters())
        with pytest.raises(ValueError, match=key):
            fresh.load_state_dict(saved)
        assert not fresh.state


@pytest.mark.parametrize("name", sorted(KOALAS))
def test_validating_changed_groups_inside_step_never_synchronises(name):
    """The groups a step validates again (after a load, or a tensor hyperparameter of another shape put in) hold
    tensors that are checked by shape and dtype only, their values on the device."""
    from conftest import NoSync

    cls, kwargs = KOALAS[name]
    model = double_mlp()
    opt = cls(model.parameters(), **{**kwargs, "lr": torch.tensor(NUMBERS[cls]["lr"], dtype=torch.float64)})
    opt.step(loss=double_losses(model, opt, 0))
    saved = _save_load(opt.state_dict())
    fresh = cls(model.parameters(), **kwargs)
    fresh.load_state_dict(saved)  # the loaded group's lr is another tensor: validated again at the next step
    losses = double_losses(model, fresh, 1)
    with NoSync():
        fresh.step(loss=losses)
    fresh.param_groups[0]["alpha_r"] = torch.tensor([[0.8]], dtype=torch.float64)
    losses = double_losses(model, fresh, 2)
    with NoSync():
        fresh.step(loss=losses)
    assert fresh.param_groups[0]["alpha_r"].dim() == 0
