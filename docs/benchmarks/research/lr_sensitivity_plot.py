"""The learning-rate sensitivity figure of docs/benchmarks/lr_sensitivity.md: final test accuracy (perplexity for the
character GPT) against the lr multiplier, one panel per task, mean over seeds with the seeds' range shaded.

    python docs/benchmarks/research/lr_sensitivity_plot.py [OUT]     # default results/research/lr_sensitivity.png

Reads what the tables read: results/research/lr_sensitivity.jsonl (the from-scratch tasks, written by
lr_sensitivity.py) and results/research/finetune_lr/*.json (the fine-tuning tasks, written by
`kalmanopt bench finetune`). Nothing is run.
"""
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from lr_sensitivity import ROOT, finetune_values, scratch_values  # noqa: E402  (this folder: the tables' readers)

# (label, record base in lr_sensitivity.jsonl, contender name in the fine-tuning files, style)
LINES = [
    ("AdamW", "adamw", "adamw", dict(color="tab:gray", marker="o")),
    ("KOALA++ (default)", "kpp_lib:lr_adaptation=0.2", "koala++-lra0.2-floor", dict(color="tab:red", marker="s")),
    ("KOALA++ fixed cap", "kpp_lib:lr_adaptation=None", "koala++-fixed",
     dict(color="tab:orange", marker="v", linestyle="--")),
    ("KOALA++ length_bound=1", "kpp_lib:length_bound=1.0", "koala++-length1",
     dict(color="tab:purple", marker="D", linestyle="-.")),
    ("Schedule-Free AdamW", "sf", "adamw-schedulefree", dict(color="tab:green", marker="^", linestyle=":")),
    ("Prodigy", "prodigy", "prodigy", dict(color="tab:blue", marker="x", linestyle=":")),
    ("MoMo-Adam", "momoadam", "momo-adam", dict(color="tab:brown", marker="P", linestyle=":")),
]
SCRATCH_TASKS = [("fm10k", "Fashion-MNIST 10k, CNN (accuracy %)"),
                 ("fm60k", "Fashion-MNIST 60k, CNN, 2 epochs (accuracy %)"),
                 ("mnist", "MNIST subset, CNN (accuracy %)"), ("lm", "character GPT (test perplexity)")]
FINETUNE_TASKS = [("mnist-full-loop", "CNN fine-tuned on MNIST, full (accuracy %)"),
                  ("bbc-lora-loop", "MiniLM LoRA, BBC News (accuracy %)")]


def main(out: Path) -> None:
    scratch, finetune = scratch_values(), finetune_values()
    panels = [(task, title, scratch, 1) for task, title in SCRATCH_TASKS] + \
             [(task, title, finetune, 2) for task, title in FINETUNE_TASKS]
    fig, grid = plt.subplots(2, 4, figsize=(17, 8))
    axes = list(grid.flat)
    for ax in axes[len(panels):-1]:
        ax.axis("off")
    handles = {}
    for ax, (task, title, cells, key) in zip(axes, panels, strict=False):
        for label, base, contender, style in LINES:
            name = base if key == 1 else contender
            points = [(m, cells.get((task, name, m))) for m in (0.1, 1.0, 10.0)]
            points = [(m, v) for m, v in points if v]
            if len(points) < 3:
                continue
            xs = [m for m, _ in points]
            (line,) = ax.plot(xs, [statistics.fmean(v) for _, v in points], label=label, **style)
            handles.setdefault(label, line)
            ax.annotate(f"{len(points[1][1])}", (1.0, statistics.fmean(points[1][1])), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", color=style["color"])
            ax.fill_between(xs, [min(v) for _, v in points], [max(v) for _, v in points], color=style["color"],
                            alpha=0.12)
        ax.set_xscale("log")
        ax.set_xticks([0.1, 1, 10], ["0.1x", "1x", "10x"])
        ax.set_xlabel("lr multiplier")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    legend = axes[-1]
    legend.axis("off")
    legend.legend(list(handles.values()), list(handles), loc="center", fontsize=9,
                  title="x: the optimizer's default lr (fine-tuning:\nthe regime's AdamW lr; Prodigy: 1).\n"
                        "The small numbers at 1x: seeds.", title_fontsize=8)
    fig.suptitle("Learning-rate sensitivity: final result against the lr multiplier (constant lr; mean, seeds' "
                 "range shaded)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "results/research/lr_sensitivity.png")
