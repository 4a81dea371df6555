"""Hugging Face ``transformers.Trainer`` with a KOALA optimizer.

::

    from transformers import TrainingArguments
    from kalmanopt.integrations.hf import KalmanTrainer

    args = TrainingArguments("out", report_to=[])   # the Trainer's defaults: learning_rate 5e-5, max_grad_norm 1.0
    trainer = KalmanTrainer(model=model, args=args, train_dataset=ds)
    trainer.train()

The Trainer calls ``optimizer.step()`` without arguments (through accelerate's ``AcceleratedOptimizer``, and a
``GradScaler`` under fp16), after ``gradient_accumulation_steps`` micro-batches. :class:`KalmanTrainer` records each
micro-batch's loss as ``training_step`` returns it (already divided by the number of micro-batches, or normalised by
the token count of the whole accumulated batch: either way their sum is the loss whose gradient was accumulated) and
binds a :class:`~kalmanopt.integrations._loss_feed.LossFeed` to the optimizer, so that its argument-less ``step()``
measures that loss. With ``per_sample_loss`` the filter gets per-sample losses instead of the batch mean.

The optimizer is built by the Trainer's own ``create_optimizer`` (so the usual weight-decay / no-decay param groups
and ``TrainingArguments.weight_decay`` apply, and the LR scheduler drives ``lr``) from ``kalman_optimizer``
(default :class:`~kalmanopt.KOALAPlusPlus`, whose ``lr`` is AdamW's: the Trainer's ``learning_rate`` as it is) with
``lr=args.learning_rate`` and ``kalman_kwargs``; or pass one with ``optimizers=(opt, scheduler)`` or
``optimizer_cls_and_kwargs=(cls, kwargs)`` as for any Trainer.

Gradient clipping (``max_grad_norm``, 1.0 by default) works as with AdamW: the Trainer clips the accumulated gradient
by the factor ``c`` and the filter measures ``c`` times the loss, the loss whose gradient it receives (see
:mod:`kalmanopt.integrations._loss_feed`).

Caveat (the Trainer's, not ours): a model whose ``forward`` takes ``**kwargs`` but whose loss ignores
``num_items_in_batch`` (e.g. ``BertForSequenceClassification``) makes Trainer 5.x *sum* the micro-batch gradients
(times the number of processes under DDP) instead of averaging them; the measured loss is summed alike, so filter and
gradient agree, but set ``model.accepts_loss_kwargs = False`` (or pass ``per_sample_loss``) to train as with one
large batch.

This module imports ``transformers``; :mod:`kalmanopt` and :mod:`kalmanopt.optim` never do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer

from ..optim import KOALAPlusPlus
from ..optim.base import KalmanOptimizer
from ._loss_feed import LossFeed, clip_factor

__all__ = ["KalmanTrainer", "per_sample_cross_entropy"]

PerSampleLoss = Callable[[Any, Tensor | None], Tensor]


def per_sample_cross_entropy(outputs: Any, labels: Tensor, *, shift: bool = False,
                             ignore_index: int = -100) -> Tensor:
    """Per-sample (per-token) cross-entropy from a model's ``logits``, for ``KalmanTrainer(per_sample_loss=...)``.

    Sequence classification (``logits`` ``(B, C)``, ``labels`` ``(B,)``) gives one loss per sequence; token
    classification gives one per labelled token; ``shift=True`` (causal LM: ``functools.partial(
    per_sample_cross_entropy, shift=True)``) predicts token ``t+1`` from position ``t``. Positions labelled
    ``ignore_index`` are dropped. Its mean is the model's own mean cross-entropy loss.
    """
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1).to(logits.device)
    keep = labels != ignore_index
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")


class KalmanTrainer(Trainer):
    """A ``transformers.Trainer`` that hands the training loss to a KOALA optimizer.

    Takes every ``Trainer`` argument, plus (keyword-only):

    Args:
        kalman_optimizer: the class to build when neither ``optimizers`` nor ``optimizer_cls_and_kwargs`` gives
            one (default :class:`~kalmanopt.KOALAPlusPlus`; also :class:`~kalmanopt.KOALAV`,
            :class:`~kalmanopt.KOALAM`).
        kalman_kwargs: its hyperparameters except ``lr`` (``TrainingArguments.learning_rate``: for KOALA++ the lr
            you would give AdamW; for KOALA-V/KOALA-M the fraction of the loss each step removes, 0.1 to 1) and
            ``weight_decay``
            (``TrainingArguments.weight_decay``, applied like the Trainer does for AdamW: not to biases and norms).
        per_sample_loss: ``fn(outputs, labels) -> 1-d tensor``: the per-sample losses of a micro-batch, computed
            from the outputs of ``model(**inputs)`` without the labels (e.g. :func:`per_sample_cross_entropy`).
            The Trainer back-propagates their mean and the filter measures them all (so ``r_stat`` sees the
            spread). Without it the filter measures the model's batch-mean loss.

    A non-Kalman optimizer (e.g. ``optimizers=(AdamW(...), None)``) is used unchanged.
    """

    def __init__(self, *args: Any, kalman_optimizer: type[KalmanOptimizer] | None = None,
                 kalman_kwargs: dict[str, Any] | None = None, per_sample_loss: PerSampleLoss | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.per_sample_loss = per_sample_loss
        self._kalman_feed = LossFeed()
        self._kalman_collecting = False
        self._kalman_losses: Tensor | None = None
        given = self.optimizer is not None or self.optimizer_cls_and_kwargs is not None
        if given and (kalman_optimizer is not None or kalman_kwargs is not None):
            raise ValueError("pass the optimizer either through optimizers= / optimizer_cls_and_kwargs= or through "
                             "kalman_optimizer= / kalman_kwargs=, not both")
        if not given:
            kw = dict(kalman_kwargs or {})
            for key, where in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
                if key in kw:
                    raise ValueError(f"set {key} with TrainingArguments({where}=...), not in kalman_kwargs")
            kw["lr"] = self.args.learning_rate
            cls = kalman_optimizer or KOALAPlusPlus
            if kw["lr"] < 1e-3 and not issubclass(cls, KOALAPlusPlus):
                warnings.warn(f"KalmanTrainer: learning_rate={kw['lr']} looks like an AdamW learning rate; the lr of "
                              f"{cls.__name__} is the fraction of the loss each step removes (typically 0.1 to 1). "
                              "KOALAPlusPlus takes AdamW's lr", stacklevel=2)
            self.optimizer_cls_and_kwargs = (cls, kw)
        if per_sample_loss is not None:
            # compute_loss returns each micro-batch's mean: the Trainer must divide it by the accumulation steps
            self.loss_is_scaled_for_ga = False

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        # bound before accelerator.prepare wraps it, so that a GradScaler's captured step is the bound one
        self._kalman_feed.bind(self.optimizer)
        return optimizer

    def _clip_grad_norm(self, model: nn.Module) -> Tensor:
        # Clipping multiplies the accumulated gradient by c = min(1, max_grad_norm / norm): the filter then measures
        # c times the loss, the loss whose gradient it is (see _loss_feed, "Gradient clipping").
        total_norm = super()._clip_grad_norm(model)
        if total_norm is not None and len(self._kalman_feed):
            self._kalman_feed.scale(clip_factor(torch.as_tensor(total_norm), self.args.max_grad_norm))
        return total_norm

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        self._kalman_losses = None
        self._kalman_collecting = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._kalman_collecting = False
        window = self.state.global_step
        if self._kalman_losses is not None:
            steps = getattr(self, "current_gradient_accumulation_steps", 1) or 1
            self._kalman_feed.add(self._kalman_losses, 1.0 / steps, window)
            self._kalman_losses = None
        else:
            self._kalman_feed.add(loss, 1.0, window)
        return loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Tensor | tuple[Tensor, Any]:
        if self.per_sample_loss is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = model(**inputs)
        losses = self.per_sample_loss(outputs, labels)
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise ValueError("per_sample_loss must return a 1-d tensor of per-sample losses, got "
                             f"{getattr(losses, 'shape', type(losses))}")
        if self._kalman_collecting:
            self._kalman_losses = losses.detach()
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss
