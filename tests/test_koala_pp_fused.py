"""The fused KOALA++ kernel (``fused=True``, and the default on CPU): same step as the reference, same guards."""

import copy
import itertools

import pytest
import torch

from kalmanopt import KOALAPlusPlus
from kalmanopt.optim import _koala_pp_fused, koala_pp

from conftest import NoSync, assert_unchanged, run_koala_pp, skipped_steps, snapshot, spoiled_step

needs_kernel = pytest.mark.skipif(_koala_pp_fused.load() is None,
                                  reason=f"no fused kernel here: {_koala_pp_fused.unavailable_reason()}")

SHAPES = [(3,), (4, 5), (2, 3, 3, 3), (1,), (7, 1), (16, 8), (2, 2, 2, 2, 2), (3000,)]  # 3000: several blocks
CONFIGS = {
    "adaptive": {"lr": 5e-4},
    "adaptive_wd_fixed_r": {"lr": 5e-4, "weight_decay": 1e-2, "r": 0.3},
    "vanilla_no_momentum": {"lr": 5e-4, "symmetric": False, "momentum": 0.0},
    "metric_only_capped": {"lr": 0.4, "momentum": 0.0, "max_step": 0.05, "r": None, "r_stat": "mean_variance"},
    "momentum_no_metric": {"lr": 3e-4, "precondition": False, "momentum": 0.5, "r_clip": None},
    "paper": {"lr": 0.5, "preset": "paper"},
    "paper_wd_squared_mean": {"lr": 0.7, "preset": "paper", "weight_decay": 5e-3, "r_stat": "squared_mean"},
}
# Every hyperparameter the kernel reads from its argument array takes a value of its own (sigma != q, and so on), so
# that two slots swapped in the array change the step (test_every_kernel_slot_is_read_from_its_own_place). The cap
# (max_step) binds on some steps, and r_clip on some statistics. With a fixed r, alpha_r and r_clip are not read; with
# an estimated R, r is not: the two configurations together read every slot.
DISTINCT = {
    "distinct_fixed_r": dict(lr=0.37, sigma=0.23, q=0.07, weight_decay=3e-3, beta2=0.95, eps=0.02, momentum=0.8,
                             max_step=0.6, r=0.45, alpha_r=0.55, r_clip=1.3, r_stat="squared_mean"),
    "distinct_estimated_r": dict(lr=0.37, sigma=0.23, q=0.07, weight_decay=3e-3, beta2=0.95, eps=0.02, momentum=0.8,
                                 max_step=0.6, r=None, alpha_r=0.55, r_clip=1.3, r_stat="squared_mean"),
}
CONFIGS.update(DISTINCT)


def _run(kwargs, *, steps=8, none_schedule=None, dtype=torch.float64, seed=0, groups=None):
    return run_koala_pp(SHAPES, kwargs, steps=steps, dtype=dtype, seed=seed, none_schedule=none_schedule,
                        groups=groups)


