"""The multi-tensor fast path must reproduce the single-tensor reference (float64, 1e-12)."""

import pytest
import torch

from kalmanopt import KOALAM, KOALAV, KOALAPlusPlus

from conftest import OPTIMIZERS, run_koala_pp, same_step_lr

SHAPES = [(3,), (4, 5), (2, 3, 3, 3), (1,), (7, 1), (16, 8), (2, 2, 2, 2, 2)]


def _run(cls, kwargs, foreach, *, steps=8, none_schedule=None, dtype=torch.float64, seed=0):
    """Preset random gradients (some None) on a bag of shapes; returns params and state after ``steps``."""
    return run_koala_pp(SHAPES, {**kwargs, "foreach": foreach}, steps=steps, dtype=dtype, seed=seed,
                        none_schedule=none_schedule, cls=cls)


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
        opt = KOALAPlusPlus(params, lr=3e-4, sigma=0.2, q=0.05, weight_decay=1e-3, foreach=foreach)
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
        second = {"params": params[3:], "lr": same_step_lr(cls, 0.2, kwargs)}
        opt = cls([{"params": params[:3]}, second], foreach=foreach, **kwargs)
        for k in range(4):
            for i, p in enumerate(params):
                p.grad = None if (i + k) % 4 == 0 else torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step(loss=torch.rand(5, generator=gen, dtype=torch.float64) + 0.5)
        runs.append(params)
        if foreach:
            buffers = opt.__dict__["_scratch_buffers"]
            # one effective-gradient buffer per group, plus the KOALA++ default's two temporaries per group
            per_group = 3 if cls is KOALAPlusPlus and opt.param_groups[0]["precondition"] else 1
            assert len(buffers) == 2 * per_group and "_scratch_buffers" not in opt.state_dict()
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# Every per-group option of each optimizer takes a different value in each of three groups, so a fast path that
# read one group's value for another (or a default) would leave the reference.
PER_GROUP = {
    "koala_pp": (KOALAPlusPlus, [
        # the AdamW-unit step rule (loss_fraction, lr the cap) in one group, the paper's (lr * loss / S, capped at
        # lr * max_step or not) in the others
        dict(lr=2e-3, loss_fraction=0.7, sigma=0.2, q=0.05, r=None, alpha_r=0.9, weight_decay=0.0, symmetric=True,
             r_stat="second_moment", block="tensor", precondition=False, momentum=0.0, max_step=None, r_clip=None,
             beta2=0.999, eps=1e-8),
        dict(lr=0.3, loss_fraction=None, sigma=0.05, q=0.2, r=0.3, alpha_r=0.9, weight_decay=1e-2, symmetric=False,
             r_stat="squared_mean", block="group", precondition=True, momentum=0.9, max_step=0.03, r_clip=100.0,
             beta2=0.99, eps=1e-6),
        dict(lr=0.8, loss_fraction=None, sigma=0.5, q=0.0, r=None, alpha_r=0.5, weight_decay=5e-3, symmetric=True,
             r_stat="mean_variance", block="group", precondition=False, momentum=0.5, max_step=0.1, r_clip=5.0,
             beta2=0.9, eps=1e-7),
    ]),
    "koala_v": (KOALAV, [
        dict(lr=0.5, sigma=0.1, q=1.0, r=None, alpha_r=0.9, weight_decay=0.0, r_stat="second_moment", r_clip=None),
        dict(lr=0.3, sigma=0.4, q=0.05, r=0.3, alpha_r=0.9, weight_decay=1e-2, r_stat="squared_mean", r_clip=100.0),
        dict(lr=0.8, sigma=0.05, q=0.3, r=None, alpha_r=0.6, weight_decay=5e-3, r_stat="mean_variance", r_clip=2.0),
    ]),
    "koala_m": (KOALAM, [
        dict(lr=0.5, sw=0.1, sc=0.0, sv=0.1, a=0.9, qw=0.01, qv=0.01, r=None, alpha_r=0.9, weight_decay=0.0,
             r_stat="second_moment", r_clip=None),
        dict(lr=0.3, sw=0.3, sc=0.05, sv=0.2, a=0.8, qw=None, qv=0.02, r=0.5, alpha_r=0.9, weight_decay=1e-2,
             r_stat="squared_mean", r_clip=100.0),
        dict(lr=0.8, sw=0.05, sc=-0.01, sv=0.05, a=0.5, qw=0.03, qv=0.0, r=None, alpha_r=0.6, weight_decay=5e-3,
             r_stat="mean_variance", r_clip=2.0),
    ]),
}
GROUP_SLICES = [slice(0, 2), slice(2, 5), slice(5, None)]


def _run_groups(cls, options, foreach, *, steps=6, seed=4):
    """Three param groups with their own options; ``foreach`` is one bool for all, or one per group."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
    per_group = foreach if isinstance(foreach, list) else [foreach] * len(options)
    groups = [{"params": params[sl], **opts, "foreach": f}
              for sl, opts, f in zip(GROUP_SLICES, options, per_group, strict=True)]
    opt = cls(groups)
    for k in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = g if p.grad is None else 0.7 * p.grad + 0.3 * g
            if (k + i) % 5 == 0:
                p.grad = None
        opt.step(loss=torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
    return params, opt


def _assert_same_run(run_a, run_b):
    (pa_list, opt_a), (pb_list, opt_b) = run_a, run_b
    for a, b in zip(pa_list, pb_list, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for pa, pb in zip(pa_list, pb_list, strict=True):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-12, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", sorted(PER_GROUP))
def test_fast_path_matches_reference_with_every_option_per_group(name):
    cls, options = PER_GROUP[name]
    assert all(set(o) == set(options[0]) for o in options)
    for key in options[0]:
        assert len({repr(o[key]) for o in options}) > 1, f"{key} takes one value in every group"
    reference = _run_groups(cls, options, False)
    _assert_same_run(reference, _run_groups(cls, options, True))
    # groups on different paths in one optimizer
    _assert_same_run(reference, _run_groups(cls, options, [True, False, True]))
    # and the groups really differ: the same run with group 0's options everywhere ends elsewhere
    uniform = _run_groups(cls, [options[0]] * 3, False)
    assert not torch.allclose(reference[0][-1], uniform[0][-1])
