"""``kalmanopt bench online``: the streams it builds (fast ones only; the MiniLM and MNIST streams need caches)."""

import argparse
import copy

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("sklearn")

from kalmanopt.bench import online  # noqa: E402


@pytest.fixture(scope="module")
def _module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture()
def cache(_module_cache, monkeypatch):
    """A data cache of this module's own: the digits MLP is pretrained once for all its tests (about a second)."""
    monkeypatch.setenv("KALMANOPT_DATA", str(_module_cache))
    return _module_cache


def test_digits_shift_stream(cache):
    task = online.load_task("digits_shift")
    assert list((cache / "models").glob("online_mlp_digits_half_a_*.pt"))
    # half B (899 digits) split into disjoint tuning and evaluation pools that cover it
    assert len(task.labels) == 899 and len(task.tune_pool) == 224 and len(task.eval_pool) == 675
    assert sorted(task.tune_pool + task.eval_pool) == list(range(899))
    weights = online.pretrained_digits_mlp()
    xa, ya, xb, yb = online.digits_halves()
    assert len(ya) == 898 and torch.equal(yb, task.labels) and torch.equal(xb, task.inputs)
    model = task.make_base(0)
    with torch.no_grad():
        acc_a = (model(xa).argmax(1) == ya).float().mean().item()
        acc_b = (model(xb).argmax(1) == yb).float().mean().item()
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(online.DIGITS_PERMUTATION_SEED))
        unshifted = torch.empty_like(xb)
        unshifted[:, perm] = xb
        acc_unshifted = (model(unshifted).argmax(1) == yb).float().mean().item()
    # learnt on A, generalises to B without the shift, near chance (10 %) with it: the stream has to be learnt
    assert acc_a > 0.98 and acc_unshifted > 0.93 and acc_b < 0.15
    assert acc_b == pytest.approx(float(weights["_shifted_half_b_accuracy"]))
    assert not any(p.requires_grad for p in model.parameters())
    # LoRA r=4 on both layers, nothing else trainable
    peft_model, opt = online.build(task, "LoRA", "AdamW", 1e-2, 0)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(names) == 4 and all("lora_" in n for n in names)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 4 * (64 + 64) + 4 * (64 + 10)


def test_quick_run_records_calibration_cost_and_the_tables(cache, tmp_path, capsys):
    """``kalmanopt bench online --quick`` on the digits stream, LoRA only, two ablation rows: the results file holds
    what the tables need, and the docs page is generated from it (figures included)."""
    import json

    from kalmanopt.cli import main

    out = tmp_path / "results"
    argv = ["bench", "online", "--task", "digits_shift", "--quick", "--adapters", "LoRA", "--no-progress",
            "--ablations", "rank=0", "--ablations", "noise=ema", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "online_digits_shift_quick.json").read_text())
    assert res["format"] == 2 and res["config"]["samples"] == 60 and res["config"]["tune_samples"] == 30
    assert res["config"]["loko_defaults"] == {k: v for k, v in online.loko_defaults().items()
                                              if isinstance(v, int | float | str | bool)}
    assert list(res["runs"]) == ["LoRA/LoKO", "LoRA/AdamW", "LoRA/AdaGrad", "LoRA/LoKO tuned p0",
                                 "LoRA/LoKO [rank=0]", "LoRA/LoKO [noise=ema]"]
    # LoKO at its defaults is not tuned; the others are, each on its six-point grid
    assert set(res["chosen"]) == {"LoRA/AdamW", "LoRA/AdaGrad", "LoRA/LoKO tuned p0"}
    for label, opt in (("LoRA/AdamW", "AdamW"), ("LoRA/AdaGrad", "AdaGrad"), ("LoRA/LoKO tuned p0", "LoKO tuned p0")):
        grid = online.SWEEPS[opt][1]
        assert len(grid) == 6 and res["chosen"][label] in grid and len(res["tuning"][label]) == 6
        best = max(res["tuning"][label].values())
        assert res["tuning"][label][f"{res['chosen'][label]:g}"] == best
    for label, recs in res["runs"].items():
        assert len(recs) == 2 and [r["order_seed"] for r in recs] == [0, 1]
        for r in recs:
            assert len(r["correct"]) == len(r["loss"]) == len(r["confidence"]) == 60
            assert r["softmax_nll"] == pytest.approx(sum(r["loss"]) / 60, abs=1e-4)
            assert 0 <= r["ece"] <= 1 and r["cpu_seconds_per_sample"] > 0
            if "pred_confidence" in r:  # an optimizer that reports its own predictive (LoKO)
                assert "LoKO" in label and r["nll"] == pytest.approx(sum(r["nll_per_sample"]) / 60, abs=1e-4)
            else:
                assert r["nll"] == r["softmax_nll"]
    # the same orders for every contender: same labels in the same places, so the hits differ only by prediction
    adamw = res["runs"]["LoRA/AdamW"][0]
    assert res["runs"]["LoRA/LoKO"][0]["trainable_parameters"] == adamw["trainable_parameters"] == 808

    # the report: a non-quick copy of the file -> docs page with the table, its command and the figures
    pytest.importorskip("matplotlib")
    (out / "online_digits_shift.json").write_text(json.dumps(res))
    online.plot_task(res, out)
    assert online.plot_reliability(res, out).exists()
    docs = tmp_path / "docs" / "online.md"
    online.write_markdown(out, docs)
    text = docs.read_text()
    assert "| method | chosen | online acc | last 100 | NLL | ECE | softmax NLL | softmax ECE | ms/sample | " in text
    assert f"Command: `{res['provenance']['command']}`" in text or "Command: `kalmanopt " in text
    assert "online_digits_shift_reliability.png" in text and "| LoRA/AdamW | lr=" in text
    assert "| LoRA/LoKO | defaults |" in text and "x LoRA/AdamW" in text
    row = next(line for line in text.splitlines() if line.startswith("| LoRA/AdamW |"))
    assert row.split("|")[10].strip() == "1.00"  # its own cost ratio