def _run_interrupted(*, steps, seed, at, interrupt):
    """The run of ``_run({"lr": 5e-4, "fused": True}, steps=steps, seed=seed)`` (same gradients and losses, float64),
    with ``opt = interrupt(opt, params)`` before step ``at``."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
    opt = KOALAPlusPlus(params, lr=5e-4, fused=True)
    for k in range(steps):
        if k == at:
            opt = interrupt(opt, params)
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = g if p.grad is None else 0.7 * p.grad + 0.3 * g
        opt.step(loss=torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
    return params, opt


def _assert_same(run_a, run_b, tol=1e-12, params_only=False):
    (pa, oa), (pb, ob) = run_a, run_b
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if params_only:
        return
    for a, b in zip(pa, pb, strict=True):
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, sb[key], rtol=tol, atol=tol, msg=key)


@needs_kernel
@pytest.mark.parametrize("schedule", [None, lambda k, i: (k + i) % 3 == 0, lambda k, i: i == 2 or k == 0],
                         ids=["all_grads", "rotating_none", "never_and_late"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fused_matches_reference_float64(config, schedule):
    reference = _run({**CONFIGS[config], "foreach": False}, none_schedule=schedule)
    fused = _run({**CONFIGS[config], "fused": True}, none_schedule=schedule)
    assert "_fused_work" in fused[1].__dict__  # the kernel really ran
    _assert_same(reference, fused)
    for a, b in zip(reference[1].diagnostics(), fused[1].diagnostics(), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12, msg=key)


@needs_kernel
def test_default_is_fused_on_cpu_and_foreach_opts_out():
    params, opt = _run({"lr": 5e-4}, steps=2)
    assert "_fused_work" in opt.__dict__
    params, opt = _run({"lr": 5e-4, "foreach": True}, steps=2)
    assert "_fused_work" not in opt.__dict__


@needs_kernel
def test_every_kernel_slot_is_read_from_its_own_place(monkeypatch):
    """Any two hyperparameter slots swapped in the kernel's argument array (koala_pp._hyper) move the fused step away
    from the reference: the fused tests would see such a bug."""
    group = KOALAPlusPlus([torch.zeros(1, requires_grad=True)], **DISTINCT["distinct_fixed_r"]).param_groups[0]
    # The last two slots, lr_adaptation's kappa and log(lr_scale_min), are read only with lr_adaptation, which needs
    # the default step rule (these configurations cap the paper's): test_lr_adaptation.py's fused tests, whose groups
    # differ in kappa and lr_scale_min (a floor that binds), see them. The others are swapped here.
    width = len(koala_pp._hyper(group)) - 2
    assert koala_pp._hyper(group)[width:] == [0.0, 0.0]
    for kwargs in DISTINCT.values():  # the premise: every slot holds a value of its own
        values = koala_pp._hyper(KOALAPlusPlus([torch.zeros(1, requires_grad=True)], **kwargs).param_groups[0])
        assert len(set(values[:width])) == width, values
    reference = {name: _run({**kwargs, "foreach": False}, steps=5)[0] for name, kwargs in DISTINCT.items()}
    right = koala_pp._hyper
    for i, j in itertools.combinations(range(width), 2):
        def swapped(group, i=i, j=j):
            values = right(group)
            values[i], values[j] = values[j], values[i]
            return values

        monkeypatch.setattr(koala_pp, "_hyper", swapped)
        seen = False
        for name, kwargs in DISTINCT.items():
            params, opt = _run({**kwargs, "fused": True}, steps=5)
            assert "_fused_work" in opt.__dict__
            seen = seen or not all(torch.allclose(a, b, rtol=1e-9, atol=0) for a, b in
                                   zip(params, reference[name], strict=True))
        assert seen, f"slots {i} and {j} swapped go unseen"
    monkeypatch.setattr(koala_pp, "_hyper", right)
    for name, kwargs in DISTINCT.items():  # and unswapped, the same step
        _assert_same((reference[name], None), (_run({**kwargs, "fused": True}, steps=5)[0], None), params_only=True)


@needs_kernel
@pytest.mark.parametrize("config", ["adaptive", "paper", "metric_only_capped", "distinct_estimated_r"])
def test_fused_float32_close_to_multi_tensor_path(config):
    """float32: both paths form the scalar algebra in float64 from float32 dot products (the multi-tensor path did it
    in float32, 7e-6 (relative) away from the kernel in S and ||H||^2: 1 - beta2^k alone loses three of float32's
    seven digits at beta2 = 0.999). They now differ by the order in which the dot products are summed only: the
    scalar state per tensor, the parameters and the per-element state (normwise) within a few float32 ulps.
    (H.v is left out: a difference of two products of similar size, its agreement is relative to ||H|| ||v||.)"""
    fused = _run({**CONFIGS[config], "fused": True}, dtype=torch.float32)
    multi = _run({**CONFIGS[config], "foreach": True}, dtype=torch.float32)
    tol = 2e-6

    def normwise(x, y):
        return float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30))

    for a, b in zip(fused[0], multi[0], strict=True):
        assert normwise(a, b) <= tol
        sa, sb = fused[1].state[a], multi[1].state[b]
        for key in ("prev_S", "prev_grad_sq"):
            assert normwise(sa[key], sb[key]) <= tol, key
        for key in ("gain", "prev_grad", "exp_avg_sq", "momentum_buffer"):
            if key in sa:
                assert normwise(sa[key], sb[key]) <= tol, key


@needs_kernel
def test_param_groups_with_their_own_options():
    def groups(params):
        return [{"params": params[:3], "lr": 2e-4, "q": 0.05, "weight_decay": 1e-2},
                {"params": params[3:6], "precondition": False, "momentum": 0.0, "r": 0.2, "symmetric": False},
                {"params": params[6:], "sigma": 0.3, "max_step": None, "beta2": 0.9, "eps": 1e-6}]
    _assert_same(_run({"lr": 5e-4, "foreach": False}, groups=groups, none_schedule=lambda k, i: (i + k) % 4 == 0),
                 _run({"lr": 5e-4, "fused": True}, groups=groups, none_schedule=lambda k, i: (i + k) % 4 == 0))


@needs_kernel
@pytest.mark.parametrize("bad", ["loss", "grad", "grad_overflow"])
def test_a_skipped_step_leaves_everything_bit_for_bit(bad):
    params, opt = _run({"lr": 5e-4, "fused": True, "weight_decay": 1e-3}, steps=3)
    before = snapshot(opt)
    loss = spoiled_step(opt, params, bad)
    with NoSync():
        opt.step(loss=loss)
    assert_unchanged(opt, before)  # everything but the skip counter
    assert skipped_steps(opt) == 1


@needs_kernel
def test_zero_gradient_tensor_is_left_alone():
    params, opt = _run({"lr": 5e-4, "fused": True}, steps=2)
    saved = {k: v.clone() for k, v in opt.state[params[1]].items() if isinstance(v, torch.Tensor)}
    before = params[1].detach().clone()
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad.zero_()
    opt.step(loss=torch.tensor(1.2, dtype=torch.float64))
    assert torch.equal(before, params[1])
    assert all(torch.equal(v, opt.state[params[1]][k]) for k, v in saved.items())
    assert not torch.equal(opt.state[params[0]]["step"], torch.tensor(2.0))


@needs_kernel
def test_grad_scaler_protocol_matches_multi_tensor_path():
    runs = []
    for kw in ({"fused": True}, {"foreach": True}):
        gen = torch.Generator().manual_seed(5)
        params = [torch.randn(s, generator=gen, dtype=torch.float32).requires_grad_() for s in SHAPES]
        opt = KOALAPlusPlus(params, lr=5e-4, **kw)
        for k in range(4):
            for p in params:
                p.grad = 1024.0 * torch.randn(p.shape, generator=gen)
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(1.0 if k == 2 else 0.0)
            opt.step(loss=torch.rand(4, generator=gen) + 0.5)
        runs.append((params, opt))
    _assert_same(*runs, tol=2e-4)
    assert skipped_steps(runs[0][1]) == 1


@needs_kernel
def test_state_dict_round_trip_continues_identically():
    def from_checkpoint(opt, params):  # a fresh optimizer from the checkpoint
        fresh = KOALAPlusPlus(params, lr=5e-4, fused=True)
        fresh.load_state_dict(opt.state_dict())
        return fresh

    whole = _run({"lr": 5e-4, "fused": True}, steps=6, seed=2)
    _assert_same(whole, _run_interrupted(steps=6, seed=2, at=3, interrupt=from_checkpoint), tol=0.0)


def test_invalid_fused_options():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="fused"):
        KOALAPlusPlus(p, fused="yes")
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        KOALAPlusPlus(p, fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="block"):
        KOALAPlusPlus(p, fused=True, block="group")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        KOALAPlusPlus([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)], fused=True)


def test_without_the_kernel_the_default_is_the_multi_tensor_path(monkeypatch):
    monkeypatch.setattr(_koala_pp_fused, "load", lambda: None)
    monkeypatch.setattr(_koala_pp_fused, "unavailable_reason", lambda: "no compiler (test)")
    default = _run({"lr": 5e-4}, steps=3)
    assert "_fused_work" not in default[1].__dict__
    _assert_same(default, _run({"lr": 5e-4, "foreach": True}, steps=3), tol=0.0)
    with pytest.raises(RuntimeError, match="no compiler"):
        KOALAPlusPlus([torch.zeros(3, requires_grad=True)], fused=True)


@needs_kernel
def test_block_group_and_low_precision_fall_back_by_default():
    params, opt = _run({"lr": 5e-4, "block": "group"}, steps=2)
    assert "_fused_work" not in opt.__dict__
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    opt = KOALAPlusPlus(model.parameters())
    model(torch.randn(4, 3, dtype=torch.bfloat16)).float().pow(2).mean().backward()
    opt.step(loss=torch.tensor(1.0))
    assert "_fused_work" not in opt.__dict__


@needs_kernel
def test_result_does_not_depend_on_the_thread_count():
    """Large tensors are shared out between threads; each block's sums are added in block order afterwards."""
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            gen = torch.Generator().manual_seed(7)
            params = [torch.randn(s, generator=gen).requires_grad_() for s in [(300, 301), (5,), (70_001,)]]
            opt = KOALAPlusPlus(params, weight_decay=1e-3)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step(loss=torch.rand(8, generator=gen) + 0.5)
            runs.append((params, opt))
    finally:
        torch.set_num_threads(threads)
    _assert_same(*runs, tol=0.0)


