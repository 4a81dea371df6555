"""``kalmanopt bench finetune``: the quick mode end to end on a tiny random BERT and synthetic data (MiniLM and the
datasets are swapped out, as the online suite's tests do), the results files, the page, and the option checks."""

import gc
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from kalmanopt.bench import common, finetune, registry  # noqa: E402
from kalmanopt.bench.finetune import report, runs, tasks  # noqa: E402
from kalmanopt.cli import main  # noqa: E402

VOCAB = 64


def _tokenize(texts, max_length):
    """Words ``w<k>`` -> token ``k + 2`` (0 pads), truncated and padded to ``max_length``."""
    ids = torch.zeros(len(texts), max_length, dtype=torch.long)
    for i, text in enumerate(texts):
        words = [2 + int(w[1:]) for w in text.split()][:max_length]
        ids[i, :len(words)] = torch.tensor(words)
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


def _swap_in_tiny_models_and_data(mp):
    """A two-layer 16-wide random BERT in place of MiniLM, synthetic texts (five classes, each with its own words),
    synthetic 28x28 images and a random 'pretrained' CNN; no dataset is fetched."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64))
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=g)
    texts = [" ".join(f"w{10 * int(y) + int(k)}" for k in torch.randint(0, 10, (12,), generator=g)) for y in labels]
    y_img = torch.randint(0, 10, (300,), generator=g)
    x_img = torch.randn(300, 1, 28, 28, generator=g) + y_img.view(-1, 1, 1, 1) / 5
    torch.manual_seed(1)
    cnn = {k: v.clone() for k, v in tasks.SmallCNN().state_dict().items()}
    mp.setattr(tasks, "load_encoder", lambda progress=True: (_tokenize, encoder))
    mp.setattr(tasks, "load_texts", lambda task: (texts, labels, ["a", "b", "c", "d", "e"]))
    mp.setattr(tasks, "load_images", lambda: (x_img[:200], y_img[:200], x_img[200:], y_img[200:]))
    mp.setattr(tasks, "cnn_weights", lambda progress=True: cnn)
    mp.setattr(finetune, "required_datasets", lambda args: [])
    mp.setattr(finetune, "required_packages", lambda args: [])
    # accelerate ends every Trainer.train() with gc.collect(): about a second in a large test process, nothing here
    mp.setattr(gc, "collect", lambda *args: 0)


@pytest.fixture()
def tiny(monkeypatch, tmp_path):
    _swap_in_tiny_models_and_data(monkeypatch)
    return tmp_path


QUICK = ["bench", "finetune", "--quick", "--no-progress", "--train-size", "48", "--test-size", "24"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick mode run once for the module's tests: its results folder."""
    out = tmp_path_factory.mktemp("finetune") / "results"
    with pytest.MonkeyPatch.context() as mp:
        _swap_in_tiny_models_and_data(mp)
        assert main([*QUICK, "--contenders", "adamw@x1,adamw-schedulefree@x1,prodigy@1,koala++@x1", "--out",
                     str(out)]) == 0
    return out


