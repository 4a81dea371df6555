"""Research: LoKO defaults that adapt to the model's scale (task C of the LoKO issue).

One run = one optimizer configuration on one stream split and one order; every run appends a line to
``results/research/loko_defaults.jsonl`` (already-present keys are skipped, so a command can be re-run).

    OMP_NUM_THREADS=1 python docs/benchmarks/research/loko_defaults.py run --stream cv_mnist --split tune \
        --configs main,tensor_v1 --orders 999
    python docs/benchmarks/research/loko_defaults.py show [--stream cv_mnist]

Streams (batch 1, predict then update):
* ``cv_mnist``: ``kalmanopt.bench.online``'s stream (SmallCNN pretrained on Fashion-MNIST, fresh 10-way head trained in
  full, LoRA r=4 on conv1/conv2/fc1), adapted to MNIST; tune pool 2,000 / eval pool 8,000 digits.
* ``digits_shift``: ``kalmanopt.bench.online``'s stream when present (the benchmark helper adds it).
* ``fmnist_inv``: ours. MLP 784-256-256-10 (ReLU, pixels in [0, 1]) pretrained on Fashion-MNIST (1 epoch, AdamW 1e-3,
  batch 128, seed 0), adapted online to *inverted* Fashion-MNIST test images (1 - x) on which it is near chance;
  LoRA r=4 (alpha 8) on all three linear layers, nothing else trainable (no fresh head, the new-user setting).
* ``fmnist_inv_raw``: the same with pixels in [0, 255] (pretrained on raw pixels): the first layer's Jacobians are
  255x larger, the scale test.

Configurations are named in ``CONFIGS``; LoKO variants run through ``ResearchLoKO`` (a subclass that adds the
prior-scale rules under study, the probit predictive NLL, and diagnostics) so ``src/kalmanopt/optim/loko.py`` is
untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kalmanopt.optim.loko import LoKO

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "results" / "research" / "loko_defaults.jsonl"


# ------------------------------------------------------------------------------------------------ the filter
class ResearchLoKO(LoKO):
    """LoKO with extra prior-scale rules (``p0_rule``) and per-step diagnostics.

    ``p0_rule``:
      * ``None``: LoKO's own ``p0`` handling.
      * ``"tensor_logitvar"``: every trainable tensor u whose Jacobian is non-zero at the first step gets
        ``p0_u = v * C / (U * tr(H_u H_u^T))`` (U tensors, C classes), i.e. the prior predictive logit variance
        is ``v`` per class, split equally over the tensors (invariant to rescaling any tensor). Tensors whose Jacobian
        is zero at step 0 (LoRA ``A`` while ``B = 0``) get ``a_rule``:
          - ``"init"``: ``p0 = a_scale * mean(A^2)`` (the variance of A's own initialisation),
          - ``"frozen"``: ``p0 = 1e-30`` (A stays where it is: LoRA-FA),
          - ``"late"``: the same logit-variance share at its first non-zero Jacobian (LoKO's ``tensor`` scope).
        ``C`` counts logits (observation "logits" or "softmax"); with a softmax observation the target is on the
        softmax scale (``tr(H_s P H_s^T) = v * tr(R)/U``) like LoKO's auto rule.
    ``q_rel``: process noise relative to each tensor's prior, ``p <- p + q_rel * p0_u`` before every step.
    """

    def __init__(self, params: Any, *, p0_rule: str | None = None, v: float = 1.0, a_rule: str = "init",
                 a_scale: float = 1.0, q_rel: float = 0.0, trust: float = 0.0, p_max: float = 1.0,
                 pred: float = 0.0, **kw: Any) -> None:
        import inspect

        if "trust" in inspect.signature(LoKO).parameters:  # the library's own trust region (later versions): off,
            kw["trust"] = 0.0  # the prototype below applies ``trust`` (same rule) so that old results stay comparable
        super().__init__(params, **kw)
        self.trust, self.trust_hits, self._trz, self.p_max, self.pred = trust, 0, None, p_max, bool(pred)
        self.p0_rule, self.v, self.a_rule, self.a_scale, self.q_rel = p0_rule, v, a_rule, a_scale, q_rel
        self.p0_of: dict[int, float] = {}
        self.partner: dict[int, int] = {}  # index of a lora_A tensor in the trainable list -> its lora_B's index
        self.logit_var: list[float] = []  # mean prior predictive logit variance per step (logits observation)
        self.pred_nll: list[float] = []  # probit-approximated predictive NLL per step

    def step(self, forward_fn=None, target=None):  # noqa: ANN001, ANN201
        from kalmanopt.optim.loko import jacobian_rows

        self.last_predictive = None
        params = [p for _, p in self._trainable()]
        if self.p0_rule in ("joint_logitvar_z", "capped") and self._trz is None:
            # the logit Jacobian's trace at the first sample, whatever the observation (one extra pass, once)
            with torch.enable_grad():
                z = forward_fn()
                rows = jacobian_rows(z.reshape(-1), params)
            self._trz = sum(float(r.double().square().sum()) for r in rows) / z.numel()
        before = [p.detach().clone() for p in params] if self.trust > 0 else None
        if self.pred and self.param_groups[0]["observation"] != "logits":
            # the linearised (probit) predictive with the prior covariance, before the update (extra C VJPs)
            probs = self.predictive(forward_fn, "probit").probs
            self.pred_nll.append(float(-torch.log(probs[torch.arange(len(target)), target].clamp_min(1e-300))
                                       .mean()))
        out = super().step(forward_fn, target)
        if before is not None:  # trust region on the actual change of the logits of this sample
            with torch.no_grad():
                dz = float((forward_fn().double() - out.double()).abs().max())
                if dz > self.trust:
                    c = self.trust / dz
                    for p, b in zip(params, before, strict=True):
                        p.copy_(b + c * (p - b))
                    self.trust_hits += 1
        pred = getattr(self, "last_predictive", None)
        # probit predictive of the prior H P^- H^T (logit observation), before the update
        if pred is not None and self.param_groups[0]["observation"] == "logits":
            self.pred_nll.append(float(-torch.log(pred.probs[torch.arange(len(target)), target].clamp_min(1e-300))
                                       .mean()))
        return out

    def _initial_variances(self, pairs, H, R, gst):  # noqa: ANN001, ANN202
        if self.p0_rule is None:
            out = super()._initial_variances(pairs, H, R, gst)
        else:
            out = [None] * len(pairs)
            live = [i for i, (_, p) in enumerate(pairs) if float(H[i].double().square().sum()) > 0]
            first = gst["step"] == 0 and not any("p" in self.state[p] for _, p in pairs)
            if first:
                self._units = 1 if self.p0_rule.startswith("joint") else max(len(live), 1)
                if self.p0_rule in ("joint_logitvar_z", "capped"):  # p0 = v / (mean_c |dz_c/dtheta|^2)
                    value = self.v / self._trz
                    if self.p0_rule == "capped":  # ... and at most p_max (parameter-space bound)
                        value = min(value, self.p_max)
                    for i in range(len(pairs)):
                        out[i] = value
                    return self._record(pairs, out)
                if self.p0_rule == "joint_logitvar":  # one scalar: the total prior logit variance is v per class
                    tr_all = sum(float(H[i].double().square().sum()) for i in live)
            g0 = self.param_groups[0]
            if g0["observation"] == "softmax" and g0["noise"] == "moment":
                # H_s = Lam H_z: an isotropic prior logit covariance v I has trace v tr(Lam^2) on the softmax scale
                lam = R - g0["r_min"] * torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
                target = self.v * float((lam @ lam).trace()) / self._units
            else:
                target = self.v * float(torch.trace(R)) / self._units
            if first:
                self._p0_by_index = {}
            for i, (_g, p) in enumerate(pairs):
                if "p" in self.state[p]:
                    continue
                tr = float(H[i].double().square().sum())
                if self.p0_rule == "joint_logitvar":
                    tr = tr_all if first else 0.0
                    if first:
                        out[i] = target / tr_all
                        continue
                if first and tr > 0:
                    out[i] = target / tr
                    self._p0_by_index[i] = out[i]
                elif first or self.a_rule != "late":
                    if self.a_rule == "pair":  # the p0 of the lora_B tensor of the same module
                        out[i] = self._p0_by_index.get(self.partner.get(i, -1), None) or 1e-30
                    elif self.a_rule == "init":
                        out[i] = self.a_scale * float(p.detach().double().square().mean()) or 1e-30
                    elif self.a_rule == "frozen":
                        out[i] = 1e-30
                    else:
                        out[i] = None
                elif tr > 0:  # "late"
                    out[i] = target / tr
        return self._record(pairs, out)

    def _record(self, pairs, out):  # noqa: ANN001, ANN202
        for (_, p), v in zip(pairs, out, strict=True):
            if v is not None and id(p) not in self.p0_of:
                self.p0_of[id(p)] = v
        return out

    def _update(self, pairs, rows, e, yhat, gst, *rest):  # noqa: ANN001, ANN002, ANN202
        m = e.numel()
        if self.q_rel > 0:
            for _, p in pairs:
                st = self.state[p]
                if "p" in st and id(p) in self.p0_of:
                    st["p"].add_(self.q_rel * self.p0_of[id(p)])
        if self.param_groups[0]["observation"] == "logits":
            var = torch.zeros(m, dtype=torch.float64)
            for (_, p), r in zip(pairs, rows, strict=True):
                if "p" in self.state[p]:
                    var += (r.reshape(m, -1).double().square() * self.state[p]["p"].reshape(1, -1).double()).sum(1)
            self.logit_var.append(float(var.mean()))
        return super()._update(pairs, rows, e, yhat, gst, *rest)


# ------------------------------------------------------------------------------------------------ configurations
# kind "loko": ResearchLoKO(**kw); "adamw"/"adagrad": torch optimizers with lr.
CONFIGS: dict[str, dict[str, Any]] = {
    # LoKO at the defaults on main before this research (loko.py up to 73b39a7): runs named "main" before 19:50 UTC
    # used LoKO() itself, which was this configuration; "main_old" spells it out (later LoKO() has new defaults)
    "main": dict(kind="loko", kw=dict(observation="logits", noise="fixed", r0=1.0, variance_update="fd", p0=0.3,
                                      rank=0)),
    "main_old": dict(kind="loko", kw=dict(observation="logits", noise="fixed", r0=1.0, variance_update="fd", p0=0.3,
                                          rank=0)),
}
for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2):
    CONFIGS[f"adamw_{lr:g}"] = dict(kind="adamw", lr=lr)
    CONFIGS[f"adagrad_{lr:g}"] = dict(kind="adagrad", lr=lr)
for p0 in (0.03, 0.3, 3.0, 30.0, 300.0, 3000.0, 3e4):
    CONFIGS[f"p0_{p0:g}"] = dict(kind="loko", kw=dict(p0=p0))
for v in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 1e4):
    for a in ("init", "frozen", "late"):
        CONFIGS[f"tlv{v:g}_{a}"] = dict(kind="loko", kw=dict(p0_rule="tensor_logitvar", v=v, a_rule=a))
    CONFIGS[f"tlv{v:g}_init_lit"] = dict(kind="loko", kw=dict(p0_rule="tensor_logitvar", v=v, observation="softmax",
                                                               noise="moment", variance_update="vd"))
    CONFIGS[f"tlv{v:g}_init_smfd"] = dict(kind="loko", kw=dict(p0_rule="tensor_logitvar", v=v, observation="softmax",
                                                                noise="moment", variance_update="fd"))
    CONFIGS[f"tlv{v:g}_init_vd"] = dict(kind="loko", kw=dict(p0_rule="tensor_logitvar", v=v, variance_update="vd"))
    for qr in (1e-3, 1e-2):
        CONFIGS[f"tlv{v:g}_init_q{qr:g}"] = dict(kind="loko", kw=dict(p0_rule="tensor_logitvar", v=v, q_rel=qr))
LIT = dict(observation="softmax", noise="moment")
for v in (0.03, 0.1, 0.3, 1.0, 3.0, 10.0):
    for a in ("late", "pair"):
        CONFIGS[f"tlv{v:g}_{a}"] = dict(kind="loko", kw=dict(p0_rule="tensor_logitvar", v=v, a_rule=a))
        for k in (0, 4, 16, 64):
            extra = dict(rank=k) if k else dict(variance_update="vd")
            CONFIGS[f"lit_r{k}_tlv{v:g}_{a}"] = dict(kind="loko", kw=dict(p0_rule="tensor_logitvar", v=v, a_rule=a,
                                                                           **LIT, **extra))
            CONFIGS[f"r{k}_tlv{v:g}_{a}"] = dict(kind="loko", kw=dict(p0_rule="tensor_logitvar", v=v, a_rule=a,
                                                                       **extra))
for v in (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
    for k in (0, 4, 16, 64):
        extra = dict(rank=k) if k else dict(variance_update="vd")
        CONFIGS[f"lit_r{k}_jlv{v:g}"] = dict(kind="loko", kw=dict(p0_rule="joint_logitvar", v=v, **LIT, **extra))
        CONFIGS[f"r{k}_jlv{v:g}"] = dict(kind="loko", kw=dict(p0_rule="joint_logitvar", v=v, **extra))
    CONFIGS[f"fd_jlv{v:g}"] = dict(kind="loko", kw=dict(p0_rule="joint_logitvar", v=v))
for s in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0):
    for k in (0, 4, 16, 64):
        extra = dict(rank=k) if k else dict(variance_update="vd")
        CONFIGS[f"lit_r{k}_autojoint{s:g}"] = dict(kind="loko", kw=dict(p0="auto", auto_scope="joint", p0_scale=s,
                                                                         **LIT, **extra))
for k in (1, 4, 16, 64):
    for p0 in (0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 1.0, 3.0, 30.0):
        CONFIGS[f"r{k}_p{p0:g}"] = dict(kind="loko", kw=dict(rank=k, p0=p0))
        CONFIGS[f"r{k}_lit_p{p0:g}"] = dict(kind="loko", kw=dict(rank=k, p0=p0, observation="softmax",
                                                                  noise="moment"))
for s in (1.0, 3.0, 10.0, 30.0, 100.0, 1000.0):
    CONFIGS[f"auto_tensor_x{s:g}"] = dict(kind="loko", kw=dict(p0="auto", auto_scope="tensor", p0_scale=s))
for eps in (1e-4, 1e-3, 1e-2):
    for p0 in (1e-3, 1e-2, 3e-2, 1e-1):
        CONFIGS[f"lit_p{p0:g}_e{eps:g}"] = dict(kind="loko", kw=dict(p0=p0, observation="softmax", noise="moment",
                                                                      variance_update="vd", r_min=eps))


# ------------------------------------------------------------------------------------------------ streams
class MLP(nn.Module):
    def __init__(self, d: int = 784, w: int = 256, c: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, w), nn.Linear(w, w), nn.Linear(w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def _fmnist_mlp(scale: float) -> dict[str, torch.Tensor]:
    from kalmanopt import data

    path = data.cache_dir() / "models" / f"research_mlp_fmnist_x{scale:g}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    d = data.load("fashion_mnist")
    x, y = d.x_train.float() / 255.0 * scale, d.y_train
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(x), 128):
        idx = perm[i:i + 128]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        xt = d.x_test.float() / 255.0 * scale
        acc = (model(xt).argmax(1) == d.y_test).float().mean().item()
        acc_inv = (model(scale - xt).argmax(1) == d.y_test).float().mean().item()
    print(f"MLP x{scale:g}: Fashion-MNIST test {acc:.4f}, inverted {acc_inv:.4f}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def load_stream(name: str) -> dict[str, Any]:
    """inputs, labels, tune pool, eval pool, n (samples per order), make(seed) -> peft model."""
    from peft import LoraConfig, get_peft_model

    from kalmanopt.bench import online

    if name in online.TASKS:
        task = online.load_task(name, progress=False)

        def make(seed: int) -> nn.Module:
            cfg = LoraConfig(r=task.rank, lora_alpha=2 * task.rank, target_modules=task.targets,
                             modules_to_save=getattr(task, "modules_to_save", ["head"]), lora_dropout=0.0)
            base = task.make_base(seed)
            torch.manual_seed(seed)
            return get_peft_model(base, cfg)

        n = 1000 if name == "cv_mnist" else min(getattr(task, "samples", 1000) or 1000, len(task.eval_pool))
        return dict(inputs=task.inputs, labels=task.labels, tune=task.tune_pool, eval=task.eval_pool, n=n,
                    make=make, task=task)
    if name in ("fmnist_inv", "fmnist_inv_raw"):
        from kalmanopt import data

        scale = 255.0 if name.endswith("raw") else 1.0
        weights = _fmnist_mlp(scale)
        d = data.load("fashion_mnist")
        x = scale - d.x_test.float() / 255.0 * scale
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234)).tolist()

        def make_mlp(seed: int) -> nn.Module:
            model = MLP()
            model.load_state_dict(weights)
            model.requires_grad_(False)
            torch.manual_seed(seed)
            cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "fc3"], lora_dropout=0.0)
            return get_peft_model(model, cfg)

        return dict(inputs=x, labels=d.y_test, tune=perm[:2000], eval=perm[2000:], n=1000, make=make_mlp)
    raise ValueError(name)


def _order(pool: list[int], seed: int, n: int) -> list[int]:
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in perm[:n]]


def config(name: str) -> dict[str, Any]:
    """A named configuration, or ``loko:key=value,key=value`` (numbers parsed; LIT expands to the literature
    observation: softmax with moment-matched R)."""
    if name in CONFIGS:
        return CONFIGS[name]
    if not name.startswith("loko:"):
        raise KeyError(name)
    kw: dict[str, Any] = {}
    for item in name[5:].split(","):
        if item == "LIT":
            kw |= LIT
            continue
        k, v = item.split("=")
        try:
            kw[k] = int(v) if k == "rank" else float(v)
        except ValueError:
            kw[k] = v
    return dict(kind="loko", kw=kw)


def make_optimizer(model: nn.Module, cfg: dict[str, Any]):  # noqa: ANN201
    from kalmanopt.integrations.peft import adapter_groups

    groups = adapter_groups(model)
    if cfg["kind"] == "loko":
        opt = ResearchLoKO(groups, **cfg["kw"])
        names = {id(p): n for n, p in model.named_parameters()}
        flat = [names[id(p)] for _, p in opt._trainable()]
        for i, n in enumerate(flat):
            if ".lora_A." in n:
                opt.partner[i] = flat.index(n.replace(".lora_A.", ".lora_B."))
        return opt
    for g in groups:
        g.pop("role")
    if cfg["kind"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=0.0)
    if cfg["kind"] == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg["lr"])
    raise ValueError(cfg["kind"])


def run(stream: dict[str, Any], name: str, split: str, order_seed: int, n: int | None = None) -> dict[str, Any]:
    from kalmanopt.online import run_online

    cfg = config(name)
    n = n or stream["n"]
    order = _order(stream["tune" if split == "tune" else "eval"], order_seed, n)
    model = stream["make"](order_seed)
    opt = make_optimizer(model, cfg)
    t0 = time.thread_time()
    res = run_online(model, opt, stream["inputs"], stream["labels"], order=order, progress=False)
    cpu = time.thread_time() - t0
    s = res.summary()
    out = dict(acc=s["online_accuracy"], nll=s["mean_loss"], last100=sum(res.correct[-100:]) / 100,
               first200=sum(res.correct[:200]) / 200, cpu_s=cpu, skipped=res.skipped_steps, n=n)
    if isinstance(opt, ResearchLoKO):
        lv = opt.logit_var or [float("nan")]
        out["logit_var"] = [lv[0], lv[min(99, len(lv) - 1)], lv[-1]]
        if opt.pred_nll:
            out["pred_nll"] = sum(opt.pred_nll) / len(opt.pred_nll)
        out["trust_hits"] = opt.trust_hits
        out["p0"] = {k: v for k, v in zip(range(len(opt.p0_of)), opt.p0_of.values(), strict=False)}
    if not math.isfinite(out["nll"]):
        out["nll"] = 1e9
    return out


def _rev() -> str:
    """HEAD and a hash of the loko.py in the working tree (another helper edits it while we run)."""
    import hashlib

    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:  # noqa: BLE001
        head = "?"
    src = b"".join(f.read_bytes() for f in sorted((ROOT / "src" / "kalmanopt" / "optim" / "loko").glob("*.py")))
    return f"{head} loko.py:{hashlib.sha1(src).hexdigest()[:10]}"


def done_keys() -> set[tuple]:
    if not OUT.exists():
        return set()
    keys = set()
    for line in OUT.read_text().splitlines():
        r = json.loads(line)
        keys.add((r["stream"], r["config"], r["split"], r["order"], r["n"]))
    return keys


def cmd_run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    stream = load_stream(args.stream)
    done = done_keys()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    n = args.n or stream["n"]
    for name in args.configs:
        for o in [int(v) for v in args.orders.split(",")]:
            key = (args.stream, name, args.split, o, n)
            if key in done:
                continue
            r = run(stream, name, args.split, o, n)
            rec = dict(stream=args.stream, config=name, split=args.split, order=o, **r, cfg=config(name),
                       rev=_rev(), when=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))
            with OUT.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{args.stream} {args.split} o{o} {name:28} acc {r['acc']:.4f} nll {r['nll']:.3f} "
                  f"first200 {r['first200']:.3f} last100 {r['last100']:.3f} cpu {r['cpu_s']:.0f}s "
                  f"pnll {r.get('pred_nll', float('nan')):.3f} lv {r.get('logit_var')}", flush=True)


def load_rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in OUT.read_text().splitlines()] if OUT.exists() else []


def cmd_show(args: argparse.Namespace) -> None:
    from collections import defaultdict

    agg: dict[tuple, list] = defaultdict(list)
    for r in load_rows():
        if args.stream and r["stream"] != args.stream:
            continue
        agg[(r["stream"], r["split"], r["config"])].append(r)
    for (s, sp, c), rs in sorted(agg.items(), key=lambda kv: (kv[0][0], kv[0][1], -sum(r["acc"] for r in kv[1])
                                                               / len(kv[1]))):
        acc = [r["acc"] for r in rs]
        m = sum(acc) / len(acc)
        sd = math.sqrt(sum((a - m) ** 2 for a in acc) / (len(acc) - 1)) if len(acc) > 1 else 0.0
        nll = sum(r["nll"] for r in rs) / len(rs)
        pn = [r["pred_nll"] for r in rs if "pred_nll" in r]
        pn_s = f"{sum(pn) / len(pn):.3f}" if pn else "  -  "
        print(f"{s:14} {sp:5} {c:28} n={len(rs)} acc {m:.4f} ± {sd:.4f}  nll {nll:.3f} pnll {pn_s} "
              f"first200 {sum(r['first200'] for r in rs) / len(rs):.3f} "
              f"last100 {sum(r['last100'] for r in rs) / len(rs):.3f}"
              f"  cpu {sum(r['cpu_s'] for r in rs) / len(rs):.0f}s")


def cmd_table(args: argparse.Namespace) -> None:
    """Markdown: one row per configuration, one column per stream (mean ± std online accuracy over the orders
    of ``--split``; NLL of the plug-in softmax and, where recorded, of the probit predictive)."""
    streams = args.streams.split(",")
    rows = load_rows()
    print("| configuration | " + " | ".join(streams) + " |")
    print("|---|" + "---|" * len(streams))
    for name in args.configs:
        cells = []
        for st in streams:
            rs = [r for r in rows if r["stream"] == st and r["split"] == args.split and r["config"] == name]
            if not rs:
                cells.append("-")
                continue
            acc = [r["acc"] for r in rs]
            m = sum(acc) / len(acc)
            sd = math.sqrt(sum((a - m) ** 2 for a in acc) / (len(acc) - 1)) if len(acc) > 1 else 0.0
            cell = f"{m:.3f} ± {sd:.3f} (nll {sum(r['nll'] for r in rs) / len(rs):.2f}"
            pn = [r["pred_nll"] for r in rs if "pred_nll" in r]
            if pn and args.pred:
                cell += f", pred {sum(pn) / len(pn):.2f}"
            if args.cost:
                cell += f", {1e3 * sum(r['cpu_s'] / r['n'] for r in rs) / len(rs):.1f} ms"
            cells.append(cell + f"){'' if len(rs) == 3 else f' n={len(rs)}'}")
        print(f"| `{name}` | " + " | ".join(cells) + " |")


def cmd_best(args: argparse.Namespace) -> None:
    """The configuration named ``prefix*`` with the best mean online accuracy on the tuning split (order 999)."""
    scores: dict[str, float] = {}
    for r in load_rows():
        if r["stream"] == args.stream and r["split"] == "tune" and r["order"] == 999 \
                and r["config"].startswith(args.prefix):
            scores[r["config"]] = r["acc"]
    print(max(scores, key=scores.get))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--stream", required=True)
    r.add_argument("--split", default="tune", choices=("tune", "eval"))
    r.add_argument("--configs", required=True, nargs="+")
    r.add_argument("--orders", default="999")
    r.add_argument("--n", type=int, default=None)
    b = sub.add_parser("best")
    b.add_argument("--stream", required=True)
    b.add_argument("--prefix", required=True)
    t = sub.add_parser("table")
    t.add_argument("--streams", required=True)
    t.add_argument("--split", default="eval")
    t.add_argument("--pred", action="store_true")
    t.add_argument("--cost", action="store_true")
    t.add_argument("--configs", nargs="+", required=True)
    s = sub.add_parser("show")
    s.add_argument("--stream", default=None)
    a = ap.parse_args()
    {"run": cmd_run, "show": cmd_show, "best": cmd_best, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
