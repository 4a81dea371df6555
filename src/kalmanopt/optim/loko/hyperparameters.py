"""Validation of LoKO's hyperparameters, shared with :class:`kalmanopt.FullKalman`.

The measurement's hyperparameters (``_SHARED``) are one for the model: every param group must agree on them.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ..base import _check_number, check_group_numbers
from .jacobian import JACOBIAN_MODES
from .measurement_noise import NOISE_MODELS
from .observation import OBSERVATIONS

__all__ = ["AUTO_SCOPES", "VARIANCE_UPDATES", "check_numbers", "validate_shared"]

VARIANCE_UPDATES = ("fd", "vd")
AUTO_SCOPES = ("joint", "group", "tensor")

# Hyperparameters of the measurement, which every param group shares (the observation is one for the model).
_SHARED = ("observation", "noise", "variance_update", "beta", "r0", "r_min", "r_clip", "p0_scale", "auto_scope",
           "jacobian", "rank", "trust", "calibrate", "trust_check", "truncation")


def check_numbers(opt: Optimizer) -> None:
    """Step-time check: every hyperparameter is still a finite Python number (groups may be changed after
    construction); LoKO and FullKalman take no tensor hyperparameters."""
    for group in opt.param_groups:
        for key, value in group.items():
            if key != "params" and isinstance(value, Tensor):
                raise ValueError(f"Invalid {key}: {type(opt).__name__} takes Python numbers, got a tensor")
        check_group_numbers(group)


def validate_shared(opt: Optimizer, group: dict[str, Any]) -> None:
    """Checks of the measurement hyperparameters, and that every group agrees on them."""
    for key, value in group.items():
        if key != "params" and isinstance(value, Tensor):
            raise ValueError(f"Invalid {key}: {type(opt).__name__} takes Python numbers, got a tensor")
    if group["observation"] not in OBSERVATIONS:
        raise ValueError(f"Invalid observation: {group['observation']!r} (expected one of {OBSERVATIONS})")
    if group["noise"] not in NOISE_MODELS:
        raise ValueError(f"Invalid noise: {group['noise']!r} (expected one of {NOISE_MODELS})")
    if group["noise"] == "moment" and group["observation"] != "softmax":
        raise ValueError(f"Invalid noise: 'moment' (the categorical variance) needs observation='softmax', "
                         f"got observation={group['observation']!r}")
    if group["jacobian"] not in JACOBIAN_MODES:
        raise ValueError(f"Invalid jacobian: {group['jacobian']!r} (expected one of {JACOBIAN_MODES})")
    _check_number("beta", group["beta"], 0.0, high=1.0, high_inclusive=False, tensor_ok=False)
    _check_number("r0", group["r0"], 0.0, tensor_ok=False)
    _check_number("r_min", group["r_min"], 0.0, tensor_ok=False)
    _check_number("q", group["q"], 0.0, tensor_ok=False)
    if group["noise"] in ("ema", "ema_diag", "fixed") and group["r0"] + group["r_min"] <= 0:
        raise ValueError("r0 and r_min cannot both be 0: R would be singular")
    if group["noise"] == "moment" and group["r_min"] <= 0:
        raise ValueError("Invalid r_min: 0 with noise='moment' (the categorical variance is singular; use r_min > 0)")
    for p in group["params"]:
        if not p.is_floating_point() or p.is_complex():
            raise ValueError(f"{type(opt).__name__} optimizes real floating-point tensors, got {p.dtype}")
    first = opt.param_groups[0]
    for key in _SHARED:
        if key in group and group[key] != first[key]:
            raise ValueError(f"Invalid {key}: every param group must use the same {key} (the measurement is shared);"
                             f" got {group[key]!r} and {first[key]!r}")
