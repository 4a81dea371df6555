r"""LoKO's observation models: the measurement ``h``, the innovation ``e`` and the softmax of the logits.

``observe`` turns a batch's logits and targets into what the filter measures (``observation="softmax"``,
``"logits"`` or ``"loss"``; see :mod:`kalmanopt.optim.loko`), and ``softmax_rows`` maps the logits' Jacobian rows
to the softmax's (:math:`H_s = \Lambda H_z`, :math:`\Lambda = \mathrm{diag}(\hat y) - \hat y \hat y^\top`).
``class_subset`` and ``subset_logit_covariance`` are the softmax observation of a few classes (``classes=c``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["OBSERVATIONS", "ClassSubset", "class_subset", "observe", "one_hot_target", "softmax_rows",
           "subset_logit_covariance"]

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


class ClassSubset(NamedTuple):
    r"""The classes a step observes with ``classes=c`` (see :func:`class_subset`).

    Attributes:
        index: ``(B, c + 1)`` class indices per sample: the ``c`` most probable (by decreasing probability), then
            the label, or the ``(c + 1)``-th most probable where the label is among the first ``c``.
        vectors: ``(B (c + 2), B C)`` the vector-Jacobian products to take of the flat logits: per sample the
            ``c + 1`` logits of ``index`` and the probability-weighted mean logit :math:`\hat y^\top z`.
        mix: ``(B (c + 1), B (c + 2))`` float64, block-diagonal: the softmax rows of the observed classes from
            those, :math:`\partial \hat y_i / \partial\theta = \hat y_i (J_i - \sum_j \hat y_j J_j)`.
    """

    index: Tensor
    vectors: Tensor
    mix: Tensor


def class_subset(yhat: Tensor, e: Tensor, count: int) -> ClassSubset:
    r"""The observed classes of ``classes=count``: the ``count`` most probable and the label (the largest entry of
    the target ``y = e + yhat``), ``count + 1`` per sample, and what the step needs to observe their softmax
    probabilities exactly with ``count + 2`` vector-Jacobian products instead of ``C``.

    The measurement is the marginal of the softmax observation on those classes: ``h_S = yhat_S``,
    ``e_S = y_S - yhat_S``, ``R_S = diag(yhat_S) - yhat_S yhat_S^T + r_min I`` (the submatrix of the moment-matched
    R). The classes left out are the least probable ones, whose rows enter the Fisher information
    :math:`J^\top(\mathrm{diag}(\hat y) - \hat y\hat y^\top)J` with the weight of their probability.
    """
    b, c = yhat.shape
    label = (e.reshape(b, c) + yhat).argmax(1)
    top = yhat.topk(count + 1, dim=1).indices  # (B, count + 1), by decreasing probability
    among = (top[:, :count] == label.unsqueeze(1)).any(1)
    extra = torch.where(among, top[:, count], label)
    index = torch.cat([top[:, :count], extra.unsqueeze(1)], dim=1)  # (B, s), s = count + 1
    s = count + 1
    rows = torch.arange(b, device=yhat.device)
    vectors = torch.zeros((b, s + 1, b, c), dtype=torch.float64, device=yhat.device)
    vectors[rows.unsqueeze(1), torch.arange(s, device=yhat.device), rows.unsqueeze(1), index] = 1.0
    vectors[rows, s, rows] = yhat
    probs = yhat.gather(1, index)  # (B, s)
    block = torch.cat([torch.diag_embed(probs), -probs.unsqueeze(2)], dim=2)  # (B, s, s + 1)
    mix = block[0] if b == 1 else torch.block_diag(*block)
    return ClassSubset(index, vectors.reshape(b * (s + 1), b * c), mix)


def subset_logit_covariance(blocks: Tensor, index: Tensor, count: int, classes: int) -> Tensor:
    """The ``(B, C, C)`` logit covariance the predictive uses with ``classes=count``, from the ``(B, s + 1, s + 1)``
    covariance of the rows :func:`class_subset` measured.

    Only the ``count`` most probable classes enter (the label's row does not: the predictive must not depend on
    the label it predicts): their block is exact; every other class gets the mean of their variances on the
    diagonal (the probit reads only the diagonal) and no covariance.
    """
    b = blocks.shape[0]
    top = index[:, :count]
    known = blocks[:, :count, :count]
    fill = torch.diagonal(known, dim1=1, dim2=2).mean(1)  # (B,)
    cov = torch.diag_embed(fill.unsqueeze(1).expand(b, classes).clone())
    rows = torch.arange(b, device=blocks.device).view(b, 1, 1)
    cov[rows, top.unsqueeze(2), top.unsqueeze(1)] = known
    return cov
