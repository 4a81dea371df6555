"""Checkpoints: weights-only loadable, and resuming reproduces the uninterrupted run bit for bit."""

import io

import torch

from conftest import tiny_mlp, train


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_loads_weights_only(optimizer_spec):
    cls, kwargs = optimizer_spec
    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, 3)
    sd = _save_load(opt.state_dict())
    assert set(sd) == {"state", "param_groups"}
    for values in sd["state"].values():
        for v in values.values():
            assert isinstance(v, torch.Tensor | bool | int | float)


def test_resume_is_bit_exact(optimizer_spec):
    cls, kwargs = optimizer_spec
    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, 6)
    straight = [p.detach().clone() for p in model.parameters()]

    model = tiny_mlp()
    opt = cls(model.parameters(), **kwargs)
    train(model, opt, 3)
    checkpoint = _save_load({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed_model = tiny_mlp(seed=123)  # different init: everything must come from the checkpoint
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = cls(resumed_model.parameters(), **kwargs)
    resumed.load_state_dict(checkpoint["opt"])
    train(resumed_model, resumed, 3, seed=3)
    for a, b in zip(straight, resumed_model.parameters(), strict=True):
        assert torch.equal(a, b.detach())


def test_load_keeps_float32_state_for_bfloat16_params():
    from kalmanopt import KOALAPlusPlus

    model = tiny_mlp(dtype=torch.bfloat16)
    opt = KOALAPlusPlus(model.parameters())
    train(model, opt, 2)
    sd = _save_load(opt.state_dict())
    opt2 = KOALAPlusPlus(model.parameters())
    opt2.load_state_dict(sd)
    for p in model.parameters():
        assert opt2.state[p]["gain"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["gain"], opt.state[p]["gain"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
