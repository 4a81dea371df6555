"""KOALA++ under torch.compile: the fused kernel as the custom operator kalmanopt::koala_pp_fused_step."""

import pytest
import torch
from torch._inductor.compile_fx import compile_fx

from kalmanopt import KOALAPlusPlus
from kalmanopt.optim import _koala_pp_fused, _koala_pp_op

from conftest import skipped_steps

needs_kernel = pytest.mark.skipif(_koala_pp_fused.load() is None,
                                  reason=f"no fused kernel here: {_koala_pp_fused.unavailable_reason()}")

SHAPES = [(3,), (4, 5), (2, 3, 3, 3), (1,), (16, 8), (3000,)]  # 3000: several of the kernel's blocks
OP = torch.ops.kalmanopt.koala_pp_fused_step.default


class Graphs:
    """An inductor backend that keeps every graph dynamo hands it: one graph per compilation."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return compile_fx(gm, example_inputs)

    def targets(self):
        return [node.target for gm in self.graphs for node in gm.graph.nodes if node.op == "call_function"]


def _params(gen, dtype):
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def _train(opt, params, gen, steps, step, *, first=0, scaler=False, dtype=torch.float32):
    """Steps ``first .. steps - 1`` of a fixed sequence: a NaN loss at step 3 (skipped), with ``scaler``
    GradScaler's scale and found-inf flag (an overflow at step 4)."""
    for k in range(first, steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.grad = (1024.0 * g if scaler else g) if p.grad is None else 0.6 * p.grad + 0.4 * g
        losses = torch.rand(8, generator=gen, dtype=dtype) + 0.5
        if k == 3:
            losses[2] = float("nan")
        if scaler:
            opt.grad_scale = torch.tensor(1024.0)
            opt.found_inf = torch.tensor(1.0 if k == 4 else 0.0)
        step(losses)


def _run(compiled, kwargs, *, steps=7, scaler=False, dtype=torch.float32, backend=None):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    params = _params(gen, dtype)
    opt = KOALAPlusPlus(params, **kwargs)

    def step(losses):
        opt.step(loss=losses)

    if compiled:
        step = torch.compile(step, fullgraph=True, backend=backend or Graphs())
    _train(opt, params, gen, steps, step, scaler=scaler, dtype=dtype)
    return params, opt


def _assert_identical(run_a, run_b):
    """Parameters, every state tensor and the diagnostics, bit for bit."""
    (pa, oa), (pb, ob) = run_a, run_b
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)
        sa, sb = oa.state[a], ob.state[b]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sb[key]), key
    for da, db in zip(oa.diagnostics(), ob.diagnostics(), strict=True):
        assert da.keys() == db.keys()
        for key in da:
            assert torch.equal(da[key], db[key]), key
    # the filter's phase (host-side, changed inside the graph: dynamo replays it), as the state dicts carry it
    leader_a, leader_b = oa.state_dict()["state"][0], ob.state_dict()["state"][0]
    for key in ("predicted", "prediction_gate"):
        assert torch.equal(leader_a[key], leader_b[key]), key


@needs_kernel
@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad_scaler"])
def test_compiled_step_is_one_fused_op_call_and_matches_eager_bit_for_bit(scaler):
    eager = _run(False, {"lr": 5e-4, "weight_decay": 1e-3}, scaler=scaler)
    graphs = Graphs()
    compiled = _run(True, {"lr": 5e-4, "weight_decay": 1e-3}, scaler=scaler, backend=graphs)
    # One compilation for all seven steps (the first one included: the state is made before tracing, see
    # KalmanOptimizer._init_group), and the step in it is the kernel, not a traced multi-tensor graph.
    assert len(graphs.graphs) == 1
    targets = graphs.targets()
    assert targets.count(OP) == 1
    assert not any("foreach" in str(t) for t in targets)
    _assert_identical(eager, compiled)
    assert skipped_steps(compiled[1]) == (2 if scaler else 1)


