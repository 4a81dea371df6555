"""CIFAR-10 and CIFAR-100 in the "python version" format: pickled dict batches.

CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, keys ``b"data"`` (uint8, N x 3072,
channel-major) and ``b"labels"``. CIFAR-100: ``cifar-100-python/{train, test, meta}`` with ``b"fine_labels"``
(and ``b"coarse_labels"``). Neither can be had offline here; point ``root`` at the unpacked directory (or its parent).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ._types import ImageData

__all__ = ["cifar10", "cifar100", "read_batch"]


def read_batch(path: str | Path) -> dict:
    """One pickled batch, with byte-string keys decoded to ``str``."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}


def _images(batch: dict, path: Path) -> torch.Tensor:
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: data of shape {data.shape}, expected (N, 3072)")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def _dir(root: Path, sub: str, probe: str) -> Path:
    for candidate in (root / sub, root):
        if (candidate / probe).is_file():
            return candidate
    raise FileNotFoundError(f"{root}: no {sub}/{probe}")


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def cifar10(root: str | Path | None = None) -> ImageData:
    """CIFAR-10: uint8 images ``(N, 3, 32, 32)``, int64 labels, 50,000 / 10,000."""
    from .sources import locate

    d = _dir(locate("cifar10", root), "cifar-10-batches-py", "test_batch")
    train = [read_batch(d / f"data_batch_{i}") for i in range(1, 6)]
    test = read_batch(d / "test_batch")
    meta = d / "batches.meta"
    classes = _names(read_batch(meta)["label_names"]) if meta.is_file() else [str(i) for i in range(10)]
    return ImageData(
        torch.cat([_images(b, d) for b in train]),
        torch.tensor(np.concatenate([b["labels"] for b in train]), dtype=torch.int64),
        _images(test, d), torch.tensor(test["labels"], dtype=torch.int64), classes)


def cifar100(root: str | Path | None = None) -> ImageData:
    """CIFAR-100 (fine labels): uint8 images ``(N, 3, 32, 32)``, int64 labels, 50,000 / 10,000."""
    from .sources import locate

    d = _dir(locate("cifar100", root), "cifar-100-python", "test")
    train, test = read_batch(d / "train"), read_batch(d / "test")
    meta = d / "meta"
    classes = _names(read_batch(meta)["fine_label_names"]) if meta.is_file() else [str(i) for i in range(100)]
    return ImageData(_images(train, d), torch.tensor(train["fine_labels"], dtype=torch.int64),
                     _images(test, d), torch.tensor(test["fine_labels"], dtype=torch.int64), classes)
