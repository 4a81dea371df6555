"""``kalmanopt report``: results files (JSON from ``kalmanopt bench vision|lm``) -> markdown tables and PNG plots.

For every results file: a table of the final metrics, mean ± standard deviation over seeds (sample std, n - 1),
sorted by the main metric (test accuracy for vision, test perplexity for language models); the learning-rate sweep
(if one ran) with the chosen values; and a figure next to the JSON file (``<name>.png``) with the training loss and
the main metric against epochs and against training seconds (mean over seeds). Each section quotes the command, git
revision, date, CPU, threads and load average recorded in the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kalmanopt import paths
from kalmanopt.errors import UsageError

__all__ = ["add_parser", "check_args", "load_results", "markdown", "plot", "summarise"]

METRICS = {  # suite -> (main key, label, higher is better, scale, format)
    "vision": ("test_accuracy", "test acc. (%)", True, 100.0, "{:.2f}"),
    "lm": ("test_ppl", "test ppl (char)", False, 1.0, "{:.3f}"),
}


def load_results(paths: Iterable[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``*.json`` results file of ``kalmanopt bench vision|lm`` under the given files or directories, in name
    order (other JSON files found in a directory, such as the online suite's, are passed over). A path that does not
    exist, or a file named on the command line that is not such a results file, is a :class:`UsageError`."""
    files: list[tuple[Path, bool]] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"{p} does not exist")
        files += [(f, False) for f in sorted(p.rglob("*.json"))] if p.is_dir() else [(p, True)]
    out = []
    for f, named in files:
        try:
            data = json.loads(f.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if named:
                raise UsageError(f"{f} is not a JSON results file ({e})") from None
            continue
        if isinstance(data, dict) and "runs" in data and data.get("suite") in METRICS:
            out.append((f, data))
        elif named:
            raise UsageError(f"{f} is not a results file of kalmanopt bench {' or '.join(METRICS)}")
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(mean: float, std: float, fmt: str) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per optimizer: mean/std of the final metrics over its seeds."""
    key, _, higher, scale, _ = METRICS[result["suite"]]
    loss_key = key.replace("accuracy", "loss").replace("ppl", "loss")
    rows = []
    for name in dict.fromkeys(r["optimizer"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["optimizer"] == name]
        metric = [r["final"].get(key, math.nan) * scale for r in runs]
        rows.append({
            "optimizer": name, "label": runs[0]["label"], "lr": runs[0]["lr"], "seeds": len(runs),
            "metric": _mean_std(metric), "test_loss": _mean_std([r["final"].get(loss_key, math.nan) for r in runs]),
            "train_loss": _mean_std([r["final"].get("train_loss", math.nan) for r in runs]),
            "epochs": _mean_std([r["epochs"] for r in runs]),
            "sec_per_epoch": _mean_std([r["seconds_per_epoch"] for r in runs]),
            "state_bytes": runs[0]["optimizer_state_bytes"], "diverged": sum(bool(r["diverged"]) for r in runs),
            "bpc": _mean_std([r["final"].get("test_bpc", math.nan) for r in runs]),
            "unscheduled": str(runs[0].get("schedule", "")).startswith("none"),
        })
    sign = -1 if higher else 1
    rows.sort(key=lambda r: (sign * r["metric"][0]) if math.isfinite(r["metric"][0]) else math.inf)
    return rows


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _clock(result: dict[str, Any]) -> str:
    """How the file's training seconds were counted: ``"cpu"`` (the training thread's CPU time) or ``"wall"`` (files
    written before ``--clock`` existed counted wall-clock time)."""
    return result["config"].get("clock") or "wall"


def _title(result: dict[str, Any]) -> str:
    c = result["config"]
    if c.get("seconds") and _clock(result) == "cpu":
        budget = f"equal training time, {c['seconds']:g} s of thread CPU time per run"
    elif c.get("seconds"):
        budget = f"equal wall-clock, {c['seconds']:g} s of training per run"
    else:
        budget = f"equal epochs, {c['epochs']}"
    if c.get("schedule"):
        budget += f", {c['schedule']} lr"
    if result["suite"] == "vision":
        return f"{c['dataset']} ({c['train_size'] / 1000:g}k train) / {c['model']} ({budget})"
    return f"{c['corpus']} ({c['train_chars'] / 1000:g}k chars) / GPT ({budget})"


def markdown(results: list[tuple[Path, dict[str, Any]]], md_dir: Path, plots: dict[Path, Path]) -> str:
    lines: list[str] = []
    for path, result in results:
        suite, c, prov = result["suite"], result["config"], result["provenance"]
        key, label, higher, _, fmt = METRICS[suite]
        lines += [f"### {suite}: {_title(result)}", ""]
        if suite == "vision":
            lines.append(f"{c['dataset']}, model `{c['model']}` ({c['parameters']:,} parameters); "
                         f"train {c['train_size']:,} / valid {c['valid_size']:,} / test {c['test_size']:,} images, "
                         f"batch {c['batch_size']}"
                         f"{', crop+flip augmentation' if c.get('augment') else ''}; seeds {c['seeds']}.")
        else:
            lines.append(f"{c['corpus']}, {c['model']} ({c['parameters']:,} parameters, vocabulary {c['vocab_size']});"
                         f" {c['train_chars']:,} training characters ({c['train_windows']:,} windows), "
                         f"valid/test {c['valid_chars']:,}/{c['test_chars']:,} characters, batch {c['batch_size']};"
                         f" seeds {c['seeds']}.")
        load = prov.get("load_average_at_start")
        lines += ["", f"Command: `{prov['command']}`  ", f"git {prov.get('git_revision')}, {prov['date']}, "
                  f"{prov['cpu']} ({prov.get('cpu_count')} logical CPUs, shared), {prov['threads']} thread(s), "
                  f"load average at start {', '.join(f'{x:.2f}' for x in load) if load else 'n/a'}; torch "
                  f"{prov['packages'].get('torch')}, pytorch-optimizer {prov['packages'].get('pytorch_optimizer')}."
                  f" Results: `{os.path.relpath(path, md_dir)}`.", ""]
        rows = summarise(result)
        extra = "test bpc" if suite == "lm" else "test loss"
        if _clock(result) == "cpu":
            lines += ["Training seconds (s / epoch, the time budget, the figure's time axis) are the training "
                      "thread's CPU time (`--clock cpu`), not wall-clock time.", ""]
        lines += [f"| optimizer | lr | {label} | {extra} | final train loss | epochs | s / epoch | state | "
                  f"diverged |", "|---|---|---|---|---|---|---|---|---|"]
        best = rows[0]["metric"][0] if rows else math.nan
        for r in rows:
            m = _fmt(*r["metric"], fmt)
            if r["metric"][0] == best:
                m = f"**{m}**"
            second = _fmt(*r["bpc"], "{:.3f}") if suite == "lm" else _fmt(*r["test_loss"], "{:.4f}")
            lr = f"{r['lr']:g}" + (" (no schedule)" if r["unscheduled"] else "")
            lines.append(f"| {r['label']} | {lr} | {m} | {second} | {_fmt(*r['train_loss'], '{:.4f}')} | "
                         f"{r['epochs'][0]:.2f} | {r['sec_per_epoch'][0]:.1f} | {_bytes(r['state_bytes'])} | "
                         f"{r['diverged']}/{r['seeds']} |")
        sweep = result.get("sweep")
        if sweep:
            vkey = sweep["selected_on"].split()[-1]
            lines += ["", f"Learning-rate sweep (seed {sweep['seed']}, {sweep['budget_epochs']} epoch(s) each, every "
                          f"optimizer's default × {', '.join(f'{f:.3g}' for f in sweep['factors'])}; selected on "
                          f"{vkey}, the validation split held out of the training set; chosen in bold):", ""]
            by_opt: dict[str, list[str]] = {}
            for r in sweep["runs"]:
                v = r["final"].get(vkey, math.nan)
                txt = "diverged" if r["diverged"] else (f"{v * 100:.2f}%" if "accuracy" in vkey else f"{v:.4f}")
                cell = f"{r['lr']:g}: {txt}"
                if sweep.get("chosen", {}).get(r["optimizer"]) == r["lr"]:
                    cell = f"**{cell}**"
                by_opt.setdefault(r["optimizer"], []).append(cell)
            lines += ["| optimizer | lr: valid metric |", "|---|---|"]
            lines += [f"| {result['optimizers'][o]['label']} | {' · '.join(cells)} |" for o, cells in by_opt.items()]
        other = "LM:" if suite == "vision" else "vision:"
        notes = []
        for v in result["optimizers"].values():
            parts = [x for x in v.get("note", "").split("; ") if x and not x.startswith(other)]
            if parts:
                notes.append(f"{v['label']}: {'; '.join(parts)}")
        if notes:
            lines += ["", "Settings: " + "; ".join(notes) + "."]
        if path in plots:
            lines += ["", f"![{_title(result)}]({os.path.relpath(plots[path], md_dir)})"]
        lines.append("")
    return "\n".join(lines)


def summary_table(results: list[tuple[Path, dict[str, Any]]]) -> str:
    """One row per optimizer, one column per results file: the main metric, mean ± std over seeds; each column's
    best in bold."""
    cols, rows_by = [], {}
    for _, result in results:
        _, label, _, _, fmt = METRICS[result["suite"]]
        rows = summarise(result)
        cols.append(f"{_title(result)}: {label}")
        best = rows[0]["metric"][0] if rows else math.nan
        for r in rows:
            cell = _fmt(*r["metric"], fmt)
            rows_by.setdefault(r["label"], {})[len(cols) - 1] = f"**{cell}**" if r["metric"][0] == best else cell
    lines = ["| optimizer | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, cells in rows_by.items():
        lines.append(f"| {name} | " + " | ".join(cells.get(i, "not run") for i in range(len(cols))) + " |")
    return "\n".join(lines)


def _curves(runs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[float]]:
    """Mean over seeds, index by index, of (epoch, seconds, key) while every seed has the index."""
    n = min(len(r["history"]) for r in runs)
    ep, sec, val = [], [], []
    for i in range(n):
        hs = [r["history"][i] for r in runs]
        vs = [h.get(key, math.nan) for h in hs]
        ep.append(statistics.fmean(h["epoch"] for h in hs))
        sec.append(statistics.fmean(h["seconds"] for h in hs))
        val.append(statistics.fmean(vs) if all(math.isfinite(v) for v in vs) else math.nan)
    return ep, sec, val


def _band(runs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Lowest and highest value over seeds, index by index, while every seed has the index (the shaded spread)."""
    n = min(len(r["history"]) for r in runs)
    lo, hi = [], []
    for i in range(n):
        vs = [r["history"][i].get(key, math.nan) for r in runs]
        ok = all(math.isfinite(v) for v in vs)
        lo.append(min(vs) if ok else math.nan)
        hi.append(max(vs) if ok else math.nan)
    return lo, hi