@pytest.mark.parametrize("row, match", [
    ("rank", "expected option=value"), ("nope=1", "has no option 'nope'"), ("noise=loud", "Invalid noise"),
    ("rank=-1", "Invalid rank"),
])
def test_bad_ablation_rows(row, match):
    if "rank" in row and "rank" not in online.loko_defaults():
        pytest.skip("this LoKO has no rank option")
    with pytest.raises(ValueError, match=match):
        online.parse_ablation(row)


def test_ablation_rows_parse_and_change_one_thing():
    assert online.parse_ablation("p0=auto,auto_scope=group") == {"p0": "auto", "auto_scope": "group"}
    assert online.parse_ablation("q=0.001") == {"q": 0.001}
    defaults = online.loko_defaults()
    presets = online.ablation_presets()
    for row in presets["all"]:
        kw = online.parse_ablation(row)
        assert any(defaults[k] != v for k, v in kw.items()), row  # never a copy of the default row
    assert set(presets["core"]) <= set(presets["all"]) and presets["none"] == []


def test_bad_options_fail_in_one_line_before_anything_is_written(tmp_path, capsys):
    from kalmanopt.cli import main

    out = tmp_path / "results"
    for argv, match in ((["--ablations", "nope=1"], "has no option 'nope'"), (["--orders", "0"], "--orders"),
                        (["--adapters", "LoRA,VeRA"], "unknown adapter 'VeRA'"), (["--samples", "-3"], "--samples")):
        try:
            status = main(["bench", "online", "--task", "digits_shift", "--quick", "--out", str(out), *argv])
        except SystemExit as e:  # numbers are refused by the parser's types
            status = e.code
        assert status == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err
    assert not out.exists()


def test_build_refuses_what_it_cannot_build(cache):
    task = online.load_task("digits_shift")
    with pytest.raises(ValueError, match="unknown optimizer"):
        online.build(task, "LoRA", "SGD", 0.1, 0)
    with pytest.raises(ValueError, match="unknown adapter"):
        online.build(task, "VeRA", "AdamW", 0.1, 0)
    with pytest.raises(ValueError, match="needs a learning rate"):
        online.build(task, "LoRA", "AdamW", None, 0)
    with pytest.raises(ValueError, match="unknown task"):
        online.load_task("cifar")


