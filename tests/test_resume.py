"""Resume from a checkpoint is bit exact: ``state_dict()`` holds everything that decides the next step.

Besides the state tensors, that is the filter's phase: whether the prediction for the next measurement has been made
(``step()`` predicts ahead, ``update()`` does not), and whether the last ``update()`` was skipped, in which case its
prediction still stands and the next ``predict()`` must not move the parameters again (KOALA-M's prediction moves
them). The property test runs any sequence of good, skipped and failed steps through every way in, checkpoints at
any point with ``torch.save``/``torch.load(weights_only=True)`` into a fresh model and optimizer, and requires the
two runs to go on bit for bit.
"""

import copy
import io

import pytest
import torch

pytest.importorskip("hypothesis", reason="needs hypothesis: install kalmanopt[test]")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kalmanopt import KOALAM, KOALAV, KOALAPlusPlus  # noqa: E402

from conftest import double_losses, double_mlp  # noqa: E402

CONFIGS = {
    "koala_pp": (KOALAPlusPlus, {}),  # the fused kernel where it is built
    "koala_pp_foreach": (KOALAPlusPlus, {"foreach": True}),
    "koala_pp_reference": (KOALAPlusPlus, {"foreach": False}),
    "koala_pp_paper": (KOALAPlusPlus, {"preset": "paper", "lr": 0.5}),
    "koala_pp_paper_foreach": (KOALAPlusPlus, {"preset": "paper", "lr": 0.5, "foreach": True}),
    "koala_pp_paper_reference": (KOALAPlusPlus, {"preset": "paper", "lr": 0.5, "foreach": False}),
    "koala_v": (KOALAV, {"lr": 0.5, "weight_decay": 1e-2}),
    "koala_m": (KOALAM, {"lr": 0.5}),
    "koala_m_online_qw": (KOALAM, {"lr": 0.5, "qw": None, "foreach": False}),
}

# step / closure: good steps; nan_loss, inf_grad: skipped steps; fail_*: exceptions raised before anything is
# written; predict, update, nan_update: the papers' interface, a pair or not (update() predicts first if needed).
OPS = ["step", "closure", "nan_loss", "inf_grad", "fail_loss", "fail_lr", "fail_closure", "predict", "update",
       "nan_update"]
