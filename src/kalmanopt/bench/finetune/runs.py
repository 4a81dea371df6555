"""The contenders of ``kalmanopt bench finetune`` and one run of one, through a plain loop or the HF Trainer.

A *contender* is a registry optimizer at a learning-rate rule, written ``NAME@RULE``:

* ``xF`` (``x1``, ``x3``, ``x1/3``): F times the regime's conventional AdamW lr (:data:`.tasks.CONVENTIONAL_LR`):
  ``koala++@x1`` is KOALA++ at the very number the user passes to AdamW;
* a number (``adamw@2e-5``, ``prodigy@1``): that lr;
* ``default`` (or the bare name): the optimizer's own default lr, read from its class (``KOALAPlusPlus(params)``).

Weight decay is 0 for every contender (the Trainer's default). Optimizers that set their own step size and take no
schedule (Schedule-Free AdamW) run once per seed, at a constant lr, whatever the schedules asked.

**Loop driver**: :func:`kalmanopt.bench.common.train_run`, as the other suites train: ``losses.mean().backward()``,
``opt.step(loss=losses)`` for the KOALA family (``opt.step()`` for the others), the schedule stepped per batch, no
gradient clipping; the fresh head is not evaluated before training (chance for everyone).

**Trainer driver**: what a user of ``transformers.Trainer`` writes, with the default ``TrainingArguments`` but for
the epochs, batch size, lr, ``lr_scheduler_type`` (``linear``, the default, or ``constant``), logging and output:
so ``max_grad_norm=1.0``, no warm-up, weight decay 0. AdamW is the Trainer's own default optimizer; Schedule-Free
AdamW is ``optim="schedule_free_adamw"``; KOALA++ is :class:`kalmanopt.integrations.hf.KalmanTrainer` with nothing
but ``learning_rate``; any other optimizer is passed as ``optimizers=(opt, None)`` (to ``KalmanTrainer`` for the
KOALA family). The model is evaluated after ``train()`` by the same function as in the loop.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kalmanopt.errors import UsageError, require

from .. import common, registry
from .tasks import CONVENTIONAL_LR, Data, batches, build_model, evaluate, logits

__all__ = ["Contender", "DEFAULT_CONTENDERS", "QUICK_CONTENDERS", "SCHEDULES", "TASK_KEY", "contenders_for",
           "default_lr", "loop_run", "parse_contender", "trainer_run"]

SCHEDULES = ("linear", "constant")
TASK_KEY = "finetune"  # the registry's task key: no weight decay, no task-specific options
DEFAULT_CONTENDERS = ("adamw@x1", "adamw@x1/3", "adamw@x3", "adamw-schedulefree@x1", "prodigy@1", "koala++@x1",
                      "koala++@default")
QUICK_CONTENDERS = ("adamw@x1", "adamw-schedulefree@x1", "koala++@x1")


# ------------------------------------------------------------------------------------------------ contenders
def _class(name: str) -> Any:
    """The optimizer class behind a registry name, for its default lr (None: not known here)."""
    import kalmanopt

    classes = {"koala++": lambda: kalmanopt.KOALAPlusPlus, "koala-v": lambda: kalmanopt.KOALAV,
               "koala-m": lambda: kalmanopt.KOALAM, "adamw": lambda: torch.optim.AdamW,
               "adam": lambda: torch.optim.Adam, "adagrad": lambda: torch.optim.Adagrad,
               "adamw-schedulefree": lambda: require("schedulefree", "Schedule-Free AdamW").AdamWScheduleFree,
               "prodigy": lambda: require("prodigyopt", "Prodigy").Prodigy}
    return classes[name]() if name in classes else None


def default_lr(name: str) -> float:
    """The optimizer's own default lr: what its class puts in a param group when no lr is passed (KOALA++'s depends
    on the preset), else the registry's from-scratch default."""
    cls = _class(name)
    if cls is None:
        return float(registry.get(name).lr["vision"])
    return float(cls([torch.zeros(1, requires_grad=True)]).param_groups[0]["lr"])


