"""The IDX format of MNIST and Fashion-MNIST (``*-idx3-ubyte[.gz]`` images, ``*-idx1-ubyte[.gz]`` labels).

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype> <ndim>``, ``ndim`` big-endian uint32 sizes, then the data
in C order. Both gzip-compressed and plain files are read.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from ._types import ImageData

__all__ = ["FASHION_MNIST_CLASSES", "IDX_FILES", "MNIST_CLASSES", "fashion_mnist", "load_idx_pair", "mnist",
           "read_idx", "write_idx"]

# dtype code -> (numpy big-endian dtype)
_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip or plain) into a native-endian numpy array of its declared shape."""
    path = Path(path)
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    count = int(np.prod(shape)) if shape else 1
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: IDX header says shape {shape} but the file holds {len(raw) - offset} bytes")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``compress`` or when the name ends in ``.gz``)."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    code = _CODES[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(_DTYPES[code]).tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(payload)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / name.removesuffix(".gz"), root / name.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root}: no {name} (or its uncompressed form)")


def load_idx_pair(root: str | Path, classes: list[str]) -> ImageData:
    """The four standard IDX files in ``root`` as uint8 images ``(N, 28, 28)`` and int64 labels."""
    root = Path(root)
    arrays = {key: read_idx(_find(root, name)) for key, name in IDX_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return ImageData(
        x_train=torch.from_numpy(arrays["train_images"].astype(np.uint8)),
        y_train=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        x_test=torch.from_numpy(arrays["test_images"].astype(np.uint8)),
        y_test=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        classes=list(classes),
    )


def fashion_mnist(root: str | Path | None = None) -> ImageData:
    """Fashion-MNIST: 60,000 train / 10,000 test uint8 images ``(N, 28, 28)``, 10 classes.

    ``root`` is a directory holding the four ``*-ubyte.gz`` files; by default the cache of
    ``kalmanopt data fetch fashion_mnist``, then the Debian package's ``/usr/share/datasets/fashion-mnist``.
    """
    from .sources import locate

    return load_idx_pair(locate("fashion_mnist", root), FASHION_MNIST_CLASSES)


def mnist(root: str | Path | None = None) -> ImageData:
    """MNIST, full 60,000 / 10,000, from a directory holding the four standard IDX files."""
    from .sources import locate

    return load_idx_pair(locate("mnist", root), MNIST_CLASSES)
