"""``kalmanopt data``: ``list`` what is known and cached, ``fetch NAME|all``, ``path NAME``."""

from __future__ import annotations

import argparse
import sys

from kalmanopt.errors import DataUnavailable

from .sources import DATASETS, FetchError, cache_dir, fetch, is_cached, locate

__all__ = ["add_parser", "check_args"]


def _list(args: argparse.Namespace) -> int:
    print(f"cache: {cache_dir()}  (set KALMANOPT_HOME to move every kalmanopt cache, KALMANOPT_DATA this one)")
    for name, d in DATASETS.items():
        try:
            where = "cached" if is_cached(name) else f"in place: {locate(name)}"
        except FileNotFoundError:
            where = "missing"
        print(f"  {name:<14} {where:<12} {d.description}")
    return 0


def _path(args: argparse.Namespace) -> int:
    if args.name not in DATASETS:
        raise DataUnavailable(f"unknown dataset {args.name!r}; known: {', '.join(DATASETS)}")
    try:
        print(locate(args.name))
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        if getattr(e, "details", None):
            print(e.details, file=sys.stderr)
        return 1
    return 0


def _fetch(args: argparse.Namespace) -> int:
    targets = list(DATASETS) if args.name == "all" else [args.name]
    missing = []
    for name in targets:
        try:
            fetch(name, force=args.force, source_dir=args.source_dir, offline=args.offline)
        except FetchError as e:
            missing.append(name)
            print(f"\n{e}\n", file=sys.stderr)
    got = [n for n in targets if n not in missing]
    print(f"\nfetched or cached: {', '.join(got) or 'none'}")
    if missing:
        print(f"MISSING: {', '.join(missing)} (see the messages above for how to get them by hand)")
        return 1
    return 0


def check_args(args: argparse.Namespace) -> None:
    """An unknown dataset name, before anything is fetched (:class:`UsageError`, one line)."""
    if getattr(args, "data_command", None) in ("fetch", "path") and args.name not in DATASETS and not (
            args.data_command == "fetch" and args.name == "all"):
        raise DataUnavailable(f"unknown dataset {args.name!r}; known: {', '.join(DATASETS)}"
                              + (", all" if args.data_command == "fetch" else ""))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the top-level ``data`` command to ``kalmanopt``'s sub-parsers."""
    from kalmanopt.options import existing_dir

    data = subparsers.add_parser("data", help="datasets: list, fetch (with checksums) into the cache, path",
                                 description="Datasets: list, fetch (with checksums) into the cache, path. The "
                                 "cache is $KALMANOPT_HOME/data (default ~/.cache/kalmanopt/data); $KALMANOPT_DATA "
                                 "moves it alone.")
    sub = data.add_subparsers(dest="data_command", required=True)
    ls = sub.add_parser("list", help="known datasets and whether they are cached")
    ls.set_defaults(func=_list)
    fe = sub.add_parser("fetch", help="obtain a dataset (or all) from its ordered sources, verify, cache")
    fe.add_argument("name", help=f"one of: {', '.join(DATASETS)}, or all")
    fe.add_argument("--force", action="store_true", help="fetch again even if cached")
    fe.add_argument("--from", dest="source_dir", type=existing_dir, default=None, metavar="DIR",
                    help="a directory holding the files (downloaded by hand), tried first")
    fe.add_argument("--offline", action="store_true", help="do not try the canonical URLs")
    fe.set_defaults(func=_fetch)
    pa = sub.add_parser("path", help="print the directory a dataset is read from")
    pa.add_argument("name")
    pa.set_defaults(func=_path)
    return data