def plot(path: Path, result: dict[str, Any], out: Path) -> Path:
    """Training loss and the main metric vs epoch and vs training seconds (time to accuracy), mean over seeds with
    the seeds' spread (lowest to highest) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, _, scale, _ = METRICS[result["suite"]]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    cmap = plt.get_cmap("tab20")
    names = list(dict.fromkeys(r["optimizer"] for r in result["runs"]))
    for i, name in enumerate(names):
        runs = [r for r in result["runs"] if r["optimizer"] == name]
        style = dict(color=cmap(i % 20), lw=2.0 if name.startswith("koala") else 1.2,
                     ls="-" if name.startswith("koala") else "--", marker="o", ms=3)
        lab = f"{runs[0]['label']} (lr {runs[0]['lr']:g})"
        ep, sec, tl = _curves(runs, "train_loss")
        _, _, m = _curves(runs, key)
        m = [v * scale for v in m]
        axes[0, 0].plot(ep[1:], tl[1:], label=lab, **style)
        axes[0, 1].plot(ep, m, label=lab, **style)
        axes[1, 0].plot(sec[1:], tl[1:], label=lab, **style)
        axes[1, 1].plot(sec, m, label=lab, **style)
        if len(runs) > 1:
            lo, hi = (([v * scale for v in band]) for band in _band(runs, key))
            axes[0, 1].fill_between(ep, lo, hi, color=style["color"], alpha=0.15, lw=0)
            axes[1, 1].fill_between(sec, lo, hi, color=style["color"], alpha=0.15, lw=0)
    seconds = "training seconds (thread CPU time)" if _clock(result) == "cpu" else "training seconds (wall-clock)"
    for ax, (x, y) in zip(axes.flat, [("epoch", "train loss (epoch mean)"), ("epoch", label),
                                      (seconds, "train loss (epoch mean)"), (seconds, label)],
                          strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    for ax in (axes[0, 0], axes[1, 0]):
        ax.set_yscale("log")
    if result["suite"] == "lm":
        for ax in (axes[0, 1], axes[1, 1]):
            ax.set_yscale("log")
    axes[0, 1].legend(fontsize=7, loc="best")
    seeds = len({r["seed"] for r in result["runs"]})
    fig.suptitle(f"{result['suite']}: {_title(result)}, mean of {seeds} seed(s), spread shaded\n"
                 f"{result['provenance']['command']}",
                 fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


MARKER = "<!-- generated by kalmanopt report below this line: edit above it -->"


def splice(path: Path, text: str) -> None:
    """Replace what follows the :data:`MARKER` line of ``path`` with ``text`` (keep the hand-written part above it;
    a file without the marker gets it appended, a missing file is created)."""
    head = path.read_text() if path.exists() else ""
    head = head.split(MARKER, 1)[0].rstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((head + "\n\n" if head else "") + MARKER + "\n\n" + text.rstrip("\n") + "\n")


def check_args(args: argparse.Namespace) -> None:
    """The output file, before anything is read or written (:class:`UsageError`, one line): an existing ``--out`` is
    replaced only with ``--overwrite`` (``--into`` keeps its hand-written part and replaces the rest: asked for)."""
    if args.into and not args.out:
        raise UsageError("--into needs --out, the page whose generated part it replaces")
    if args.out:
        path = Path(args.out).expanduser()
        paths.refuse_existing(path, overwrite=args.overwrite or args.into)
        paths.check_writable_dir(path.parent)


def main(args: argparse.Namespace) -> int:
    results = load_results(args.paths)
    if not results:
        print(f"no results files under {' '.join(args.paths)}")
        return 1
    md_out = Path(args.out) if args.out else None
    md_dir = md_out.parent if md_out else Path.cwd()
    plots = {} if args.no_plots else {p: plot(p, r, p.with_suffix(".png")) for p, r in results}
    text = markdown(results, md_dir, plots)
    if len(results) > 1 and not args.no_summary:
        text = "### Summary (mean ± std over seeds)\n\n" + summary_table(results) + "\n\n" + text
    if args.title:
        text = f"{args.title}\n\n{text}"
    if md_out and args.into:
        splice(md_out, text)
        print(f"wrote the tables into {md_out} below its marker line, and {len(plots)} plot(s)")
    elif md_out:
        md_out.parent.mkdir(parents=True, exist_ok=True)
        md_out.write_text(text)
        print(f"wrote {md_out} and {len(plots)} plot(s)")
    else:
        print(text)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the top-level ``report`` command."""
    p = subparsers.add_parser("report", help="results JSON files -> markdown tables and PNG plots",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from kalmanopt.options import existing_path

    p.add_argument("paths", nargs="+", type=existing_path, help="results files or directories (searched for *.json)")
    p.add_argument("--out", default=None, help="markdown file (default: print to stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists (else refused)")
    p.add_argument("--title", default=None, help="a heading line put first")
    p.add_argument("--into", action="store_true",
                   help="keep the hand-written text of --out above its marker line and replace only what follows")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-summary", action="store_true", help="no cross-file summary table")
    p.set_defaults(func=main)
    return p