def test_loko_at_its_defaults_gets_nothing_but_the_parameters(cache, monkeypatch):
    """The default row is ``LoKO(param_groups)``: ``wrap`` receives no option; the tuned row only ``p0``."""
    from kalmanopt import LoKO
    from kalmanopt.integrations import peft as integration

    seen = []
    real = integration.wrap

    def spy(model, config=None, **kwargs):
        seen.append(kwargs)
        return real(model, config, **kwargs)

    monkeypatch.setattr(integration, "wrap", spy)
    task = online.load_task("digits_shift")
    _, opt = online.build(task, "LoRA", "LoKO", None, 0)
    assert isinstance(opt, LoKO) and seen[-1] == {}
    online.build(task, "LoRA", "LoKO", 0.3, 0)
    assert seen[-1] == {"p0": 0.3}
    online.build(task, "LoRA", "LoKO", None, 0, {"rank": 4} if "rank" in online.loko_defaults() else {"q": 1e-3})
    assert seen[-1] in ({"rank": 4}, {"q": 1e-3})
    defaults = online.loko_defaults()  # what the results file states: the values the optimizer really has
    assert all(opt.param_groups[0][k] == v for k, v in defaults.items() if k in opt.param_groups[0] and k != "p0")


def test_cost_only_measures_every_row_against_adamw(cache, tmp_path, capsys):
    import json

    from kalmanopt.cli import main

    out = tmp_path / "results"
    argv = ["bench", "online", "--task", "digits_shift", "--quick", "--cost-only", "5", "--adapters", "LoRA",
            "--ablations", "observation=loss", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    cost = json.loads((out / "cost_digits_shift_quick.json").read_text())
    assert list(cost["rows"]) == ["LoRA/LoKO", "LoRA/AdamW", "LoRA/AdaGrad", "LoRA/LoKO tuned p0",
                                  "LoRA/LoKO [observation=loss]"]
    assert cost["samples"] == 5 and cost["rounds"] == 3
    for label, row in cost["rows"].items():
        assert len(row["all_rounds_ms"]) == 3 and row["ms_per_sample"] == sorted(row["all_rounds_ms"])[1] > 0
        tuned = label in ("LoRA/AdamW", "LoRA/AdaGrad", "LoRA/LoKO tuned p0")
        per_row = (6 * 30 if tuned else 0) + 2 * 60  # quick: tuning 30 x 6 grid points, 2 orders of 60
        assert row["full_run_minutes"] == pytest.approx(row["ms_per_sample"] * per_row / 6e4)
    assert cost["rows"]["LoRA/AdamW"]["ratio_to_lora_adamw"] == 1.0
    assert "| LoRA/LoKO [observation=loss] |" in capsys.readouterr().out


def test_a_run_without_out_leaves_the_recorded_results_and_page_alone(cache, tmp_path, monkeypatch, capsys):
    """``kalmanopt bench online`` (not quick: it writes a page too) without --out/--docs, in a checkout: the results
    file and the page go to ./kalmanopt-results/online/, the recorded ones are left as they were; naming them takes
    --overwrite."""
    from kalmanopt.cli import main

    recorded = {tmp_path / "results" / "online" / "cost_digits_shift.json": "recorded\n",
                tmp_path / "docs" / "benchmarks" / "online.md": "recorded page\n"}
    for path, text in recorded.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "online", "--task", "digits_shift", "--cost-only", "2", "--adapters", "LoRA", "--ablations",
            "none", "--no-progress"]
    assert main(argv) == 0
    assert all(path.read_text() == text for path, text in recorded.items())
    scratch = tmp_path / "kalmanopt-results" / "online"
    assert (scratch / "cost_digits_shift.json").is_file()
    assert "## Cost per sample" in (scratch / "online.md").read_text()
    assert f"page {scratch / 'online.md'}" in capsys.readouterr().out
    assert main([*argv, "--out", "results/online", "--docs", "docs/benchmarks/online.md"]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert all(path.read_text() == text for path, text in recorded.items())


def test_device_cpu_changes_nothing_and_is_recorded(cache, tmp_path):
    import json

    from kalmanopt.cli import main

    task = online.load_task("digits_shift")
    order = task.eval_pool[:8]
    default = online.run_one(task, "LoRA", "LoKO", None, order, 0, progress=False)
    cpu = online.run_one(task, "LoRA", "LoKO", None, order, 0, progress=False, device="cpu")
    for key in ("correct", "loss", "confidence", "nll_per_sample", "pred_confidence"):
        assert cpu[key] == default[key], key
    out = tmp_path / "results"
    assert main(["bench", "online", "--task", "digits_shift", "--quick", "--cost-only", "1", "--adapters", "LoRA",
                 "--ablations", "none", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads((out / "cost_digits_shift_quick.json").read_text())["provenance"]["device"] == "cpu"


def _bert_classifier(hidden: int, layers: int, heads: int, intermediate: int, classes: int):
    """A randomly initialised BERT encoder (no download) in the classifier the MiniLM streams use, pooler included."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=32, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=intermediate,
                                     max_position_embeddings=16)
    torch.manual_seed(0)
    return online.EncoderClassifier(transformers.BertModel(config).requires_grad_(False), classes)


def _wide_task(make_base, name="nlp_bbc_wide", classes=5):
    from kalmanopt.bench.online.tasks import NLP_ADAPTERS

    targets, rank, adapted = NLP_ADAPTERS[name]
    return online.Task(name, "", [], torch.zeros(0, dtype=torch.long), [], [], make_base, list(targets), rank,
                       classes, modules_to_save=["head"], adapted=adapted)


@pytest.mark.parametrize("adapter", ["LoRA", "DoRA"])
def test_wide_stream_adapts_every_linear_layer_of_every_block_and_nothing_else(adapter):
    """``nlp_bbc_wide``: LoRA/DoRA on query, key, value, attention output and both MLP layers of each block (not the
    pooler, whose output is never read), and every adapter gets a gradient."""
    task = _wide_task(lambda seed: _bert_classifier(16, 2, 2, 32, 3), classes=3)
    model, opt = online.build(task, adapter, "AdamW", 1e-3, 0)
    adapted = {n.split(".lora_A")[0].split("base_model.model.")[-1] for n, _ in model.named_parameters()
               if ".lora_A" in n}
    expected = {f"encoder.encoder.layer.{i}.{m}" for i in range(2) for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")}
    assert adapted == expected
    ids = torch.randint(0, 32, (1, 7), generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=torch.ones_like(ids)),
                                      torch.tensor([1])).backward()
    lora_b = [(n, p) for n, p in model.named_parameters() if ".lora_B" in n]
    assert len(lora_b) == 12 and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora_b)


def test_wide_stream_is_about_nine_times_the_every_block_query_value_adapter():
    """At MiniLM-L6's sizes (384 wide, 1,536 MLP, 6 blocks; random weights): 665,477 trainable parameters with the
    5-class head (DoRA 686,213) against nlp_bbc's 75,653 (DoRA 80,261), the counts the docs state."""
    base = _bert_classifier(384, 6, 12, 1536, 5)
    counts = {}
    for name in ("nlp_bbc", "nlp_bbc_wide"):
        task = _wide_task(lambda seed: copy.deepcopy(base), name)
        for adapter in ("LoRA", "DoRA"):
            _, opt = online.build(task, adapter, "AdamW", 1e-3, 0)
            counts[name, adapter] = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert counts == {("nlp_bbc", "LoRA"): 75_653, ("nlp_bbc", "DoRA"): 80_261,
                      ("nlp_bbc_wide", "LoRA"): 665_477, ("nlp_bbc_wide", "DoRA"): 686_213}


def test_wide_stream_is_a_task_of_the_cli(tmp_path, capsys):
    from kalmanopt.bench.online import SUITES, required_datasets, resolve_ablations
    from kalmanopt.cli import main

    assert "nlp_bbc_wide" in online.TASKS and SUITES["nlp_wide"] == ("nlp_bbc_wide",)
    assert required_datasets(argparse.Namespace(suite="all", task="nlp_bbc_wide")) == ["bbc_news"]
    assert list(resolve_ablations(None, "nlp_bbc_wide")) == online.ablation_presets()["core"]
    out = tmp_path / "results"
    for argv, match in ((["--adapters", "LoRA,VeRA"], "unknown adapter 'VeRA'"), (["--ablations", "nope=1"],
                                                                                  "has no option 'nope'")):
        assert main(["bench", "online", "--task", "nlp_bbc_wide", "--cost-only", "1", "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err
    assert not out.exists()
