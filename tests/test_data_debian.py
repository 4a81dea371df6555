"""The Debian-package source of ``kalmanopt data fetch``: ``apt-get download`` + ``dpkg -x`` without root.

No network and no apt: fake ``apt-get`` and ``dpkg`` scripts on PATH. The fake ``apt-get download PKG`` drops a
"package" (here a tar.gz) in its working directory, the fake ``dpkg -x DEB DIR`` untars it into DIR."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kalmanopt import data as D
from kalmanopt.data import sources as F

DEBIAN_DIR = "/usr/share/datasets/toy-mnist"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KALMANOPT_DATA", str(tmp_path / "cache"))


def _idx_files(seed: int = 0) -> dict[str, bytes]:
    """The four gzipped IDX files (uint8 images and labels), by name."""
    rng = np.random.default_rng(seed)
    arrays = (rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), rng.integers(0, 10, 6).astype(np.uint8),
              rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), rng.integers(0, 10, 3).astype(np.uint8))
    out = {}
    for name, a in zip(D.idx.IDX_FILES.values(), arrays, strict=True):
        tmp = Path(f"/tmp/{os.getpid()}-{name}")
        D.write_idx(tmp, a)
        out[name] = tmp.read_bytes()
        tmp.unlink()
    return out


def _fake_deb(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as t:
        for name, content in files.items():
            info = tarfile.TarInfo(f".{DEBIAN_DIR}/{name}")
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _fake_apt(bin_dir: Path, deb: Path | None, log: Path) -> None:
    """``apt-get download PKG`` copies ``deb`` (or fails like apt without package lists); ``dpkg -x`` untars."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    if deb is None:
        apt = 'echo "E: Unable to locate package $2" >&2\nexit 100\n'
    else:
        apt = f'echo "apt-get $* in $(pwd)" >> "{log}"\ncp "{deb}" "./$2_1.0-1_all.deb"\n'
    _script(bin_dir / "apt-get", apt)
    _script(bin_dir / "dpkg", f'echo "dpkg $*" >> "{log}"\n[ "$1" = "-x" ] || exit 2\n'
                              'mkdir -p "$3" && tar -xzf "$2" -C "$3"\n')


def _dataset(files: dict[str, bytes], tmp_path: Path) -> F.Dataset:
    arts = [F.Artifact(n, "sha256:" + hashlib.sha256(gzip.decompress(b)).hexdigest(), of_content=True)
            for n, b in files.items()]
    return F.Dataset("toy_fm", "toy", D.idx.fashion_mnist, arts,
                     [F.SystemPath(str(tmp_path / "not-installed"), "toy-mnist"),
                      F.DebianPackage("toy-mnist", DEBIAN_DIR)], manual="apt-get install toy-mnist")


def test_debian_package_source_fetches_without_installing(tmp_path, monkeypatch):
    files = _idx_files()
    _fake_deb(tmp_path / "pkg.deb", files)
    log = tmp_path / "calls.log"
    _fake_apt(tmp_path / "bin", tmp_path / "pkg.deb", log)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(F.DATASETS, "toy_fm", _dataset(files, tmp_path))
    messages: list[str] = []
    dest = F.fetch("toy_fm", log=messages.append)
    # the system directory was tried first, then the package was downloaded into a temporary directory, unpacked
    assert "not there" in messages[0]
    calls = log.read_text().splitlines()
    assert calls[0].startswith("apt-get download toy-mnist in ") and "kalmanopt-fetch-" in calls[0]
    assert calls[1].startswith("dpkg -x ") and calls[1].split()[2].endswith("toy-mnist_1.0-1_all.deb")
    assert any("Debian package toy-mnist" in m and str(dest) in m for m in messages)
    assert sum("sha256 of the decompressed data OK" in m for m in messages) == 4
    d = D.load("toy_fm")
    assert d.x_train.shape == (6, 28, 28) and d.x_test.shape == (3, 28, 28)
    expected = torch.from_numpy(np.frombuffer(gzip.decompress(files["train-images-idx3-ubyte.gz"])[16:],
                                              dtype=np.uint8).reshape(6, 28, 28).copy())
    assert torch.equal(d.x_train, expected)
    # the temporary download directory is gone; only the cache keeps the files
    assert not Path(calls[0].rsplit(" in ", 1)[1]).exists()


def test_debian_package_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    files = _idx_files()
    wrong = dict(files, **{"t10k-labels-idx1-ubyte.gz": gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")})
    _fake_deb(tmp_path / "pkg.deb", wrong)
    _fake_apt(tmp_path / "bin", tmp_path / "pkg.deb", tmp_path / "calls.log")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(F.DATASETS, "toy_fm", _dataset(files, tmp_path))
    with pytest.raises(F.FetchError) as e:
        F.fetch("toy_fm", log=lambda m: None)
    assert "checksum mismatch" in str(e.value) and "t10k-labels-idx1-ubyte.gz" in str(e.value)
    assert "apt-get install toy-mnist" in str(e.value)  # the by-hand instructions stay the last resort
    assert not F.is_cached("toy_fm")


def test_debian_package_source_failures_say_why(tmp_path, monkeypatch):
    files = _idx_files()
    monkeypatch.setitem(F.DATASETS, "toy_fm", _dataset(files, tmp_path))
    # apt-get without package lists
    _fake_apt(tmp_path / "bin", None, tmp_path / "calls.log")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    messages: list[str] = []
    with pytest.raises(F.FetchError):
        F.fetch("toy_fm", log=messages.append)
    assert "apt-get update" in messages[-1] and "package lists" in messages[-1]
    # no apt-get at all (not a Debian system)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    messages.clear()
    with pytest.raises(F.FetchError):
        F.fetch("toy_fm", log=messages.append)
    assert "apt-get is not installed" in messages[-1]


def test_fashion_mnist_catalogue_order():
    ds = D.DATASETS["fashion_mnist"]
    kinds = [type(s) for s in ds.sources]
    assert kinds == [F.SystemPath, F.DebianPackage, F.Url]
    deb = ds.sources[1]
    assert deb.package == "dataset-fashion-mnist" and deb.directory == ds.sources[0].directory
    # the same content checksums as the other sources; the manual hint (apt-get install, as root) is kept
    assert all(a.checksum.startswith("sha256:") and a.of_content for a in ds.artifacts)
    assert "apt-get install dataset-fashion-mnist" in ds.manual and "apt-get install" in ds.by_hand()