def test_quick_run_writes_what_the_report_needs(quick):
    """Every cell of the quick mode (MNIST's two regimes through the loop; BBC's two regimes through the loop and the
    Trainer) runs its contenders; the files hold the metrics, times, resolved lrs and provenance."""
    out = quick
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == ["bbc-full-loop-quick.json", "bbc-full-trainer-quick.json", "bbc-lora-loop-quick.json",
                     "bbc-lora-trainer-quick.json", "mnist-full-loop-quick.json", "mnist-last-loop-quick.json"]
    for name in files:
        res = json.loads((out / name).read_text())
        assert res["suite"] == "finetune" and res["provenance"]["command"].startswith("kalmanopt bench finetune")
        assert "--contenders" in res["provenance"]["command"] and res["provenance"]["packages"]["torch"]
        conventional = res["config"]["conventional_lr"][0]
        assert conventional == {"full": 5e-5 if res["task"] == "bbc" else 1e-3, "lora": 5e-4, "last": 1e-3}[
            res["regime"]]
        # KOALA++ and AdamW at the very same lr number; Prodigy at 1
        lrs = {r["contender"]: r["lr"] for r in res["runs"]}
        assert lrs == {"adamw@x1": conventional, "adamw-schedulefree@x1": conventional, "prodigy@1": 1.0,
                       "koala++@x1": conventional}
        for r in res["runs"]:
            f = r["final"]
            assert 0 <= f["test_accuracy"] <= 1 and f["test_nll"] > 0 and f["train_loss"] > 0
            assert r["train_seconds_cpu"] > 0 and r["train_seconds_wall"] > 0 and r["seed"] == 0
            assert r["steps"] == (3 if res["task"] == "bbc" else 1)  # 48 examples in batches of 16 / of 64
        unscheduled = next(r for r in res["runs"] if r["contender"] == "adamw-schedulefree@x1")
        assert unscheduled["schedule"].startswith("none")
        assert {r["schedule"] for r in res["runs"] if r is not unscheduled} == {"linear"}
        if res["regime"] == "lora":
            assert res["config"]["trainable_parameters"] < res["config"]["parameters"] // 4
        if res["driver"] == "trainer":
            how = {r["contender"]: r["trainer"] for r in res["runs"]}
            assert how["koala++@x1"].startswith("KalmanTrainer (its default optimizer")
            assert how["adamw@x1"].startswith("Trainer (its default optimizer")
            assert all(r["max_grad_norm"] == 1.0 for r in res["runs"])  # the Trainer's default, left alone
def test_the_page_and_figures_render_from_the_results(quick, tmp_path):
    """Tables (mean ± std), the KOALA++ - AdamW row, the command, a figure per cell; quick files make no page."""
    assert report.write_markdown(quick, tmp_path / "docs" / "finetune.md") is None
    out = tmp_path / "results"
    out.mkdir()
    for cell in ("bbc-lora-trainer", "mnist-last-loop"):  # as if they were full runs
        (out / f"{cell}.json").write_text((quick / f"{cell}-quick.json").read_text())
    page = tmp_path / "docs" / "finetune.md"
    assert main(["bench", "finetune", "--report-only", "--out", str(out), "--docs", str(page)]) == 0
    text = page.read_text()
    assert "Test accuracy (%), linear schedule:" in text
    assert "| Schedule-Free AdamW at the conventional lr (`adamw-schedulefree@x1`) (no schedule) |" in text
    assert text.count("| *KOALA++ − AdamW, both at the conventional lr (points)* |") == 1
    assert "### bbc-lora-trainer: BBC News, LoRA, Hugging Face Trainer" in text
    assert "| contender | lr | schedule | test acc. (%) | test NLL | final train loss | train s (thread CPU) |" in text
    assert f"Command: `{json.loads((out / 'mnist-last-loop.json').read_text())['provenance']['command']}`" in text
    assert (out / "bbc-lora-trainer.png").exists() and "(../results/mnist-last-loop.png)" in text


def test_resume_runs_only_what_is_missing_and_refuses_other_settings(tiny, capsys):
    out = tiny / "r"
    base = [*QUICK, "--tasks", "mnist", "--regimes", "full", "--contenders", "adamw@x1,adamw@default", "--out",
            str(out)]
    assert main(base) == 0
    first = json.loads((out / "mnist-full-loop-quick.json").read_text())
    # adamw@default is AdamW's 1e-3, the CNN's conventional lr: one run, recorded as the same
    assert [r["contender"] for r in first["runs"]] == ["adamw@x1"] and first["same_as"] == {"adamw@default":
                                                                                            "adamw@x1"}
    assert main([*base, "--seeds", "0", "1", "--resume"]) == 0
    second = json.loads((out / "mnist-full-loop-quick.json").read_text())
    assert [r["seed"] for r in second["runs"]] == [0, 1] and second["runs"][0] == first["runs"][0]
    assert second["provenance_history"] == [first["provenance"]]  # the command that made the kept run
    capsys.readouterr()
    assert main([*base, "--epochs", "2", "--resume"]) == 2  # other settings: refused, the file left alone
    assert "--resume" in capsys.readouterr().err
    assert json.loads((out / "mnist-full-loop-quick.json").read_text()) == second


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "imagenet"], "unknown 'imagenet'"),
    (["--tasks", "mnist", "--regimes", "lora"], "no cell"),
    (["--schedules", "cosine"], "unknown 'cosine'"),
    (["--contenders", "nope@x1"], "unknown optimizer 'nope'"),
    (["--contenders", "adamw@x0"], "not a positive number"),
    (["--contenders", "adamw@fast"], "not a positive number"),
    (["--contenders", "adahessian@x1"], "double backward"),
    (["--contenders", "momo@x1", "--tasks", "bbc"], "--drivers loop"),
    (["--epochs", "0"], "at least 1"),
    (["--seeds", "-1"], "at least 0"),
    (["--optimizers", "koala-v", "--contenders", "adamw@x1"], "none of the contenders"),
    (["--report-only"], "no results files"),
])
def test_bad_options_fail_in_one_line_before_anything_is_written(tiny, capsys, extra, message):
    out = tiny / "never"
    if extra[:2] == ["--contenders", "momo@x1"]:
        pytest.importorskip("momo")
    try:
        status = main([*QUICK, *extra, "--out", str(out)])
    except SystemExit as e:  # the parser's own errors (option types)
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_existing_results_file_is_replaced_only_when_asked(tiny, capsys):
    out = tiny / "o"
    out.mkdir()
    (out / "mnist-full-loop-quick.json").write_text("{}")
    argv = [*QUICK, "--tasks", "mnist", "--regimes", "full", "--contenders", "adamw@x1", "--out", str(out)]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "mnist-full-loop-quick.json").read_text() == "{}"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "mnist-full-loop-quick.json").read_text())["runs"]


