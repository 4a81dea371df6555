"""argparse ``type=`` callables for the command line: a bad value is the parser's own one-line error (status 2)
before anything runs, fetches or writes.

Every numeric or path option of ``kalmanopt`` (:mod:`kalmanopt.cli`) and of the benchmark suites
(:mod:`kalmanopt.bench`) takes its type from here, so that the same value is refused with the same words everywhere.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

__all__ = ["COUNT", "NONNEGATIVE", "POSITIVE", "SEED", "THREADS", "existing_dir", "existing_path", "integer", "number"]


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An integer in ``[minimum, maximum]`` (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def number(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None,
           below: float | None = None) -> Callable[[str], float]:
    """A finite float (NaN and infinities refused) with optional closed (``minimum``/``maximum``) or open
    (``above``/``below``) bounds."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {value:g}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be above {above:g}, got {value:g}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be below {below:g}, got {value:g}")
        return value

    return parse


COUNT = integer(1)  # epochs, sizes, batch sizes, rounds: at least one
NONNEGATIVE = integer(0)  # counts where 0 means "none" or "the default"
SEED = integer(0, 2**63 - 1)  # what torch.manual_seed and torch.Generator.manual_seed take without wrapping
THREADS = integer(1, 4096)
POSITIVE = number(above=0.0)


def existing_dir(text: str) -> str:
    """A directory that exists (read from: ``--data-root``, ``--from``)."""
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return text


def existing_path(text: str) -> str:
    """A file or directory that exists."""
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    return text
