"""Where kalmanopt keeps what it downloads and builds, and where the benchmarks write their results.

One variable moves the caches: ``KALMANOPT_HOME`` (default ``$XDG_CACHE_HOME/kalmanopt``, that is
``~/.cache/kalmanopt``) holds

* ``data/``: the datasets of ``kalmanopt data fetch`` (and the online benchmark's pretrained models);
* ``kernels/``: the fused KOALA++ C kernel, compiled once per machine.

The two older variables still move their own part, and win over ``KALMANOPT_HOME``: ``KALMANOPT_DATA`` (the dataset
cache) and ``KALMANOPT_CACHE_DIR`` (the kernel cache).

Results are not a cache. A ``kalmanopt bench`` run without ``--out`` writes under :func:`scratch_dir`,
``./kalmanopt-results/`` in the current directory, where a later run of the same name replaces it; ``--out`` names
the file (or folder) instead, and a file that already exists there is replaced only with ``--overwrite``. So the
recorded results under the repository's ``results/`` change only when a command asks for it by name and flag
(:func:`output_file`).
"""

from __future__ import annotations

import os
from pathlib import Path

from kalmanopt.errors import UsageError

__all__ = ["SCRATCH", "add_output_arguments", "check_writable_dir", "data_dir", "home", "kernel_dir", "output_dir",
           "output_file", "refuse_existing", "scratch_dir"]

SCRATCH = "kalmanopt-results"


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def home() -> Path:
    """``$KALMANOPT_HOME``, else ``$XDG_CACHE_HOME/kalmanopt``, else ``~/.cache/kalmanopt``."""
    root = _env_path("KALMANOPT_HOME")
    if root is not None:
        return root
    base = _env_path("XDG_CACHE_HOME") or Path.home() / ".cache"
    return base / "kalmanopt"


def data_dir() -> Path:
    """The dataset cache: ``$KALMANOPT_DATA``, else ``home() / "data"``.

    Until kalmanopt 0.1 the datasets lay in ``home()`` itself: where ``data/`` does not exist yet and ``home()``
    holds a complete dataset of that layout, it is used as it is, so an offline machine keeps its datasets.
    """
    env = _env_path("KALMANOPT_DATA")
    if env is not None:
        return env
    root = home()
    if not (root / "data").exists() and root.is_dir() and any(p.is_file() for p in root.glob("*/.complete")):
        return root
    return root / "data"


def kernel_dir() -> Path:
    """The compiled-kernel cache: ``$KALMANOPT_CACHE_DIR``, else ``home() / "kernels"``."""
    return _env_path("KALMANOPT_CACHE_DIR") or home() / "kernels"


def scratch_dir() -> Path:
    """Where results go without ``--out``: ``kalmanopt-results/`` in the current directory."""
    return Path.cwd() / SCRATCH


# ------------------------------------------------------------------------------------------------ output paths
def check_writable_dir(directory: str | os.PathLike, option: str = "--out") -> None:
    """:class:`UsageError` unless ``directory`` is, or can be created as, a folder this process can write into: its
    nearest existing ancestor must be a writable directory. Creates nothing."""
    probe = Path(directory).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{option} {directory}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {directory}: {probe} is not writable")


def refuse_existing(path: Path, *, overwrite: bool, option: str = "--out") -> None:
    """:class:`UsageError` if ``path`` is a directory, or an existing file while ``overwrite`` is false."""
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory, expected a file")
    if path.exists() and not overwrite:
        raise UsageError(f"{option} {path} exists: pass --overwrite to replace it, or choose another path")


def output_file(out: str | os.PathLike | None, default: str | os.PathLike, *, overwrite: bool,
                option: str = "--out") -> Path:
    """The results file of a run: ``out`` when given (refused if it exists, unless ``overwrite``), else
    ``scratch_dir() / default`` (scratch: replaced freely). Checked, not created: nothing is written here."""
    if out is None:
        path = scratch_dir() / default
    else:
        path = Path(out).expanduser()
        refuse_existing(path, overwrite=overwrite, option=option)
    check_writable_dir(path.parent, option if out is not None else f"the results folder (no {option})")
    return path


def output_dir(out: str | os.PathLike | None, default: str | os.PathLike, *, option: str = "--out") -> Path:
    """The results folder of a run that writes several files: ``out``, else ``scratch_dir() / default``; checked to
    be creatable and writable (the caller refuses, with :func:`refuse_existing`, the files in it it would replace)."""
    path = scratch_dir() / default if out is None else Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: is a file, expected a directory")
    check_writable_dir(path, option if out is not None else f"the results folder (no {option})")
    return path


def add_output_arguments(parser, suite: str, *, page: str, replaces: str) -> None:  # noqa: ANN001 - an ArgumentParser
    """A suite's output options, the same in every suite: ``--out DIR``, ``--docs FILE`` and ``--overwrite``."""
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"results folder (default: {SCRATCH}/{suite} in the current directory)")
    parser.add_argument("--docs", default=None, metavar="FILE",
                        help=f"the markdown page regenerated from the --out folder (default: {page} in it)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {replaces} in --out and the --docs page if they exist (else refused)")