def _number(text: str, what: str) -> float:
    num, slash, den = text.partition("/")
    try:
        value = float(num) / (float(den) if slash else 1.0)
    except (ValueError, ZeroDivisionError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--contenders: {what} {text!r} is not a positive number")
    return value


@dataclass(frozen=True)
class Contender:
    """A registry optimizer (``optimizer``) at a learning-rate rule (``rule``: ``"x<F>"``, ``"default"`` or a
    number); ``spec`` is how it was written."""

    spec: str
    optimizer: str
    rule: str

    def lr(self, conventional: float) -> float:
        if self.rule == "default":
            return default_lr(self.optimizer)
        if self.rule.startswith("x"):
            return float(f"{conventional * _number(self.rule[1:], 'factor'):.3g}")
        return _number(self.rule, "lr")

    def describe(self) -> str:
        """The rule in words, for the tables."""
        if self.rule == "default":
            return "its default lr"
        if self.rule == "x1":
            return "the conventional lr"
        if self.rule.startswith("x"):
            return f"{self.rule[1:]} x the conventional lr"
        return f"lr {self.rule}"


def parse_contender(spec: str) -> Contender:
    """``"NAME@RULE"`` -> :class:`Contender`; :class:`UsageError` (one line) for an unknown optimizer, a missing
    package or a malformed rule."""
    name, _, rule = spec.strip().partition("@")
    rule = rule.strip() or "default"
    registry.check(registry.get(name.strip()).name)
    if rule != "default":
        _number(rule[1:] if rule.startswith("x") else rule, "factor" if rule.startswith("x") else "lr")
    if registry.get(name.strip()).loss == "hessian":
        raise UsageError(f"--contenders: {name} needs a double backward, which neither driver does")
    return Contender(spec.strip(), name.strip(), rule)


def contenders_for(specs: tuple[str, ...] | None, data_kind: str, regime: str,
                   optimizers: tuple[str, ...] | None = None) -> list[Contender]:
    """The contenders of a cell: ``specs`` as given, or the defaults (with the regime's second conventional lr, e.g.
    AdamW at 2e-5 for full fine-tuning, after AdamW at the first); only those of ``optimizers`` if given."""
    if specs is None:
        extra = tuple(f"adamw@{lr:g}" for lr in CONVENTIONAL_LR[(data_kind, regime)][1:])
        specs = DEFAULT_CONTENDERS[:1] + extra + DEFAULT_CONTENDERS[1:]
    contenders = [parse_contender(s) for s in specs]
    return [c for c in contenders if optimizers is None or c.optimizer in optimizers]


# ------------------------------------------------------------------------------------------------ the loop
def loop_run(data: Data, regime: str, contender: Contender, lr: float, schedule: str, seed: int, *, epochs: int,
             batch_size: int, clock: str, progress: bool, device: str | torch.device = "cpu") -> dict[str, Any]:
    """One run through :func:`kalmanopt.bench.common.train_run`; the record's ``final`` has ``test_accuracy``,
    ``test_nll`` and ``train_loss`` (the last epoch's mean)."""
    x_train, y_train = data.train
    skipped = {"initial": True}

    def evaluate_after_training(model: torch.nn.Module) -> dict[str, float]:
        if skipped["initial"]:  # train_run's epoch-0 point: a fresh head, chance for every contender
            skipped["initial"] = False
            return {"test_accuracy": math.nan, "test_nll": math.nan}
        return evaluate(model, *data.test)

    def per_sample_loss(model: torch.nn.Module, x: Any, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(model, x), y, reduction="none")

    rec = common.train_run(
        common.RunSpec(contender.optimizer, lr, seed), task=TASK_KEY, make_model=lambda: build_model(data, regime),
        epoch_batches=lambda g: batches(x_train, y_train, batch_size, g),
        steps_per_epoch=(len(y_train) + batch_size - 1) // batch_size, per_sample_loss=per_sample_loss,
        evaluate=evaluate_after_training, budget=common.Budget(epochs), progress=progress,
        desc=f"{data.task}-{regime} loop {contender.spec} {schedule} seed {seed}", schedule=schedule, clock=clock,
        device=device)
    return {"contender": contender.spec, "driver": "loop", **rec, "schedule_asked": schedule}


# ------------------------------------------------------------------------------------------------ the Trainer
class _Examples(torch.utils.data.Dataset):
    """Text examples as the Trainer's data loader takes them: dicts of tensors with ``labels``."""

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.inputs.items()}, "labels": self.labels[i]}


def _quiet_progress() -> type:
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        """The Trainer's progress bar without a printed line per log."""

        def on_log(self, *args: Any, **kwargs: Any) -> None:
            pass

    return QuietProgress


def _collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack, then cut the texts to the batch's longest (as the loop does: the same function, less work)."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    length = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}


def _last_epoch_loss(history: list[dict[str, Any]], epochs: float) -> float:
    losses = [h["loss"] for h in history if "loss" in h and h.get("epoch", 0) > epochs - 1]
    return sum(losses) / len(losses) if losses else math.nan