@needs_kernel
def test_replaced_state_is_seen_and_checked_before_the_kernel_writes_through_it():
    """The kernel's pointer arrays are reused between steps; a replaced state tensor must invalidate them."""
    def new_state_tensors(opt, params):
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # every state tensor is a new one now
        return opt

    whole = _run({"lr": 5e-4, "fused": True}, steps=5, seed=3)
    params, opt = _run_interrupted(steps=5, seed=3, at=3, interrupt=new_state_tensors)
    _assert_same(whole, (params, opt), tol=0.0)
    opt.state[params[2]]["gain"] = torch.zeros(5, dtype=torch.float64)  # of another size: never written through
    with pytest.raises(ValueError, match="'gain'"):
        opt.step(loss=torch.tensor(1.0, dtype=torch.float64))


@needs_kernel
@pytest.mark.parametrize("precondition", [True, False], ids=["metric", "no_metric"])
def test_without_weight_decay_the_parameter_does_not_enter_the_reduction(precondition):
    """Without weight decay h = g: the reduction pass does not read the parameter (it is bound by the bytes it
    reads), so a non-finite entry of a parameter guards nothing and the step is the multi-tensor path's, as with
    finite parameters; with weight decay the same entry skips the step, in both paths."""
    for wd in (0.0, 1e-2):
        runs = []
        for fused in (True, False):
            gen = torch.Generator().manual_seed(5)
            params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES[:3]]
            with torch.no_grad():
                params[1][2, 3] = float("inf")
            opt = KOALAPlusPlus(params, lr=5e-4, weight_decay=wd, precondition=precondition, fused=fused,
                                foreach=None if fused else True)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                opt.step(loss=torch.rand(4, generator=gen, dtype=torch.float64) + 0.5)
            runs.append((params, opt))
        (pa, oa), (pb, ob) = runs
        assert skipped_steps(oa) == skipped_steps(ob) == (3 if wd else 0)
        for a, b in zip(pa, pb, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)
            for key, value in oa.state[a].items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(value, ob.state[b][key], rtol=1e-12, atol=1e-12, msg=key)
        moved = not torch.equal(pa[0], torch.randn(SHAPES[0], generator=torch.Generator().manual_seed(5),
                                                   dtype=torch.float64))
        assert moved == (wd == 0) and bool(torch.isfinite(pa[0]).all())


@needs_kernel
def test_replaced_state_at_a_cached_address_is_checked_again():
    """The eager step's pointer arrays are confirmed by the very tensors, not by their addresses: a state entry
    replaced by another tensor at the same address (a view of it, too small) is checked and refused."""
    params, opt = _run({"lr": 5e-4, "fused": True}, steps=2)
    gain = opt.state[params[1]]["gain"]
    opt.state[params[1]]["gain"] = gain.view(-1)[:3]  # the same data pointer, 3 of 20 elements
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="'gain'"):
        opt.step(loss=torch.tensor(1.0, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
