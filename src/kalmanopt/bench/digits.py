"""The demo task: a small MLP on scikit-learn's bundled 8x8 digits (1,797 images, no download needed)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsResult", "load_digits", "make_mlp", "train_digits"]


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> tuple[torch.Tensor, ...]:
    """Standardised digits as float32 tensors: ``x_train, y_train, x_test, y_test`` (a fixed stratified split)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    x, y = sk_load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed,
                                                        stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    to_x = lambda a: torch.as_tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    to_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return to_x(x_train), to_y(y_train), to_x(x_test), to_y(y_test)


def make_mlp(hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@dataclass
class DigitsResult:
    name: str
    test_accuracy: float
    final_train_loss: float
    seconds: float
    skipped_steps: int = 0


def train_digits(name: str, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], *, epochs: int = 20,
                 batch_size: int = 32, seed: int = 0, data: tuple[torch.Tensor, ...] | None = None,
                 device: str | torch.device = "cpu") -> DigitsResult:
    """Train a fresh MLP (seeded) and return its test accuracy.

    Kalman optimizers receive per-sample losses through ``step(loss=...)``; ``torch.optim`` ones get a plain
    ``step()``. Both see the same data order for a given seed. ``device``: the MLP is built on the CPU (the same
    initial weights everywhere) and moved there with the data; the time waits for the device's queued work.
    """
    device = torch.device(device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (data if data is not None else load_digits()))
    torch.manual_seed(seed)
    model = make_mlp().to(device)
    opt = make_optimizer(model)
    wants_loss = hasattr(opt, "predict")
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=order).to(device)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            losses = F.cross_entropy(model(x_train[idx]), y_train[idx], reduction="none")
            losses.mean().backward()
            if wants_loss:
                opt.step(loss=losses)
            else:
                opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        train_loss = F.cross_entropy(model(x_train), y_train).item()
    skipped = 0
    if wants_loss:
        skipped = int(sum(int(st["skipped_steps"]) for st in opt.state.values() if "skipped_steps" in st))
    return DigitsResult(name, accuracy, train_loss, seconds, skipped)
