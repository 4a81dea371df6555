"""A loss feed bound to a KOALA optimizer, for frameworks that call ``optimizer.step()`` without the loss.

Training frameworks (the Hugging Face ``Trainer``, Lightning) own the loop: they run forward/backward, possibly over
several micro-batches whose gradients accumulate, and then call ``optimizer.step()`` (HF, accelerate, a
``GradScaler``) or ``optimizer.step(closure=...)`` (Lightning). A Kalman filter also needs the loss that the
accumulated gradient belongs to. The integration records every micro-batch's loss into a :class:`LossFeed` as it is
computed, and :meth:`LossFeed.bind` replaces the optimizer *instance's* ``step`` (the class is untouched; this is how
``torch.optim.lr_scheduler`` and accelerate wrap ``step`` too) so that a step without a loss takes it from the feed:

* ``step()`` (no closure, no loss): measures the fed loss;
* ``step(closure)``: runs the closure (the framework's forward/backward, which feeds the last micro-batch) inside
  the optimizer's own ``step(closure)``, so the filter's predict/measure order is kept, and measures the fed loss
  instead of the closure's return value (which is a single micro-batch's, possibly rescaled, loss); if nothing
  was fed it measures what the closure returned, exactly as the unbound optimizer does;
* ``step(closure, loss=...)`` (Lightning's manual optimisation wraps every step in a closure): runs the closure,
  then measures ``loss``;
* ``step(loss=...)``: unchanged.

**What is measured** is the loss whose gradient was accumulated: the weighted sum ``sum_j w_j * mean(loss_j)`` of the
fed micro-batch losses (``w_j`` is 1 when the framework already divided each micro-batch loss by the number of
micro-batches, ``1/M`` otherwise). When every fed loss is 1-d (per-sample), the filter gets a 1-d tensor with that
same mean: the concatenation of the micro-batches' per-sample losses, each rescaled by ``N * w_j / n_j`` (``N`` the
total count; the factor is 1 for equal micro-batches with ``w_j = 1/M``), so that the R statistic sees every sample.

**Gradient clipping.** Clipping by norm multiplies the accumulated gradient by ``c = min(1, max_norm / norm)``: it is
then the gradient of ``c`` times the loss, not of the loss. A filter that measured the unclipped loss against the
clipped gradient would see a measurement ``1/c`` times too large for its gradient and size its step accordingly (with
the KOALA++ default, a Polyak-type step ``c`` times smaller in its gradient and ``1/c`` times larger than consistent).
The integrations hand the clipping factor to the feed (:meth:`LossFeed.scale`), which measures ``c`` times the loss
(every per-sample loss too): measurement and gradient describe the same objective, as without clipping.

**Data parallel.** The feed holds this process's losses only; the KOALA optimizers themselves sum the loss
statistics over the ``torch.distributed`` group in ``step`` (see :class:`~kalmanopt.optim.base.KalmanOptimizer`), so
every replica measures the same global loss.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

from ..optim.base import KalmanOptimizer

__all__ = ["LossFeed", "clip_factor", "unwrap_optimizer"]

_FEED = "_kalmanopt_loss_feed"
_ORIGINAL = "_kalmanopt_original_step"
_STEP = "_kalmanopt_fed_step"


def unwrap_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer behind wrappers that keep it in ``.optimizer`` (accelerate, Lightning)."""
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen and not isinstance(optimizer, KalmanOptimizer):
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def clip_factor(total_norm: Tensor, max_norm: float) -> Tensor:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies the gradients by, from their total norm before it."""
    return (max_norm / (total_norm.detach().float() + 1e-6)).clamp(max=1.0)


def _promote(loss: Tensor) -> Tensor:
    return loss.to(torch.promote_types(loss.dtype, torch.float32))


def _combine(parts: list[tuple[Tensor, float]]) -> Tensor:
    """One measurement from ``(loss, weight)`` parts: mean ``sum_j w_j mean(loss_j)``; 1-d if every part is 1-d."""
    if all(loss.dim() == 1 for loss, _ in parts):
        total = sum(loss.numel() for loss, _ in parts)
        return torch.cat([_promote(loss) * (total * w / loss.numel()) for loss, w in parts])
    means = [_promote(loss).mean() * w for loss, w in parts]
    return torch.stack(means).sum()


class LossFeed:
    """Collects the micro-batch losses of one optimizer step and hands them to a bound KOALA optimizer."""

    def __init__(self) -> None:
        self._parts: list[tuple[Tensor, float]] = []
        self._window: Any = None
        self._scale: Tensor | None = None

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, loss: Tensor, weight: float = 1.0, window: Any = None) -> None:
        """Record one micro-batch's loss (0-d, or 1-d per-sample) with its weight in the accumulated gradient.

        ``window`` names the optimizer step the micro-batch belongs to (e.g. the global step): a loss fed for a
        different window than the pending ones discards them (their step never happened, e.g. skipped by a
        ``GradScaler`` overflow).
        """
        if not isinstance(loss, Tensor):
            loss = torch.as_tensor(loss)
        if loss.dim() > 1:
            raise ValueError(f"a fed loss must be 0-d or 1-d (per-sample), got shape {tuple(loss.shape)}")
        if window != self._window:
            self.clear()
            self._window = window
        self._parts.append((loss.detach(), float(weight)))

    def clear(self) -> None:
        self._parts.clear()
        self._scale = None

    def scale(self, factor: Tensor | float) -> None:
        """Measure ``factor`` times the pending loss: the factor gradient clipping applied to the accumulated
        gradient (a 0-d tensor is never read on the host)."""
        factor = torch.as_tensor(factor).detach()
        self._scale = factor if self._scale is None else self._scale * factor

    def take(self) -> Tensor | None:
        """The measurement for the pending micro-batches (None if nothing was fed); empties the feed."""
        parts, self._parts = self._parts, []
        factor, self._scale = self._scale, None
        if not parts:
            return None
        measured = _combine(parts)
        if factor is None:
            return measured
        # A factor on the CPU (a norm reported as a Python number) multiplies as a CPU scalar, read with the kernel's
        # arguments: copied to a CUDA loss's device, it would wait for the device's queue (a host synchronisation).
        on_host = factor.device.type == "cpu" and factor.dim() == 0
        return measured * (factor.to(dtype=measured.dtype) if on_host else factor.to(measured))

    def bind(self, optimizer: Any) -> KalmanOptimizer | None:
        """Make ``optimizer.step`` take its loss from this feed (idempotent; rebinding replaces the feed).

        ``optimizer`` may be wrapped (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``);
        the KOALA optimizer inside is bound and returned. Anything else is left alone and None is returned.
        """
        opt = unwrap_optimizer(optimizer)
        if not isinstance(opt, KalmanOptimizer):
            return None
        if _ORIGINAL not in opt.__dict__:
            original = opt.step  # the class's step, or the wrapper an LR scheduler installed
            opt.__dict__[_ORIGINAL] = original

            def step(self: KalmanOptimizer, closure: Any = None, *, loss: Tensor | None = None) -> Tensor | None:
                return _fed_step(self, closure, loss=loss)

            if getattr(original, "_wrapped_by_lr_sched", False):
                step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # the scheduler's wrapper is inside
            opt.__dict__[_STEP] = step
            opt.step = types.MethodType(step, opt)
        opt.__dict__[_FEED] = self
        return opt

    @staticmethod
    def unbind(optimizer: Any) -> None:
        """Undo :meth:`bind`: ``step`` needs its loss again.

        If something wrapped the bound ``step`` since (an LR scheduler created after binding), the wrapper stays and
        the bound step inside it passes every call through unchanged.
        """
        opt = unwrap_optimizer(optimizer)
        state = getattr(opt, "__dict__", {})
        if _ORIGINAL not in state:
            return
        state.pop(_FEED, None)
        current = state.get("step")
        if getattr(current, "__func__", None) is state.get(_STEP):
            original = state.pop(_ORIGINAL)
            state.pop(_STEP)
            if isinstance(original, types.MethodType) and original.__func__ is getattr(type(opt), "step", None):
                del opt.step
            else:
                opt.step = original


def _fed_step(self: KalmanOptimizer, closure: Any = None, *, loss: Tensor | None = None) -> Tensor | None:
    """``step`` of a bound optimizer (see the module docstring)."""
    original = self.__dict__[_ORIGINAL]
    feed: LossFeed | None = self.__dict__.get(_FEED)
    if feed is None:
        return original(closure) if loss is None else original(closure, loss=loss)
    if loss is not None:
        feed.clear()
        if closure is not None:
            with torch.enable_grad():
                closure()
        return original(loss=loss)
    if closure is None:
        fed = feed.take()
        return original() if fed is None else original(loss=fed)

    returned: list[Any] = []

    def measured() -> Any:
        out = closure()
        returned.append(out)
        fed = feed.take()
        return out if fed is None else fed

    original(measured)
    return returned[0] if returned else None
