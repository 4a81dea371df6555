"""KOALA++'s ``length_bound``: no correction longer than L times AdamW's step (before momentum) at the same lr.

The oracle is the definition read off the parameters: without the metric and momentum, a step moves each tensor by
the correction itself, ``gamma * (v + q h)``, and the bound says ``||theta_k - theta_{k-1}|| <= L * lr * ||h_k||``
(the cap ``lr / q`` times ``q ||h||``). Each bound test also checks that the same run without the option breaks
the bound, so that it cannot pass with the option ignored.
"""
import io

import pytest
import torch

from kalmanopt import KOALAPlusPlus

from conftest import double_losses, double_mlp, run_koala_pp, tiny_mlp

# correlated gradients (run_koala_pp) at a step that binds the cap: the covariance term lengthens the correction
SHAPES = [(6, 5), (5,), (3, 6)]
PLAIN = dict(lr=0.05, precondition=False, momentum=0.0, lr_adaptation=None)


def _ratios(options, *, steps=12, block="tensor"):
    """Per step and block, ||theta_k - theta_{k-1}|| / (lr ||h_k||)."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
    opt = KOALAPlusPlus(params, block=block, **options)
    ratios = []
    for _ in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = g if p.grad is None else 0.8 * p.grad + 0.2 * g
        before = [p.detach().clone() for p in params]
        opt.step(loss=torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
        moves = [(p.detach() - b).square().sum() for p, b in zip(params, before, strict=True)]
        grads = [p.grad.square().sum() for p in params]
        if block == "group":
            moves, grads = [sum(moves)], [sum(grads)]
        ratios.append([float((m / g).sqrt()) / options["lr"] for m, g in zip(moves, grads, strict=True)])
    return torch.tensor(ratios)


@pytest.mark.parametrize("block", ["tensor", "group"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bound", [1.0, 1.2])
def test_no_step_is_longer_than_the_bound(foreach, block, bound):
    free = _ratios({**PLAIN, "foreach": foreach}, block=block)
    bounded = _ratios({**PLAIN, "foreach": foreach, "length_bound": bound}, block=block)
    assert free.max() > bound * 1.05  # without it the covariance term makes steps longer than the bound
    assert bounded.max() <= bound * (1 + 1e-9)
    assert (bounded - bound).abs().min() < 1e-9  # and it binds (the capped step, exactly as long as allowed)
    # a step already within the bound is the step without it
    within = free <= bound * (1 - 1e-6)
    first = int(torch.nonzero(~within.all(1))[0]) if not within.all() else len(free)
    assert torch.allclose(bounded[:first], free[:first], rtol=1e-12, atol=0)


@pytest.mark.parametrize("block", ["tensor", "group"])
def test_reference_and_multi_tensor_agree(block):
    options = dict(lr=3e-2, length_bound=1.0, block=block)  # metric, momentum, lr_adaptation: the default preset's
    ref, _ = run_koala_pp(SHAPES, {**options, "foreach": False}, steps=15)
    fast, _ = run_koala_pp(SHAPES, {**options, "foreach": True}, steps=15)
    for a, b in zip(ref, fast, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    free, _ = run_koala_pp(SHAPES, {**options, "foreach": True, "length_bound": None}, steps=15)
    assert any(not torch.allclose(a, b) for a, b in zip(fast, free, strict=True))


def test_bfloat16_state_follows_float32():
    options = dict(lr=3e-2, length_bound=1.0)
    full, _ = run_koala_pp(SHAPES, options, steps=10, dtype=torch.float32)
    bf16, opt = run_koala_pp(SHAPES, {**options, "state_dtype": torch.bfloat16}, steps=10, dtype=torch.float32)
    assert all(s["gain"].dtype == torch.bfloat16 for s in opt.state.values() if "gain" in s)
    for a, b in zip(full, bf16, strict=True):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)


def test_a_bounded_group_is_not_fused_and_fused_true_refuses():
    model = tiny_mlp()
    opt = KOALAPlusPlus([{"params": list(model[0].parameters()), "length_bound": 1.0},
                         {"params": list(model[2].parameters())}], lr=1e-2)
    assert not opt._fused_group(opt.param_groups[0])
    assert opt._fused_group(opt.param_groups[1])  # the group without it keeps the default fused path
    with pytest.raises(RuntimeError, match="length_bound"):
        KOALAPlusPlus(tiny_mlp().parameters(), length_bound=1.0, fused=True)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), torch.tensor(1.0)])
def test_invalid_bounds_are_refused(bad):
    with pytest.raises(ValueError, match="length_bound"):
        KOALAPlusPlus(tiny_mlp().parameters(), length_bound=bad)


def test_a_step_without_a_cap_refuses_it():
    with pytest.raises(ValueError, match="no cap"):
        KOALAPlusPlus(tiny_mlp().parameters(), preset="paper", length_bound=1.0)
    KOALAPlusPlus(tiny_mlp().parameters(), preset="paper", max_step=0.01, length_bound=1.0)  # the paper's cap


def test_resume_bit_for_bit_and_old_checkpoints():
    def run(model, opt, ks):
        for k in ks:
            opt.step(loss=double_losses(model, opt, k))

    model, other = double_mlp(), double_mlp()
    opt = KOALAPlusPlus(model.parameters(), lr=2e-2, length_bound=1.0, foreach=True)
    run(model, opt, range(6))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    run(model, opt, range(6, 12))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    other.load_state_dict(saved["model"])
    resumed = KOALAPlusPlus(other.parameters(), lr=2e-2, foreach=True)  # the bound comes from the checkpoint
    resumed.load_state_dict(saved["opt"])
    assert resumed.param_groups[0]["length_bound"] == 1.0
    run(other, resumed, range(6, 12))
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    # a checkpoint from before the option: its groups get none
    old = saved["opt"]
    for g in old["param_groups"]:
        del g["length_bound"]
    fresh = KOALAPlusPlus(double_mlp().parameters(), lr=2e-2)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["length_bound"] is None