def trainer_run(data: Data, regime: str, contender: Contender, lr: float, schedule: str, seed: int, *, epochs: int,
                batch_size: int, clock: str, progress: bool, device: str | torch.device = "cpu") -> dict[str, Any]:
    """One run through ``transformers.Trainer`` (``KalmanTrainer`` for the KOALA family), as the module's docstring
    says; training time on both clocks around ``train()``, then the same evaluation as the loop. ``device``: cpu, or
    cuda for the Trainer's own CUDA device (``use_cpu=False``)."""
    import transformers
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from kalmanopt.integrations._loss_feed import unwrap_optimizer
    from kalmanopt.integrations.hf import KalmanTrainer

    if data.kind != "text":
        raise ValueError("the Trainer driver runs the text tasks")
    transformers.logging.set_verbosity_error()
    entry = registry.get(contender.optimizer)
    if entry.loss not in ("plain", "kalman"):
        raise ValueError(f"{contender.optimizer}: the Trainer cannot hand its step the loss it needs")
    applied = schedule if entry.scheduled else "constant"
    steps_per_epoch = (len(data.train[1]) + batch_size - 1) // batch_size
    torch.manual_seed(seed)
    model = build_model(data, regime)
    with tempfile.TemporaryDirectory(prefix="kalmanopt-finetune-") as workdir, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs: dict[str, Any] = dict(
            output_dir=workdir, num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type=applied, seed=seed, logging_steps=1, save_strategy="no", report_to="none",
            disable_tqdm=not progress, use_cpu=torch.device(device).type == "cpu")
        # how a user gets each optimizer into the Trainer
        trainer_cls, extra = Trainer, {}
        if contender.optimizer == "adamw":
            how = "Trainer (its default optimizer, AdamW)"
        elif contender.optimizer == "adamw-schedulefree":
            kwargs["optim"] = "schedule_free_adamw"
            how = "Trainer(optim='schedule_free_adamw')"
        elif contender.optimizer == "koala++":
            trainer_cls, how = KalmanTrainer, "KalmanTrainer (its default optimizer, KOALA++)"
        else:
            trainer_cls = KalmanTrainer if entry.loss == "kalman" else Trainer
            extra["optimizers"] = (entry.make(model, TASK_KEY, lr=lr), None)
            how = f"{trainer_cls.__name__}(optimizers=({entry.label}, None))"
        trainer = trainer_cls(model=model, args=TrainingArguments(**kwargs), train_dataset=_Examples(*data.train),
                              data_collator=_collate, **extra)
        # every step is logged (loss, gradient norm, lr: kept in the record); the Trainer would print each one
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        if progress:
            trainer.add_callback(_quiet_progress())
        common.synchronize(torch.device(device))
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        trainer.train()
        common.synchronize(torch.device(device))  # the last steps may still be queued on a GPU
        wall, cpu = time.perf_counter() - start_wall, time.thread_time() - start_cpu
    opt = unwrap_optimizer(trainer.optimizer)
    final = registry.evaluating(entry, opt, lambda m: evaluate(m, *data.test))(model)  # Schedule-Free: at x
    history = [{k: v for k, v in h.items() if isinstance(v, int | float)} for h in trainer.state.log_history]
    final["train_loss"] = _last_epoch_loss(history, epochs)
    losses = [h["loss"] for h in history if "loss" in h]
    diverged = not all(math.isfinite(v) for v in losses + [final["test_nll"]])
    state = registry.state_bytes(opt)
    messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}"[:300] for w in caught))
    return {
        "contender": contender.spec, "driver": "trainer", "optimizer": contender.optimizer, "label": entry.label,
        "lr": lr, "seed": seed, "weight_decay": 0.0, "budget": "epochs", "epochs": float(trainer.state.epoch or 0),
        "steps": trainer.state.global_step, "train_seconds": cpu if clock == "cpu" else wall, "clock": clock,
        "train_seconds_wall": wall, "train_seconds_cpu": cpu,
        "seconds_per_epoch": (cpu if clock == "cpu" else wall) / epochs,
        "optimizer_state_bytes": state, "parameters": sum(p.numel() for p in model.parameters()),
        "skipped_steps": sum(int(st["skipped_steps"]) for st in opt.state.values()
                             if isinstance(st, dict) and "skipped_steps" in st),
        "diverged": diverged, "final": final, "history": history,
        "schedule": applied if entry.scheduled else "none (sets its own step size)", "schedule_asked": schedule,
        "warmup_steps": 0, "steps_per_epoch": steps_per_epoch, "trainer": how,
        "max_grad_norm": trainer.args.max_grad_norm,
        "warnings": messages, "diagnostics": [],
    }
