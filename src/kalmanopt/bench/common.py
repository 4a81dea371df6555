"""What the vision and language-model suites share: the training loop under an epoch or a wall-clock budget, the
learning-rate sweep, provenance, and the results file.

One *run* is (optimizer, learning rate, seed). Within a seed every optimizer starts from the same initial weights
(``torch.manual_seed(seed)`` before the model is built) and sees the same batches in the same order (a separate
``torch.Generator`` seeded with ``seed`` draws each epoch's permutation). Evaluation is not counted in the training
time. A run whose training loss turns non-finite stops and is marked ``diverged``.

Training time is measured on one of two clocks (``--clock``): ``wall`` (``time.perf_counter``) or ``cpu``, the CPU
time of the training thread (``time.thread_time``). With one torch thread (the default) every forward, backward and
optimizer step runs in the calling thread, so ``cpu`` counts the run's own work and not the time the process waits for
a core on a loaded, shared machine; it is the default when ``--threads 1``, ``wall`` otherwise (with several torch
threads the work runs in other threads, which ``thread_time`` does not see). The clock bounds the equal-time budget
(``--seconds``) and gives the seconds in the history (the time-to-accuracy figures).

Device (``--device cpu|cuda[:N]``, default ``cpu``): the model is built on the CPU from the seed (the same initial
weights on every device), then moved; the data stays where the suite loaded it and each batch is moved as it is used,
by the training loop and by the suites' evaluations (a no-op on the CPU, so a CPU run computes exactly what it did
before the option existed). On CUDA the queued device work is waited for (``torch.cuda.synchronize``) before every
clock reading, and the default clock is ``wall`` (the CPU time of the host thread does not see the device's work).
``--device cuda`` where CUDA is not available is refused before anything runs (:func:`check_device`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kalmanopt import paths

from . import registry

__all__ = ["CLOCKS", "Budget", "RunSpec", "add_common_arguments", "add_device_argument", "check_device",
           "device_of", "provenance", "resolve_clock", "resolve_defaults", "run_suite", "synchronize", "to_device",
           "train_run"]

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
CLOCK_LABELS = {"wall": "wall-clock", "cpu": "thread CPU time"}


# ------------------------------------------------------------------------------------------------ provenance
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def command_line(args: argparse.Namespace) -> str:
    """The ``kalmanopt ...`` command that reproduces ``args``: the sub-command and every option the user set
    (values that differ from the parser's defaults), whatever way the parser was invoked (shell or ``main(argv)``)."""
    parser: argparse.ArgumentParser = args._parser
    words = ["kalmanopt", *args._prog.split()]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[0] if isinstance(action, argparse.BooleanOptionalAction) else \
            max(action.option_strings, key=len)
        if isinstance(action, argparse.BooleanOptionalAction):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:
            words.append(flag)
        elif isinstance(value, list):
            if action.nargs in ("+", "*"):
                words += [flag, *map(str, value)]
            else:
                for v in value:
                    words += [flag, str(v)]
        else:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


def provenance(command: str | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Command line, git revision, package versions, CPU, threads, load average, date and the device the run used
    (with the card's name on CUDA)."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    device = torch.device(device)
    info = {
        "command": command or shlex.join(sys.argv),
        "git_revision": _git_revision(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "packages": {d: _version(d) for d in ("kalmanopt", "torch", "pytorch_optimizer", "numpy")},
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["packages"]["cuda"] = torch.version.cuda
    return info


# ------------------------------------------------------------------------------------------------ the device
def device_type(text: str) -> str:
    """An argparse type: a torch device string of type cpu or cuda (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return text


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=device_type, default="cpu",
                   help="where the model trains: cpu (default) or cuda[:N] (the data is moved batch by batch; on "
                        "CUDA the timings wait for the device and the default --clock is wall)")


def check_device(args: argparse.Namespace) -> torch.device:
    """``args.device`` (``cpu`` when the namespace has none) as a :class:`torch.device`; :class:`UsageError` (one
    line) for CUDA where this PyTorch build or machine has none, before anything runs or is written."""
    from kalmanopt.errors import UsageError

    text = getattr(args, "device", None) or "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text}: expected cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text}: expected cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available in this PyTorch build or on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """A tensor, or a dict / list / tuple of them, on ``device`` (the same objects when they are already there)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (else buffer) lives; the CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously to the host), so that a clock read next
    covers it; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ one run
@dataclass(frozen=True)
class Budget:
    """``epochs`` (an upper bound when ``seconds`` is set) and an optional training-time limit in seconds."""

    epochs: int
    seconds: float | None = None

    @property
    def kind(self) -> str:
        return "time" if self.seconds is not None else "epochs"


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    lr: float
    seed: int


Batches = Callable[[torch.Generator], Iterator[tuple[Tensor, Tensor]]]


def train_run(spec: RunSpec, *, task: str, make_model: Callable[[], nn.Module], epoch_batches: Batches,
              steps_per_epoch: int, per_sample_loss: Callable[[nn.Module, Tensor, Tensor], Tensor],
              evaluate: Callable[[nn.Module], dict[str, float]], budget: Budget, progress: bool = True,
              desc: str = "", schedule: str = "constant", warmup_steps: int = 0,
              clock: str = "wall", device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train one fresh model; return its record (history per epoch, final metrics, time, state size, and the
    filter's diagnostics over training for the KOALA optimizers that record them). ``clock`` (``"wall"`` or
    ``"cpu"``, see the module's docstring) measures the training time and bounds ``budget.seconds``. ``device``:
    the model is built (from the seed) on the CPU and moved there, each batch is moved there as it is used;
    ``evaluate`` gets the model on it (the suites' evaluations move their batches to :func:`device_of` the model)."""
    from tqdm.auto import tqdm

    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; expected one of {tuple(CLOCKS)}")
    device = torch.device(device)
    clock_now = CLOCKS[clock]

    def now() -> float:  # a reading that covers the device work queued so far
        synchronize(device)
        return clock_now()

    entry = registry.get(spec.optimizer)
    torch.manual_seed(spec.seed)
    model = make_model().to(device)  # before the optimizer: its state is created on the device
    opt = entry.make(model, task, lr=spec.lr)
    evaluate = registry.evaluating(entry, opt, evaluate)  # Schedule-Free: evaluate at x, train at y (else no-op)
    applied = schedule if entry.scheduled else "none (sets its own step size)"
    # Under a time budget the schedule runs over the budget's seconds (the share of the budget used so far, or of
    # the epoch bound if that is reached first), so that every optimizer anneals to 0 when its time is up.
    used = {"seconds": 0.0}
    fraction = (lambda step: max(step / max(budget.epochs * steps_per_epoch, 1),  # noqa: E731
                                 used["seconds"] / budget.seconds)) if budget.seconds is not None else None
    if entry.scheduled and budget.seconds is not None and schedule != "constant":
        applied = f"{schedule} over the time budget"
    scheduler = lr_scheduler(opt, schedule, budget.epochs * steps_per_epoch, warmup_steps, fraction) \
        if entry.scheduled else None
    diagnostics: list[dict[str, float]] = []
    every = max(1, steps_per_epoch // DIAGNOSTICS_PER_EPOCH)
    order = torch.Generator().manual_seed(spec.seed)
    history: list[dict[str, float]] = [{"epoch": 0.0, "seconds": 0.0, "train_loss": math.nan,
                                        **evaluate(model)}]
    train_seconds, steps, diverged, out_of_time = 0.0, 0, False, False
    both_clocks = {"wall": 0.0, "cpu": 0.0}  # the training time on both clocks, whichever one ``clock`` names
    total = budget.epochs * steps_per_epoch
    bar = tqdm(total=total, desc=desc or f"{spec.optimizer} lr={spec.lr:g} seed={spec.seed}", leave=False,
               disable=not progress, mininterval=2.0, dynamic_ncols=True)
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        if entry.loss == "hessian":  # the fused attention kernels have no double backward; the math one has
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        for epoch in range(budget.epochs):
            model.train()
            loss_sum, n_steps = 0.0, 0
            start, start_wall, start_cpu = now(), time.perf_counter(), time.thread_time()
            for x, y in epoch_batches(order):
                x, y = to_device(x, device), to_device(y, device)
                opt.zero_grad(set_to_none=True)
                loss = registry.backward_and_step(entry, opt, per_sample_loss(model, x, y)).item()
                if scheduler is not None:
                    used["seconds"] = train_seconds + now() - start
                    scheduler.step()
                loss_sum += loss
                n_steps += 1
                steps += 1
                if steps % every == 0 and hasattr(opt, "diagnostics"):
                    diagnostics.append(record_diagnostics(opt, steps / steps_per_epoch, loss))
                bar.update(1)
                if not math.isfinite(loss):
                    diverged = True
                    break
                if budget.seconds is not None and train_seconds + now() - start >= budget.seconds:
                    out_of_time = True
                    break
                if n_steps % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / n_steps:.3f}", refresh=False)
            train_seconds += now() - start  # synchronised: the two readings below cover the device's work too
            both_clocks["wall"] += time.perf_counter() - start_wall
            both_clocks["cpu"] += time.thread_time() - start_cpu
            opt.zero_grad(set_to_none=True)  # frees create_graph graphs
            history.append({"epoch": epoch + n_steps / steps_per_epoch, "seconds": train_seconds,
                            "train_loss": loss_sum / max(n_steps, 1), **evaluate(model)})
            if diverged or out_of_time:
                break
    bar.close()
    skipped = 0
    for st in opt.state.values():
        if isinstance(st, dict) and "skipped_steps" in st:
            skipped += int(st["skipped_steps"])
    final = history[-1]
    return {
        "optimizer": spec.optimizer, "label": entry.label, "lr": spec.lr, "seed": spec.seed,
        "weight_decay": entry.weight_decay.get(task, 0.0), "budget": budget.kind,
        "epochs": final["epoch"], "steps": steps, "train_seconds": train_seconds, "clock": clock,
        "train_seconds_wall": both_clocks["wall"], "train_seconds_cpu": both_clocks["cpu"],
        "seconds_per_epoch": train_seconds / final["epoch"] if final["epoch"] > 0 else math.nan,
        "optimizer_state_bytes": registry.state_bytes(opt), "parameters": sum(p.numel() for p in model.parameters()),
        "skipped_steps": skipped, "diverged": diverged, "final": final, "history": history,
        "schedule": applied, "warmup_steps": warmup_steps if entry.scheduled else 0, "diagnostics": diagnostics,
    }


DIAGNOSTICS_PER_EPOCH = 25
SCHEDULES = ("constant", "cosine", "linear")


def lr_scheduler(opt: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0,
                 fraction: Callable[[int], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The same schedule for every optimizer: a linear warm-up over ``warmup_steps``, then ``constant``,
    ``cosine`` annealing to 0 at ``total_steps`` (the reference configurations' CosineAnnealingLR, stepped per
    batch) or ``linear`` decay to 0 there (the Hugging Face Trainer's default). ``fraction(step)``, if given, says
    how much of the run is done (in [0, 1]; an equal-time budget counts seconds) in place of ``step / total_steps``;
    the warm-up still counts steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        if fraction is not None:
            done = min(max(fraction(step), 0.0), 1.0)
        else:
            span = max(total_steps - warmup_steps, 1)
            done = min(step - warmup_steps, span) / span
        if schedule == "linear":  # the Hugging Face Trainer's default: straight down to 0 at the end
            return 1.0 - done
        return 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def record_diagnostics(opt: torch.optim.Optimizer, epoch: float, loss: float) -> dict[str, float]:
    """The first param group's filter diagnostics as numbers (the mean over its blocks), read outside ``step``."""
    record = {"epoch": epoch, "loss": loss}
    groups = opt.diagnostics()
    for key, value in (groups[0] if groups else {}).items():
        if key != "loss":
            record[key] = float(value.float().mean())
    return record


# ------------------------------------------------------------------------------------------------ a suite
def _score(record: dict[str, Any], key: str, higher_is_better: bool) -> float:
    value = record["final"].get(key, math.nan)
    if record["diverged"] or not math.isfinite(value):
        return -math.inf
    return value if higher_is_better else -value


def run_suite(args: argparse.Namespace, *, task: str, config: dict[str, Any], run: Callable[..., dict[str, Any]],
              select_key: str, higher_is_better: bool, out_path: Path) -> dict[str, Any]:
    """Sweep (optional) then the seeded runs; write the results file after every run (so a killed suite keeps
    what it finished). ``run(spec, budget, split)`` trains one run; ``split`` is ``"valid"`` in the sweep."""
    from tqdm.auto import tqdm

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    for n in names:
        registry.get(n)
    overrides = dict(_parse_lr(s) for s in (args.lr or []))
    prov = provenance(getattr(args, "_command", None), getattr(args, "device", "cpu"))
    result: dict[str, Any] = {"suite": task, "config": config, "provenance": prov,
                              "optimizers": {n: {"label": registry.get(n).label, "note": registry.get(n).note,
                                                 "loss": registry.get(n).loss} for n in names},
                              "left_out": registry.LEFT_OUT, "sweep": None, "runs": []}
    chosen = {n: overrides.get(n, registry.get(n).lr[task]) for n in names}

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float))
        tmp.replace(out_path)

    if args.sweep:
        sweep_budget = Budget(args.sweep_epochs)
        sweep: dict[str, Any] = {"budget_epochs": args.sweep_epochs, "seed": args.sweep_seed,
                                 "factors": list(registry.SWEEP_FACTORS), "selected_on": select_key,
                                 "runs": []}
        result["sweep"] = sweep
        for n in names:
            if n in overrides:
                continue
            best = None
            for lr in registry.lr_grid(n, task):
                rec = run(RunSpec(n, lr, args.sweep_seed), sweep_budget, "valid")
                sweep["runs"].append({k: rec[k] for k in ("optimizer", "lr", "seed", "diverged", "final",
                                                           "train_seconds")})
                value = rec["final"].get(select_key, math.nan)
                tqdm.write(f"  sweep {n:<16} lr={lr:<8g} {select_key}={value:.4f}"
                           f"{' DIVERGED' if rec['diverged'] else ''}")
                if best is None or _score(rec, select_key, higher_is_better) > _score(best, select_key,
                                                                                       higher_is_better):
                    best = rec
            chosen[n] = best["lr"]
            save()
        sweep["chosen"] = dict(chosen)
    result["chosen_lr"] = chosen
    budget = Budget(args.epochs, args.seconds)
    for seed in args.seeds:
        for n in names:
            rec = run(RunSpec(n, chosen[n], seed), budget, "test")
            result["runs"].append(rec)
            _draw_diagnostics(rec, out_path)
            f = rec["final"]
            metrics = "  ".join(f"{k}={v:.4f}" for k, v in f.items() if k not in ("epoch", "seconds"))
            tqdm.write(f"  {n:<16} lr={chosen[n]:<8g} seed={seed} epochs={rec['epochs']:.2f} "
                  f"{rec['train_seconds']:.1f}s  {metrics}{'  DIVERGED' if rec['diverged'] else ''}")
            save()
    result["provenance"]["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    save()
    print(f"wrote {out_path}")
    return result


def _draw_diagnostics(record: dict[str, Any], out_path: Path) -> None:
    """The filter's diagnostics over training, one figure per KOALA run beside the results file (if matplotlib)."""
    if not record.get("diagnostics"):
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    from .grid import plot_diagnostics

    out_path.parent.mkdir(parents=True, exist_ok=True)
    png = out_path.with_name(f"{out_path.stem}-{record['optimizer']}-seed{record['seed']}.png")
    plot_diagnostics(record, png, f"{out_path.stem}: {record['label']}, seed {record['seed']} ({record['schedule']})")


def _parse_lr(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    registry.get(name)
    return name, float(value)


def resolve_defaults(args: argparse.Namespace, normal: dict[str, Any], quick: dict[str, Any]) -> None:
    """Fill every argument the user left at None from ``quick`` (with ``--quick``) or ``normal``."""
    for key, value in {**normal, **(quick if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def resolve_clock(args: argparse.Namespace) -> str:
    """``args.clock``, or its default: ``cpu`` (the training thread's CPU time) with one torch thread on the CPU,
    else ``wall`` (more threads, or a CUDA device, whose work the host thread's CPU time does not see)."""
    if getattr(args, "clock", None) is None:
        on_cpu = torch.device(getattr(args, "device", None) or "cpu").type == "cpu"
        args.clock = "cpu" if args.threads == 1 and on_cpu else "wall"
    return args.clock


def add_common_arguments(p: argparse.ArgumentParser, *, default_optimizers: Iterable[str]) -> None:
    from kalmanopt.options import COUNT, NONNEGATIVE, POSITIVE, SEED, THREADS, existing_dir

    p.add_argument("--optimizers", default=None,
                   help=f"comma-separated registry names (default: {','.join(default_optimizers)}; known: "
                        f"{', '.join(registry.REGISTRY)})")
    p.add_argument("--seeds", type=SEED, nargs="+", default=None, help="default: 0 1 2")
    p.add_argument("--epochs", type=COUNT, default=None, help="epochs per run (the upper bound with --seconds)")
    p.add_argument("--seconds", type=POSITIVE, default=None,
                   help="equal-time budget: training seconds per run on --clock (evaluation not counted)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default=None,
                   help="what a training second is: 'cpu', the training thread's CPU time (time.thread_time; the "
                        "default with --threads 1: robust to other jobs on a shared machine), or 'wall' "
                        "(time.perf_counter; the default with more threads or on CUDA)")
    p.add_argument("--lr", action="append", metavar="NAME=LR", help="fix an optimizer's lr (skips its sweep)")
    p.add_argument("--sweep", action="store_true",
                   help="first sweep each optimizer's lr over default x (1/3, 1, 3) on one seed, select on the "
                        "validation split, then run the seeds with the chosen values")
    p.add_argument("--sweep-epochs", type=COUNT, default=1, help="epochs per sweep run (the same for every optimizer)")
    p.add_argument("--sweep-seed", type=SEED, default=100)
    p.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="learning-rate schedule, the same for every optimizer that takes one: cosine annealing to 0 "
                        "over the epoch budget (default, the reference configurations' protocol) or constant")
    p.add_argument("--warmup-steps", type=NONNEGATIVE, default=0, help="linear warm-up steps before the schedule")
    p.add_argument("--threads", type=THREADS, default=1, help="torch.set_num_threads (default 1)")
    add_device_argument(p)
    p.add_argument("--quick", action="store_true", help="a smoke run of about two minutes (its default results "
                   "file is named *-quick.json)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--data-root", type=existing_dir, default=None,
                   help="read the dataset from this directory instead of the cache")
    p.add_argument("--out", default=None, help=f"results file (JSON; default: {paths.SCRATCH}/<suite>/<name>.json "
                   "in the current directory, replaced by the next run of the same name)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the --out file if it exists (without it an existing file is refused: recorded "
                        "results are replaced only when asked)")


def results_file(args: argparse.Namespace, suite: str, name: str) -> Path:
    """The results file of a vision or language-model run, checked before anything runs: ``--out``, else
    ``kalmanopt-results/<suite>/<name>[-quick].json`` (see :func:`kalmanopt.paths.output_file`)."""
    default = Path(suite) / f"{name}{'-quick' if args.quick else ''}.json"
    return paths.output_file(args.out, default, overwrite=args.overwrite)
