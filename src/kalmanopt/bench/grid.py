"""The KOALA++ development grid: results files of ``kalmanopt bench vision|lm`` run with ``--schedule constant``
and ``--schedule cosine`` -> one markdown table per task and a diagnostics figure per KOALA run.

``python -m kalmanopt.bench.grid RESULTS_DIR OUT.md`` reads every ``*-constant.json`` / ``*-cosine.json`` pair in
``RESULTS_DIR`` and writes, per task, the final test metric (mean ± std over seeds) under each schedule, the gap to
AdamW at its defaults, and the largest drop of a run from its own best epoch (a run that ends far below its best
epoch is one a user would have had to stop by hand). Each KOALA run that recorded the filter's diagnostics
(:meth:`kalmanopt.KOALAPlusPlus.diagnostics`) gets a figure ``<results>-<optimizer>-seed<k>.png`` beside its
results file: the training loss, the step size :math:`\\eta\\ell/S`, S, :math:`h\\cdot v`, :math:`\\lVert h\\rVert^2`
and R over training.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from .report import _mean_std

__all__ = ["main", "plot_diagnostics", "task_table"]

METRIC = {"vision": ("test_accuracy", 100.0, True, "test accuracy (%)"),
          "lm": ("test_ppl", 1.0, False, "test perplexity (per char)")}
DIAGNOSTIC_KEYS = ("loss", "step_size", "S", "h_dot_v", "grad_sq", "noise")


def _per_optimizer(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    key, scale, higher, _ = METRIC[result["suite"]]
    out: dict[str, dict[str, Any]] = {}
    for run in result["runs"]:
        finals = out.setdefault(run["optimizer"], {"label": run["label"], "lr": run["lr"], "final": [], "drop": [],
                                                   "unscheduled": False})
        # Schedule-Free and MoMo set their own step size: their runs record "none (...)" as the schedule
        finals["unscheduled"] |= str(run.get("schedule", "")).startswith("none")
        values = [h[key] * scale for h in run["history"][1:] if key in h]
        final = run["final"][key] * scale if not run["diverged"] else math.nan
        finals["final"].append(final)
        if values:
            best = max(values) if higher else min(values)
            finals["drop"].append((best - values[-1]) if higher else (values[-1] - best))
    return out


def task_table(constant: dict[str, Any] | None, cosine: dict[str, Any] | None) -> str:
    """Markdown: one row per optimizer, the final metric under each schedule."""
    some = constant or cosine
    assert some is not None
    suite = some["suite"]
    _, _, higher, label = METRIC[suite]
    by_schedule = {"constant": _per_optimizer(constant) if constant else {},
                   "cosine": _per_optimizer(cosine) if cosine else {}}
    # AdamW's mean over its finite runs; without any (diverged or not run) the "vs AdamW" cells stay empty
    reference = {s: _mean_std([v for v in rows["adamw"]["final"] if math.isfinite(v)])[0]
                 if "adamw" in rows and any(math.isfinite(v) for v in rows["adamw"]["final"]) else math.nan
                 for s, rows in by_schedule.items()}
    fmt = "{:.2f}" if suite == "vision" else "{:.3f}"
    lines = [f"| optimizer | constant: {label} | vs AdamW | drop from best epoch | cosine: {label} | vs AdamW |",
             "|---|---|---|---|---|---|"]
    names = dict.fromkeys([*by_schedule["constant"], *by_schedule["cosine"]])
    for name in names:
        cells = []
        for schedule in ("constant", "cosine"):
            row = by_schedule[schedule].get(name)
            other = by_schedule["cosine" if schedule == "constant" else "constant"].get(name)
            finite = [] if row is None else [v for v in row["final"] if math.isfinite(v)]
            if row is None or not finite:
                if row is not None:
                    missing = f"diverged ({len(row['final'])}/{len(row['final'])})"
                elif other is not None and other["unscheduled"]:
                    missing = "(takes no schedule)"
                else:
                    missing = "not run"
                cells += [missing, ""]
                if schedule == "constant":
                    cells.append("")
                continue
            mean, std = _mean_std(finite)
            diverged = len(row["final"]) - len(finite)
            ref = reference[schedule]
            if not math.isfinite(ref):
                gap = ""
            elif suite == "vision":
                gap = f"{mean - ref:+.2f} pt"
            else:
                gap = f"{mean / ref:.3f}x"
            note = f", {diverged} diverged" if diverged else ""
            cells += [f"{fmt.format(mean)} ± {fmt.format(std)} (n={len(finite)}{note})", gap]
            if schedule == "constant":
                worst = max(row["drop"]) if row["drop"] else math.nan
                cells.append(f"{worst:.2f}" + (" pt" if suite == "vision" else ""))
        first = by_schedule["constant"].get(name) or by_schedule["cosine"].get(name)
        lrs = sorted({rows[name]["lr"] for rows in by_schedule.values() if name in rows})
        lines.append(f"| {first['label']} (lr {', '.join(f'{lr:g}' for lr in lrs)}) | " + " | ".join(cells) + " |")
    better = "higher" if higher else "lower"
    lines.append("")
    lines.append(f"Mean ± std over seeds of the final test metric ({better} is better); 'vs AdamW' is the difference "
                 "to AdamW (at the lr in its row) under the same schedule; 'drop from best epoch' is the largest, "
                 "over seeds, of (best epoch - final) at a constant lr.")
    return "\n".join(lines)


def plot_diagnostics(run: dict[str, Any], path: Path, title: str) -> bool:
    """The filter's diagnostics of one run over training (log scale), next to its loss. False if none recorded."""
    records = run.get("diagnostics") or []
    if not records:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    for ax, key in zip(axes.flat, DIAGNOSTIC_KEYS, strict=True):
        values = [abs(r.get(key, math.nan)) for r in records]
        ax.plot(epochs, values, lw=1)
        if any(v > 0 for v in values if math.isfinite(v)):
            ax.set_yscale("log")
        ax.set_title({"loss": "training loss", "step_size": "step size lr*l/S (after the cap)",
                      "S": "S", "h_dot_v": "|h . v|", "grad_sq": "||h||^2", "noise": "R"}[key], fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m kalmanopt.bench.grid RESULTS_DIR OUT.md", file=sys.stderr)
        return 2
    folder, out = Path(argv[0]), Path(argv[1])
    tasks: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*.json")):
        stem, _, schedule = f.stem.rpartition("-")
        if schedule in ("constant", "cosine"):
            tasks.setdefault(stem, {})[schedule] = (f, json.loads(f.read_text()))
    sections = []
    for stem, files in tasks.items():
        constant, cosine = files.get("constant", (None, None)), files.get("cosine", (None, None))
        some = constant[1] or cosine[1]
        config = some["config"]
        sections.append(f"### {stem}\n")
        sections.append(f"{config.get('parameters', '?'):,} parameters; "
                        + ", ".join(f"{k} {config[k]}" for k in ("dataset", "corpus", "train_size", "train_chars",
                                                                  "epochs", "batch_size", "seeds") if k in config)
                        + ".\n")
        sections.append(task_table(constant[1], cosine[1]) + "\n")
        for path, result in (constant, cosine):
            if result is None:
                continue
            sections.append(f"`{result['provenance']['command']}`  \n")
            for run in result["runs"]:
                if run["optimizer"].startswith("koala") and run.get("diagnostics"):
                    png = path.with_name(f"{path.stem}-{run['optimizer']}-seed{run['seed']}.png")
                    plot_diagnostics(run, png, f"{stem} ({path.stem.rpartition('-')[2]}), {run['label']}, "
                                               f"seed {run['seed']}")
        sections.append("")
    out.write_text("\n".join(sections))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
