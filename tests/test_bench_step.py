"""``kalmanopt bench step``: parameter sets, the reference-structure baseline, the command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from kalmanopt import KOALAPlusPlus
from kalmanopt.bench import step as step_bench
from kalmanopt.cli import main
from kalmanopt.errors import UsageError
from kalmanopt.optim import _koala_pp_fused


def _gpt_count(d: int, layers: int, vocab: int, context: int) -> int:
    """Parameters of a tied-head GPT by formula: embeddings, 12d^2 + 13d per layer, final LayerNorm."""
    return vocab * d + context * d + layers * (12 * d * d + 13 * d) + 2 * d


@pytest.mark.parametrize(("shapes", "expected"), [
    (step_bench.resnet18_shapes, 11_689_512),  # torchvision resnet18, BN weight+bias included
    (step_bench.resnet50_shapes, 25_557_032),  # torchvision resnet50
    (step_bench.gpt4_shapes, 5_785_088),
    (step_bench.gpt2_shapes, 124_439_808),  # GPT-2 small, tied head
])
def test_parameter_counts(shapes, expected):
    assert step_bench.n_params(shapes()) == expected


def test_gpt_counts_match_the_formula():
    assert step_bench.n_params(step_bench.gpt4_shapes()) == _gpt_count(256, 4, 10_000, 256)
    assert step_bench.n_params(step_bench.gpt2_shapes()) == _gpt_count(768, 12, 50_257, 1_024)


def test_resnet_tensor_counts():
    # ResNet-18: conv1+bn1 (3), 8 blocks x 6, 3 downsamples x 3, fc (2); ResNet-50: 3 + 16 x 9 + 4 x 3 + 2.
    assert len(step_bench.resnet18_shapes()) == 3 + 8 * 6 + 3 * 3 + 2
    assert len(step_bench.resnet50_shapes()) == 3 + 16 * 9 + 4 * 3 + 2


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_reference_structure_matches_koala_pp(weight_decay):
    """The naive baseline computes KOALA++ itself: same parameters as the library's reference kernel."""
    shapes = [(3, 4), (5,), (2, 3, 2)]
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes] for _ in range(3)]
    losses = [torch.tensor(v, dtype=torch.float64) for v in (2.3, 1.7, 1.1)]
    hyper = dict(lr=0.5, sigma=0.2, q=0.1, r=0.5, weight_decay=weight_decay)

    results = []
    for make in (lambda ps: KOALAPlusPlus(ps, foreach=False, preset="paper", **hyper),
                 lambda ps: step_bench._ReferenceStructureKOALAPlusPlus(ps, **hyper)):
        params = [p.clone().requires_grad_(True) for p in start]
        opt = make(params)
        for step_grads, loss in zip(grads, losses, strict=True):
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step(loss=loss)
        results.append([p.detach() for p in params])

    library, baseline = results
    for a, b, s in zip(library, baseline, start, strict=True):
        assert not torch.equal(a, s)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)


def test_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--quick", "--threads", "1", "--out", str(out)]) == 0

    results = json.loads(out.read_text())
    assert results["provenance"]["torch"] == torch.__version__
    [record] = results["results"]
    assert record["preset"] == step_bench.QUICK_PRESET
    keys = [row["key"] for row in record["rows"]]
    expected = [c.key for c in step_bench._contenders()]
    if _koala_pp_fused.load() is None:  # fused=True cannot be built here: its row is skipped with a note
        expected.remove("koala++-fused")
        expected.remove("koala++-fused-bf16")
        assert any("fused=True" in note for note in record["notes"])
    assert sorted(keys) == sorted(expected)
    for row in record["rows"]:
        assert len(row["per_step_ms"]) == record["rounds"]
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
    by_key = {row["key"]: row for row in record["rows"]}
    assert by_key["adamw"]["ratio_to_adamw"] == pytest.approx(1.0)
    assert by_key["adamw"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert by_key["koala++-paper"]["state_bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert by_key["koala++"]["state_bytes_per_param"] == pytest.approx(16.0, abs=0.01)  # + metric and momentum
    for row in record["rows"]:
        assert row["cpu_median_ms"] > 0 and len(row["per_step_cpu_ms"]) == record["rounds"]
    assert by_key["adamw"]["cpu_ratio_to_adamw"] == pytest.approx(1.0)
    path = "fused kernel" if _koala_pp_fused.load() is not None else "multi-tensor path"
    assert f"| KOALA++ (defaults; {path}) |" in capsys.readouterr().out


def test_mlp_preset_is_the_demo_model():
    from kalmanopt.bench.digits import make_mlp

    assert [tuple(p.shape) for p in make_mlp().parameters()] == step_bench.mlp_shapes()
    assert "mlp" in step_bench.ALL_PRESETS


def test_preset_comma_list_and_unknown_names():
    from kalmanopt.cli import build_parser

    parse = lambda *argv: build_parser().parse_args(["bench", "step", *argv])  # noqa: E731
    settings, name = step_bench._settings(parse("--preset", "mlp,resnet18-tiny"))
    assert settings.presets == ["mlp", "resnet18-tiny"] and name == "mlp+resnet18-tiny"
    assert step_bench._settings(parse("--preset", "all"))[0].presets == list(step_bench.ALL_PRESETS)
    with pytest.raises(UsageError, match="unknown preset"):
        step_bench._settings(parse("--preset", "mlp,resnet99"))


def test_quick_run_leaves_the_recorded_results_alone(tmp_path, monkeypatch, capsys):
    """``kalmanopt bench step --quick`` in a checkout writes to ./kalmanopt-results/, not over results/step/; naming
    the recorded file takes --overwrite."""
    monkeypatch.chdir(tmp_path)
    recorded = tmp_path / "results" / "step" / f"step-{step_bench.QUICK_PRESET}.json"
    recorded.parent.mkdir(parents=True)
    recorded.write_text("recorded\n")
    argv = ["bench", "step", "--quick", "--threads", "1", "--optimizers", "adamw", "--rounds", "1",
            "--steps-per-round", "1"]
    assert main(argv) == 0
    assert recorded.read_text() == "recorded\n"
    scratch = tmp_path / "kalmanopt-results" / "step" / f"step-{step_bench.QUICK_PRESET}.json"
    assert json.loads(scratch.read_text())["results"][0]["preset"] == step_bench.QUICK_PRESET
    assert f"kalmanopt-results/step/step-{step_bench.QUICK_PRESET}.json" in capsys.readouterr().err
    assert main([*argv, "--out", str(recorded)]) == 2  # refused before anything runs
    assert "exists: pass --overwrite" in capsys.readouterr().err and recorded.read_text() == "recorded\n"
    assert main([*argv, "--out", str(recorded), "--overwrite"]) == 0
    assert json.loads(recorded.read_text())["settings"]["optimizers"] == ["adamw"]


def test_cuda_steps_are_timed_with_cuda_events(monkeypatch):
    """On CUDA a timing is the device's: the elapsed time between two CUDA events recorded around the steps (the
    host may queue steps faster than the device runs them). Fakes stand in for CUDA here."""
    recorded = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            recorded.append(self)

        def elapsed_time(self, end):
            assert recorded == [self, end]
            return 30.0  # milliseconds between the two events, for 3 steps

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    wall, cpu = step_bench._time_steps(lambda: None, 3, torch.device("cuda"))
    assert len(recorded) == 2 and wall == pytest.approx(0.010) and cpu >= 0
