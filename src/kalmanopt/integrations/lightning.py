"""Lightning (``pytorch_lightning``, or ``lightning.pytorch``) with a KOALA optimizer.

With automatic optimisation Lightning calls ``optimizer.step(closure=...)``, where the closure runs
``training_step`` and ``backward`` and returns the detached loss, so returning a KOALA optimizer from
``configure_optimizers`` works as it is, with nothing from this module (also under DDP: the optimizer sums the loss
statistics over the processes itself), **as long as** ``accumulate_grad_batches=1`` and no ``GradScaler`` is used
(``precision="16-mixed"`` on a GPU: Lightning then runs the closure itself and calls ``scaler.step(optimizer)``
without it). :class:`KalmanLossCallback` removes these limits::

    trainer = pl.Trainer(callbacks=[KalmanLossCallback()], accumulate_grad_batches=4, ...)

It records every micro-batch's loss as it is back-propagated (Lightning's ``on_before_backward``: already divided by
``accumulate_grad_batches``; un-scaled if a ``GradScaler`` scaled it) and binds a
:class:`~kalmanopt.integrations._loss_feed.LossFeed` to the optimizer, so the filter measures the loss of the whole
accumulated gradient instead of the closure's value, which is the last micro-batch's loss divided by
``accumulate_grad_batches``. With the callback:

* per-sample losses: ``return per_sample(self, losses)`` in ``training_step`` (it returns their mean for Lightning to
  back-propagate and hands all of them to the filter);
* gradient clipping by norm (``gradient_clip_val``): the filter measures the loss times the clipping factor, the loss
  whose gradient it receives (see :mod:`kalmanopt.integrations._loss_feed`);
* manual optimisation: ``self.manual_backward(loss); opt.step()`` measures the back-propagated loss(es), and
  ``opt.step(loss=losses)`` works too (without the callback, Lightning's ``LightningOptimizer.step`` always passes a
  closure, so ``loss=`` clashes with it).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

try:  # the standalone package first: it is what we test against
    from pytorch_lightning import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - the unified package
    from lightning.pytorch import Callback, LightningModule, Trainer

from ._loss_feed import LossFeed, clip_factor, unwrap_optimizer

__all__ = ["KalmanLossCallback", "per_sample"]

_PER_SAMPLE = "_kalmanopt_per_sample_losses"


def per_sample(module: LightningModule, losses: Tensor) -> Tensor:
    """In ``training_step``: ``return per_sample(self, losses)`` with 1-d per-sample losses.

    Returns ``losses.mean()`` (what Lightning back-propagates) and leaves the per-sample losses for
    :class:`KalmanLossCallback` to hand to the filter. Without the callback it is just ``losses.mean()``.
    """
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        raise ValueError(f"per_sample expects 1-d per-sample losses, got {getattr(losses, 'shape', type(losses))}")
    module.__dict__[_PER_SAMPLE] = losses.detach()
    return losses.mean()


class KalmanLossCallback(Callback):
    """Hands the loss of the accumulated gradient to every KOALA optimizer of the fit (others are left alone)."""

    def __init__(self) -> None:
        self.feed = LossFeed()
        self._bound: list[Any] = []
        self._warned_value_clipping = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bound = [opt for opt in trainer.optimizers if self.feed.bind(opt) is not None]
        self.feed.clear()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        pl_module.__dict__.pop(_PER_SAMPLE, None)  # a stale one from validation or a skipped step

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        losses = pl_module.__dict__.pop(_PER_SAMPLE, None)
        window = trainer.global_step
        if losses is not None:
            weight = 1.0 / trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1.0
            self.feed.add(losses, weight, window)
            return
        loss = loss.detach()
        scaler = getattr(getattr(trainer.strategy, "precision_plugin", None), "scaler", None)
        if scaler is not None and scaler.is_enabled():
            loss = loss / scaler.scale(torch.ones((), device=loss.device))  # the scale, without a host sync
        self.feed.add(loss, 1.0, window)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Called just before Lightning clips (gradient_clip_val): by norm, the gradients are multiplied by
        # c = min(1, clip_val / norm), and the filter measures c times the loss, the loss whose gradient it receives.
        clip_val = trainer.gradient_clip_val
        if not clip_val or not len(self.feed) or unwrap_optimizer(optimizer) not in self._bound:
            return
        algorithm = trainer.gradient_clip_algorithm  # None (Lightning's default: norm), a str or its enum
        if algorithm is not None and str(getattr(algorithm, "value", algorithm)) != "norm":
            if not self._warned_value_clipping:
                warnings.warn("KalmanLossCallback: clipping by value changes the gradient's direction, which no "
                              "rescaling of the loss matches; the filter measures the unclipped loss. Clip by norm "
                              "(gradient_clip_algorithm='norm') for a consistent measurement", stacklevel=2)
                self._warned_value_clipping = True
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            self.feed.scale(clip_factor(total_norm, float(clip_val)))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for opt in self._bound:
            LossFeed.unbind(opt)
        self._bound = []
        self.feed.clear()
