r"""The online protocol: stream each sample once, predict with the current parameters, record, then update.

One loop drives LoKO / FullKalman (``step(forward_fn, target)``, which returns the outputs before the update) and any
``torch.optim`` optimizer (forward, cross-entropy, backward, ``step()``) alike, so that every contender sees the same
stream, the same batches and the same bookkeeping::

    result = run_online(model, opt, inputs, labels, order=perm)
    result.online_accuracy[-1]   # average online accuracy after the whole stream

Average online accuracy after N samples is ``(1/N) sum_{i<=N} correct_i`` where ``correct_i`` is decided *before*
sample i updates the model.

Calibration is scored on the same predictions. For every sample the result keeps two predictive distributions:

* the **softmax** of the logits (``loss``, ``confidence``): what a plain network predicts;
* the **reported predictive** (``nll``, ``pred_confidence``, ``pred_correct``): for an output filter that exposes a
  predictive distribution after each step (``optimizer.last_predictive.probs``, e.g. LoKO's linearised predictive
  over the logits before the update), that distribution; for every other optimizer the softmax again.

Online NLL is the mean of :math:`-\log p_i(y_i)`, the expected calibration error (ECE) the standard 15-bin one,
see :func:`expected_calibration_error`.

Devices: the inputs and labels may stay in host memory; each batch is moved to the model's device (that of its first
parameter, or ``device=``) as it is streamed, and on CUDA the step's time is read after the device has finished it
(``torch.cuda.synchronize``): the thread CPU time then includes the host's wait, the wall time is the cost to read.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OnlineResult", "run_online", "default_collate", "is_output_filter", "expected_calibration_error",
           "reliability_bins", "ECE_BINS"]

ECE_BINS = 15


def _bin_index(confidence: float, bins: int) -> int:
    # bin m (0-based) holds m/M < conf <= (m+1)/M; bisect_left on the inner edges gives exactly that, with no
    # rounding of conf * M (0.4 * 15 is 6.000000000000001 in floating point)
    return bisect.bisect_left([m / bins for m in range(1, bins)], confidence)


def reliability_bins(confidence: Sequence[float], correct: Sequence[int], bins: int = ECE_BINS
                     ) -> list[tuple[float, float, int, float, float]]:
    r"""Equal-width bins of the confidence: ``(lower, upper, count, mean confidence, accuracy)`` per bin.

    Bin :math:`m` (of :math:`M`) holds the predictions with :math:`(m-1)/M < \text{conf} \le m/M`; empty bins
    have count 0 and NaN means.
    """
    _check_calibration_input(confidence, correct, bins)
    count, conf_sum, hit_sum = [0] * bins, [0.0] * bins, [0] * bins
    for c, h in zip(confidence, correct, strict=True):
        b = _bin_index(float(c), bins)
        count[b] += 1
        conf_sum[b] += float(c)
        hit_sum[b] += int(h)
    return [(m / bins, (m + 1) / bins, count[m], conf_sum[m] / count[m] if count[m] else math.nan,
             hit_sum[m] / count[m] if count[m] else math.nan) for m in range(bins)]


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[int], bins: int = ECE_BINS) -> float:
    r"""Expected calibration error over equal-width confidence bins (Naeini et al. 2015; Guo et al. 2017).

    .. math::
        \mathrm{ECE} = \sum_{m=1}^{M} \frac{|B_m|}{n}\,\bigl|\operatorname{acc}(B_m) - \operatorname{conf}(B_m)\bigr|,
        \qquad B_m = \{i : (m-1)/M < \text{conf}_i \le m/M\}

    Args:
        confidence: the probability of the predicted class (the largest one), per prediction.
        correct: 1 where the predicted class was the label, else 0.
        bins: the number of bins :math:`M` (15, the usual choice).
    """
    n = len(confidence)
    if n == 0:
        return math.nan
    return sum(cnt / n * abs(acc - conf) for _, _, cnt, conf, acc in reliability_bins(confidence, correct, bins)
               if cnt)


def _check_calibration_input(confidence: Sequence[float], correct: Sequence[int], bins: int) -> None:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"Invalid bins: {bins!r} (a positive int)")
    if len(confidence) != len(correct):
        raise ValueError(f"confidence and correct differ in length ({len(confidence)} vs {len(correct)})")
    for c in confidence:
        if not 0.0 <= float(c) <= 1.0:  # also rejects NaN
            raise ValueError(f"Invalid confidence: {c!r} (a probability in [0, 1])")


@dataclass
class OnlineResult:
    r"""Per-sample records of one pass over a stream (in stream order).

    Attributes:
        correct: 1 where the argmax of the logits (before the update) was the label.
        loss: cross-entropy of the logits, i.e. the softmax NLL :math:`-\log \operatorname{softmax}(z)_y`.
        confidence: the largest softmax probability.
        nll, pred_confidence, pred_correct: the same for the reported predictive (the optimizer's
            ``last_predictive.probs`` where it has one, else the softmax: then equal to ``loss``, ``confidence``,
            ``correct``).
        predictive_batches: how many batches were scored with the optimizer's own predictive (0: softmax only).
        seconds: wall-clock time of the whole pass; cpu_seconds: thread CPU time of the forward passes, backward
            passes and optimizer steps only (bookkeeping excluded; with one torch thread this is the step's whole
            cost, undisturbed by other processes on the machine).
    """

    correct: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    pred_confidence: list[float] = field(default_factory=list)
    pred_correct: list[int] = field(default_factory=list)
    predictive_batches: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    skipped_steps: int = 0

    def ece(self, bins: int = ECE_BINS) -> float:
        """ECE of the reported predictive."""
        return expected_calibration_error(self.pred_confidence, self.pred_correct, bins)

    def softmax_ece(self, bins: int = ECE_BINS) -> float:
        """ECE of the softmax of the logits."""
        return expected_calibration_error(self.confidence, self.correct, bins)

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
        nan = float("nan")
        return {"samples": n, "online_accuracy": (sum(self.correct) / n) if n else nan,
                "mean_loss": (sum(self.loss) / n) if n else nan,
                "nll": (sum(self.nll) / n) if n else nan, "ece": self.ece(),
                "softmax_nll": (sum(self.loss) / n) if n else nan, "softmax_ece": self.softmax_ece(),
                "predictive": "optimizer" if self.predictive_batches else "softmax",
                "seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "skipped_steps": self.skipped_steps}


def is_output_filter(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` takes ``(forward_fn, target)`` (LoKO, FullKalman) rather than a closure."""
    from .optim.full_kalman import FullKalman
    from .optim.loko import LoKO

    return isinstance(optimizer, LoKO | FullKalman)