@needs_kernel
def test_compiled_options_float64_and_bfloat16_state():
    """The kernel's other variants and options (no metric, no momentum, a cap, fixed R) through the operator."""
    for kwargs, dtype in (({"lr": 0.4, "momentum": 0.0, "precondition": False, "r": 0.2, "max_step": 0.05},
                           torch.float64),
                          ({"lr": 0.5, "preset": "paper", "weight_decay": 1e-2}, torch.float64),
                          ({"lr": 5e-4, "state_dtype": torch.bfloat16}, torch.float32)):
        graphs = Graphs()
        compiled = _run(True, kwargs, steps=5, dtype=dtype, backend=graphs)
        assert graphs.targets().count(OP) == 1
        _assert_identical(_run(False, kwargs, steps=5, dtype=dtype), compiled)


@needs_kernel
def test_state_dict_round_trip_after_compiled_steps():
    kwargs = {"lr": 5e-4}
    whole = _run(False, kwargs, steps=6)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    params = _params(gen, torch.float32)
    opt = KOALAPlusPlus(params, **kwargs)
    step = torch.compile(lambda losses: opt.step(loss=losses), fullgraph=True, backend=Graphs())
    _train(opt, params, gen, 3, step)
    saved = opt.state_dict()
    # a fresh optimizer from the checkpoint, compiled afresh
    resumed = KOALAPlusPlus(params, **kwargs)
    resumed.load_state_dict(saved)
    step = torch.compile(lambda losses: resumed.step(loss=losses), fullgraph=True, backend=Graphs())
    _train(resumed, params, gen, 6, step, first=3)
    _assert_identical(whole, (params, resumed))


