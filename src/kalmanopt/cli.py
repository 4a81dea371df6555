"""The ``kalmanopt`` command line: ``kalmanopt demo`` and ``kalmanopt bench ...``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    import torch

    from kalmanopt import KOALAPlusPlus
    from kalmanopt.bench.digits import load_digits, train_digits

    torch.set_num_threads(args.threads) if args.threads else None
    data = load_digits()
    print(f"kalmanopt demo: 2-layer MLP on scikit-learn digits ({len(data[0])} train / {len(data[2])} test), "
          f"{args.epochs} epochs, batch 32, seed {args.seed}")
    contenders = [
        ("KOALA++ (lr=1.0)", lambda m: KOALAPlusPlus(m.parameters(), lr=1.0)),
        ("AdamW (lr=1e-3)", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
    ]
    print(f"{'optimizer':<20} {'test acc':>9} {'train loss':>11} {'seconds':>8}")
    for name, make in contenders:
        r = train_digits(name, make, epochs=args.epochs, seed=args.seed, data=data)
        print(f"{r.name:<20} {r.test_accuracy:>9.4f} {r.final_train_loss:>11.4f} {r.seconds:>8.2f}")
    return 0


# Each module defines ``add_parser(subparsers)``; a module that is not part of this installation is left out.
BENCH_SUITES = ("step", "vision", "lm", "online", "covariance")
TOP_LEVEL_COMMANDS = ("kalmanopt.data.cli", "kalmanopt.bench.report")


def _optional_module(name: str):
    """Import ``name`` if it exists; errors inside an existing module propagate."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except ModuleNotFoundError:  # its parent package does not exist
        return None
    return importlib.import_module(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kalmanopt", description="Kalman-filter optimizers for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small MLP on scikit-learn digits with KOALA++ and AdamW")
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmark suites (results under results/, see BENCHMARKS.md)")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    for name in BENCH_SUITES:
        module = _optional_module(f"kalmanopt.bench.{name}")
        if module is not None:
            module.add_parser(bench_sub)
    for name in TOP_LEVEL_COMMANDS:
        module = _optional_module(name)
        if module is not None:
            module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
