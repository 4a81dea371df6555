"""torch.compile of the optimizer step: compile time and per-step time, eager vs compiled, KOALA++ vs AdamW.

Issue 13: a compiled KOALA++ step (then the traced multi-tensor path) compiled twice and ran 18x slower than eager.
Since the fix the compiled step calls the fused kernel as the custom operator kalmanopt::koala_pp_fused_step; this
script measures what that gives, on the parameter shapes of ``kalmanopt bench step`` (preset gradients and a fixed
loss, as there), one thread:

    python docs/benchmarks/research/compile_step.py --preset mlp --rounds 7 --steps 200
    python docs/benchmarks/research/compile_step.py --preset resnet18 --rounds 5 --steps 5

Each contender gets its own copy of the parameters. Compilation is timed on the first two calls of each compiled
function (wall and thread CPU time; the second call catches a recompilation) with inductor's on-disk caches in a
fresh temporary directory, i.e. a cold compile. Then the per-step times: interleaved rounds (order rotated), each
``--steps`` consecutive steps, garbage collection paused; medians over rounds. ``--foreach-compiled`` adds the old
compiled route (KOALA++ foreach=True under torch.compile: the traced multi-tensor graph; minutes on ResNet-18).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # a cold compile: nothing from an earlier run
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

import torch  # noqa: E402

import kalmanopt  # noqa: E402
from kalmanopt.bench.step import FIXED_LOSS, PRESETS  # noqa: E402


def _contenders(foreach_compiled: bool) -> list[tuple[str, Callable, bool, bool]]:
    """(label, make(params, wd), takes a loss, compiled)."""
    koala = lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd)  # noqa: E731
    adamw = lambda ps, wd: torch.optim.AdamW(ps, lr=1e-3, weight_decay=wd, foreach=True)  # noqa: E731
    rows = [("KOALA++ eager (fused kernel, ctypes)", koala, True, False),
            ("KOALA++ compiled (fused kernel, custom op)", koala, True, True),
            ("AdamW(foreach) eager", adamw, False, False),
            ("AdamW(foreach) compiled", adamw, False, True)]
    if foreach_compiled:
        rows.append(("KOALA++ foreach=True compiled (traced multi-tensor)",
                     lambda ps, wd: kalmanopt.KOALAPlusPlus(ps, weight_decay=wd, foreach=True), True, True))
    return rows


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - start, time.thread_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mlp", choices=sorted(PRESETS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--foreach-compiled", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = PRESETS[args.preset]
    shapes = preset.shapes()
    generator = torch.Generator().manual_seed(0)
    params = [0.02 * torch.randn(s, generator=generator) for s in shapes]
    grads = [1e-3 * torch.randn(s, generator=generator) for s in shapes]
    loss = torch.tensor(FIXED_LOSS)
    print(f"{preset.description}: {sum(p.numel() for p in params):,} parameters in {len(params)} tensors; "
          f"torch {torch.__version__}, 1 thread, inductor cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}", flush=True)

    prepared = []
    for label, make, takes_loss, compiled in _contenders(args.foreach_compiled):
        own = [p.clone().requires_grad_(True) for p in params]
        for p, g in zip(own, grads, strict=True):
            p.grad = g.clone()
        opt = make(own, 5e-4)

        def step(opt=opt, takes_loss=takes_loss) -> None:
            if takes_loss:
                opt.step(loss=loss)
            else:
                opt.step()

        fn = step
        if compiled:
            # fullgraph for KOALA++ (the step must not break); AdamW as torch's docs compile it
            fn = torch.compile(step, fullgraph=takes_loss)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            first, second = _timed(fn), _timed(fn)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
            print(f"  {label}: compile {first[0]:.2f} s wall / {first[1]:.2f} s CPU, second call "
                  f"{second[0]:.3f} s wall / {second[1]:.3f} s CPU, graphs compiled: {graphs}", flush=True)
        for _ in range(args.warmup):
            fn()
        prepared.append((label, fn, []))

    for r in range(args.rounds):
        order = prepared[r % len(prepared):] + prepared[:r % len(prepared)]
        for _label, fn, times in order:
            gc.disable()
            try:
                wall, cpu = _timed(lambda fn=fn: [fn() for _ in range(args.steps)])
            finally:
                gc.enable()
            times.append((wall / args.steps, cpu / args.steps))
    recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    base = statistics.median(t[1] for t in prepared[2][2])
    print(f"\n{args.rounds} interleaved rounds x {args.steps} steps (median over rounds; CPU = thread time); "
          f"graphs compiled in all: {recompiles}")
    print("| step | median ms/step (wall) | CPU ms/step | CPU vs AdamW(foreach) eager |")
    print("|---|---:|---:|---:|")
    for label, _fn, times in prepared:
        wall, cpu = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
        print(f"| {label} | {1e3 * wall:.4g} | {1e3 * cpu:.4g} | {cpu / base:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
