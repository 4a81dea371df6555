"""Assemble BENCHMARKS.md from the section pages in docs/benchmarks/.

Usage: ``python docs/benchmarks/assemble.py`` (from the repository root). The headlines are written by hand in
``docs/benchmarks/headlines.md``; every other section is a page that a benchmark command generates (or its
write-up). Links in the pages are relative to docs/benchmarks/; in BENCHMARKS.md they become relative to the root:
``../../results/x.png`` -> ``results/x.png``, ``../algorithms.md`` -> ``docs/algorithms.md``, and a link to another
section page becomes plain text naming its file (the pages are not part of the built site).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = ROOT / "docs" / "benchmarks"

# (page, how many levels its headings move down) in the order of BENCHMARKS.md
SECTIONS = [
    ("headlines.md", 0),
    ("grid_section.md", 0),
    ("fm60k.md", 0),
    ("fm60k_long.md", 0),  # written by hand; its tables by `kalmanopt report` (commands in it)
    ("lm_long.md", 0),  # the same, for the character GPT over 10 epochs
    ("step.md", 0),
    ("vision_lm_protocol.md", 0),
    ("online.md", 0),
    ("loko_defaults.md", 1),  # its "#" title becomes a "##" section, and so on down
    ("vision_lm.md", 0),
    ("r_stat_section.md", 0),
    ("finetune.md", 0),
    ("lr_sensitivity.md", 0),  # written by hand from docs/benchmarks/research/lr_sensitivity.py --table  # written by `kalmanopt bench finetune --docs docs/benchmarks/finetune.md`
]  # online.md ends with covariance.md (the FullKalman experiment), as `kalmanopt bench online` writes it

_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _rewrite(match: re.Match) -> str:
    bang, text, target = match.groups()
    path, sep, anchor = target.partition("#")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", path) or not path:
        return match.group(0)
    if path.startswith("../../"):
        return f"{bang}[{text}]({path[len('../../'):]}{sep}{anchor})"
    if path.startswith("../"):
        return f"{bang}[{text}](docs/{path[len('../'):]}{sep}{anchor})"
    if path.endswith(".md") and "/" not in path:  # another section page: name it (it is not a page of the site)
        return f"{text} (`docs/benchmarks/{path}`)" if text != path else f"`docs/benchmarks/{path}`"
    return match.group(0)


def _shift_headings(text: str, shift: int) -> str:
    """Move every Markdown heading ``shift`` levels down, leaving fenced code blocks alone."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"^#+ ", line):
            line = "#" * shift + line
        out.append(line)
    return "\n".join(out)


def assemble() -> str:
    parts = []
    for name, shift in SECTIONS:
        text = (PAGES / name).read_text().strip("\n")
        if shift:
            text = _shift_headings(text, shift)
        parts.append(_LINK.sub(_rewrite, text))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    (ROOT / "BENCHMARKS.md").write_text(assemble())
    print("wrote BENCHMARKS.md")
