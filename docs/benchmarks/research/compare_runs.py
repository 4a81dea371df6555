"""Side-by-side means of one optimizer's runs in two sets of results files (same cells, seeds and protocol): the
tables of the learning-rate sensitivity page that set today's KOALA++ default against the records of before.

    python docs/benchmarks/research/compare_runs.py grid results/grid results/grid-lra-floor results/grid-lra
    python docs/benchmarks/research/compare_runs.py finetune results/finetune results/finetune-default \\
        results/finetune-default-loop
    python docs/benchmarks/research/compare_runs.py swept results/finetune results/finetune-default \\
        results/finetune-default-loop

``grid``: for every file of the first folder, the mean ± std over seeds of the final test metric of each optimizer
found in it and in the files of the same name in the other folders (KOALA++'s fixed cap and AdamW from the first,
the adaptive variants from the others). ``finetune``: per cell and contender spec (``koala++@x1``, ``adamw@x1``),
test accuracy, linear schedule; the first folder's ``koala++`` runs are the fixed cap (recorded before the default
changed), the others' today's default. ``swept``: per cell, AdamW at 1/3, 1 and 3 times the conventional lr (the
first folder), its best, today's KOALA++ default at 1x (the other folders) and its difference to that best.
"""

import json
import statistics
import sys
from pathlib import Path


def _mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _same_files(first: Path, others: list[Path]):
    """(file of the first folder, folder, that folder's file of the same name) for every folder that has it."""
    for path in sorted(first.glob("*.json")):
        for folder in [first, *others]:
            if (folder / path.name).exists():
                yield path, folder, folder / path.name


def grid(first: Path, others: list[Path]) -> None:
    print("| file | optimizer | final metric (mean ± std, n) |")
    print("|---|---|---|")
    for path, folder, other in _same_files(first, others):
        runs = json.loads(other.read_text())["runs"]
        by = {}
        for r in runs:
            key = "test_accuracy" if "test_accuracy" in r["final"] else "test_ppl"
            by.setdefault(f"{r['optimizer']} ({folder.name})", []).append(
                r["final"][key] * (100 if key == "test_accuracy" else 1))
        for name, values in by.items():
            if name.startswith(("koala++", "adamw (")) and not name.startswith("koala++-paper"):
                m, s = _mean_std(values)
                print(f"| {path.stem} | {name} | {m:.2f} ± {s:.2f} ({len(values)}) |")


def finetune(first: Path, others: list[Path]) -> None:
    print("| cell | contender (folder) | test accuracy (%), linear | n |")
    print("|---|---|---|---|")
    for path, folder, other in _same_files(first, others):
        by = {}
        for r in json.loads(other.read_text())["runs"]:
            if r.get("schedule_asked", r.get("schedule")) != "linear":
                continue
            if r["contender"] in ("koala++@x1", "adamw@x1"):
                by.setdefault(f"{r['contender']} ({folder.name})", []).append(100 * r["final"]["test_accuracy"])
        for name, values in sorted(by.items()):
            m, s = _mean_std(values)
            print(f"| {path.stem} | {name} | {m:.2f} ± {s:.2f} | {len(values)} |")


def _linear(path: Path, contender: str) -> list[float]:
    return [100 * r["final"]["test_accuracy"] for r in json.loads(path.read_text())["runs"]
            if r["contender"] == contender and r.get("schedule_asked", r.get("schedule")) == "linear"]


def swept(first: Path, others: list[Path]) -> None:
    rules = ("adamw@x1/3", "adamw@x1", "adamw@x3")
    print("| cell | AdamW x1/3 | AdamW x1 | AdamW x3 | AdamW best | KOALA++ today's default (x1) | difference |")
    print("|---|---|---|---|---|---|---|")
    for path in sorted(first.glob("*.json")):
        adamw = {rule: _linear(path, rule) for rule in rules}
        best = max(statistics.fmean(v) for v in adamw.values() if v)
        ours = next((_linear(folder / path.name, "koala++@x1") for folder in others if (folder / path.name).exists()),
                    [])
        cells = " | ".join(f"{statistics.fmean(v):.2f} ({len(v)})" if v else "" for v in adamw.values())
        mine = f"{statistics.fmean(ours):.2f} ({len(ours)}) | {statistics.fmean(ours) - best:+.2f}" if ours else " | "
        print(f"| {path.stem} | {cells} | {best:.2f} | {mine} |")


if __name__ == "__main__":
    kind, first, *others = sys.argv[1:]
    {"grid": grid, "finetune": finetune, "swept": swept}[kind](Path(first), [Path(o) for o in others])
