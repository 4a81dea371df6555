"""KOALA++ with bfloat16 per-element state (``state_dtype=torch.bfloat16``): widened on load, computed in the
parameters' dtype, rounded to nearest even on store; the same on every path, and checkpoints keep it."""

import copy
import ctypes
import io
import math

import pytest
import torch

from kalmanopt import KOALAPlusPlus
from kalmanopt.optim import _koala_pp_fused

from conftest import NoSync, run_koala_pp, skipped_steps

needs_kernel = pytest.mark.skipif(_koala_pp_fused.load() is None,
                                  reason=f"no fused kernel here: {_koala_pp_fused.unavailable_reason()}")

SHAPES = [(3,), (4, 5), (2, 3, 3, 3), (1,), (16, 8), (3000,)]  # 3000: several of the kernel's blocks
PER_ELEMENT = ("prev_grad", "gain", "exp_avg_sq", "momentum_buffer")
CONFIGS = {
    "adaptive": {"lr": 5e-4},
    "adaptive_wd_fixed_r": {"lr": 5e-4, "weight_decay": 1e-2, "r": 0.3},
    "metric_only_capped": {"lr": 0.4, "momentum": 0.0, "max_step": 0.05, "r": None},
    "momentum_no_metric": {"lr": 3e-4, "precondition": False, "momentum": 0.5},
    "paper": {"lr": 0.5, "preset": "paper"},
}


def _run(kwargs, *, steps=6, dtype=torch.float64, seed=0, none_schedule=None):
    return run_koala_pp(SHAPES, kwargs, steps=steps, dtype=dtype, seed=seed, none_schedule=none_schedule)


