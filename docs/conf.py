"""Sphinx configuration: the API reference (autodoc + napoleon), the Markdown pages through MyST, the furo theme.

Build from the repository root::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The README and BENCHMARKS.md live at the repository root and are *included* (not copied) by ``index.md`` and
``benchmarks.md``; :func:`_repo_relative_links` rewrites their relative links while they are read, so that the same
files work on GitHub and in the built site.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT / "src"))  # document the checkout, installed or not

import kalmanopt  # noqa: E402

project = "kalmanopt"
author = "the kalmanopt authors"
copyright = "2026, the kalmanopt authors"
release = version = kalmanopt.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# docs/benchmarks/*.md are the sections BENCHMARKS.md is assembled from; the site shows BENCHMARKS.md itself.
exclude_patterns = ["_build", "benchmarks/**", "Thumbs.db", ".DS_Store"]

# ---------------------------------------------------------------------------------------------- MyST (Markdown)
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # GitHub-style #slug links inside README.md and BENCHMARKS.md

# ---------------------------------------------------------------------------------------------- autodoc
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# The integrations import their frameworks (transformers, pytorch_lightning, peft: the "test" extra). Where one is
# not installed, autodoc imports a mock of it instead, so that `pip install -e ".[docs]"` alone builds the site.
_OPTIONAL = ("transformers", "pytorch_lightning", "lightning", "peft", "accelerate")
autodoc_mock_imports = [m for m in _OPTIONAL if importlib.util.find_spec(m) is None]

# ---------------------------------------------------------------------------------------------- HTML
html_theme = "furo"
html_title = f"kalmanopt {release}"
html_static_path: list[str] = []

# ---------------------------------------------------------------------------------------------- included root files
# Relative link targets in the root-level Markdown files, as the built site sees them from docs/.
_PAGES = {"README.md": "index.md", "BENCHMARKS.md": "benchmarks.md"}
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^#|^/")


def _target(target: str) -> str:
    path, sep, anchor = target.partition("#")
    if path in _PAGES:
        path = _PAGES[path]
    elif path.startswith("docs/"):
        path = path[len("docs/"):]
    else:  # a file elsewhere in the repository (images under results/, LICENSE, examples/): link to it as a file
        path = "../" + path
    return path + sep + anchor


def _repo_relative_links(app, relative_path: Path, parent_docname: str, content: list[str]) -> None:
    """``include-read`` hook: make the links of an included root-level Markdown file relative to docs/."""
    if Path(relative_path).parent != Path("..") or Path(relative_path).suffix != ".md":
        return
    content[0] = _LINK.sub(
        lambda m: m.group(0) if _SCHEME.match(m.group(2)) else m.group(1) + _target(m.group(2)) + m.group(3),
        content[0],
    )


def _page_link(match: re.Match) -> str:
    path, sep, anchor = match.group(2).partition("#")
    if path.startswith("../") and path[3:] in _PAGES:
        return match.group(1) + _PAGES[path[3:]] + sep + anchor + match.group(3)
    return match.group(0)


def _page_links(app, docname: str, content: list[str]) -> None:
    """``source-read`` hook: pages under docs/ link to the root files as ``../BENCHMARKS.md``; use their pages."""
    content[0] = _LINK.sub(_page_link, content[0])


def setup(app):
    app.connect("include-read", _repo_relative_links)
    app.connect("source-read", _page_links)
