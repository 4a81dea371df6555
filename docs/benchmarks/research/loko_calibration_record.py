"""Record LoKO's uncalibrated predictive on the online streams, for offline study of its calibration (issue 22, 3).

    python docs/benchmarks/research/loko_calibration_record.py --task cv_mnist --orders 3 \
        --out /tmp/loko_calibration

Runs LoKO at its defaults with ``calibrate=False`` (the calibration never touches the filter, so the parameters,
logits and covariances are those of the default run) on the evaluation orders of ``kalmanopt bench online`` (order k
seeds the model), one thread, and saves per order ``<out>/<task>_<k>.pt``: the logits ``mean (n, C)``, the filter's
own logit covariance ``cov (n, C, C)`` (float64, scale 1) and the labels ``(n,)``. Every calibration rule is then a
prequential function of these records (``loko_calibration.py``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from kalmanopt.bench.online.suite import _order, _stream_sizes
from kalmanopt.bench.online.tasks import build, load_task
from kalmanopt.online import run_online


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="digits_shift")
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--out", default="/tmp/loko_calibration")
    ap.add_argument("--tune", action="store_true",
                    help="the tuning pool instead (orders seeded 999, 1000, ...; saved as <task>_tune_<k>.pt)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    task = load_task(args.task, progress=False)
    n, n_tune = _stream_sizes(task, argparse.Namespace(samples=args.samples, tune_samples=0, quick=False))
    for k in range(args.orders):
        seed = 999 + k if args.tune else k
        order = _order(task.tune_pool, seed, n_tune) if args.tune else _order(task.eval_pool, seed, n)
        model, opt = build(task, "LoRA", "LoKO", None, seed, {"calibrate": False})
        means, covs, labels = [], [], []

        def recording_step(forward_fn, target, _step=opt.step, opt=opt, means=means, covs=covs, labels=labels):
            out = _step(forward_fn, target)
            pred = opt.last_predictive
            if pred is None:  # a skipped sample: no predictive (never seen on these streams)
                raise RuntimeError("skipped sample")
            means.append(pred.mean.detach().double().cpu())
            covs.append(pred.cov.detach().double().cpu())
            labels.append(target.detach().cpu())
            return out

        opt.step = recording_step
        t0 = time.thread_time()
        res = run_online(model, opt, task.inputs, task.labels, order=order, progress=False)
        s = res.summary()
        torch.save({"mean": torch.cat(means), "cov": torch.cat(covs), "label": torch.cat(labels),
                    "online_accuracy": s["online_accuracy"], "softmax_nll": s["softmax_nll"],
                    "softmax_ece": s["softmax_ece"], "uncalibrated_nll": s["nll"], "uncalibrated_ece": s["ece"]},
                   os.path.join(args.out, f"{args.task}_{'tune_' if args.tune else ''}{k}.pt"))
        print(f"{args.task} {'tuning ' if args.tune else ''}order {k}: n {len(order)} "
              f"acc {s['online_accuracy']:.4f} softmax nll {s['softmax_nll']:.4f} "
              f"ece {s['softmax_ece']:.3f}; scale-1 probit nll {s['nll']:.4f} ece {s['ece']:.3f}; "
              f"{time.thread_time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