def _predictive(optimizer: Any, logits: Tensor) -> Tensor | None:
    """The optimizer's class probabilities for this batch (``last_predictive.probs``), or None to use the softmax.

    Only a predictive of the batch's shape is taken: a filter that skipped the step (non-finite output) or observed
    something other than the logits leaves None behind.
    """
    pred = getattr(optimizer, "last_predictive", None)
    probs = getattr(pred, "probs", None)
    if not isinstance(probs, Tensor) or probs.shape != logits.shape:
        return None
    probs = probs.detach().to(torch.float64)
    return probs if bool(torch.isfinite(probs).all()) else None


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


def _to(batch: Any, device: torch.device) -> Any:
    """A tensor or a dict of tensors on ``device`` (the same objects when they are already there)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    return batch


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def run_online(model: nn.Module, optimizer: Any, inputs: Any, labels: Tensor, *, order: Sequence[int] | None = None,
               batch_size: int = 1, forward: Callable[[nn.Module, Any], Tensor] | None = None,
               collate: Callable[[Sequence[Any]], Any] = default_collate, progress: bool = True,
               desc: str | None = None, max_samples: int | None = None,
               device: str | torch.device | None = None) -> OnlineResult:
    """Stream ``inputs``/``labels`` once in ``order`` (default: as given), predict-then-update per batch.

    ``inputs`` is a tensor indexed by sample (images) or a sequence of per-sample items combined by ``collate``
    (e.g. tokenised text as dicts of ``(1, L)`` tensors; padding is the caller's business at batch size > 1).
    ``forward(model, batch)`` returns logits ``(batch, classes)``; default ``model(batch)`` (``model(**batch)``
    for dicts). The model is put in ``eval`` mode (no dropout: the filter's measurement must be deterministic).
    Each batch and its labels are moved to ``device`` (default: where the model's parameters are).
    """
    n = len(labels)
    idx = list(range(n)) if order is None else [int(i) for i in order]
    if max_samples is not None:
        idx = idx[:max_samples]
    forward = forward or _default_forward
    device = _model_device(model) if device is None else torch.device(device)
    on_cuda = device.type == "cuda"
    model.eval()
    kalman = is_output_filter(optimizer)
    result = OnlineResult()
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(idx), desc=desc, disable=not progress, leave=False, mininterval=2.0)
    except ImportError:  # pragma: no cover - tqdm is in the bench extra
        bar = None
    start = time.perf_counter()
    cpu = 0.0
    tiny = torch.finfo(torch.float64).tiny
    for s in range(0, len(idx), batch_size):
        chunk = idx[s:s + batch_size]
        if isinstance(inputs, Tensor):
            batch = inputs[chunk]
        else:
            batch = collate([inputs[i] for i in chunk])
        batch, target = _to(batch, device), labels[chunk].to(device)
        if on_cuda:  # the previous batch's work (and this one's copy) is not this step's
            torch.cuda.synchronize(device)
        t0 = time.thread_time()
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
        if on_cuda:  # the step is queued, not done: wait for it before reading the clock
            torch.cuda.synchronize(device)
        cpu += time.thread_time() - t0
        with torch.no_grad():
            logits = logits.detach()
            losses = F.cross_entropy(logits.float(), target, reduction="none")
            soft = torch.softmax(logits.to(torch.float64), dim=1)
            confidence = soft.max(1).values
            correct = (logits.argmax(1) == target).tolist()
            probs = _predictive(optimizer, logits)
            if probs is None:
                nll, pred_conf, pred_correct = losses.tolist(), confidence.tolist(), correct
            else:
                result.predictive_batches += 1
                # a probability that underflowed to 0 counts as the smallest positive double (NLL <= 708)
                nll = (-probs.gather(1, target.unsqueeze(1)).squeeze(1).clamp_min(tiny).log()).tolist()
                pred_conf = probs.max(1).values.tolist()
                pred_correct = (probs.argmax(1) == target).tolist()
        result.correct.extend(int(c) for c in correct)
        result.loss.extend(float(v) for v in losses)
        result.confidence.extend(float(v) for v in confidence)
        result.nll.extend(float(v) for v in nll)
        result.pred_confidence.extend(float(v) for v in pred_conf)
        result.pred_correct.extend(int(c) for c in pred_correct)
        if bar is not None:
            bar.update(len(chunk))
            if (s // batch_size) % 50 == 0:
                bar.set_postfix(acc=f"{sum(result.correct) / len(result.correct):.3f}")
    if on_cuda:
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = cpu
    if bar is not None:
        bar.close()
    result.skipped_steps = int(getattr(optimizer, "skipped_steps", 0))
    return result
