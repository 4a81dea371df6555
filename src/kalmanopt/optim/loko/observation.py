r"""LoKO's observation models: the measurement ``h``, the innovation ``e`` and the softmax of the logits.

``observe`` turns a batch's logits and targets into what the filter measures (``observation="softmax"``,
``"logits"`` or ``"loss"``; see :mod:`kalmanopt.optim.loko`), and ``softmax_rows`` maps the logits' Jacobian rows
to the softmax's (:math:`H_s = \Lambda H_z`, :math:`\Lambda = \mathrm{diag}(\hat y) - \hat y \hat y^\top`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["OBSERVATIONS", "observe", "one_hot_target", "softmax_rows"]

OBSERVATIONS = ("softmax", "logits", "loss")


def one_hot_target(target: Tensor, outputs: Tensor) -> Tensor:
    """Class indices ``(B,)`` or probabilities ``(B, C)`` as a float64 ``(B, C)`` target."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a tensor of class indices, got {type(target)!r}")
    b, c = outputs.shape
    if target.dim() == 1 and not target.is_floating_point() and not target.is_complex():
        # any integer dtype; bool as the classes 0 and 1
        if target.numel() != b:
            raise ValueError(f"target has {target.numel()} labels for a batch of {b} outputs")
        labels = target.to(device=outputs.device, dtype=torch.int64)
        if b and not bool(((labels >= 0) & (labels < c)).all()):  # LoKO synchronises anyway
            raise ValueError(f"target holds class indices outside [0, {c}) for outputs with {c} classes")
        # = F.one_hot(labels, c) in float64, without its second range check (a host sync)
        return torch.zeros((b, c), dtype=torch.float64, device=outputs.device).scatter_(1, labels.unsqueeze(1), 1.0)
    if target.dim() == 1 and target.shape != outputs.shape:
        raise ValueError(f"target of shape ({b},) must hold integer class indices, got dtype {target.dtype} "
                         f"(probabilities have shape ({b}, {c}))")
    if target.shape == outputs.shape and target.is_floating_point():
        return target.detach().to(device=outputs.device, dtype=torch.float64)
    raise ValueError(f"target must be class indices of shape ({b},) or probabilities of shape ({b}, {c}), "
                     f"got {tuple(target.shape)} {target.dtype}")


def observe(outputs: Tensor, target: Tensor, observation: str) -> tuple[Tensor, Tensor, Tensor]:
    """The measurement: ``h`` (flat, with autograd graph), innovation ``e`` (float64, flat) and ``yhat`` (B, C).

    ``yhat`` is the detached softmax (float64), used by the moment-matched R.
    """
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs)
        raise ValueError(f"forward_fn must return logits of shape (batch, classes), got {shape}")
    y = one_hot_target(target, outputs)
    yhat = torch.softmax(outputs.detach().to(torch.float64), dim=1)
    if observation == "softmax":
        h = torch.softmax(outputs, dim=1).reshape(-1)
        e = (y - yhat).reshape(-1)
    elif observation == "logits":
        h = outputs.reshape(-1)
        e = (y - yhat).reshape(-1)
    elif observation == "loss":
        h = (-(y.to(outputs.dtype) * torch.log_softmax(outputs, dim=1)).sum(1)).mean().reshape(1)
        e = -h.detach().to(torch.float64)
    else:
        raise ValueError(f"unknown observation {observation!r}; expected one of {OBSERVATIONS}")
    return h, e, yhat


def softmax_rows(logit_rows: list[Tensor], yhat: Tensor) -> list[Tensor]:
    r"""The softmax's Jacobian rows from the logits': :math:`H_s = \Lambda H_z` per sample, with
    :math:`\Lambda = \mathrm{diag}(\hat y) - \hat y \hat y^\top` (symmetric), ``yhat`` the ``(B, C)`` softmax."""
    b, c = yhat.shape
    lam = torch.diag_embed(yhat) - yhat.unsqueeze(2) * yhat.unsqueeze(1)  # (B, C, C)
    out = []
    for r in logit_rows:
        flat = r.reshape(b, c, -1)
        out.append((lam.to(flat.dtype) @ flat).reshape(r.shape))
    return out