def _states(opt, params):
    return [{k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params]


def test_state_is_bfloat16_only_per_element_and_default_unchanged():
    params, opt = _run({"lr": 5e-4, "state_dtype": torch.bfloat16, "foreach": False}, steps=2, dtype=torch.float32)
    for st in _states(opt, params):
        for key, value in st.items():
            want = torch.bfloat16 if key in PER_ELEMENT else (torch.float32 if key != "skipped_steps" and
                                                              key != "noise_updates" else torch.int64)
            assert value.dtype == want, key
    default = _run({"lr": 5e-4, "foreach": False}, steps=2, dtype=torch.float32)
    explicit = _run({"lr": 5e-4, "foreach": False, "state_dtype": None}, steps=2, dtype=torch.float32)
    for a, b in zip(default[0] + sum((list(s.values()) for s in _states(default[1], default[0])), []),
                    explicit[0] + sum((list(s.values()) for s in _states(explicit[1], explicit[0])), []), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_reference_is_the_full_precision_step_rounded_on_store(config):
    """One reference step with bf16 state equals a step on float copies of that state, then rounded; the stored
    ||H||^2 and H.v are those of the rounded vectors."""
    params, opt = _run({**CONFIGS[config], "state_dtype": torch.bfloat16, "foreach": False}, steps=3,
                       dtype=torch.float32)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = KOALAPlusPlus(twin_params, **CONFIGS[config], foreach=False)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["state_dtype"] = None
    twin.load_state_dict(saved)  # the same state, widened to float32
    assert twin.state[twin_params[0]]["gain"].dtype == torch.float32
    gen = torch.Generator().manual_seed(9)
    loss = torch.rand(6, generator=gen) + 0.5
    for p, t in zip(params, twin_params, strict=True):
        t.grad = p.grad = torch.randn(p.shape, generator=gen)
    opt.step(loss=loss)
    twin.step(loss=loss)
    for p, t in zip(params, twin_params, strict=True):
        assert torch.equal(p, t)
        st = opt.state[p]
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and key not in ("prev_grad_sq", "prev_grad_v"):
                assert torch.equal(value, twin.state[t][key].to(value.dtype)), key
        H, gain = st["prev_grad"].float().view(-1), st["gain"].float().view(-1)
        assert torch.equal(st["prev_grad_sq"], H.dot(H))
        assert torch.equal(st["prev_grad_v"], H.dot(gain) - st["prev_q"] * H.dot(H))
        torch.testing.assert_close(st["prev_grad_sq"], twin.state[t]["prev_grad_sq"], rtol=1e-2, atol=0)


@pytest.mark.parametrize("config", [*sorted(CONFIGS), "group_block"])
def test_multi_tensor_path_matches_reference(config):
    kw = {**CONFIGS.get(config, {"lr": 5e-4, "block": "group"}), "state_dtype": torch.bfloat16}
    schedule = (lambda k, i: (k + i) % 3 == 0) if config == "group_block" else None
    reference = _run({**kw, "foreach": False}, none_schedule=schedule)
    multi = _run({**kw, "foreach": True}, none_schedule=schedule)
    _assert_same(reference, multi, tol=1e-12)


def _assert_same(run_a, run_b, *, tol, state_exact=True):
    (pa, oa), (pb, ob) = run_a, run_b
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    differ = total = 0
    for sa, sb in zip(_states(oa, pa), _states(ob, pb), strict=True):
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            assert value.dtype == sb[key].dtype, key
            if key in PER_ELEMENT and state_exact:
                assert torch.equal(value, sb[key]), key
            elif key in PER_ELEMENT:
                # A value within float32 rounding of a bfloat16 rounding boundary may round the other way, and the
                # step after reads it: a few elements differ, by about one bfloat16 unit of the tensor's scale.
                a, b = value.float(), sb[key].float()
                differ, total = differ + int((a != b).sum()), total + a.numel()
                torch.testing.assert_close(a, b, rtol=2 ** -6, atol=2 ** -7 * float(a.abs().max()), msg=key)
            else:
                torch.testing.assert_close(value, sb[key], rtol=tol, atol=tol, msg=key)
    assert differ <= 0.01 * total, (differ, total)


@needs_kernel
@pytest.mark.parametrize("schedule", [None, lambda k, i: (k + i) % 3 == 0], ids=["all_grads", "rotating_none"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fused_matches_reference_bit_for_bit_in_the_state(config, schedule):
    """float64 parameters (compute in float64) with bfloat16 state: the reference and the kernel agree to 1e-12
    before rounding, so every stored bfloat16 element is the same bits (the conversion is exercised exactly)."""
    kw = {**CONFIGS[config], "state_dtype": torch.bfloat16}
    reference = _run({**kw, "foreach": False}, none_schedule=schedule)
    fused = _run({**kw, "fused": True}, none_schedule=schedule)
    assert "_fused_work" in fused[1].__dict__  # the kernel really ran
    _assert_same(reference, fused, tol=1e-12)


@needs_kernel
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fused_float32_matches_reference_to_rounding(config):
    """float32: the kernel sums its dot products in another order than torch, so a value within a float32 ulp of a
    bfloat16 rounding boundary may round the other way; parameters stay within float32 rounding."""
    kw = {**CONFIGS[config], "state_dtype": torch.bfloat16}
    reference = _run({**kw, "foreach": False}, dtype=torch.float32)
    fused = _run({**kw, "fused": True}, dtype=torch.float32)
    assert "_fused_work" in fused[1].__dict__
    _assert_same(reference, fused, tol=1e-4, state_exact=False)
    assert not torch.equal(reference[0][-1], fused[0][-1])  # not the same computation: the test can tell


@needs_kernel
def test_kernel_rounds_to_bfloat16_as_torch_does():
    specials = torch.tensor([0x7F800001, 0xFFC00001, 0x7FFFFFFF, 0x7FC00000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
                             0x3F808000, 0x3F818000, 0x3F808001, 0x00000001, 0x80000005, 0x00018000, 0x00008000],
                            dtype=torch.int64).to(torch.uint32).view(torch.int32).view(torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([specials, torch.randn(5000, generator=gen) * torch.logspace(-40, 38, 5000)])
    ours = torch.empty(x.numel(), dtype=torch.int16)
    _koala_pp_fused.load().koala_bf16_round(x.numel(), ctypes.c_void_p(x.data_ptr()),
                                             ctypes.c_void_p(ours.data_ptr()))
    assert torch.equal(ours, x.to(torch.bfloat16).view(torch.int16))


@needs_kernel
@pytest.mark.parametrize("bad", ["loss", "grad_overflow"])
def test_a_skipped_fused_step_leaves_bf16_state_bit_for_bit(bad):
    params, opt = _run({"lr": 5e-4, "fused": True, "weight_decay": 1e-3, "state_dtype": torch.bfloat16}, steps=3,
                       dtype=torch.float32)
    before_p = [p.detach().clone() for p in params]
    before_s = copy.deepcopy(opt.state_dict())
    loss = torch.rand(6) + 0.5
    for p in params:
        p.grad = torch.randn_like(p)
    if bad == "loss":
        loss[2] = math.nan
    else:
        params[1].grad[0, 0] = 1e30  # finite, but its square overflows float32: ||h||^2 is not finite
    with NoSync():
        opt.step(loss=loss)
    assert all(torch.equal(a, b) for a, b in zip(before_p, params, strict=True))
    after = opt.state_dict()
    for key, st in before_s["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor) and name != "skipped_steps":
                assert value.dtype == after["state"][key][name].dtype
                assert torch.equal(value, after["state"][key][name]), name
    assert skipped_steps(opt) == 1


@pytest.mark.parametrize("path", ["reference", "foreach", "fused"])
def test_state_dict_round_trip_keeps_bf16_and_continues_identically(path):
    if path == "fused" and _koala_pp_fused.load() is None:
        pytest.skip(f"no fused kernel here: {_koala_pp_fused.unavailable_reason()}")
    kw = {"lr": 5e-4, "state_dtype": torch.bfloat16, **{"reference": {"foreach": False}, "foreach": {"foreach": True},
                                                       "fused": {"fused": True}}[path]}
    whole = _run(kw, steps=6, seed=2, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = KOALAPlusPlus(params, **kw)
    for k in range(6):
        if k == 3:  # through bytes, as a checkpoint on disk, loaded with weights_only=True
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            opt = KOALAPlusPlus(params, **kw)
            opt.load_state_dict(saved)
            assert opt.state[params[0]]["gain"].dtype == torch.bfloat16
            assert opt.param_groups[0]["state_dtype"] == torch.bfloat16
        for p in params:
            g = torch.randn(p.shape, generator=gen)
            p.grad = g if p.grad is None else 0.7 * p.grad + 0.3 * g
        opt.step(loss=torch.rand(6, generator=gen) + 0.5)
    _assert_same(whole, (params, opt), tol=0.0)


def test_loading_follows_the_loaded_groups_state_dtype():
    """Loaded hyperparameters replace the optimizer's (torch.optim), state_dtype too: the state is cast to match."""
    params, bf16 = _run({"lr": 5e-4, "state_dtype": torch.bfloat16, "foreach": False}, steps=2, dtype=torch.float32)
    plain = KOALAPlusPlus(params, lr=5e-4)
    plain.load_state_dict(bf16.state_dict())
    assert plain.param_groups[0]["state_dtype"] == torch.bfloat16
    assert plain.state[params[0]]["gain"].dtype == torch.bfloat16
    _, full = _run({"lr": 5e-4, "foreach": False}, steps=2, dtype=torch.float32)
    narrow = KOALAPlusPlus(params, lr=5e-4, state_dtype=torch.bfloat16)
    narrow.load_state_dict(full.state_dict())
    assert narrow.param_groups[0]["state_dtype"] is None
    assert narrow.state[params[0]]["gain"].dtype == torch.float32
    old = full.state_dict()
    del old["param_groups"][0]["state_dtype"]  # a checkpoint from before the option
    narrow.load_state_dict(old)
    assert narrow.param_groups[0]["state_dtype"] is None


@pytest.mark.parametrize("bad", [torch.float16, torch.int32, torch.float32, "bfloat16", 16])
def test_invalid_state_dtype(bad):
    with pytest.raises(ValueError, match="state_dtype"):
        KOALAPlusPlus([torch.zeros(3, requires_grad=True)], state_dtype=bad)


def test_bf16_parameters_train_with_bf16_state_as_with_float32_state():
    """bfloat16 parameters (the multi-tensor path, float32 compute): bfloat16 state trains like float32 state."""
    final = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        model = model.to(torch.bfloat16)
        opt = KOALAPlusPlus(model.parameters(), lr=1e-3, state_dtype=dtype)
        x = torch.randn(64, 5, dtype=torch.bfloat16)
        y = x.float().sum(1, keepdim=True).to(torch.bfloat16)
        for _ in range(60):
            opt.zero_grad()
            loss = (model(x) - y).float().square().squeeze(1)
            loss.mean().backward()
            opt.step(loss=loss)
        assert opt.state[model[0].weight]["gain"].dtype == (dtype or torch.float32)
        assert opt.state[model[0].weight]["prev_S"].dtype == torch.float32
        final[dtype] = loss.mean().item()
    assert final[torch.bfloat16] < 0.8 * 4.56  # the loss at the start
    assert abs(final[torch.bfloat16] - final[None]) < 0.1 * final[None]
