"""KOALA++ with bfloat16 optimizer state against its float32 state, on `kalmanopt bench vision`: research code behind
the accuracy figure in docs/algorithms.md (KOALA++, "bfloat16 state"), not library code.

It adds one optimizer, ``koala++-bf16`` (the registry's ``koala++`` entry with ``state_dtype=torch.bfloat16``), to
this process's copy of the benchmark registry and runs ``kalmanopt bench vision`` (or ``lm``, given first) with the
arguments given, e.g.

    python docs/benchmarks/research/bf16_state.py --dataset fashion_mnist --train-size 10000 --epochs 3 \\
        --seeds 0 1 2 --schedule constant --threads 1 --optimizers koala++,koala++-bf16 \\
        --out results/research/bf16_state-fashion_mnist.json
    python docs/benchmarks/research/bf16_state.py lm --optimizers koala++,koala++-bf16 ...

Both rows run the default CPU path (the fused kernel; float32 parameters), the same learning rate and seeds.
"""

import dataclasses
import sys

import torch

import kalmanopt
from kalmanopt.bench import registry
from kalmanopt.cli import main

base = registry.get("koala++")
registry.REGISTRY["koala++-bf16"] = dataclasses.replace(
    base, name="koala++-bf16", label="KOALA++ (default, state_dtype=bfloat16)",
    build=lambda p, lr, wd, **kw: kalmanopt.KOALAPlusPlus(p, lr=lr, weight_decay=wd, state_dtype=torch.bfloat16,
                                                          **kw),
    note=base.note + "; the previous gradient, gain, second moment and momentum buffer stored in bfloat16")

if __name__ == "__main__":
    args = sys.argv[1:]
    task = args.pop(0) if args and args[0] in ("vision", "lm") else "vision"
    sys.exit(main(["bench", task, *args]))
