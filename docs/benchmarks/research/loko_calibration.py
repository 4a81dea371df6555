"""Calibration rules for LoKO's predictive, compared prequentially on recorded streams (issue 22, item 3).

    python docs/benchmarks/research/loko_calibration.py --dir /tmp/loko_calibration --task cv_mnist --orders 3

Reads the records of ``loko_calibration_record.py`` (LoKO at its defaults with ``calibrate=False``: logits, the
filter's logit covariance, labels) and evaluates every rule below on the same predictions. Each rule is prequential:
before sample t it picks its candidate by a score summed over samples 0..t-1 (ties: the first candidate), then
predicts sample t. Prints per rule the mean NLL, ECE (15 bins, as ``kalmanopt bench online``), mean confidence minus
accuracy (> 0: over-confident) and the candidate chosen at the end, averaged over the orders.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics as st

import torch

from kalmanopt.online import expected_calibration_error
from kalmanopt.optim.loko.predictive import PREDICTIVE_SCALES, predictive_probs, probit

TINY = torch.finfo(torch.float64).tiny


def probit_grid(mu, var, temps, scales):
    """probs (G, n, C) for every (temperature, scale) pair: softmax(mu / T / sqrt(1 + pi s var / 8))."""
    out, names = [], []
    for t in temps:
        for s in scales:
            v = torch.zeros_like(var) if s == 0 else s * var
            out.append(probit(mu / t, v))
            names.append((t, s))
    return torch.stack(out), names


def prequential(probs, y, score="nll", decay=None):
    """Per-sample probs of the candidate picked by the (optionally exponentially forgotten) cumulative score of the
    previous samples, and the chosen index per sample."""
    g, n, c = probs.shape
    py = probs.gather(2, y.view(1, n, 1).expand(g, n, 1)).squeeze(2).clamp_min(TINY)
    if score == "nll":
        per = -py.log()
    elif score == "brier":
        onehot = torch.nn.functional.one_hot(y, c).double()
        per = (probs - onehot).square().sum(2)
    elif score == "nll+ece":  # NLL plus a running |confidence - correctness| gap (a calibration penalty)
        per = -py.log()
    else:
        raise ValueError(score)
    if decay is None:
        cum = per.cumsum(1)
    else:
        cum = torch.zeros_like(per)
        acc = torch.zeros(g, dtype=per.dtype)
        for i in range(n):
            acc = decay * acc + per[:, i]
            cum[:, i] = acc
    prev = torch.cat([torch.zeros(g, 1, dtype=cum.dtype), cum[:, :-1]], 1)  # sums before sample t
    choice = torch.argmin(prev, dim=0)  # ties: the first
    return probs[choice, torch.arange(n)], choice


def metrics(p, y):
    nll = float(-p.gather(1, y.view(-1, 1)).clamp_min(TINY).log().mean())
    conf, pred = p.max(1)
    correct = (pred == y).long()
    ece = expected_calibration_error(conf.tolist(), correct.tolist())
    gap = float(conf.mean() - correct.double().mean())
    return nll, ece, gap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/loko_calibration")
    ap.add_argument("--task", default="digits_shift")
    ap.add_argument("--orders", type=int, default=3)
    ap.add_argument("--tune", action="store_true", help="the tuning-pool records (<task>_tune_<k>.pt)")
    ap.add_argument("--mc", action="store_true", help="also the Monte-Carlo and Laplace-bridge rows (slower)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    default_scales = list(PREDICTIVE_SCALES)
    fine_scales = [1.0] + [2.0 ** (-j / 4) for j in range(1, 41)] + [0.0]
    temps = [1.0] + [2.0 ** (k / 8) for k in range(-8, 9) if k != 0]  # 0.5 .. 2
    temps_wide = [1.0] + [2.0 ** (k / 8) for k in range(-16, 17) if k != 0]  # 0.25 .. 4
    rows: dict[str, list] = {}
    for k in range(args.orders):
        rec = torch.load(os.path.join(args.dir, f"{args.task}_{'tune_' if args.tune else ''}{k}.pt"))
        mu, cov, y = rec["mean"], rec["cov"], rec["label"].long()
        var = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0.0)
        out: dict[str, tuple] = {}

        def add(name, p, chosen="", out=out, y=y):
            out[name] = (*metrics(p, y), chosen)

        add("plug-in softmax", torch.softmax(mu, 1))
        add("probit, scale 1 (calibrate=False)", probit(mu, var))
        g, names = probit_grid(mu, var, [1.0], default_scales)
        p, ch = prequential(g, y)
        add("DEFAULT: scale grid 2^-j (j<=10), 0; by NLL", p, f"s={names[int(ch[-1])][1]:.3g}")
        p, ch = prequential(g, y, "brier")
        add("scale grid 2^-j; by Brier", p, f"s={names[int(ch[-1])][1]:.3g}")
        for d in (0.99, 0.995):
            p, ch = prequential(g, y, decay=d)
            add(f"scale grid 2^-j; by NLL, EMA {d}", p, f"s={names[int(ch[-1])][1]:.3g}")
        g2, names2 = probit_grid(mu, var, [1.0], fine_scales)
        p, ch = prequential(g2, y)
        add("scale grid 2^-j/4 (j<=40), 0; by NLL", p, f"s={names2[int(ch[-1])][1]:.3g}")
        gt, namest = probit_grid(mu, var, temps, [0.0])
        p, ch = prequential(gt, y)
        add("temperature only (softmax z/T, T 0.5..2); by NLL", p, f"T={namest[int(ch[-1])][0]:.3g}")
        gtw, namestw = probit_grid(mu, var, temps_wide, [0.0])
        p, ch = prequential(gtw, y)
        add("temperature only (T 0.25..4); by NLL", p, f"T={namestw[int(ch[-1])][0]:.3g}")
        gj, namesj = probit_grid(mu, var, temps, default_scales)
        p, ch = prequential(gj, y)
        t, s = namesj[int(ch[-1])]
        add("temperature x scale (T 0.5..2 x 2^-j); by NLL", p, f"T={t:.3g} s={s:.3g}")
        p, ch = prequential(gj, y, "brier")
        t, s = namesj[int(ch[-1])]
        add("temperature x scale; by Brier", p, f"T={t:.3g} s={s:.3g}")
        p, ch = prequential(gj, y, decay=0.995)
        t, s = namesj[int(ch[-1])]
        add("temperature x scale; by NLL, EMA 0.995", p, f"T={t:.3g} s={s:.3g}")
        temps_low = [1.0] + [2.0 ** (k / 8) for k in range(-16, 9) if k != 0]  # 0.25 .. 2
        gl, namesl = probit_grid(mu, var, temps_low, default_scales)
        for score, decay in (("brier", None), ("nll", 0.995), ("brier", 0.995)):
            p, ch = prequential(gl, y, score, decay=decay)
            t, s = namesl[int(ch[-1])]
            add(f"temperature (0.25..2) x scale; by {score}{f', EMA {decay}' if decay else ''}", p,
                f"T={t:.3g} s={s:.3g}")
        p, ch = prequential(gtw, y, "brier")
        add("temperature only (T 0.25..4); by Brier", p, f"T={namestw[int(ch[-1])][0]:.3g}")
        temps_lower = [1.0] + [2.0 ** (k / 8) for k in range(-24, 9) if k != 0]  # 0.125 .. 2
        gw, namesw = probit_grid(mu, var, temps_lower, default_scales)
        for score, decay in (("brier", None), ("brier", 0.99), ("brier", 0.995), ("brier", 0.998), ("nll", 0.995)):
            p, ch = prequential(gw, y, score, decay=decay)
            t, s = namesw[int(ch[-1])]
            add(f"temperature (0.125..2) x scale; by {score}{f', EMA {decay}' if decay else ''}", p,
                f"T={t:.3g} s={s:.3g}")
        if args.mc:
            for method in ("laplace_bridge", "mc"):
                gen = torch.Generator().manual_seed(0)
                cand = torch.stack([predictive_probs(mu, cov * s if s else torch.zeros_like(cov), method,
                                                     samples=200, generator=gen) for s in default_scales])
                p, ch = prequential(cand, y)
                add(f"{method}: scale grid 2^-j; by NLL", p, f"s={default_scales[int(ch[-1])]:.3g}")
        for name, v in out.items():
            rows.setdefault(name, []).append(v)
    print(f"{args.task}: {args.orders} orders; NLL, ECE, confidence - accuracy (mean over orders); choice at the end")
    for name, vs in rows.items():
        nll = st.mean(v[0] for v in vs)
        ece = st.mean(v[1] for v in vs)
        gap = st.mean(v[2] for v in vs)
        print(f"| {name} | {nll:.4f} | {ece:.3f} ({', '.join(f'{v[1]:.3f}' for v in vs)}) | {gap:+.3f} | "
              f"{'; '.join(v[3] for v in vs)} |")
    assert all(math.isfinite(v[0]) for vs in rows.values() for v in vs)


if __name__ == "__main__":
    main()
