"""``kalmanopt bench lm``: character-level language modelling with a 4-layer GPT-style decoder (KOALA++ Task 2 at
CPU scale).

Default: Moby-Dick (``kalmanopt data fetch moby_dick``), a 4-layer decoder (d = 64, 4 heads, context 64, tied head),
character tokenizer built on the training split, every optimizer of the registry, 3 seeds, equal epochs. Other
corpora: ``--corpus shakespeare|brown|wikitext2``. ``--full`` is the reference shape (d = 256, context 256); with
WikiText-2 in a user directory (``--corpus wikitext2 --data-root DIR``) it is the papers' configuration except for
the tokenizer (characters, not GPT-2 BPE, which cannot be had offline).

Data: the corpus's fixed split (90/5/5 by characters for the bundled corpora). ``--train-chars`` keeps the first N
characters of the training split (the scale knob), ``--eval-chars`` the first N of valid and test. One epoch is one
pass, in a seeded random order, over the non-overlapping windows of ``context + 1`` characters of the training text.
Every token's cross-entropy is a "sample" for the Kalman optimizers' loss statistics. Reported: loss (nats per
character), perplexity (per character) and bits per character on valid (sweep) or test.

``--device cuda`` trains and evaluates on the GPU (see :mod:`kalmanopt.bench.common`); the windows stay in host
memory and each batch is moved as it is used.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kalmanopt.errors import UsageError

from . import common, models

__all__ = ["add_parser", "check_args", "main", "windows"]

CORPORA = ("moby_dick", "shakespeare", "brown", "wikitext2")
NORMAL = dict(epochs=3, seeds=[0, 1, 2], d_model=64, context=64, n_layers=4, n_heads=4, eval_chars=50_000)
FULL = dict(d_model=256, context=256)
QUICK = dict(train_chars=40_000, eval_chars=8_000, epochs=1, seeds=[0], d_model=32, context=32, n_layers=2,
             optimizers="koala++,koala-v,sgd,adamw,adahessian")
# Optimizers that run on the GPT: all of the registry (Shampoo/SOAP precondition the 2-D weights; dims > 1024 are
# left diagonal).


def windows(ids: Tensor, context: int) -> Tensor:
    """Non-overlapping windows of ``context + 1`` ids (input and shifted target), shape ``(n, context + 1)``."""
    n = (len(ids) - 1) // context
    if n < 1:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one window of {context + 1}")
    idx = torch.arange(n)[:, None] * context + torch.arange(context + 1)[None, :]
    return ids[idx]


@torch.no_grad()
def _evaluate(model: nn.Module, w: Tensor, split: str, batch: int = 64) -> dict[str, float]:
    model.eval()
    device = common.device_of(model)
    total, count = 0.0, 0
    for i in range(0, len(w), batch):
        chunk = w[i : i + batch].to(device)
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train()
    loss = total / count
    return {f"{split}_loss": loss, f"{split}_ppl": math.exp(min(loss, 50.0)), f"{split}_bpc": loss / math.log(2)}


def check_args(args: argparse.Namespace) -> None:
    """The defaults (``--full``, ``--quick``), what depends on several options, and the results file: called by the
    CLI before anything is fetched, run or written (:class:`UsageError`, one line)."""
    args._command = common.command_line(args)  # before the defaults are filled in: the options the user gave
    from . import registry

    common.check_device(args)
    if args.full:
        common.resolve_defaults(args, FULL, {})
    common.resolve_defaults(args, {**NORMAL, "optimizers": ",".join(registry.DEFAULT)}, QUICK)
    if args.d_model % args.n_heads:
        raise UsageError(f"--d-model {args.d_model} is not a multiple of --n-heads {args.n_heads}")
    budget = "time" if args.seconds is not None else "epochs"
    args.out_path = common.results_file(args, "lm", f"{args.corpus}-gpt{args.n_layers}-d{args.d_model}-{budget}")


def _windows(text: str, tok: models.CharTokenizer, context: int, what: str) -> Tensor:
    try:
        return windows(tok.encode(text), context)
    except ValueError:
        raise UsageError(f"the {what} text ({len(text):,} characters) is shorter than one window of --context "
                         f"{context} + 1") from None


def main(args: argparse.Namespace) -> int:
    from kalmanopt import data

    if getattr(args, "out_path", None) is None:  # called directly, not through the CLI
        check_args(args)
    torch.set_num_threads(args.threads)
    device = common.check_device(args)
    clock = common.resolve_clock(args)
    corpus = data.load(args.corpus, root=args.data_root)
    train_text = corpus.train[: args.train_chars] if args.train_chars else corpus.train
    tok = models.CharTokenizer(train_text)
    evals = {s: _windows(getattr(corpus, s)[: args.eval_chars] if args.eval_chars else getattr(corpus, s), tok,
                         args.context, s) for s in ("valid", "test")}
    train_w = _windows(train_text, tok, args.context, "training")
    n, bs = len(train_w), args.batch_size
    steps = (n + bs - 1) // bs

    def make_model() -> nn.Module:
        return models.GPT(tok.vocab_size, context=args.context, d_model=args.d_model, n_layers=args.n_layers,
                          n_heads=args.n_heads, dropout=args.dropout)

    def epoch_batches(g: torch.Generator):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            w = train_w[perm[i : i + bs]]
            yield w[:, :-1], w[:, 1:]

    def per_sample_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")

    def run(spec: common.RunSpec, budget: common.Budget, split: str) -> dict[str, Any]:
        return common.train_run(spec, task="lm", make_model=make_model, epoch_batches=epoch_batches,
                                steps_per_epoch=steps, per_sample_loss=per_sample_loss,
                                evaluate=lambda m: _evaluate(m, evals[split], split), budget=budget,
                                progress=not args.no_progress, schedule=args.schedule,
                                warmup_steps=args.warmup_steps, clock=clock, device=device)

    out = args.out_path
    config = {"corpus": args.corpus, "model": f"GPT {args.n_layers} layers, d={args.d_model}, {args.n_heads} heads, "
                                              f"context {args.context}, tied head, char tokenizer",
              "parameters": models.n_parameters(make_model()), "vocab_size": tok.vocab_size,
              "train_chars": len(train_text), "train_windows": n, "valid_chars": int(evals["valid"][:, 1:].numel()),
              "test_chars": int(evals["test"][:, 1:].numel()), "batch_size": bs, "context": args.context,
              "epochs": args.epochs, "seconds": args.seconds, "seeds": args.seeds, "quick": args.quick,
              "schedule": args.schedule, "warmup_steps": args.warmup_steps, "clock": clock,
              **({"device": str(device)} if device.type != "cpu" else {})}
    per_run = f"{args.seconds:g} s ({common.CLOCK_LABELS[clock]})" if args.seconds else f"{args.epochs} epochs"
    print(f"kalmanopt bench lm: {args.corpus}, {config['model']} ({config['parameters']:,} parameters), "
          f"{config['train_chars']:,} train chars ({n} windows, batch {bs}), {per_run} per run, seeds {args.seeds}, "
          f"{torch.get_num_threads()} thread(s), {device}; results: {out}", flush=True)
    common.run_suite(args, task="lm", config=config, run=run, select_key="valid_loss", higher_is_better=False,
                     out_path=out)
    return 0


def add_parser(bench_subparsers) -> argparse.ArgumentParser:
    from kalmanopt.options import COUNT, number

    from . import registry

    p = bench_subparsers.add_parser("lm", help="character-level GPT on Moby-Dick / Shakespeare / Brown / WikiText-2",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=CORPORA, default="moby_dick")
    p.add_argument("--train-chars", type=COUNT, default=None, help="keep the first N characters of the train split")
    p.add_argument("--eval-chars", type=COUNT, default=None, help="first N characters of valid/test (default 50,000)")
    p.add_argument("--batch-size", type=COUNT, default=32)
    p.add_argument("--d-model", type=COUNT, default=None, help="default 64 (256 with --full)")
    p.add_argument("--context", type=COUNT, default=None, help="default 64 (256 with --full)")
    p.add_argument("--n-layers", type=COUNT, default=None, help="default 4")
    p.add_argument("--n-heads", type=COUNT, default=None, help="default 4")
    p.add_argument("--dropout", type=number(0.0, below=1.0), default=0.0)
    p.add_argument("--full", action="store_true", help="the reference shape: d = 256, context 256")
    common.add_common_arguments(p, default_optimizers=registry.DEFAULT)
    p.set_defaults(func=main, _parser=p, _prog="bench lm")
    return p
