"""The multi-tensor fast path must reproduce the single-tensor reference (float64, 1e-12)."""

import pytest
import torch

from conftest import OPTIMIZERS

SHAPES = [(3,), (4, 5), (2, 3, 3, 3), (1,), (7, 1), (16, 8), (2, 2, 2, 2, 2)]


def _run(cls, kwargs, foreach, *, steps=8, none_schedule=None, dtype=torch.float64, seed=0):
    """Preset random gradients (some None) on a bag of shapes; returns params and state after ``steps``."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]
    opt = cls(params, foreach=foreach, **kwargs)
    for k in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            # A correlated gradient sequence, as in training: H_k close to H_{k-1}.
            p.grad = g if p.grad is None else 0.7 * p.grad + 0.3 * g
            if none_schedule is not None and none_schedule(k, i):
                p.grad = None
        losses = torch.rand(6, generator=gen, dtype=dtype) + 0.5
        opt.step(loss=losses)
    return params, opt


@pytest.mark.parametrize("schedule", [None, lambda k, i: (k + i) % 3 == 0, lambda k, i: i == 2 or k == 0],
                         ids=["all_grads", "rotating_none", "never_and_late"])
def test_fast_path_matches_reference(optimizer_spec, schedule):
    cls, kwargs = optimizer_spec
    p_ref, opt_ref = _run(cls, kwargs, foreach=False, none_schedule=schedule)
    p_fast, opt_fast = _run(cls, kwargs, foreach=True, none_schedule=schedule)
    for a, b in zip(p_ref, p_fast, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for pa, pb in zip(p_ref, p_fast, strict=True):
        sa, sb = opt_ref.state[pa], opt_fast.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_parameters_actually_move(name):
    cls, kwargs = OPTIMIZERS[name]
    before = _run(cls, kwargs, foreach=True, steps=0)[0]
    after = _run(cls, kwargs, foreach=True, steps=3)[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_many_random_shapes_koala_pp():
    from kalmanopt import KOALAPlusPlus

    gen = torch.Generator().manual_seed(1)
    shapes = [tuple(int(d) for d in torch.randint(1, 6, (int(torch.randint(1, 4, (1,), generator=gen)),),
                                                  generator=gen)) for _ in range(40)]
    runs = []
    for foreach in (False, True):
        g2 = torch.Generator().manual_seed(2)
        params = [torch.randn(s, generator=g2, dtype=torch.float64).requires_grad_() for s in shapes]
        opt = KOALAPlusPlus(params, lr=0.3, sigma=0.2, q=0.05, weight_decay=1e-3, foreach=foreach)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g2, dtype=torch.float64)
            opt.step(loss=torch.tensor(1.3, dtype=torch.float64))
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_several_param_groups_and_a_reused_scratch_buffer(optimizer_spec):
    """Each group's effective gradient lives in its own reused buffer; results still equal the reference."""
    cls, kwargs = optimizer_spec
    runs = []
    for foreach in (False, True):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
        opt = cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.2}], foreach=foreach, **kwargs)
        for k in range(4):
            for i, p in enumerate(params):
                p.grad = None if (i + k) % 4 == 0 else torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step(loss=torch.rand(5, generator=gen, dtype=torch.float64) + 0.5)
        runs.append(params)
        if foreach:
            buffers = opt.__dict__["_scratch_buffers"]
            assert len(buffers) == 2 and "_scratch_buffers" not in opt.state_dict()
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
