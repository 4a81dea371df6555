"""``kalmanopt bench covariance``: where a run writes (never over the recorded results/ and docs/ unless asked).

The exact EKF runs for three samples on 40 digits held in memory, on a LeNet-5 narrowed further (190 parameters) so
that the test takes about a second."""

from __future__ import annotations

import json
import types

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from kalmanopt import data  # noqa: E402
from kalmanopt.cli import main  # noqa: E402


@pytest.fixture
def digits(monkeypatch):
    """``mnist_subset`` served from memory (40 random 28x28 digits), and a 190-parameter LeNet-5."""
    from kalmanopt.bench import covariance

    lenet = covariance.NarrowLeNet5
    monkeypatch.setattr(covariance, "NarrowLeNet5", lambda: lenet(c1=1, c2=1, f1=4, f2=4))
    g = torch.Generator().manual_seed(0)
    fake = types.SimpleNamespace(x_train=torch.randint(0, 255, (30, 28, 28), dtype=torch.uint8, generator=g),
                                 y_train=torch.randint(0, 10, (30,), generator=g),
                                 x_test=torch.randint(0, 255, (10, 28, 28), dtype=torch.uint8, generator=g),
                                 y_test=torch.randint(0, 10, (10,), generator=g))
    monkeypatch.setattr(data, "load", lambda name, root=None: fake)


def test_quick_run_leaves_the_recorded_results_and_page_alone(digits, tmp_path, monkeypatch, capsys):
    recorded = {tmp_path / "results" / "covariance" / "covariance.json": "recorded\n",
                tmp_path / "docs" / "benchmarks" / "covariance.md": "recorded page\n"}
    for path, text in recorded.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "covariance", "--quick", "--samples", "3", "--no-progress"]
    assert main(argv) == 0
    assert all(path.read_text() == text for path, text in recorded.items())
    scratch = tmp_path / "kalmanopt-results" / "covariance-quick"
    assert json.loads((scratch / "covariance.json").read_text())["config"]["samples"] == 3
    assert "## Covariance evolution" in (scratch / "covariance.md").read_text()
    assert str(scratch) in capsys.readouterr().out
    # the recorded files by name: refused without --overwrite, before anything runs
    assert main([*argv, "--out", "results/covariance", "--docs", "docs/benchmarks/covariance.md"]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert all(path.read_text() == text for path, text in recorded.items())
