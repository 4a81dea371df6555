"""Where the fused KOALA++ step's time goes on CPU, and the floor it cannot go below (docs/benchmarks/step.md).

Times, with one thread and the thread's CPU time, on ResNet-18's parameter shapes (11.7 M parameters, 62 tensors):
``AdamW(foreach=True)``, ``AdamW(fused=True)`` and the fused KOALA++ kernel (default preset, bfloat16 state, paper
preset; weight decay 5e-4 and 0), whole steps and the reduction pass alone. The reduction pass alone is timed with a
patched copy of the kernel, built into a temporary cache, in which no tensor commits (so the element-wise pass never
runs); the shipped kernel is not changed. It prints, per row, the bytes read per parameter, the time, the read rate,
and the ratio to ``AdamW(foreach=True)``.

    python docs/benchmarks/research/fused_roofline.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from kalmanopt import KOALAPlusPlus
from kalmanopt.bench.step import resnet18_shapes
from kalmanopt.optim import _koala_pp_fused

# Bytes each step reads per parameter (writes are not counted: the measured cost follows what is read).
# AdamW(fused): gradient, parameter, two moments. KOALA++ reduction pass: gradient, parameter (weight decay only),
# second moment (default preset only), previous gradient, gain. Element-wise pass: gradient, parameter, second
# moment, previous gradient, gain, momentum buffer (default preset) / gradient, parameter, previous gradient, gain
# (paper preset). bfloat16 state: 2 bytes per state element instead of 4.
READ_BYTES = {
    "adamw-fused": 16,
    "koala++ fp32": 20 + 24, "koala++ fp32 pass 1": 20,
    "koala++ bf16": 14 + 16, "koala++ bf16 pass 1": 14,
    "koala++-paper fp32": 16 + 16, "koala++-paper fp32 pass 1": 16,
}


def _pass_one_only_kernel() -> None:
    """Rebuild the kernel with the element-wise pass switched off (no tensor commits), in a temporary cache."""
    source = _koala_pp_fused._SOURCE
    assert source.count("if (!commit) continue;") == 1
    _koala_pp_fused._SOURCE = source.replace("if (!commit) continue;", "if (1) continue;")
    os.environ["KALMANOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="kalmanopt-roofline-")
    _koala_pp_fused._tried = False
    _koala_pp_fused._library = None


def _tensors(generator: torch.Generator) -> list[torch.Tensor]:
    params = [torch.randn(s, generator=generator) * 0.05 for s in resnet18_shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return params


def _build(weight_decay: float, generator: torch.Generator) -> dict[str, torch.optim.Optimizer]:
    rows = {"adamw-foreach": lambda p: torch.optim.AdamW(p, weight_decay=weight_decay, foreach=True),
            "adamw-fused": lambda p: torch.optim.AdamW(p, weight_decay=weight_decay, fused=True),
            "koala++ fp32": lambda p: KOALAPlusPlus(p, weight_decay=weight_decay, fused=True),
            "koala++ bf16": lambda p: KOALAPlusPlus(p, weight_decay=weight_decay, fused=True,
                                                    state_dtype=torch.bfloat16),
            "koala++-paper fp32": lambda p: KOALAPlusPlus(p, weight_decay=weight_decay, fused=True, preset="paper")}
    return {name: make(_tensors(generator)) for name, make in rows.items()}


def _time(optimizers: dict[str, torch.optim.Optimizer], rounds: int, steps: int = 5) -> dict[str, float]:
    loss = torch.tensor([2.3])

    def step(opt: torch.optim.Optimizer) -> None:
        opt.step(loss=loss) if isinstance(opt, KOALAPlusPlus) else opt.step()

    for opt in optimizers.values():
        for _ in range(3):
            step(opt)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):  # interleaved rounds: a change in the machine's load hits every row alike
        for name, opt in optimizers.items():
            start = time.thread_time()
            for _ in range(steps):
                step(opt)
            times[name].append((time.thread_time() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = sum(p.numel() for p in _tensors(torch.Generator().manual_seed(0)))
    results: dict[tuple[float, str], float] = {}
    for weight_decay in (5e-4, 0.0):
        measured = _time(_build(weight_decay, torch.Generator().manual_seed(0)), args.rounds)
        results.update({(weight_decay, name): t for name, t in measured.items()})
    _pass_one_only_kernel()
    for weight_decay in (5e-4, 0.0):
        measured = _time(_build(weight_decay, torch.Generator().manual_seed(0)), args.rounds)
        results.update({(weight_decay, f"{name} pass 1"): t for name, t in measured.items() if "koala" in name})
    print(f"ResNet-18 shapes, {n:,} parameters, 1 thread, thread CPU time, median of {args.rounds} rounds\n")
    print("| weight decay | step | B read/param | ms | GB/s read | x AdamW(foreach) |")
    print("|---|---|---:|---:|---:|---:|")
    for (weight_decay, name), seconds in results.items():
        base = results[(weight_decay, "adamw-foreach")]
        read = READ_BYTES.get(name)
        if read is not None and weight_decay == 0 and "koala" in name:
            read -= 4  # without weight decay the reduction pass does not read the parameter
        rate = f"{read * n / seconds / 1e9:.1f}" if read else ""
        print(f"| {weight_decay:g} | {name} | {read or ''} | {seconds * 1e3:.2f} | {rate} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