@needs_kernel
def test_float_lr_schedule_matches_eager_and_tensor_lr_compiles_once():
    """As with torch.optim: a float lr is a constant of the graph, so each new value compiles again (a scheduler's
    patched ``step`` also breaks the graph, so no fullgraph); a tensor lr is an input of one graph (it takes the
    multi-tensor path, with the same results up to rounding)."""
    runs = {}
    for name, compiled, lr in (("eager", False, 5e-4), ("float", True, 5e-4), ("tensor", True, torch.tensor(5e-4))):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        gen = torch.Generator().manual_seed(1)
        params = _params(gen, torch.float32)[:2]
        opt = KOALAPlusPlus(params, lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.8 ** k)

        def step(losses, opt=opt):
            opt.step(loss=losses)

        if compiled:  # aot_eager: the graphs are what is tested here, not inductor's code
            step = torch.compile(step, backend="aot_eager")
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            step(torch.rand(4, generator=gen) + 0.5)
            schedule.step()
        runs[name] = ([p.detach().clone() for p in params], torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert all(torch.equal(a, b) for a, b in zip(runs["eager"][0], runs["float"][0], strict=True))
    assert runs["float"][1] >= 4  # one graph per lr value (behind the scheduler's graph break)
    for a, b in zip(runs["eager"][0], runs["tensor"][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    tensor_graphs = runs["tensor"][1]
    assert tensor_graphs <= 2  # the graph before and after the scheduler's break, whatever the lr


def _stepped_pair():
    """Two float32 parameters after one default KOALA++ step (metric and momentum on): their per-tensor state in the
    operator's order and the group's R and counters."""
    gen = torch.Generator().manual_seed(0)
    params = _params(gen, torch.float32)[:2]
    opt = KOALAPlusPlus(params, lr=5e-4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step(loss=torch.tensor(1.0))
    state = [opt.state[p][key] for p in params for key in _koala_pp_op.STATE_KEYS]
    group = opt.state[params[0]]
    shared = [group["measurement_noise"], group["skipped_steps"], group["noise_updates"]]
    return gen, params, opt, state, shared


@needs_kernel
def test_operator_rejects_state_it_cannot_write_through():
    gen, params, opt, state, shared = _stepped_pair()
    # koala_pp._hyper's layout: ..., flags 7, r_stat, lr_adaptation's kappa (off) and log(lr_scale_min)
    hyper = [0.5, 0.1, 0.1, 0.0, 0.999, 1e-8, 0.9, 0.01, 0.0, 0.9, 2.0, 7.0, 0.0, 0.0, 0.0]
    assert len(hyper) == _koala_pp_op.NHP
    grads = [p.grad for p in params]
    measurement = torch.tensor([1.0, 1.0, 1.0])  # moments (kind 0)
    bad = list(state)
    bad[1] = torch.zeros(5)  # the gain, of the wrong size
    with pytest.raises(ValueError, match="gain"):
        _koala_pp_op.fused_step(params, grads, bad + shared, [0, 2], hyper, measurement, 0, None, None)
    with pytest.raises(ValueError, match="measurement"):  # moments are three numbers
        _koala_pp_op.fused_step(params, grads, state + shared, [0, 2], hyper, measurement[:2], 0, None, None)
    with pytest.raises(ValueError, match="do not fit"):
        _koala_pp_op.fused_step(params, grads, state + shared, [0, 1], hyper, measurement, 0, None, None)
    _koala_pp_op.fused_step(params, grads, state + shared, [0, 2], hyper, measurement, 0, None, None)


@needs_kernel
def test_compiled_update_matches_eager_bit_for_bit():
    """The predict/update interface: update(mean, statistic) runs the kernel on the given measurement."""
    runs, graphs = [], Graphs()
    for compiled in (False, True):
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(4)
        params = _params(gen, torch.float32)
        opt = KOALAPlusPlus(params, lr=5e-4)

        def update(mean, statistic, opt=opt):
            opt.update(mean, statistic)

        if compiled:
            update = torch.compile(update, fullgraph=True, backend=graphs)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            losses = torch.rand(8, generator=gen) + 0.5
            update(losses.mean(), losses.square().mean())
        runs.append((params, opt))
    assert len(graphs.graphs) == 1 and graphs.targets().count(OP) == 1
    _assert_identical(*runs)


@needs_kernel
def test_a_process_whose_first_step_is_compiled_uses_the_kernel(monkeypatch):
    """Whether the kernel is built is settled before tracing (the build cannot be traced), not only by an eager
    step run earlier."""
    monkeypatch.setattr(_koala_pp_op, "_built", None)
    graphs = Graphs()
    _run(True, {"lr": 5e-4}, steps=2, backend=graphs)
    assert graphs.targets().count(OP) == 1


@needs_kernel
def test_operator_cache_of_pointer_arrays_rechecks_other_tensors_at_the_same_address():
    """The operator's pointer arrays are cached by the state's addresses; another tensor at an address the cache
    knows (here a view, which shares it) or another parameter size must be checked again, not written through."""
    gen, params, opt, state, shared = _stepped_pair()
    hyper = [0.5, 0.1, 0.1, 0.0, 0.999, 1e-8, 0.9, 0.01, 0.0, 0.9, 2.0, 7.0, 0.0, 0.0, 0.0]
    grads = [p.grad for p in params]
    measurement = torch.tensor([1.0, 1.0, 1.0])
    _koala_pp_op.fused_step(params, grads, state + shared, [0, 2], hyper, measurement, 0, None, None)  # cached now
    # views at the same addresses as cached entries: the gain too small, prev_grad of another dtype
    for index, view, name in ((1, state[1][:1], "gain"), (0, state[0].view(torch.int32), "prev_grad")):
        bad = list(state)
        bad[index] = view
        with pytest.raises(ValueError, match=name):
            _koala_pp_op.fused_step(params, grads, bad + shared, [0, 2], hyper, measurement, 0, None, None)
    # group state of another size or dtype, and more entries than the groups' options ask for
    for index, wrong, name in ((0, torch.zeros(2), "measurement_noise"), (1, shared[1].float(), "skipped_steps"),
                              (2, shared[2].int(), "noise_updates")):
        bad = list(shared)
        bad[index] = wrong
        with pytest.raises(ValueError, match=name):
            _koala_pp_op.fused_step(params, grads, state + bad, [0, 2], hyper, measurement, 0, None, None)
    with pytest.raises(ValueError, match="state entries"):
        _koala_pp_op.fused_step(params, grads, state + shared + shared, [0, 2], hyper, measurement, 0, None, None)
    # the same state tensors with a parameter of another size: its state no longer fits
    bigger = [torch.zeros(7), params[1].detach()]
    with pytest.raises(ValueError, match="prev_grad"):
        _koala_pp_op.fused_step(bigger, [torch.zeros(7), grads[1]], state + shared, [0, 2], hyper, measurement, 0,
                                None, None)


@needs_kernel
@pytest.mark.parametrize("kind", ["moments", "given"])
def test_operator_schema_and_fake_implementation_agree_with_the_kernel(kind):
    """torch.library.opcheck: the operator writes only what its schema declares mutable (params and state), and its
    fake implementation gives the real output's shape and dtype (two groups: the diagnostics hold one R per group)."""
    gen = torch.Generator().manual_seed(0)
    params = _params(gen, torch.float32)[:3]
    opt = KOALAPlusPlus([{"params": params[:2]}, {"params": params[2:], "momentum": 0.0}], lr=5e-4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step(loss=torch.tensor(1.0))
    hyper, state, shared = [], [], []
    for j, group in enumerate(opt.param_groups):
        hyper += [0.5, 0.1, 0.1, 0.0, 0.999, 1e-8, 0.9 if j == 0 else 0.0, 0.01, 0.0, 0.9, 2.0, 7.0 if j == 0 else 3.0,
                  0.0, 0.0, 0.0]
        flags = int(hyper[_koala_pp_op.HP_FLAGS - _koala_pp_op.NHP])
        state += [opt.state[p][key] for p in group["params"] for key in _koala_pp_op.STATE_KEYS
                  if _koala_pp_op.uses(key, flags)]
        lead = opt.state[group["params"][0]]
        shared += [lead["measurement_noise"], lead["skipped_steps"], lead["noise_updates"]]
    measurement = torch.tensor([3.0, 5.0, 2.0]) if kind == "moments" else torch.tensor([1.5, 2.5])
    args = ([p.detach().clone() for p in params], [p.grad.clone() for p in params],
            [t.clone() for t in state + shared], [0, 2, 3], hyper, measurement,
            _koala_pp_op.MOMENTS if kind == "moments" else _koala_pp_op.GIVEN, None, None)
    before = [t.clone() for t in args[0] + args[2]]
    out = _koala_pp_op.fused_step(*args)
    assert out.shape == (4 * 3 + 2 + 1,)
    assert any(not torch.equal(a, b) for a, b in zip(before, args[0] + args[2], strict=True))  # the step was taken
    result = torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}


@needs_kernel
def test_compiled_lr_adaptation_is_the_eager_fused_step_bit_for_bit():
    """lr_adaptation through the operator (its lr_log_scale in the state list, the group without it left out):
    one graph, one operator call, the eager kernel's step bit for bit, skipped steps (a NaN loss, GradScaler's
    overflow) included, and the multiplier in the diagnostics."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(3)
        params = _params(gen, torch.float32)
        opt = KOALAPlusPlus([{"params": params[:3], "lr_adaptation": 0.3},
                             {"params": params[3:], "lr_adaptation": None}], lr=5e-4, weight_decay=1e-3)

        def step(losses, opt=opt):
            opt.step(loss=losses)

        graphs = Graphs()
        if compiled:
            step = torch.compile(step, fullgraph=True, backend=graphs)
        _train(opt, params, gen, 7, step, scaler=True)
        runs.append((params, opt))
    (eager_params, eager), (_, traced) = runs
    assert "_fused_work" in eager.__dict__
    assert len(graphs.graphs) == 1 and graphs.targets().count(OP) == 1
    assert not any("foreach" in str(t) for t in graphs.targets())
    _assert_identical(*runs)
    assert float(eager.state[eager_params[0]]["lr_log_scale"]) != 0.0 and "lr_log_scale" not in \
        eager.state[eager_params[3]]
    assert "lr_scale" in traced.diagnostics()[0] and "lr_scale" not in traced.diagnostics()[1]
    assert skipped_steps(traced) == 2 * 2  # two skipped steps, counted per group
