"""The online protocol: stream each sample once, predict with the current parameters, record, then update.

One loop drives LoKO / FullKalman (``step(forward_fn, target)``, which returns the outputs before the update) and any
``torch.optim`` optimizer (forward, cross-entropy, backward, ``step()``) alike, so that every contender sees the same
stream, the same batches and the same bookkeeping::

    result = run_online(model, opt, inputs, labels, order=perm)
    result.online_accuracy[-1]   # average online accuracy after the whole stream

Average online accuracy after N samples is ``(1/N) sum_{i<=N} correct_i`` where ``correct_i`` is decided *before*
sample i updates the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OnlineResult", "run_online", "default_collate", "is_output_filter"]


@dataclass
class OnlineResult:
    """Per-sample records of one pass over a stream (in stream order)."""

    correct: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    skipped_steps: int = 0

    @property
    def online_accuracy(self) -> list[float]:
        """Average online accuracy after each observed sample."""
        out, total = [], 0
        for i, c in enumerate(self.correct, 1):
            total += c
            out.append(total / i)
        return out

    def running_loss(self, window: int = 50) -> list[float]:
        """Training loss (measured before each update), averaged over the last ``window`` samples."""
        out, acc = [], 0.0
        for i, v in enumerate(self.loss):
            acc += v
            if i >= window:
                acc -= self.loss[i - window]
            out.append(acc / min(i + 1, window))
        return out

    def summary(self) -> dict[str, Any]:
        n = len(self.correct)
        return {"samples": n, "online_accuracy": (sum(self.correct) / n) if n else float("nan"),
                "mean_loss": (sum(self.loss) / n) if n else float("nan"), "seconds": self.seconds,
                "skipped_steps": self.skipped_steps}


def is_output_filter(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` takes ``(forward_fn, target)`` (LoKO, FullKalman) rather than a closure."""
    from .optim.full_kalman import FullKalman
    from .optim.loko import LoKO

    return isinstance(optimizer, LoKO | FullKalman)


def default_collate(items: Sequence[Any]) -> Any:
    """Stack tensors; concatenate dicts of ``(1, ...)`` tensors (pre-tokenised text) key by key."""
    first = items[0]
    if isinstance(first, Tensor):
        return torch.stack(list(items))
    if isinstance(first, dict):
        return {k: torch.cat([it[k] for it in items]) for k in first}
    raise TypeError(f"no default collate for items of type {type(first)!r}; pass collate=")


def _default_forward(model: nn.Module, batch: Any) -> Tensor:
    return model(**batch) if isinstance(batch, dict) else model(batch)


def run_online(model: nn.Module, optimizer: Any, inputs: Any, labels: Tensor, *, order: Sequence[int] | None = None,
               batch_size: int = 1, forward: Callable[[nn.Module, Any], Tensor] | None = None,
               collate: Callable[[Sequence[Any]], Any] = default_collate, progress: bool = True,
               desc: str | None = None, max_samples: int | None = None) -> OnlineResult:
    """Stream ``inputs``/``labels`` once in ``order`` (default: as given), predict-then-update per batch.

    ``inputs`` is a tensor indexed by sample (images) or a sequence of per-sample items combined by ``collate``
    (e.g. tokenised text as dicts of ``(1, L)`` tensors; padding is the caller's business at batch size > 1).
    ``forward(model, batch)`` returns logits ``(batch, classes)``; default ``model(batch)`` (``model(**batch)``
    for dicts). The model is put in ``eval`` mode (no dropout: the filter's measurement must be deterministic).
    """
    n = len(labels)
    idx = list(range(n)) if order is None else [int(i) for i in order]
    if max_samples is not None:
        idx = idx[:max_samples]
    forward = forward or _default_forward
    model.eval()
    kalman = is_output_filter(optimizer)
    result = OnlineResult()
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(idx), desc=desc, disable=not progress, leave=False, mininterval=2.0)
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        bar = None
    start = time.perf_counter()
    for s in range(0, len(idx), batch_size):
        chunk = idx[s:s + batch_size]
        if isinstance(inputs, Tensor):
            batch = inputs[chunk]
        else:
            batch = collate([inputs[i] for i in chunk])
        target = labels[chunk]
        if kalman:
            logits = optimizer.step(lambda batch=batch: forward(model, batch), target)
        else:
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                out = forward(model, batch)
                loss = F.cross_entropy(out, target)
                loss.backward()
            optimizer.step()
            logits = out.detach()
        with torch.no_grad():
            losses = F.cross_entropy(logits.float(), target, reduction="none")
            correct = (logits.argmax(1) == target).tolist()
        result.correct.extend(int(c) for c in correct)
        result.loss.extend(float(v) for v in losses)
        if bar is not None:
            bar.update(len(chunk))
            if (s // batch_size) % 50 == 0:
                bar.set_postfix(acc=f"{sum(result.correct) / len(result.correct):.3f}")
    result.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    result.skipped_steps = int(getattr(optimizer, "skipped_steps", 0))
    return result
