"""``kalmanopt bench vision``: image classification (KOALA++ Task 1 at CPU scale).

Default: Fashion-MNIST (from ``kalmanopt data fetch fashion_mnist``), the small CNN, every optimizer of the
registry, 3 seeds, equal epochs. ``--seconds S`` gives every optimizer the same training time instead (AdaFisher's
fairness rule: slower optimizers get fewer epochs). ``--sweep`` first picks each optimizer's learning rate on a
validation split held out of the training set. Full-size configurations (CIFAR-10/100 with ResNet-18/50) are behind
``--dataset cifar10 --model resnet18`` and need the data in a user directory (``--data-root``).

Data: pixels scaled to [0, 1], then standardised with the training set's mean and standard deviation. A fixed
validation split (``--valid-size`` images, drawn once with seed 12345) is removed from the training set and used only
by the sweep; ``--train-size`` then keeps a fixed random subset of the rest (the scale knob for CPUs). CIFAR gets
random crops (padding 4) and horizontal flips, drawn from the run's data-order generator.

``--device cuda`` trains and evaluates on the GPU (see :mod:`kalmanopt.bench.common`): the images stay in host
memory, each batch is moved as it is used, and the batches and augmentations are drawn on the CPU as before, so a
seed sees the same batches on every device.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kalmanopt.errors import UsageError

from . import common, models

__all__ = ["add_parser", "check_args", "main", "prepare"]

DATASETS = ("fashion_mnist", "mnist_subset", "mnist", "cifar10", "cifar100")
NORMAL = dict(valid_size=5000, epochs=5, seeds=[0, 1, 2], optimizers=None)
QUICK = dict(train_size=2000, valid_size=500, test_size=1000, epochs=1, seeds=[0],
             optimizers="koala++,koala-v,sgd,adam,adahessian")
SPLIT_SEED = 12345


def prepare(dataset: str, root: str | None, *, train_size: int | None, valid_size: int,
            test_size: int | None) -> dict[str, Any]:
    """Float tensors ``(N, C, H, W)`` for train / valid / test, int64 labels, and the class count."""
    from kalmanopt import data

    d = data.load(dataset, root=root)
    x_tr, x_te = d.x_train, d.x_test
    if x_tr.dtype == torch.uint8:
        x_tr, x_te = x_tr.float() / 255, x_te.float() / 255
    if x_tr.ndim == 3:
        x_tr, x_te = x_tr.unsqueeze(1), x_te.unsqueeze(1)
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(len(x_tr), generator=g)
    valid_idx, train_idx = perm[:valid_size], perm[valid_size:]
    if len(train_idx) == 0:
        raise UsageError(f"--valid-size {valid_size} leaves no training images ({dataset} has {len(x_tr)})")
    if train_size is not None:
        train_idx = train_idx[:train_size]
    test_idx = torch.randperm(len(x_te), generator=g)[:test_size] if test_size else torch.arange(len(x_te))
    x_train = x_tr[train_idx]
    mean, std = x_train.mean(dim=(0, 2, 3), keepdim=True), x_train.std(dim=(0, 2, 3), keepdim=True) + 1e-6
    norm = lambda x: (x - mean) / std  # noqa: E731
    return {
        "train": (norm(x_train), d.y_train[train_idx]), "valid": (norm(x_tr[valid_idx]), d.y_train[valid_idx]),
        "test": (norm(x_te[test_idx]), d.y_test[test_idx]), "num_classes": len(d.classes),
        "in_channels": x_tr.shape[1], "image_size": x_tr.shape[-1],
    }


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random 32x32 crops of the 4-padded images and random horizontal flips (CIFAR's standard augmentation)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2,), generator=g).tolist()  # one offset per batch: cheap, still random
    out = padded[:, :, dy : dy + h, dx : dx + w]
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device)  # drawn on the CPU generator, used where the images are
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor, split: str, batch: int = 1000) -> dict[str, float]:
    model.eval()
    device = common.device_of(model)
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        out = model(xb)
        loss += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    model.train()
    return {f"{split}_loss": loss / len(x), f"{split}_accuracy": correct / len(x)}


def check_args(args: argparse.Namespace) -> None:
    """The defaults (``--quick`` or not), what depends on several options, and the results file: called by the CLI
    before anything is fetched, run or written (:class:`UsageError`, one line)."""
    args._command = common.command_line(args)  # before the defaults are filled in: the options the user gave
    from . import registry

    common.check_device(args)
    common.resolve_defaults(args, {**NORMAL, "optimizers": ",".join(registry.DEFAULT)}, QUICK)
    if args.sweep and args.valid_size < 1:
        raise UsageError("--sweep selects each learning rate on the validation split: give --valid-size of at "
                         "least 1")
    budget = "time" if args.seconds is not None else "epochs"
    args.out_path = common.results_file(args, "vision", f"{args.dataset}-{args.model}-{budget}")


def main(args: argparse.Namespace) -> int:
    if getattr(args, "out_path", None) is None:  # called directly, not through the CLI
        check_args(args)
    torch.set_num_threads(args.threads)
    device = common.check_device(args)
    clock = common.resolve_clock(args)
    data = prepare(args.dataset, args.data_root, train_size=args.train_size, valid_size=args.valid_size,
                   test_size=args.test_size)
    x_train, y_train = data["train"]
    n, bs = len(x_train), args.batch_size
    steps = (n + bs - 1) // bs
    augment = args.augment if args.augment is not None else args.dataset.startswith("cifar")
    make_model = lambda: models.MODELS[args.model](in_channels=data["in_channels"],  # noqa: E731
                                                   num_classes=data["num_classes"])

    def epoch_batches(g: torch.Generator):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            x = x_train[idx]
            yield (_augment(x, g) if augment else x), y_train[idx]

    def per_sample_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y, reduction="none")

    def run(spec: common.RunSpec, budget: common.Budget, split: str) -> dict[str, Any]:
        x_eval, y_eval = data[split]
        return common.train_run(spec, task="vision", make_model=make_model, epoch_batches=epoch_batches,
                                steps_per_epoch=steps, per_sample_loss=per_sample_loss,
                                evaluate=lambda m: _evaluate(m, x_eval, y_eval, split), budget=budget,
                                progress=not args.no_progress, schedule=args.schedule,
                                warmup_steps=args.warmup_steps, clock=clock, device=device)

    out = args.out_path
    config = {"dataset": args.dataset, "model": args.model, "parameters": models.n_parameters(make_model()),
              "train_size": n, "valid_size": len(data["valid"][0]), "test_size": len(data["test"][0]),
              "batch_size": bs, "epochs": args.epochs, "seconds": args.seconds, "augment": augment,
              "seeds": args.seeds, "quick": args.quick,
              "schedule": args.schedule, "warmup_steps": args.warmup_steps, "clock": clock,
              **({"device": str(device)} if device.type != "cpu" else {})}
    per_run = f"{args.seconds:g} s ({common.CLOCK_LABELS[clock]})" if args.seconds else f"{args.epochs} epochs"
    print(f"kalmanopt bench vision: {args.dataset} / {args.model} ({config['parameters']:,} parameters), "
          f"train {n} / valid {config['valid_size']} / test {config['test_size']}, batch {bs}, "
          f"{per_run} per run, seeds {args.seeds}, "
          f"{torch.get_num_threads()} thread(s), {device}; results: {out}", flush=True)
    common.run_suite(args, task="vision", config=config, run=run, select_key="valid_accuracy",
                     higher_is_better=True, out_path=out)
    return 0


def add_parser(bench_subparsers) -> argparse.ArgumentParser:
    from kalmanopt.options import COUNT, NONNEGATIVE

    from . import registry

    p = bench_subparsers.add_parser("vision", help="image classification: Fashion-MNIST / MNIST subset / CIFAR",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="fashion_mnist")
    p.add_argument("--model", choices=list(models.MODELS), default="cnn")
    p.add_argument("--train-size", type=COUNT, default=None, help="keep a fixed random subset of the training set")
    p.add_argument("--valid-size", type=NONNEGATIVE, default=None, help="held out of the training set for the sweep "
                   "(default 5000)")
    p.add_argument("--test-size", type=COUNT, default=None, help="evaluate on a fixed random subset of the test set")
    p.add_argument("--batch-size", type=COUNT, default=128)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop + flip (default: on for CIFAR only)")
    common.add_common_arguments(p, default_optimizers=registry.DEFAULT)
    p.set_defaults(func=main, _parser=p, _prog="bench vision")
    return p