SETTINGS = dict(max_examples=8, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.usefixtures("one_thread")


def _apply(op, k, model, opt):
    """Operation ``op`` on batch ``k``; the expected exceptions of the failing ones are swallowed here."""
    if op == "step":
        opt.step(loss=double_losses(model, opt, k))
    elif op == "closure":
        opt.step(lambda: double_losses(model, opt, k))
    elif op == "nan_loss":
        losses = double_losses(model, opt, k)
        losses[1] = float("nan")
        opt.step(loss=losses)
    elif op == "inf_grad":
        losses = double_losses(model, opt, k)
        next(model.parameters()).grad[0, 0] = float("inf")
        opt.step(loss=losses)
    elif op == "fail_loss":  # per-token losses not flattened
        losses = double_losses(model, opt, k)
        with pytest.raises(ValueError, match="loss must be 0-d"):
            opt.step(loss=losses.reshape(2, 3))
    elif op == "fail_lr":  # a schedule that produced a NaN learning rate
        losses = double_losses(model, opt, k)
        lr = opt.param_groups[0]["lr"]
        opt.param_groups[0]["lr"] = float("nan")
        with pytest.raises(ValueError, match="Invalid lr"):
            opt.step(loss=losses)
        opt.param_groups[0]["lr"] = lr
    elif op == "fail_closure":  # the user's closure raises (after step() made the pending prediction)
        def closure():
            raise KeyError("data loader exhausted")

        with pytest.raises(KeyError):
            opt.step(closure)
    elif op == "predict":
        opt.predict()
    elif op == "update":
        losses = double_losses(model, opt, k)
        opt.update(losses.mean(), losses.square().mean())
    elif op == "nan_update":
        double_losses(model, opt, k)
        opt.update(torch.tensor(float("nan"), dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    else:
        raise AssertionError(op)


def _checkpoint(model, opt):
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_same(run_a, run_b):
    (model_a, opt_a), (model_b, opt_b) = run_a, run_b
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for key, values in sa["state"].items():
        assert values.keys() == sb["state"][key].keys(), key
        for name, value in values.items():
            assert isinstance(value, torch.Tensor), (key, name)
            other = sb["state"][key][name]
            assert value.dtype == other.dtype and torch.equal(value, other), (key, name)


def _resumed(name, ops, cut):
    """The run of ``ops`` uninterrupted, and the same run restarted from a checkpoint taken after ``ops[:cut]``."""
    cls, kwargs = CONFIGS[name]
    model = double_mlp(0)
    opt = cls(model.parameters(), **kwargs)
    for k, op in enumerate(ops[:cut]):
        _apply(op, k, model, opt)
    saved = _checkpoint(model, opt)
    twin = double_mlp(1)  # other weights: everything has to come from the checkpoint
    twin.load_state_dict(saved["model"])
    twin_opt = cls(twin.parameters(), **kwargs)
    twin_opt.load_state_dict(saved["optim"])
    for run in ((model, opt), (twin, twin_opt)):
        for k, op in enumerate(ops[cut:], start=cut):
            _apply(op, k, *run)
    return (model, opt), (twin, twin_opt)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(**SETTINGS)
@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=5))
def test_resume_is_bit_exact_after_any_sequence_of_steps(name, ops):
    """Checkpointed after each operation of ``ops`` in turn; the continuation ends with what reads every part of
    the phase: a prediction (explicit, then the one a step makes) and a measurement."""
    ops = [*ops, "predict", "update", "step"]
    for cut in range(1, len(ops) - 2):
        run, resumed = _resumed(name, ops, cut)
        _assert_same(run, resumed)


@pytest.mark.parametrize("then", ["predict_update", "step", "update"])
def test_koala_m_resume_after_a_skipped_update_is_bit_exact(then):
    """The issue's case: a checkpoint right after a skipped update(); its prediction still stands, so the next
    prediction must leave the parameters where they are, in the resumed run too."""
    ops = ["step", "step", "step", "predict", "nan_update"]
    ops += {"predict_update": ["predict", "update"], "step": ["step"], "update": ["update"]}[then]
    run, resumed = _resumed("koala_m", ops, cut=5)
    _assert_same(run, resumed)


@pytest.mark.parametrize("name", ["koala_m", "koala_v", "koala_pp_paper_foreach"])
def test_deep_copy_of_the_optimizer_keeps_the_phase(name):
    """copy.deepcopy (pickle) of a model and its optimizer, taken after a skipped update(), goes on bit for bit."""
    cls, kwargs = CONFIGS[name]
    model = double_mlp(0)
    opt = cls(model.parameters(), **kwargs)
    ops = ["step", "predict", "nan_update", "predict", "update", "step"]
    for k, op in enumerate(ops[:3]):
        _apply(op, k, model, opt)
    twin, twin_opt = copy.deepcopy((model, opt))
    for run in ((model, opt), (twin, twin_opt)):
        for k, op in enumerate(ops[3:], start=3):
            _apply(op, k, *run)
    _assert_same((model, opt), (twin, twin_opt))


def test_distributed_checkpoint_keeps_the_phase(tmp_path):
    """torch.distributed.checkpoint (one process): the recipe get_state_dict / dcp.save, then get_state_dict of a
    fresh model and optimizer / dcp.load / set_state_dict, right after a skipped update() of KOALA-M."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ops = ["step", "step", "predict", "nan_update", "predict", "update", "step"]
    model = double_mlp(0)
    opt = KOALAM(model.parameters(), lr=0.5)
    for k, op in enumerate(ops[:4]):
        _apply(op, k, model, opt)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path), no_dist=True)
    twin = double_mlp(1)
    twin_opt = KOALAM(twin.parameters(), lr=0.5)
    model_sd, optim_sd = get_state_dict(twin, twin_opt)  # the template: a fresh state, the phase included
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path), no_dist=True)
    set_state_dict(twin, twin_opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    for run in ((model, opt), (twin, twin_opt)):
        for k, op in enumerate(ops[4:], start=4):
            _apply(op, k, *run)
    _assert_same((model, opt), (twin, twin_opt))
