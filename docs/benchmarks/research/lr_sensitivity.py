"""Learning-rate sensitivity of KOALA++ against AdamW and the tuning-free peers (issue: "a filter that sizes its own
step"): final test accuracy / perplexity over multiples of each optimizer's default lr.

    python docs/benchmarks/research/lr_sensitivity.py TASK SEED MULTS SPEC [SPEC ...]

TASK and SPEC as in ablation.py (fm10k, fm60k, mnist, lm, digits; SPEC = name:key=value,...); MULTS a
comma-separated list of multipliers (e.g. 0.1,0.3,1,3,10) applied to the SPEC's lr (default lr: AdamW 1e-3, KOALA++
1e-3, Schedule-Free 2.5e-3, MoMo-Adam 1e-2, Prodigy 1). One torch thread; constant lr, no weight decay. Each run
appends a JSON line to results/research/lr_sensitivity.jsonl; `python docs/benchmarks/research/lr_sensitivity.py
--table` prints the table of what ran (mean over seeds, then worst and median over the multipliers); `--markdown` the
page's table over 0.1x / 1x / 10x, `--markdown-five` the one over 0.1x / 0.3x / 1x / 3x / 10x,
`--markdown-finetune` and `--markdown-finetune-five` the fine-tuning ones.
"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "results/research/lr_sensitivity.jsonl"
DEFAULT_LR = {"adamw": 1e-3, "kpp_lib": 1e-3, "sf": 2.5e-3, "momoadam": 1e-2, "prodigy": 1.0, "kpp_hd": 1e-3,
              "kpp_dist": 1e-3}


def with_lr(spec: str, mult: float) -> str:
    name, _, rest = spec.partition(":")
    items = [item for item in rest.split(",") if item]
    lr = next((float(i.split("=")[1]) for i in items if i.startswith("lr=")), DEFAULT_LR[name])
    items = [i for i in items if not i.startswith("lr=")] + [f"lr={lr * mult:.6g}"]
    return f"{name}:{','.join(items)}"


def final_values() -> dict:
    """(task, base, mult) -> the final metric of each seed, one value per seed: a seed run twice (the same numbers:
    the runs are deterministic) counts once, the later record kept."""
    seeds: dict = defaultdict(dict)
    for line in OUT.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            seeds[r["task"], r["base"], r["mult"]][r["seed"]] = r["accs"][-1] if r["accs"] else float("nan")
    return {key: list(values.values()) for key, values in seeds.items()}


def table() -> None:
    cells = final_values()
    for task in sorted({k[0] for k in cells}):
        mults = sorted({k[2] for k in cells if k[0] == task})
        print(f"\n{task}: final metric (accuracy; perplexity for lm), mean over seeds (n)")
        print("| optimizer | " + " | ".join(f"{m:g}x" for m in mults) + " | worst | median |")
        print("|---|" + "---|" * (len(mults) + 2))
        for base in sorted({k[1] for k in cells if k[0] == task}):
            row, finals = [], []
            for m in mults:
                v = cells.get((task, base, m))
                if v:
                    mean = statistics.fmean(v)
                    finals.append(mean)
                    row.append(f"{mean:.4f} ({len(v)})")
                else:
                    row.append("")
            lm = task == "lm"
            worst = (max if lm else min)(finals) if finals else float("nan")
            print(f"| {base} | " + " | ".join(row) + f" | {worst:.4f} | {statistics.median(finals):.4f} |")


# the rows of docs/benchmarks/lr_sensitivity.md (python docs/benchmarks/research/lr_sensitivity.py --markdown)
# The default (lr_adaptation=0.2, lr_scale_min=1) is stored as "kpp_lib:lr_adaptation=0.2", the fixed cap as
# "kpp_lib:lr_adaptation=None" (run while it was the default: plain "kpp_lib" then), the adaptation without a floor
# with ",lr_scale_min=0.001" (its records were relabelled when the floor came, not re-run).
LABELS = {"adamw": "AdamW", "kpp_lib:lr_adaptation=0.2": "**KOALA++ (default: `lr_adaptation=0.2`, floor 1)**",
          "kpp_lib:lr_adaptation=None": "KOALA++, fixed cap (`lr_adaptation=None`)",
          "kpp_lib:length_bound=1.0": "KOALA++ (`length_bound=1`: AdamW's step length)",
          "kpp_lib:length_bound=1.5": "KOALA++ (`length_bound=1.5`)",
          "kpp_lib:lr_adaptation=0.05,lr_scale_min=0.001": "KOALA++ (`lr_adaptation=0.05, lr_scale_min=1e-3`)",
          "kpp_lib:lr_adaptation=0.1,lr_scale_min=0.001": "KOALA++ (`lr_adaptation=0.1, lr_scale_min=1e-3`)",
          "kpp_lib:lr_adaptation=0.2,lr_scale_min=0.001": "KOALA++ (`lr_adaptation=0.2, lr_scale_min=1e-3`)",
          "sf": "Schedule-Free AdamW",
          "prodigy": "Prodigy", "momoadam": "MoMo-Adam", "kpp_dist": "KOALA++, distance-estimated cap (research)",
          "kpp_hd:norm=ema,kappa=0.02": "KOALA++, EMA-normalised hypergradient (research)"}
TITLES = {"fm10k": "Fashion-MNIST 10k (accuracy)", "fm60k": "Fashion-MNIST 60k, 2 epochs (accuracy)",
          "mnist": "MNIST subset (accuracy)", "lm": "character GPT (perplexity)"}


def print_rows(cells: dict, titles: dict, labels: dict, mults: tuple[float, ...], percent: float = 1.0) -> None:
    """A markdown table of the rows that ran at every one of ``mults`` (``cells``: (task, name, mult) -> the values
    of the seeds; accuracies shown times ``percent``); worst and median over those multipliers (perplexity, the task
    ``lm``: lower is better)."""
    print("| task | optimizer | " + " | ".join(f"{m:g}x" for m in mults) + " | worst | median |")
    print("|---|---|" + "---|" * (len(mults) + 2))
    for task, title in titles.items():
        lm, first = task == "lm", True
        for name, label in labels.items():
            values = [cells.get((task, name, m)) for m in mults]
            if not all(values):
                continue
            means = [statistics.fmean(v) for v in values]
            show = (lambda x: f"{x:.2f}") if lm else (lambda x: f"{percent * x:.1f}")
            worst, median = (max if lm else min)(means), statistics.median(means)
            print(f"| {title if first else ''} | {label} | "
                  + " | ".join(f"{show(m)} ({len(v)})" for m, v in zip(means, values, strict=True))
                  + f" | {show(worst)} | {show(median)} |")
            first = False


def scratch_values() -> dict:
    """:func:`final_values` in the figure's units: accuracy in %, perplexity as it is."""
    return {key: [v if key[0] == "lm" else 100 * v for v in values] for key, values in final_values().items()}


