"""The vision and language-model suites end to end on tiny data written in the real formats (IDX gzip, npm text),
the registry's loss paths, the models, and ``kalmanopt report``. CPU only, no network, well under a minute."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kalmanopt.bench import models, registry
from kalmanopt.bench.lm import windows
from kalmanopt.cli import main as cli_main
from kalmanopt.data import write_idx
from kalmanopt.data.idx import IDX_FILES


def need(*packages):
    """Skip unless the optional packages are installed (the bench extra; all are in kalmanopt[test])."""
    for package in packages:
        pytest.importorskip(package, reason=f"needs {package}: install kalmanopt[test]")


def need_optimizers(*names):
    """Skip unless the packages the registry entries import are installed."""
    need(*sorted({m for name in names for m in getattr(registry.get(name), "requires", ())}))


@pytest.fixture
def fashion_dir(tmp_path):
    """A 600/200-image Fashion-MNIST look-alike: class k is a bright k-th row band, plus noise."""
    rng = np.random.default_rng(0)
    d = tmp_path / "fm"
    d.mkdir()

    def make(n):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(y):
            x[i, 2 * k + 3 : 2 * k + 6, :] = 250
        return x, y

    (xtr, ytr), (xte, yte) = make(600), make(200)
    for name, a in zip(IDX_FILES.values(), (xtr, ytr, xte, yte), strict=True):
        write_idx(d / name, a)
    return d


@pytest.fixture
def moby_dir(tmp_path):
    d = tmp_path / "md" / "package" / "data"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["call", "me", "ishmael", "the", "whale", "sea", "ship", "ahab"]
    (d / "data.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(1500)) + "\n")
    return tmp_path / "md"


def test_models_shapes():
    assert models.SmallCNN()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert models.small_resnet()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert models.resnet18(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    tok = models.CharTokenizer("hello world")
    assert tok.decode(tok.encode("hello")) == "hello" and tok.encode("z").tolist() == [0]
    gpt = models.GPT(tok.vocab_size, context=16, d_model=32, n_layers=4, n_heads=4)
    assert gpt(torch.zeros(3, 16, dtype=torch.long)).shape == (3, 16, tok.vocab_size)
    assert gpt.tok.weight is not None and len(gpt.blocks) == 4
    w = windows(torch.arange(21), 5)
    assert w.shape == (4, 6) and w[1].tolist() == [5, 6, 7, 8, 9, 10]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("name", registry.DEFAULT)
def test_every_registered_optimizer_takes_a_step(name):
    need_optimizers(name)
    torch.manual_seed(0)
    model = models.SmallCNN(width=4, hidden=8)
    entry = registry.get(name)
    opt = entry.make(model, "vision")  # K-FAC and AdaFisher take the model
    entry.to_train(opt)  # Schedule-Free steps only in training mode
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = registry.backward_and_step(entry, opt, F.cross_entropy(model(x), y, reduction="none"))
    assert math.isfinite(loss.item())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert registry.lr_grid(name, "vision")[1] == pytest.approx(entry.lr["vision"], rel=1e-3)


def test_gpt_with_hessian_optimizer_runs():
    """AdaHessian needs a double backward through attention: the suite switches to the math SDPA kernel."""
    need("tqdm")
    need_optimizers("adahessian")
    from kalmanopt.bench import common

    gpt = lambda: models.GPT(20, context=8, d_model=16, n_layers=1, n_heads=2)  # noqa: E731
    ids = torch.randint(0, 20, (8, 9))
    rec = common.train_run(common.RunSpec("adahessian", 0.1, 0), task="lm", make_model=gpt,
                           epoch_batches=lambda g: iter([(ids[:, :-1], ids[:, 1:])]), steps_per_epoch=1,
                           per_sample_loss=lambda m, x, y: F.cross_entropy(m(x).reshape(-1, 20), y.reshape(-1),
                                                                           reduction="none"),
                           evaluate=lambda m: {"test_loss": 0.0}, budget=common.Budget(1), progress=False)
    assert rec["steps"] == 1 and not rec["diverged"]


def test_bench_vision_sweep_runs_and_report(fashion_dir, tmp_path):
    need("tqdm", "matplotlib")  # progress bars, the report's figure
    need_optimizers("koala++", "sgd", "adamw")
    out = tmp_path / "results" / "vision" / "fm.json"
    rc = cli_main(["bench", "vision", "--data-root", str(fashion_dir), "--train-size", "300", "--valid-size", "100",
                   "--test-size", "200", "--batch-size", "50", "--epochs", "2", "--seeds", "0", "1",
                   "--optimizers", "koala++,sgd,adamw", "--sweep", "--sweep-epochs", "1", "--lr", "adamw=0.003",
                   "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    prov = res["provenance"]
    for key in ("command", "git_revision", "packages", "cpu", "threads", "date"):
        assert key in prov
    assert prov["threads"] == 1 and "bench vision" in prov["command"]
    assert len(res["runs"]) == 6 and len(res["sweep"]["runs"]) == 6  # adamw's lr was fixed: no sweep for it
    assert res["chosen_lr"]["adamw"] == 0.003
    assert res["chosen_lr"]["koala++"] in registry.lr_grid("koala++", "vision")
    # identical data order and initial weights within a seed: the evaluation before training is identical
    first = {(r["optimizer"], r["seed"]): r["history"][0]["test_loss"] for r in res["runs"]}
    assert first[("koala++", 0)] == first[("sgd", 0)] == first[("adamw", 0)] != first[("sgd", 1)]
    for r in res["runs"]:
        assert len(r["history"]) == 3 and r["history"][-1]["epoch"] == 2
    for r in res["runs"]:  # every run learns the bands: far above the untrained model (chance, ~0.1) it started as
        untrained, final = r["history"][0], r["final"]
        assert final["test_accuracy"] >= untrained["test_accuracy"] + 0.6, r["optimizer"]
        assert final["test_loss"] <= 0.5 * untrained["test_loss"], r["optimizer"]
    md = tmp_path / "docs" / "vm.md"
    assert cli_main(["report", str(out.parent), "--out", str(md)]) == 0
    text = md.read_text()
    assert "| KOALA++ (default) |" in text and "±" in text and "Learning-rate sweep" in text
    assert out.with_suffix(".png").is_file() and "../results/vision/fm.png" in text


def test_bench_vision_quick(fashion_dir, tmp_path, capsys):
    need("tqdm")
    need_optimizers("koala++", "koala-v", "sgd", "adam", "adahessian")
    out = tmp_path / "q.json"
    assert cli_main(["bench", "vision", "--quick", "--data-root", str(fashion_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["quick"] and res["config"]["seeds"] == [0] and res["config"]["epochs"] == 1
    assert [r["optimizer"] for r in res["runs"]] == ["koala++", "koala-v", "sgd", "adam", "adahessian"]
    assert "--quick" in res["provenance"]["command"]


def test_bench_vision_equal_time_budget(fashion_dir, tmp_path):
    need("tqdm")
    need_optimizers("sgd", "adahessian")
    out = tmp_path / "t.json"
    assert cli_main(["bench", "vision", "--data-root", str(fashion_dir), "--train-size", "500", "--valid-size", "50",
                     "--batch-size", "10", "--epochs", "50", "--seconds", "0.3", "--seeds", "0",
                     "--optimizers", "sgd,adahessian", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["clock"] == "cpu"  # the default with one thread
    for r in res["runs"]:
        assert r["budget"] == "time" and r["train_seconds"] < 5.0 and r["epochs"] < 50 and r["clock"] == "cpu"
        assert r["schedule"] == "cosine over the time budget"
    text = cli_report_text(out)
    assert "equal training time, 0.3 s of thread CPU time per run" in text and "`--clock cpu`" in text


def _sleepy_run(clock, seconds=None, epochs=1):
    """One SGD run on a linear model whose batches take 30 ms of sleep each (waiting, not computing)."""
    import time

    from kalmanopt.bench import common

    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def batches(g):
        for _ in range(4):
            time.sleep(0.03)
            yield x, y

    return common.train_run(common.RunSpec("sgd", 0.1, 0), task="vision", make_model=lambda: torch.nn.Linear(4, 2),
                            epoch_batches=batches, steps_per_epoch=4,
                            per_sample_loss=lambda m, a, b: F.cross_entropy(m(a), b, reduction="none"),
                            evaluate=lambda m: {"test_accuracy": 0.0}, budget=common.Budget(epochs, seconds),
                            progress=False, schedule="cosine", clock=clock)


def test_cpu_clock_counts_the_training_threads_work_not_waiting():
    need("tqdm")
    wall, cpu = _sleepy_run("wall"), _sleepy_run("cpu")
    assert wall["clock"] == "wall" and cpu["clock"] == "cpu"
    assert wall["train_seconds"] >= 4 * 0.03  # the sleeps count on the wall clock
    assert cpu["train_seconds"] < 0.06  # and not on the thread's CPU clock (4 tiny SGD steps)
    assert cpu["history"][-1]["seconds"] == cpu["train_seconds"]
    # a time budget on the wall clock stops the sleepy run; on the CPU clock the same budget lets it finish its epochs
    assert _sleepy_run("wall", seconds=0.05, epochs=3)["steps"] < 12
    assert _sleepy_run("cpu", seconds=0.05, epochs=3)["steps"] == 12
    with pytest.raises(ValueError, match="clock"):
        _sleepy_run("gpu")


def test_clock_option_default_and_record(fashion_dir, tmp_path):
    need("tqdm")
    from kalmanopt.bench import common

    out = tmp_path / "w.json"
    assert cli_main(["bench", "vision", "--data-root", str(fashion_dir), "--train-size", "100", "--valid-size", "50",
                     "--test-size", "50", "--batch-size", "50", "--epochs", "1", "--seeds", "0", "--optimizers",
                     "sgd", "--clock", "wall", "--seconds", "60", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["clock"] == "wall" and res["runs"][0]["clock"] == "wall"
    assert "--clock wall" in res["provenance"]["command"]
    assert "equal wall-clock, 60 s of training per run" in cli_report_text(out)
    for threads, expected in ((1, "cpu"), (2, "wall")):
        ns = argparse.Namespace(threads=threads, clock=None)
        assert common.resolve_clock(ns) == expected == ns.clock
    assert common.resolve_clock(argparse.Namespace(threads=1, clock="wall")) == "wall"


def test_cosine_over_a_time_budget_follows_the_fraction_of_time_used():
    from kalmanopt.bench.common import lr_scheduler

    used = {"f": 0.0}
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = lr_scheduler(opt, "cosine", total_steps=1000, fraction=lambda step: used["f"])
    seen = []
    for f in (0.0, 0.5, 1.0, 2.0):
        used["f"] = f
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen[0] == 1.0 and math.isclose(seen[1], 0.5, abs_tol=1e-12) and seen[2] == seen[3] == 0.0


def cli_report_text(path) -> str:
    from kalmanopt.bench import report

    results = report.load_results([path])
    return report.markdown(results, path.parent, {})


def test_bench_lm_quick_on_npm_layout(moby_dir, tmp_path):
    need("tqdm")
    need_optimizers("koala++", "adamw", "sophiah")
    out = tmp_path / "lm.json"
    assert cli_main(["bench", "lm", "--quick", "--data-root", str(moby_dir), "--train-chars", "6000",
                     "--eval-chars", "1500", "--d-model", "16", "--context", "16", "--n-layers", "1",
                     "--optimizers", "koala++,adamw,sophiah", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["quick"] and res["config"]["train_chars"] == 6000
    for r in res["runs"]:
        f = r["final"]
        assert math.isclose(f["test_ppl"], math.exp(f["test_loss"]), rel_tol=1e-6)
        # better than a uniform predictor (perplexity = vocabulary size) and than the untrained model
        assert f["test_ppl"] < res["config"]["vocab_size"], r["optimizer"]
        assert f["test_ppl"] < r["history"][0]["test_ppl"], r["optimizer"]
        if r["optimizer"] in ("koala++", "adamw"):  # the two that must learn in one quick epoch: 5% below untrained
            assert f["test_ppl"] < 0.95 * r["history"][0]["test_ppl"], r["optimizer"]
    text = cli_report_text(out)
    assert "test ppl" in text and "KOALA++" in text
    from kalmanopt.bench import report

    summary = report.summary_table(report.load_results([out, out]))
    assert summary.count("| KOALA++ (default) |") == 1 and summary.count("**") >= 4


def test_schedules_are_the_same_for_every_optimizer():
    from kalmanopt.bench.common import lr_scheduler

    def factors(schedule, warmup):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
        sched = lr_scheduler(opt, schedule, total_steps=10, warmup_steps=warmup)
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"] / 2.0)
            opt.step()
            sched.step()
        return out

    assert factors("constant", 0) == [1.0] * 10
    cosine = factors("cosine", 0)
    assert cosine[0] == 1.0 and all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    assert math.isclose(cosine[5], 0.5, rel_tol=1e-12)
    assert factors("cosine", 4)[:4] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="schedule"):
        factors("step", 0)


def test_bench_vision_records_schedule_and_draws_the_filter(fashion_dir, tmp_path):
    need("tqdm")
    need("matplotlib")
    out = tmp_path / "s.json"
    assert cli_main(["bench", "vision", "--data-root", str(fashion_dir), "--train-size", "300", "--valid-size", "50",
                     "--epochs", "1", "--seeds", "0", "--batch-size", "10", "--schedule", "constant",
                     "--optimizers", "koala++,sgd", "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["schedule"] == "constant"
    koala, sgd = res["runs"]
    assert koala["schedule"] == sgd["schedule"] == "constant"
    assert len(koala["diagnostics"]) >= 20 and not sgd["diagnostics"]
    keys = {"step_size", "S", "h_dot_v", "grad_sq", "noise", "loss", "epoch", "lr_scale"}
    assert keys <= set(koala["diagnostics"][0])
    # the default cap lr / q = 0.01, times lr_adaptation's multiplier (at least 1)
    assert all(0 < d["step_size"] <= 0.01 * d["lr_scale"] * (1 + 1e-6) for d in koala["diagnostics"])
    assert all(d["lr_scale"] >= 1.0 for d in koala["diagnostics"])
    assert (tmp_path / "s-koala++-seed0.png").stat().st_size > 0


def test_time_to_accuracy_figure_shades_the_seeds(tmp_path):
    need("matplotlib")
    from kalmanopt.bench import report

    def run(seed, accs):
        history = [{"epoch": float(i), "seconds": 2.0 * i, "train_loss": 1.0 / (i + 1), "test_accuracy": a}
                   for i, a in enumerate(accs)]
        return {"optimizer": "adamw", "label": "AdamW", "lr": 1e-3, "seed": seed, "history": history,
                "final": history[-1], "diverged": False}

    result = {"suite": "vision", "config": {"dataset": "fashion_mnist", "model": "cnn", "train_size": 10,
                                            "epochs": 2, "seconds": None},
              "provenance": {"command": "kalmanopt bench vision"}, "runs": [run(0, [0.1, 0.5, 0.7]),
                                                                            run(1, [0.1, 0.6, 0.8])]}
    assert report._band(result["runs"], "test_accuracy") == ([0.1, 0.5, 0.7], [0.1, 0.6, 0.8])
    out = report.plot(tmp_path / "r.json", result, tmp_path / "r.png")
    assert out.stat().st_size > 0


def test_report_into_keeps_the_hand_written_part(tmp_path):
    from kalmanopt.bench import report

    page = tmp_path / "page.md"
    report.splice(page, "tables v1")
    assert page.read_text() == report.MARKER + "\n\ntables v1\n"
    page.write_text("# Title\n\nProse.\n\n" + page.read_text())
    report.splice(page, "tables v2\n")
    report.splice(page, "tables v3")
    text = page.read_text()
    assert text == "# Title\n\nProse.\n\n" + report.MARKER + "\n\ntables v3\n"


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_a_run_without_out_leaves_the_recorded_results_alone(fashion_dir, tmp_path, monkeypatch, capsys, quick):
    """In a checkout, ``kalmanopt bench vision [--quick]`` without --out writes to ./kalmanopt-results/: the recorded
    results/vision/fashion_mnist-cnn-epochs.json (the file a quick run used to replace) is left as it was."""
    need("tqdm")
    need_optimizers("sgd")
    checkout = tmp_path / "checkout"
    recorded = checkout / "results" / "vision" / "fashion_mnist-cnn-epochs.json"
    recorded.parent.mkdir(parents=True)
    recorded.write_text("recorded\n")
    monkeypatch.chdir(checkout)
    assert cli_main(["bench", "vision", *(["--quick"] if quick else []), "--data-root", str(fashion_dir),
                     "--train-size", "100", "--valid-size", "50", "--test-size", "50", "--epochs", "1", "--seeds",
                     "0", "--optimizers", "sgd", "--no-progress"]) == 0
    assert recorded.read_text() == "recorded\n"
    assert [p for p in (checkout / "results").rglob("*") if p.is_file()] == [recorded]
    name = f"fashion_mnist-cnn-epochs{'-quick' if quick else ''}.json"
    scratch = checkout / "kalmanopt-results" / "vision" / name
    assert json.loads(scratch.read_text())["config"]["quick"] is quick
    assert f"results: {scratch}" in capsys.readouterr().out  # where the results went


def test_quick_lm_run_leaves_the_recorded_results_alone(moby_dir, tmp_path, monkeypatch):
    need("tqdm")
    need_optimizers("sgd")
    checkout = tmp_path / "checkout"
    recorded = checkout / "results" / "lm" / "moby_dick-gpt1-d16-epochs.json"  # what this run wrote before
    recorded.parent.mkdir(parents=True)
    recorded.write_text("recorded\n")
    monkeypatch.chdir(checkout)
    assert cli_main(["bench", "lm", "--quick", "--data-root", str(moby_dir), "--train-chars", "3000", "--eval-chars",
                     "600", "--d-model", "16", "--context", "16", "--n-layers", "1", "--optimizers", "sgd",
                     "--no-progress"]) == 0
    assert recorded.read_text() == "recorded\n"
    scratch = checkout / "kalmanopt-results" / "lm" / "moby_dick-gpt1-d16-epochs-quick.json"
    assert json.loads(scratch.read_text())["config"]["quick"]


def test_device_cpu_computes_what_the_default_does_and_is_recorded(fashion_dir, tmp_path):
    need("tqdm")
    argv = ["bench", "vision", "--data-root", str(fashion_dir), "--train-size", "100", "--valid-size", "50",
            "--test-size", "50", "--batch-size", "25", "--epochs", "1", "--seeds", "0", "--optimizers", "sgd,adamw",
            "--no-progress"]
    assert cli_main([*argv, "--out", str(tmp_path / "default.json")]) == 0
    assert cli_main([*argv, "--device", "cpu", "--out", str(tmp_path / "cpu.json")]) == 0
    default, cpu = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("default", "cpu"))
    assert cpu["provenance"]["device"] == "cpu" and "device_name" not in cpu["provenance"]
    assert cpu["config"] == default["config"] and "device" not in cpu["config"]
    for a, b in zip(default["runs"], cpu["runs"], strict=True):  # the same numbers, bit for bit
        assert [{k: v for k, v in h.items() if k != "seconds"} for h in a["history"]] == \
            [{k: v for k, v in h.items() if k != "seconds"} for h in b["history"]]


def test_device_checks_and_moves(monkeypatch):
    from kalmanopt.bench import common
    from kalmanopt.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="^--device cuda: CUDA is not available"):
        common.check_device(argparse.Namespace(device="cuda"))
    assert common.check_device(argparse.Namespace()) == torch.device("cpu")  # a namespace built by hand
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, as far as the check knows
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert common.check_device(argparse.Namespace(device="cuda")) == torch.device("cuda")
    with pytest.raises(UsageError, match="cuda:1: this machine has 1 CUDA device"):
        common.check_device(argparse.Namespace(device="cuda:1"))
    # on CUDA the host thread's CPU time does not see the work: the default clock is the wall clock
    assert common.resolve_clock(argparse.Namespace(threads=1, clock=None, device="cuda")) == "wall"
    assert common.resolve_clock(argparse.Namespace(threads=1, clock=None, device="cpu")) == "cpu"
    # batches of every shape the suites make are moved (the meta device stands in for a GPU); on the CPU, not copied
    x, ids = torch.randn(2, 3), torch.ones(2, 4, dtype=torch.long)
    moved = common.to_device(({"input_ids": ids, "attention_mask": ids}, [x]), torch.device("meta"))
    assert moved[0]["input_ids"].is_meta and moved[0]["attention_mask"].is_meta and moved[1][0].is_meta
    assert common.to_device(x, torch.device("cpu")) is x
    assert common.device_of(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert common.device_of(torch.nn.ReLU()) == torch.device("cpu")
