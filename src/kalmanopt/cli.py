"""The ``kalmanopt`` command line: ``kalmanopt demo`` and ``kalmanopt bench ...``."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kalmanopt", description="Kalman-filter optimizers for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small MLP on scikit-learn digits with KOALA++ and AdamW")
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    try:
        from kalmanopt.bench import step as step_bench
    except ImportError:  # pragma: no cover - the suite is optional while it is being built
        step_bench = None
    if step_bench is not None:
        step_bench.add_parser(bench_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
