"""Thread CPU time per sample of LoKO variants against LoRA/AdamW, interleaved sample by sample (issue 22, item 1).

    python docs/benchmarks/research/loko_cost_bench.py --task cv_mnist --samples 300 \
        --row "" --row trust_check=predicted --row truncation=whitened

On a shared machine the thread CPU time of one step varies by up to 2x with the load of the other core (hyperthreads,
caches). ``kalmanopt bench online --cost-only`` interleaves whole rows (3 rounds); here every contender takes its step
on sample i before any takes sample i + 1, so a change of load hits them all alike, and the ratio to LoRA/AdamW is
what is reported (median of the per-block ratios over blocks of 50 samples, and the ratio of the totals). Same
models, seeds and stream order (order 0) as the benchmark; one thread. Also the minor page faults per step (of the
process, read around each step). ``--no-workspace`` adds every LoKO row once more with LoFi's CPU workspace off
(``opt._workspace = lambda device: None``: fresh temporaries every step, as before it existed).
"""

from __future__ import annotations

import argparse
import resource
import statistics as st
import time

import torch
import torch.nn.functional as F

from kalmanopt.bench.online.suite import _order, parse_ablation
from kalmanopt.bench.online.tasks import build, load_task
from kalmanopt.online import _default_forward, _to, default_collate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="cv_mnist")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--skip", type=int, default=0, help="samples stepped before timing starts (warm state)")
    ap.add_argument("--row", action="append", default=None)
    ap.add_argument("--no-workspace", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = load_task(args.task, progress=False)
    order = _order(task.eval_pool, 0, args.skip + args.samples)
    rows = ["AdamW"] + (args.row or [""])
    contenders = []
    for row in rows:
        if row == "AdamW":
            model, opt = build(task, "LoRA", "AdamW", 1e-3, 0)
        else:
            model, opt = build(task, "LoRA", "LoKO", None, 0, parse_ablation(row) if row else {})
        model.eval()
        contenders.append((row or "defaults", model, opt))
        if args.no_workspace and row != "AdamW":
            model, opt = build(task, "LoRA", "LoKO", None, 0, parse_ablation(row) if row else {})
            model.eval()
            opt._workspace = lambda device: None
            contenders.append(((row or "defaults") + " [no workspace]", model, opt))
    times = {name: [] for name, _, _ in contenders}
    faults = {name: 0 for name, _, _ in contenders}
    for j, i in enumerate(order):
        batch = task.inputs[[i]] if isinstance(task.inputs, torch.Tensor) else default_collate([task.inputs[i]])
        batch, target = _to(batch, "cpu"), task.labels[[i]]
        for name, model, opt in contenders:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.thread_time()
            if name == "AdamW":
                opt.zero_grad(set_to_none=True)
                out = _default_forward(model, batch)
                F.cross_entropy(out, target).backward()
                opt.step()
            else:
                opt.step(lambda model=model, batch=batch: _default_forward(model, batch), target)
            if j >= args.skip:
                times[name].append(time.thread_time() - t0)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    ref = times["AdamW"]
    block = 50
    print(f"{args.task}: {args.samples} samples (after {args.skip}), interleaved per sample, thread CPU time")
    print("| row | ms/sample | x LoRA/AdamW (totals) | x LoRA/AdamW (median of 50-sample blocks) | page faults/step |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        blocks = [sum(values[b:b + block]) / sum(ref[b:b + block]) for b in range(0, len(values), block)]
        print(f"| {name} | {sum(values) / len(values) * 1e3:.2f} | {sum(values) / sum(ref):.2f} | "
              f"{st.median(blocks):.2f} | {faults[name] / len(values):.0f} |")


if __name__ == "__main__":
    main()
