import pytest
import torch

from kalmanopt import KOALAM, KOALAV, KOALAPlusPlus

# Every optimizer with a configuration that exercises its options; ids name them in test reports.
OPTIMIZERS = {
    # KOALA++'s lr is AdamW's (5e-4: the 0.5 of kalmanopt 0.1); KOALA-V/M's the papers'
    "koala_pp": (KOALAPlusPlus, {"lr": 5e-4}),
    "koala_pp_vanilla": (KOALAPlusPlus, {"lr": 5e-4, "symmetric": False}),
    "koala_pp_wd": (KOALAPlusPlus, {"lr": 5e-4, "weight_decay": 1e-2, "r": 0.3}),
    "koala_v": (KOALAV, {"lr": 0.5}),
    "koala_v_wd": (KOALAV, {"lr": 0.5, "weight_decay": 1e-2}),
    "koala_m": (KOALAM, {"lr": 0.5}),
    "koala_m_online_qw": (KOALAM, {"lr": 0.5, "qw": None, "weight_decay": 1e-2}),
}


@pytest.fixture(params=sorted(OPTIMIZERS), ids=sorted(OPTIMIZERS))
def optimizer_spec(request):
    return OPTIMIZERS[request.param]


def same_step_lr(cls, lr, options=None):
    """The ``lr`` that gives ``cls`` the steps kalmanopt 0.1's ``lr`` gave: KOALA++'s default rule takes AdamW's units,
    1e-3 times the old number (README, "Migrating"); KOALA-V/M and KOALA++'s paper rule keep the papers' lr."""
    from kalmanopt import KOALAPlusPlus

    options = options or {}  # the other constructor arguments: the paper's rule keeps the paper's lr
    paper_rule = options.get("preset") == "paper" or options.get("max_step") is not None \
        or ("loss_fraction" in options and options["loss_fraction"] is None)
    return lr * 1e-3 if issubclass(cls, KOALAPlusPlus) and not paper_rule else lr


def tiny_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def batch(seed=0, n=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def per_sample_loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def train(model, opt, steps, *, seed=0, path="loss", reduce=False):
    """Train ``steps`` steps on fresh batches; ``path`` is 'loss', 'closure' or 'predict_update'."""
    for k in range(steps):
        x, y = batch(seed + k, dtype=next(model.parameters()).dtype)

        def closure(x=x, y=y):
            opt.zero_grad()
            losses = per_sample_loss(model, x, y)
            losses.mean().backward()
            return losses.mean() if reduce else losses

        if path == "closure":
            opt.step(closure)
        elif path == "loss":
            opt.step(loss=closure())
        else:
            opt.predict()
            losses = closure()
            stat = losses.square() if reduce else losses.square().mean()
            opt.update(losses.mean(), stat)
    return model


def snapshot(opt):
    """A deep copy of every tensor in the optimizer state and of every parameter."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for p, s in opt.state.items()}
    return params, state


def assert_unchanged(opt, before):
    params, state = before
    now = [p.detach() for g in opt.param_groups for p in g["params"]]
    for a, b in zip(params, now, strict=True):
        assert torch.equal(a, b)
    for p, s in opt.state.items():
        for k, v in s.items():
            if k == "skipped_steps":
                continue
            old = state[id(p)][k]
            if isinstance(v, torch.Tensor):
                assert torch.equal(old, v), k
            else:
                assert old == v, k


class NoSync:
    """Every host synchronisation of a tensor is an error while active (``step`` must never synchronise)."""

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}

        def forbid(name):
            def f(self, *a, **k):
                raise AssertionError(f"host synchronisation: Tensor.{name} inside step")
            return f

        for n in self.names:
            setattr(torch.Tensor, n, forbid(n))

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def spoiled_step(opt, params, bad, inf_at=(4, (0,))):
    """Fresh gradients and per-sample losses (6, float64) for a step the optimizer must skip: ``bad`` is ``"loss"``
    (a NaN loss), ``"grad"`` (an infinite gradient entry, ``inf_at`` = (tensor, index)), ``"grad_overflow"`` (a
    finite entry whose square overflows: ||h||^2 is not finite) or ``"found_inf"`` (GradScaler's protocol). Returns
    the losses to step with."""
    loss = torch.rand(6, dtype=torch.float64) + 0.5
    for p in params:
        p.grad = torch.randn_like(p)
    if bad == "loss":
        loss[2] = float("nan")
    elif bad == "grad":
        params[inf_at[0]].grad[inf_at[1]] = float("inf")
    elif bad == "grad_overflow":
        params[1].grad[0, 0] = 1e200
    else:
        opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(1.0)
    return loss


def skipped_steps(opt):
    """The skips counted over every param group."""
    return sum(int(s["skipped_steps"]) for s in opt.state.values() if "skipped_steps" in s)


# The diagonal filter with LoKO's earlier defaults (logit observation, fixed R, variance matching, p0 = 0.3, no trust
# region): the tests of the diagonal algebra pin it explicitly, so that they do not depend on the library's
# defaults (softmax observation, moment-matched R, rank 64, trust region), which tests/test_loko_defaults.py covers.
LOKO_DIAGONAL = dict(p0=0.3, observation="logits", noise="fixed", rank=0, trust=0.0, jacobian="batched",
                     calibrate=False)


def diagonal_loko(params, **kwargs):
    """``LoKO`` with :data:`LOKO_DIAGONAL` under the given keyword arguments."""
    from kalmanopt import LoKO

    return LoKO(params, **{**LOKO_DIAGONAL, **kwargs})


def run_koala_pp(shapes, kwargs, *, steps, dtype=None, seed=0, none_schedule=None, groups=None, cls=None):
    """KOALA++ (or ``cls``) over random parameters of ``shapes`` for ``steps`` steps of correlated random gradients
    (as in training) and random per-sample losses; ``none_schedule(step, i)`` drops parameter i's gradient."""
    import torch

    from kalmanopt import KOALAPlusPlus

    dtype = dtype or torch.float64
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    opt = (cls or KOALAPlusPlus)(params if groups is None else groups(params), **kwargs)
    for k in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.grad = g if p.grad is None else 0.7 * p.grad + 0.3 * g
            if none_schedule is not None and none_schedule(k, i):
                p.grad = None
        opt.step(loss=torch.rand(6, generator=gen, dtype=dtype) + 0.5)
    return params, opt


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests: tiny models step 1000x slower with two threads on a loaded 2-core
    machine (thread hand-offs), and the suite must stay within minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def double_mlp(seed=0):
    """The 3-4-2 float64 MLP of the resume and torch-convention tests."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def double_losses(model, opt, k):
    """Per-sample losses of batch ``k`` (6 samples, 2 classes) at the current parameters, their mean's gradient
    computed."""
    g = torch.Generator().manual_seed(k)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (6,), generator=g)
    opt.zero_grad()
    losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    losses.mean().backward()
    return losses.detach()
