"""Accuracy, NLL and cost of LoKO variants on the online streams (issue 22, item 1: a cheaper step).

    python docs/benchmarks/research/loko_cost_accuracy.py --task digits_shift --orders 3 \
        --row "" --row trust_check=predicted --row truncation=whitened

Each ``--row`` is LoKO's defaults with the given options (an ablation row of ``kalmanopt bench online``; ``""``: the
defaults); every row runs on the same evaluation orders as ``kalmanopt bench online`` (order k seeds the model),
one thread. Prints per row: average online accuracy, LoKO's predictive NLL, ECE (mean over orders, and per order),
thread CPU ms per sample, and the fraction of steps where the trust region ran its second forward pass.
Appends one JSON line per row to ``--jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import time

import torch

from kalmanopt.bench.online.suite import _order, _stream_sizes, parse_ablation
from kalmanopt.bench.online.tasks import build, load_task
from kalmanopt.online import run_online


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="digits_shift")
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--row", action="append", default=None)
    ap.add_argument("--jsonl", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = load_task(args.task, progress=False)
    ns = argparse.Namespace(samples=args.samples, tune_samples=0, quick=False)
    n, _ = _stream_sizes(task, ns)
    for row in args.row or [""]:
        kwargs = parse_ablation(row) if row else {}
        accs, nlls, eces, ms, fwd = [], [], [], [], []
        for k in range(args.orders):
            order = _order(task.eval_pool, k, n)
            model, opt = build(task, "LoRA", "LoKO", None, k, kwargs)
            res = run_online(model, opt, task.inputs, task.labels, order=order, progress=False)
            s = res.summary()
            accs.append(s["online_accuracy"])
            nlls.append(s["nll"])
            eces.append(s["ece"])
            ms.append(res.cpu_seconds / n * 1e3)
            fwd.append(getattr(opt, "trust_forwards", float("nan")) / n)
        out = {"task": args.task, "row": row or "defaults", "samples": n, "orders": args.orders,
               "acc": accs, "nll": nlls, "ece": eces, "ms": ms, "trust_forward_fraction": fwd,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(f"{args.task:14s} {row or 'defaults':45s} acc {st.mean(accs):.4f} ({', '.join(f'{a:.4f}' for a in accs)})"
              f"  nll {st.mean(nlls):.4f} ({', '.join(f'{a:.4f}' for a in nlls)})  ece {st.mean(eces):.3f}"
              f"  {st.mean(ms):.2f} ms  fwd {st.mean(fwd):.2f}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
