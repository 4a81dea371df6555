"""Tables and figures of ``kalmanopt bench online`` from its results files (``results/online/online_<task>.json``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["cost_table", "plot_task", "plot_reliability", "write_markdown", "task_table", "reliability_of"]

RELIABILITY = ("LoRA/LoKO", "LoRA/AdamW", "LoRA/AdaGrad")  # the main contenders' diagrams (LoKO: both predictives)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def _fmt(ms: tuple[float, float], digits: int = 4) -> str:
    if math.isnan(ms[0]):
        return "–"
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def _curves(records: list[dict[str, Any]], window: int = 50) -> tuple[list[list[float]], list[list[float]]]:
    from kalmanopt.online import OnlineResult

    accs, losses = [], []
    for r in records:
        res = OnlineResult(correct=r["correct"], loss=r["loss"])
        accs.append(res.online_accuracy)
        losses.append(res.running_loss(window))
    return accs, losses


def _command(command: str) -> str:
    """The command as a user types it (the entry point's path shortened to ``kalmanopt``)."""
    first, _, rest = command.partition(" ")
    return f"kalmanopt {rest}" if first.endswith("/kalmanopt") else command


def reliability_of(records: list[dict[str, Any]], predictive: bool) -> tuple[list[float], list[int]]:
    """Confidences and hits pooled over orders: the optimizer's predictive (where recorded) or the softmax."""
    conf: list[float] = []
    hits: list[int] = []
    for r in records:
        if "confidence" not in r:
            continue
        if predictive and "pred_confidence" in r:
            conf += r["pred_confidence"]
            hits += r["pred_correct"]
        else:
            conf += r["confidence"]
            hits += r["correct"]
    return conf, hits


def task_table(res: dict[str, Any]) -> list[str]:
    """The markdown table of one results file: every contender and ablation, mean ± std over orders."""
    from kalmanopt.online import expected_calibration_error

    runs = res["runs"]
    new = res.get("format", 1) >= 2
    ref = runs.get("LoRA/AdamW", [])
    ref_ms = _mean_std([r.get("cpu_seconds_per_sample") for r in ref])[0] if ref else math.nan
    lines = ["| method | chosen | online acc | last 100 | NLL | ECE | softmax NLL | softmax ECE | ms/sample | "
             "x LoRA/AdamW | trainable params |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, recs in runs.items():
        base = label.split(" [")[0]
        chosen = ""
        if base in res["chosen"] and " [" not in label:
            key = "p0" if "LoKO" in base else "lr"
            chosen = f"{key}={res['chosen'][base]:g}"
            grid = res["config"]["sweeps"].get("LoKO tuned p0" if "LoKO" in base else base.split("/")[1])
            if grid and res["chosen"][base] in (min(grid[1]), max(grid[1])):
                chosen += " (grid edge)"
        elif "LoKO" in base and " [" not in label and new:
            chosen = "defaults"
        acc = _mean_std([r["online_accuracy"] for r in recs])
        last = _mean_std([r["final_window_accuracy"] for r in recs])
        soft_nll = _mean_std([r["mean_loss"] for r in recs])
        has_pred = any("pred_confidence" in r for r in recs)
        nll = _mean_std([r.get("nll") for r in recs]) if new else soft_nll
        ece = _mean_std([r.get("ece") for r in recs]) if new else (math.nan, math.nan)
        soft_ece = _mean_std([r.get("softmax_ece") for r in recs]) if new else (math.nan, math.nan)
        if new and "ece" not in recs[0]:  # computed from the records if an older run lacks the summary
            ece = _mean_std([expected_calibration_error(*reliability_of([r], True)) for r in recs])
        cpu = _mean_std([r.get("cpu_seconds_per_sample") for r in recs])[0]
        ms = cpu if not math.isnan(cpu) else _mean_std([r["seconds_per_sample"] for r in recs])[0]
        ratio = f"{cpu / ref_ms:.2f}" if not math.isnan(cpu) and ref_ms > 0 else "–"
        soft = (_fmt(soft_nll), _fmt(soft_ece, 3)) if has_pred else ("–", "–")
        lines.append(f"| {label} | {chosen} | {_fmt(acc)} | {_fmt(last, 3)} | {_fmt(nll)} | {_fmt(ece, 3)} | "
                     f"{soft[0]} | {soft[1]} | {ms * 1e3:.1f} | {ratio} | {recs[0]['trainable_parameters']:,} |")
    return lines


def _verdict(res: dict[str, Any]) -> list[str]:
    """LoKO at its defaults against LoRA/AdamW, order by order (same orders, same initial weights)."""
    runs = res["runs"]
    if res.get("format", 1) < 2 or "LoRA/LoKO" not in runs or "LoRA/AdamW" not in runs:
        return []
    lk, ad = runs["LoRA/LoKO"], runs["LoRA/AdamW"]
    d_acc = [a["online_accuracy"] - b["online_accuracy"] for a, b in zip(lk, ad, strict=True)]
    d_nll = [a["nll"] - b["nll"] for a, b in zip(lk, ad, strict=True)]
    wins = sum(d >= 0 for d in d_acc)
    lower = sum(d < 0 for d in d_nll)
    return [f"LoKO at its defaults minus LoRA/AdamW (tuned lr), per order: online accuracy "
            f"{', '.join(f'{100 * d:+.1f}' for d in d_acc)} points (LoKO >= AdamW on {wins} of {len(d_acc)}); "
            f"NLL (LoKO's predictive vs AdamW's softmax) {', '.join(f'{d:+.3f}' for d in d_nll)} (lower on "
            f"{lower} of {len(d_nll)}).", ""]


def plot_task(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Online accuracy and running loss against samples observed: the main contenders, then LoKO's ablations."""
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
        axes[0].set_ylabel("softmax NLL before the update (moving avg 50)")
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


def plot_reliability(result: dict[str, Any], out_dir: Path) -> Path | None:
    """Reliability diagram (15 bins, all orders pooled) of LoKO's predictive, LoKO's softmax and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kalmanopt.online import expected_calibration_error, reliability_bins

    panels = []
    for label in RELIABILITY:
        recs = result["runs"].get(label)
        if not recs or "confidence" not in recs[0]:
            continue
        if any("pred_confidence" in r for r in recs):
            panels.append((f"{label}: its predictive", *reliability_of(recs, True)))
            panels.append((f"{label}: softmax of the logits", *reliability_of(recs, False)))
        else:
            panels.append((f"{label}: softmax", *reliability_of(recs, False)))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, conf, hits) in zip(axes[0], panels, strict=True):
        bins = reliability_bins(conf, hits)
        width = 1.0 / len(bins)
        lows = [b[0] for b in bins if b[2]]
        ax.bar(lows, [b[4] for b in bins if b[2]], width=width, align="edge", edgecolor="k", linewidth=0.5,
               label="accuracy")
        # the gap between accuracy and mean confidence: the bar's top part where accuracy is higher (underconfident),
        # above the bar where confidence is (overconfident)
        ax.bar(lows, [abs(b[3] - b[4]) for b in bins if b[2]], bottom=[min(b[3], b[4]) for b in bins if b[2]],
               width=width, align="edge", color="tab:red", alpha=0.35, hatch="//", edgecolor="tab:red",
               linewidth=0.0, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ece = expected_calibration_error(conf, hits)
        ax.set_title(f"{title}\nECE {ece:.3f}, {len(conf)} predictions", fontsize=8)
        ax.set_xlabel("confidence (largest probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{result['task']}: reliability, 15 bins, all orders pooled", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"online_{result['task']}_reliability.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cost_table(cost: dict[str, Any]) -> list[str]:
    """Markdown table of a ``--cost-only`` measurement."""
    full = cost["full_run"]
    lines = [f"**{cost['task']}**: thread CPU time per sample, median of {cost['rounds']} interleaved rounds of "
             f"{cost['samples']} samples (loading the task: {cost['load_seconds']:.0f} s wall); a full run here "
             f"({full['orders']} orders x {full['samples']} samples, tuning {full['tune_samples']} x 6 grid points) "
             f"takes about {cost['full_run_minutes']:.0f} min of CPU on one thread.", "",
             "| row | ms/sample | x LoRA/AdamW | full run (min) |", "|---|---|---|---|"]
    for label, r in cost["rows"].items():
        lines.append(f"| {label} | {r['ms_per_sample']:.2f} | {r['ratio_to_lora_adamw']:.2f} | "
                     f"{r['full_run_minutes']:.1f} |")
    return lines


def write_markdown(results_dir: Path, docs_path: Path) -> None:
    """``docs/benchmarks/online.md`` from every (non-quick) results file, with the hand-written notes around it."""
    from .tasks import TASKS

    files = [results_dir / f"online_{t}.json" for t in TASKS if (results_dir / f"online_{t}.json").exists()]
    results = [json.loads(f.read_text()) for f in files]
    lines = ["## Online fine-tuning (LoKO)", "",
             "<!-- generated by `kalmanopt bench online` from results/online/*.json; edit online_setup.md and "
             "online_findings.md instead -->", ""]
    setup = docs_path.parent / "online_setup.md"
    if setup.exists():
        lines += [setup.read_text().rstrip(), ""]
    lines += ["## Results", ""]
    for res in results:
        cfg, prov = res["config"], res["provenance"]
        lines += [f"### {res['task']}: {res['description']}", ""]
        if res.get("format", 1) < 2:
            lines += ["*Previous version of the benchmark*: LoKO's `p0` was swept on the tuning stream like the "
                      "baselines' learning rates (three points each), with the configuration "
                      f"`{cfg.get('loko_defaults')}`; no calibration was recorded. Rerun the command below to get "
                      "this task in the current protocol.", ""]
        lines += [f"{cfg['samples']} samples per stream, {cfg['orders']} orders, tuning stream {cfg['tune_samples']} "
                  f"samples; LoRA r={cfg['lora_rank']} (alpha {cfg['lora_alpha']}) on {', '.join(cfg['targets'])}. "
                  f"Ran {res['seconds'] / 60:.1f} min on {prov['cpu']} ({prov['threads']} thread(s)), "
                  f"{prov['date']}, revision `{prov['git_revision']}`.", "",
                  f"Command: `{_command(prov['command'])}`", ""]
        if res.get("format", 1) >= 2:
            defaults = ", ".join(f"{k}={v!r}" for k, v in cfg["loko_defaults"].items())
            lines += [f"LoKO's defaults in this run: `{defaults}`.", ""]
        lines += task_table(res) + [""] + _verdict(res)
        lines += ["Tuning (average online accuracy on the tuning stream):", "",
                  "| contender | " + " | ".join(f"value {i + 1}" for i in range(6)) + " |",
                  "|---|" + "---|" * 6]
        for k, scores in res["tuning"].items():
            cells = [f"{v}: {s:.4f}" for v, s in scores.items()]
            lines.append(f"| {k} | " + " | ".join(cells + [""] * (6 - len(cells))) + " |")
        for kind in ("main", "ablations", "reliability"):
            png = results_dir / f"online_{res['task']}_{kind}.png"
            if png.exists():
                rel = os.path.relpath(png, docs_path.parent)
                lines += ["", f"![{res['task']} {kind}]({rel})"]
        lines.append("")
    costs = [json.loads((results_dir / f"cost_{t}.json").read_text()) for t in TASKS
             if (results_dir / f"cost_{t}.json").exists()]
    if costs:
        lines += ["## Cost per sample", "",
                  "Measured with `--cost-only` (the rows of the comparison at the options given, 3 interleaved "
                  "rounds, thread CPU time, one thread); the minutes estimate a full run of the task.", ""]
        for cost in costs:
            lines += [f"Command: `{_command(cost['provenance']['command'])}` ({cost['provenance']['cpu']}, "
                      f"{cost['provenance']['date']})", ""] + cost_table(cost) + [""]
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    extra = docs_path.parent / "online_findings.md"
    if extra.exists():
        lines += ["", extra.read_text()]
    cov = results_dir.parent / "covariance" / "covariance.json"
    if cov.exists():
        from ..covariance import markdown

        lines += ["", markdown(json.loads(cov.read_text()), cov.parent, docs_path.parent)]
    docs_path.write_text("\n".join(lines) + "\n")
