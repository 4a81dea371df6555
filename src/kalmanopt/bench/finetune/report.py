"""The tables and figures of ``kalmanopt bench finetune``: results files -> markdown page and PNG plots.

One results file per *cell* (task, regime, driver). For each: a table with one row per contender and schedule
(test accuracy and NLL as mean ± standard deviation over seeds, sample std with n - 1; the last epoch's training loss;
the training seconds on both clocks, the training thread's CPU time and wall-clock; diverged runs) and a figure of
every seed's test accuracy and NLL (``<cell>.png`` next to the file). Above them, per schedule, a summary with one
column per cell and a row with KOALA++ minus AdamW, both at the conventional lr (the drop-in question).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..report import _fmt, _mean_std, splice
from .tasks import DRIVERS, REGIMES, TASKS

__all__ = ["load_results", "rows", "cell_table", "summary_tables", "plot_cell", "markdown", "write_markdown"]

NO_SCHEDULE = "none"


def load_results(folder: Path, quick: bool = False) -> list[tuple[Path, dict[str, Any]]]:
    """The finetune results files in ``folder`` (``*-quick.json`` only with ``quick``), in the suite's cell order."""
    out = []
    for f in sorted(Path(folder).glob("*.json")):
        if f.stem.endswith("-quick") != quick:
            continue
        try:
            data = json.loads(f.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("suite") == "finetune" and isinstance(data.get("runs"), list):
            out.append((f, data))
    order = {(t, r, d): i for i, (t, r, d) in enumerate((t, r, d) for t in TASKS for r in REGIMES[t]
                                                             for d in DRIVERS[t])}
    return sorted(out, key=lambda fr: order.get((fr[1]["task"], fr[1]["regime"], fr[1]["driver"]), len(order)))


def _schedule(run: dict[str, Any]) -> str:
    return NO_SCHEDULE if str(run.get("schedule", "")).startswith("none") else run["schedule"]


def cell_title(result: dict[str, Any]) -> str:
    regime = {"full": "full fine-tuning", "lora": "LoRA", "last": "last layers (fc1 + head)"}[result["regime"]]
    driver = {"loop": "plain PyTorch loop", "trainer": "Hugging Face Trainer"}[result["driver"]]
    task = {"bbc": "BBC News", "spam": "SpamAssassin", "mnist": "MNIST (CNN pretrained on Fashion-MNIST)"}
    return f"{task.get(result['task'], result['task'])}, {regime}, {driver}"


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (contender, schedule), in the order the runs were made: means and stds over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in result["runs"]:
        groups.setdefault((r["contender"], _schedule(r)), []).append(r)
    out = []
    for (spec, schedule), runs in groups.items():
        info = result["contenders"].get(spec, {})
        out.append({
            "contender": spec, "label": info.get("label", runs[0]["label"]), "rule": info.get("rule", ""),
            "lr": runs[0]["lr"], "schedule": schedule, "seeds": len(runs),
            "accuracy": _mean_std([100 * r["final"].get("test_accuracy", math.nan) for r in runs]),
            "nll": _mean_std([r["final"].get("test_nll", math.nan) for r in runs]),
            "train_loss": _mean_std([r["final"].get("train_loss", math.nan) for r in runs]),
            "cpu": _mean_std([r.get("train_seconds_cpu", math.nan) for r in runs]),
            "wall": _mean_std([r.get("train_seconds_wall", math.nan) for r in runs]),
            "diverged": sum(bool(r["diverged"]) for r in runs),
            "warnings": sorted({w for r in runs for w in r.get("warnings", [])}),
        })
    return out


def _name(row: dict[str, Any]) -> str:
    """``KOALA++ (default) at the conventional lr (`koala++@x1`)``: the optimizer, its lr rule, the spec."""
    rule = f" at {row['rule']}" if row["rule"] else ""
    return f"{row['label']}{rule} (`{row['contender']}`)"


def cell_table(result: dict[str, Any]) -> list[str]:
    """The cell's markdown table (best mean accuracy in bold)."""
    rs = rows(result)
    best = max((r["accuracy"][0] for r in rs if math.isfinite(r["accuracy"][0])), default=math.nan)
    lines = ["| contender | lr | schedule | test acc. (%) | test NLL | final train loss | train s (thread CPU) | "
             "train s (wall) | diverged |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        acc = _fmt(*r["accuracy"], "{:.2f}")
        lines.append(f"| {_name(r)} | {r['lr']:g} | {r['schedule']} | "
                     f"{f'**{acc}**' if r['accuracy'][0] == best else acc} | {_fmt(*r['nll'], '{:.4f}')} | "
                     f"{_fmt(*r['train_loss'], '{:.4f}')} | {r['cpu'][0]:.1f} | {r['wall'][0]:.1f} | "
                     f"{r['diverged']}/{r['seeds']} |")
    return lines


def _short(result: dict[str, Any]) -> str:
    return f"{result['task']} {result['regime']} {result['driver']}"


def summary_tables(results: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Per schedule: test accuracy (%) of every contender (rows) in every cell (columns), mean ± std over seeds,
    each column's best in bold; the contenders without a schedule appear in every table. Last row: KOALA++ minus
    AdamW, both at the conventional lr, in points."""
    schedules: list[str] = []
    for _, res in results:
        for r in rows(res):
            if r["schedule"] != NO_SCHEDULE and r["schedule"] not in schedules:
                schedules.append(r["schedule"])
    lines: list[str] = []
    for schedule in schedules or [NO_SCHEDULE]:
        table: dict[str, dict[int, str]] = {}
        delta: dict[int, str] = {}
        for i, (_, res) in enumerate(results):
            rs = [r for r in rows(res) if r["schedule"] in (schedule, NO_SCHEDULE)]
            best = max((r["accuracy"][0] for r in rs if math.isfinite(r["accuracy"][0])), default=math.nan)
            for r in rs:
                cell = _fmt(*r["accuracy"], "{:.2f}")
                name = _name(r) + (" (no schedule)" if r["schedule"] == NO_SCHEDULE else "")
                table.setdefault(name, {})[i] = f"**{cell}**" if r["accuracy"][0] == best else cell
            by_spec = {r["contender"]: r["accuracy"][0] for r in rs}
            if "koala++@x1" in by_spec and "adamw@x1" in by_spec:
                delta[i] = f"{by_spec['koala++@x1'] - by_spec['adamw@x1']:+.2f}"
        lines += [f"Test accuracy (%), {schedule} schedule:" if schedule != NO_SCHEDULE else "Test accuracy (%):",
                  "", "| contender | " + " | ".join(_short(res) for _, res in results) + " |",
                  "|---" * (len(results) + 1) + "|"]
        for name, cells in table.items():
            lines.append(f"| {name} | " + " | ".join(cells.get(i, "not run") for i in range(len(results))) + " |")
        if delta:
            lines.append("| *KOALA++ − AdamW, both at the conventional lr (points)* | " +
                         " | ".join(delta.get(i, "") for i in range(len(results))) + " |")
        lines.append("")
    return lines


def plot_cell(result: dict[str, Any], out: Path) -> Path:
    """Every seed's test accuracy and NLL per contender (one marker per schedule), the mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = rows(result)
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(rs) + 1.8), sharey=True)
    markers = {"linear": "o", "constant": "s", NO_SCHEDULE: "D"}
    colours = {"linear": "tab:blue", "constant": "tab:orange", NO_SCHEDULE: "tab:green"}
    for y, row in enumerate(rs):
        runs = [r for r in result["runs"] if r["contender"] == row["contender"] and _schedule(r) == row["schedule"]]
        for ax, key, scale in ((axes[0], "test_accuracy", 100.0), (axes[1], "test_nll", 1.0)):
            values = [scale * r["final"].get(key, math.nan) for r in runs]
            ax.scatter(values, [y] * len(values), marker=markers.get(row["schedule"], "o"),
                       color=colours.get(row["schedule"], "k"), alpha=0.7, s=25)
            mean = row["accuracy"][0] if key == "test_accuracy" else row["nll"][0]
            if math.isfinite(mean):
                ax.plot([mean, mean], [y - 0.3, y + 0.3], color=colours.get(row["schedule"], "k"), lw=2)
    axes[0].set_yticks(range(len(rs)), [f"{r['contender']} ({r['lr']:g}, {r['schedule']})" for r in rs], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("test accuracy (%)")
    axes[1].set_xlabel("test NLL")
    nll = [r["final"].get("test_nll", math.nan) for r in result["runs"]]
    finite = [v for v in nll if math.isfinite(v) and v > 0]
    if finite and max(finite) > 20 * min(finite):  # a diverged run would flatten the others
        axes[1].set_xscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{cell_title(result)}: every seed (dots), mean (bar)\n{result['provenance']['command']}",
                 fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return out


def markdown(results: list[tuple[Path, dict[str, Any]]], md_dir: Path, plots: dict[Path, Path]) -> str:
    """The generated part of the page: the summaries, then one section per cell with its command and provenance."""
    lines = ["### Summary (mean ± std over seeds)", "", *summary_tables(results)]
    for path, res in results:
        c, prov = res["config"], res["provenance"]
        load = prov.get("load_average_at_start")
        sizes = f"{c['train_size']:,} train / {c['test_size']:,} test {'texts' if c['kind'] == 'text' else 'images'}"
        lora = c.get("lora")
        adapters = f" (LoRA r = {lora['r']}, alpha = {lora['lora_alpha']} on {', '.join(lora['target_modules'])})" \
            if lora else ""
        lines += [f"### {res['cell']}: {cell_title(res)}", "",
                  f"{res['description']}; {sizes}, batch {c['batch_size']}, {c['epochs']} epoch(s), seeds "
                  f"{c['seeds']}; {c['trainable_parameters']:,} of {c['parameters']:,} parameters train"
                  f"{adapters}"
                  f"; conventional AdamW lr {', '.join(f'{v:g}' for v in c['conventional_lr'])}.", "",
                  f"Command: `{prov['command']}`  ",
                  f"git {prov.get('git_revision')}, {prov['date']}, {prov['cpu']} ({prov.get('cpu_count')} logical "
                  f"CPUs, shared), {prov['threads']} thread(s), load average at start "
                  f"{', '.join(f'{x:.2f}' for x in load) if load else 'n/a'}; torch {prov['packages'].get('torch')}, "
                  f"transformers {prov['packages'].get('transformers')}. Results: `{os.path.relpath(path, md_dir)}`.",
                  "", *cell_table(res)]
        earlier = list(dict.fromkeys(h["command"] for h in res.get("provenance_history", [])
                                     if h["command"] != prov["command"]))
        if earlier:
            lines += ["", "Earlier commands whose runs this file keeps (`--resume`): " +
                      "; ".join(f"`{c}`" for c in earlier) + "."]
        if res.get("same_as"):
            lines += ["", "Same optimizer and lr, run once: " + "; ".join(f"`{a}` = `{b}`" for a, b in
                                                                           res["same_as"].items()) + "."]
        warned = {w for r in res["runs"] for w in r.get("warnings", []) if "kalmanopt" in w or "Kalman" in w}
        if warned:
            lines += ["", "Warnings the user sees: " + "; ".join(f"`{w}`" for w in sorted(warned)) + "."]
        if path in plots:
            lines += ["", f"![{cell_title(res)}]({os.path.relpath(plots[path], md_dir)})"]
        lines.append("")
    return "\n".join(lines)


def write_markdown(folder: Path, page: Path, *, plots: bool = True) -> Path | None:
    """Regenerate ``page`` (below its marker line; the hand-written text above it stays) and the figures from every
    (non-quick) results file in ``folder``; None when there is none."""
    results = load_results(folder)
    if not results:
        return None
    drawn = {p: plot_cell(r, p.with_suffix(".png")) for p, r in results} if plots else {}
    splice(page, markdown(results, page.parent, drawn))
    return page
