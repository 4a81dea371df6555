"""The ``kalmanopt`` command line: ``kalmanopt demo``, ``kalmanopt bench ...``, ``kalmanopt data ...``, ``report``.

Expected failures (:class:`kalmanopt.errors.UsageError`: data that cannot be obtained, an optional package that is
not installed, a bad option value) print one line, ``kalmanopt: error: ...``, and exit with status 2; so do the
parser's own errors. Every ``kalmanopt bench`` command first checks the optional packages its suite lists in
``required_packages(args)``, then fetches the datasets it needs (as ``kalmanopt data fetch`` would, with its
progress): those the suite lists in ``required_datasets(args)``, else those named by its ``--dataset``/``--corpus``
option (none with ``--data-root``); a dataset loaded later in the run is fetched when it is loaded.

Bad values are refused before anything runs or is written: each numeric or path option has an argparse ``type``
from :mod:`kalmanopt.options` (``integer``, ``number``, ``SEED``, ``existing_dir``, ``existing_path``), and
the command's module may define ``check_args(args)`` for what depends on several options (its output paths among
them), called first. Results: see :mod:`kalmanopt.paths` (``./kalmanopt-results/`` without ``--out``; an existing
file is replaced only with ``--overwrite``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from kalmanopt.errors import OPTIONAL_DEPENDENCIES, UsageError, missing_dependency
from kalmanopt.options import (  # noqa: E402,F401 - the option types, also used as kalmanopt.cli.X
    COUNT,
    NONNEGATIVE,
    POSITIVE,
    SEED,
    THREADS,
    existing_dir,
    existing_path,
    integer,
    number,
)


def _demo(args: argparse.Namespace) -> int:
    import torch

    from kalmanopt import KOALAPlusPlus
    from kalmanopt.bench.common import check_device
    from kalmanopt.bench.digits import load_digits, train_digits

    device = check_device(args)  # before anything runs: --device cuda without CUDA is one line
    torch.set_num_threads(args.threads) if args.threads else None
    data = load_digits()
    print(f"kalmanopt demo: 2-layer MLP on scikit-learn digits ({len(data[0])} train / {len(data[2])} test), "
          f"{args.epochs} epochs, batch 32, seed {args.seed}" + ("" if device.type == "cpu" else f", {device}"))
    contenders = [
        ("KOALA++ (lr=1e-3)", lambda m: KOALAPlusPlus(m.parameters(), lr=1e-3)),  # the same lr as AdamW
        ("AdamW (lr=1e-3)", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)),
    ]
    print(f"{'optimizer':<20} {'test acc':>9} {'train loss':>11} {'seconds':>8}")
    tables = []
    for name, make in contenders:
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                r = train_digits(name, make, epochs=args.epochs, seed=args.seed, data=data, device=device)
            tables.append((name, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)))
        else:
            r = train_digits(name, make, epochs=args.epochs, seed=args.seed, data=data, device=device)
        print(f"{r.name:<20} {r.test_accuracy:>9.4f} {r.final_train_loss:>11.4f} {r.seconds:>8.2f}")
    for name, table in tables:
        print(f"\ntorch.profiler, {name} (training loop; seconds above include the profiler's overhead):\n{table}")
    return 0


WHERE = """\
where things go:
  results   without --out: ./kalmanopt-results/<suite>/ in the current directory (scratch: a later
            run of the same name replaces it); with --out: that path, where an existing file is
            replaced only with --overwrite (the repository's recorded results/ are not, unless asked)
  caches    $KALMANOPT_HOME (default ~/.cache/kalmanopt): the datasets in data/ ($KALMANOPT_DATA
            moves them alone), the compiled KOALA++ kernel in kernels/ ($KALMANOPT_CACHE_DIR moves it alone)
"""

# Each module defines ``add_parser(subparsers)``; a module that is not part of this installation is left out.
BENCH_SUITES = ("step", "vision", "lm", "online", "finetune", "covariance")
TOP_LEVEL_COMMANDS = ("kalmanopt.data.cli", "kalmanopt.bench.report")


def _optional_module(name: str):
    """Import ``name`` if it exists; errors inside an existing module propagate."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except ModuleNotFoundError:  # its parent package does not exist
        return None
    return importlib.import_module(name)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (the sub-parsers inherit the class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kalmanopt", description="Kalman-filter optimizers for PyTorch.", epilog=WHERE,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from kalmanopt.bench.common import device_type  # the demo's task is a bench module's

    demo = sub.add_parser("demo", help="train a small MLP on scikit-learn digits with KOALA++ and AdamW")
    demo.add_argument("--epochs", type=COUNT, default=20)
    demo.add_argument("--seed", type=SEED, default=0)
    demo.add_argument("--threads", type=integer(0, 4096), default=0, help="torch threads (0: PyTorch's default)")
    demo.add_argument("--profile", type=NONNEGATIVE, default=0, metavar="ROWS",
                      help="run each optimizer under torch.profiler and print its top ROWS operators (default: 0)")
    demo.add_argument("--device", type=device_type, default="cpu",
                      help="where the MLP trains: cpu (default) or cuda[:N] (the digits are moved once)")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmark suites (results in ./kalmanopt-results/ or --out; see "
                           "BENCHMARKS.md)", description="Benchmark suites.", epilog=WHERE,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
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


def _hook(args: argparse.Namespace, name: str):
    """The function ``name`` of the module that defines the command's ``func``, or None."""
    return getattr(sys.modules.get(getattr(args.func, "__module__", "")), name, None)


def required_datasets(args: argparse.Namespace) -> list[str]:
    """The datasets a ``kalmanopt bench`` command reads: its module's ``required_datasets(args)`` if it has one, else
    the value of ``--dataset``/``--corpus`` (none when ``--data-root`` is given)."""
    hook = _hook(args, "required_datasets")
    if hook is not None:
        return list(hook(args))
    if getattr(args, "data_root", None):
        return []
    return [v for v in (getattr(args, "dataset", None), getattr(args, "corpus", None)) if isinstance(v, str)]


def _check_optimizers(args: argparse.Namespace) -> None:
    """The suites built on ``bench.common`` (registry optimizers, ``--lr NAME=LR``): unknown names, malformed
    values and missing optional packages are reported before any data is fetched or run is started."""
    if not hasattr(args, "sweep_seed"):  # an option of bench.common.add_common_arguments only
        return
    from kalmanopt.bench import registry

    for text in getattr(args, "lr", None) or []:
        registry.parse_lr(text)
    if isinstance(getattr(args, "optimizers", None), str):
        for name in (n.strip() for n in args.optimizers.split(",")):
            if name:
                registry.check(name)


def _run(args: argparse.Namespace) -> int:
    check = _hook(args, "check_args")  # cross-option values and output paths: before anything runs or is written
    if check is not None:
        check(args)
    if args.command != "bench":
        return args.func(args)
    from kalmanopt import data

    _check_optimizers(args)
    packages = _hook(args, "required_packages")
    for module in packages(args) if packages is not None else ():
        if importlib.util.find_spec(module) is None:
            raise missing_dependency(module, f"`kalmanopt bench {args.func.__module__.rsplit('.', 1)[-1]}`")
    with data.auto_fetch():
        for name in required_datasets(args):
            data.ensure(name)
        return args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UsageError as e:
        message = str(e).strip().splitlines()
        print(f"kalmanopt: error: {message[0] if message else type(e).__name__}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional package imported without kalmanopt.errors.require
        if e.name is None or e.name.split(".")[0] not in OPTIONAL_DEPENDENCIES:
            raise
        print(f"kalmanopt: error: {missing_dependency(e.name)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kalmanopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
