"""PEFT: wrap a pretrained model with LoRA or DoRA adapters and get a LoKO optimizer over what is trainable.

::

    from peft import LoraConfig
    from kalmanopt.integrations.peft import wrap

    model, opt = wrap(classifier, LoraConfig(r=8, target_modules=["query", "value"], modules_to_save=["head"]))
    logits = opt.step(lambda: model(**batch), labels)       # or kalmanopt.online.run_online(model, opt, ...)

Works for any ``nn.Module`` PEFT can adapt: transformers models (attention projections) and CNNs (LoRA on
``Conv2d``/``Linear``); ``LoraConfig(use_dora=True)`` gives DoRA, whose magnitude vectors the filter estimates too.
Trainable parameters are split into param groups by role: ``"lora_A"``, ``"lora_B"``, ``"magnitude"`` (DoRA) and
``"other"`` (e.g. a classification head in ``modules_to_save``), so that each role can get its own prior ``p0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer

__all__ = ["ROLES", "adapter_groups", "param_role", "wrap"]

ROLES = ("lora_A", "lora_B", "magnitude", "other")


def param_role(name: str) -> str:
    """The role of a trainable parameter of a PEFT model, from its name."""
    if "lora_magnitude_vector" in name:
        return "magnitude"
    if ".lora_A." in name or "lora_A" in name.split("."):
        return "lora_A"
    if ".lora_B." in name or "lora_B" in name.split("."):
        return "lora_B"
    return "other"


def adapter_groups(model: nn.Module, p0: dict[str, float | str] | None = None) -> list[dict[str, Any]]:
    """The trainable parameters as param groups by role (empty roles left out), with per-role ``p0`` if given."""
    by_role: dict[str, list] = {r: [] for r in ROLES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_role[param_role(name)].append(p)
    groups = []
    for role in ROLES:
        if by_role[role]:
            g: dict[str, Any] = {"params": by_role[role], "role": role}
            if p0 is not None and role in p0:
                g["p0"] = p0[role]
            groups.append(g)
    if not groups:
        raise ValueError("the wrapped model has no trainable parameter")
    return groups


def wrap(model: nn.Module, config: Any = None, *, optimizer: str | Callable[[Iterable], Optimizer] = "loko",
         p0_by_role: dict[str, float | str] | None = None, **optimizer_kwargs: Any) -> tuple[nn.Module, Optimizer]:
    """Wrap ``model`` with PEFT adapters and build the optimizer over its trainable parameters.

    Args:
        model: the pretrained model (any ``nn.Module``).
        config: a ``peft.LoraConfig`` (``use_dora=True`` for DoRA). ``None``: no wrapping; the model's own
            ``requires_grad`` parameters are used (a plain subset).
        optimizer: ``"loko"`` (default) or ``"full_kalman"``, or a callable taking param groups and returning any
            ``torch.optim.Optimizer`` (the baselines: ``lambda groups: torch.optim.AdamW(groups, lr=1e-3)``).
        p0_by_role: prior variance per role (``"lora_A"``, ``"lora_B"``, ``"magnitude"``, ``"other"``), for LoKO.
        **optimizer_kwargs: passed to LoKO / FullKalman (``p0``, ``r0``, ``beta``, ``observation``, ``noise``, ...).

    Returns:
        ``(peft_model, optimizer)``.
    """
    if config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, config)
    if isinstance(optimizer, str):
        from ..optim.full_kalman import FullKalman
        from ..optim.loko import LoKO

        if optimizer == "loko":
            opt: Optimizer = LoKO(adapter_groups(model, p0_by_role), **optimizer_kwargs)
        elif optimizer == "full_kalman":
            opt = FullKalman(adapter_groups(model, p0_by_role), **optimizer_kwargs)
        else:
            raise ValueError(f"Invalid optimizer: {optimizer!r} (expected 'loko', 'full_kalman' or a callable)")
    else:
        if p0_by_role is not None or optimizer_kwargs:
            raise ValueError("p0_by_role and optimizer keyword arguments apply to optimizer='loko' only; "
                             "configure a callable optimizer inside the callable")
        groups = adapter_groups(model)
        for g in groups:
            g.pop("role")
        opt = optimizer(groups)
    return model, opt
