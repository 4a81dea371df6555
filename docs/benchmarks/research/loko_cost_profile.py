"""Where a LoKO step spends its time: thread CPU time per phase, one thread (issue 22, item 1).

    python docs/benchmarks/research/loko_cost_profile.py --task cv_mnist --samples 200 [--loko key=value ...]

Wraps the functions LoKO's step calls (module attributes of ``kalmanopt.optim.loko.optimizer`` and
``kalmanopt.optim.lofi``) with thread-CPU timers; nested phases are reported inclusive (``lofi.update`` contains its
``eigh``). The model's forward passes are timed by wrapping ``forward_fn``: the first call of a step is the
measurement's forward, the second the trust region's. Also times a LoRA/AdamW step (forward, backward, step) on the
same samples for the ratio.
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import torch
import torch.nn.functional as F

from kalmanopt.bench.online.suite import _order, parse_ablation
from kalmanopt.bench.online.tasks import build, load_task
from kalmanopt.online import _default_forward, _to

TIMES: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.thread_time()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[name] += time.thread_time() - t0
            CALLS[name] += 1
    return wrapper


def instrument() -> None:
    from kalmanopt.optim import lofi
    from kalmanopt.optim.loko import optimizer as mod

    for name in ("jacobian_rows", "observe", "noise_matrix", "cholesky_with_jitter", "calibrated", "all_finite"):
        setattr(mod, name, timed(name, getattr(mod, name)))
    for name in ("update", "predict"):
        setattr(lofi, name, timed("lofi." + name, getattr(lofi, name)))
    torch.linalg.eigh = timed("eigh", torch.linalg.eigh)
    for name in ("_update_lowrank", "_trust_region", "_initial_variances", "_joint_prior", "_update"):
        setattr(mod.LoKO, name, timed(name, getattr(mod.LoKO, name)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="cv_mnist")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--loko", action="append", default=[], help="LoKO options as an ablation row: rank=16,trust=0")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = load_task(args.task, progress=False)
    order = _order(task.eval_pool, 0, args.samples)
    kwargs = {}
    for spec in args.loko:
        kwargs |= parse_ablation(spec)

    def samples():
        for i in order:
            batch = task.inputs[[i]] if isinstance(task.inputs, torch.Tensor) else \
                __import__("kalmanopt.online", fromlist=["default_collate"]).default_collate([task.inputs[i]])
            yield _to(batch, "cpu"), task.labels[[i]]

    # AdamW reference
    model, opt = build(task, "LoRA", "AdamW", 1e-3, 0)
    model.eval()
    t_adam = 0.0
    for batch, target in samples():
        t0 = time.thread_time()
        opt.zero_grad(set_to_none=True)
        out = _default_forward(model, batch)
        F.cross_entropy(out, target).backward()
        opt.step()
        t_adam += time.thread_time() - t0

    model, opt = build(task, "LoRA", "LoKO", None, 0, kwargs)
    model.eval()
    instrument()
    total = 0.0
    for batch, target in samples():
        calls = [0]

        def fwd(batch=batch, calls=calls):
            calls[0] += 1
            t0 = time.thread_time()
            out = _default_forward(model, batch)
            TIMES["forward #1" if calls[0] == 1 else "forward #2 (trust)"] += time.thread_time() - t0
            return out
        t0 = time.thread_time()
        opt.step(fwd, target)
        total += time.thread_time() - t0
    n = len(order)
    print(f"task {args.task}, {n} samples, LoKO options {kwargs}, trainable "
          f"{sum(p.numel() for g in opt.param_groups for p in g['params'])}")
    print(f"LoRA/AdamW step: {t_adam / n * 1e3:.3f} ms/sample")
    print(f"LoKO step:       {total / n * 1e3:.3f} ms/sample ({total / t_adam:.2f}x AdamW)")
    print("| phase | ms/sample | share | calls |\n|---|---|---|---|")
    for name, t in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {t / n * 1e3:.3f} | {t / total:.0%} | {CALLS.get(name, n)} |")


if __name__ == "__main__":
    main()