def markdown(mults: tuple[float, ...] = (0.1, 1.0, 10.0)) -> None:
    print_rows(final_values(), TITLES, LABELS, mults, percent=100.0)


# the fine-tuning rows (results/research/finetune_lr/*.json, written by `kalmanopt bench finetune`): contender name ->
# label; the multiplier is the contender's rule (x3/10 is 0.3 times the regime's AdamW lr; Prodigy's plain numbers)
FINETUNE = ROOT / "results/research/finetune_lr"
FINETUNE_LABELS = {"adamw": "AdamW", "koala++-lra0.2-floor": "**KOALA++ (default)**",
                   "koala++-length1": "KOALA++ (`length_bound=1`)", "adamw-schedulefree": "Schedule-Free AdamW",
                   "prodigy": "Prodigy", "momo-adam": "MoMo-Adam"}
FINETUNE_TITLES = {"mnist-full-loop": "CNN, full, MNIST", "bbc-lora-loop": "MiniLM LoRA, BBC News"}


def finetune_values() -> dict:
    """(cell, contender name, mult) -> test accuracy (%) of each seed, one value per seed (Prodigy's 0.1 ran under
    two names, `prodigy@1/10` and `prodigy@0.1`: the same runs); constant lr, or no schedule (Schedule-Free, MoMo)."""
    seeds: dict = defaultdict(dict)
    for path in FINETUNE.glob("*.json"):
        for r in json.loads(path.read_text())["runs"]:
            name, _, rule = r["contender"].partition("@")
            schedule = str(r.get("schedule"))
            if not (schedule == "constant" or schedule.startswith("none")):
                continue
            num, _, den = rule.lstrip("x").partition("/")
            try:
                mult = float(num) / float(den or 1)
            except ValueError:
                continue
            seeds[path.stem, name, round(mult, 6)][r["seed"]] = 100 * r["final"]["test_accuracy"]
    return {key: list(values.values()) for key, values in seeds.items()}


def markdown_finetune(mults: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)) -> None:
    print_rows(finetune_values(), FINETUNE_TITLES, FINETUNE_LABELS, mults)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        table()
        sys.exit(0)
    if sys.argv[1:] == ["--markdown"]:
        markdown()
        sys.exit(0)
    if sys.argv[1:] == ["--markdown-five"]:  # the five-point grid: 0.1x, 0.3x, 1x, 3x, 10x
        markdown((0.1, 0.3, 1.0, 3.0, 10.0))
        sys.exit(0)
    if sys.argv[1:] == ["--markdown-finetune"]:
        markdown_finetune((0.1, 1.0, 10.0))
        sys.exit(0)
    if sys.argv[1:] == ["--markdown-finetune-five"]:
        markdown_finetune()
        sys.exit(0)
    import ablation

    task, seed, mults = sys.argv[1], int(sys.argv[2]), [float(m) for m in sys.argv[3].split(",")]
    d, epochs, bs = ablation.task_data(task)
    for spec in sys.argv[4:]:
        for mult in mults:
            r = ablation.run(task, seed, with_lr(spec, mult), d, epochs, bs)
            r.update(base=spec, mult=mult)
            print(json.dumps(r), flush=True)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            with OUT.open("a") as f:
                f.write(json.dumps(r) + "\n")