def test_contender_rules():
    import kalmanopt

    koala = runs.parse_contender("koala++@x1")
    assert koala.lr(5e-5) == 5e-5 and koala.lr(5e-4) == 5e-4  # AdamW's number, whatever the regime
    assert runs.parse_contender("adamw@x1/3").lr(5e-5) == pytest.approx(1.67e-5)
    assert runs.parse_contender("adamw@x3").lr(5e-4) == pytest.approx(1.5e-3)
    assert runs.parse_contender("prodigy@1").lr(5e-5) == 1.0
    default = kalmanopt.KOALAPlusPlus([torch.zeros(1, requires_grad=True)]).param_groups[0]["lr"]
    assert runs.parse_contender("koala++@default").lr(5e-5) == default
    assert runs.parse_contender("adamw").lr(5e-5) == 1e-3 == runs.default_lr("adamw")
    specs = [c.spec for c in runs.contenders_for(None, "text", "full")]
    assert specs == ["adamw@x1", "adamw@2e-05", "adamw@x1/3", "adamw@x3", "adamw-schedulefree@x1", "prodigy@1",
                     "koala++@x1", "koala++@default"]
    assert "adamw@2e-05" not in [c.spec for c in runs.contenders_for(None, "text", "lora")]


def test_registry_gives_the_optimizer_only_the_trainable_parameters():
    """A LoRA model's frozen base weights are not the optimizer's (as in the Trainer): the state and the KOALA
    filter cover the adapters and the head only."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tasks.SmallCNN(), LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name in ("adamw", "koala++"):
        opt = registry.get(name).make(model, runs.TASK_KEY, lr=1e-3)
        assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == trainable < sum(
            p.numel() for p in model.parameters())


def test_linear_schedule_is_the_trainers():
    """``common.lr_scheduler(..., "linear")``: the lr the Trainer's default schedule gives at every step."""
    from transformers import get_linear_schedule_with_warmup

    ours, theirs = ([torch.zeros(1, requires_grad=True)] for _ in range(2))
    a, b = torch.optim.SGD(ours, lr=0.1), torch.optim.SGD(theirs, lr=0.1)
    sa = common.lr_scheduler(a, "linear", total_steps=10)
    sb = get_linear_schedule_with_warmup(b, num_warmup_steps=0, num_training_steps=10)  # the Trainer's default
    for _ in range(12):
        assert a.param_groups[0]["lr"] == pytest.approx(b.param_groups[0]["lr"], abs=1e-12)
        a.step(), b.step(), sa.step(), sb.step()


def test_device_cpu_is_accepted_and_recorded(tiny):
    out = tiny / "results"
    assert main([*QUICK, "--tasks", "mnist", "--contenders", "adamw@x1", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "mnist-full-loop-quick.json").read_text())
    assert result["provenance"]["device"] == "cpu" and "device" not in result["config"]
    assert result["config"]["clock"] == "cpu" and result["runs"]
