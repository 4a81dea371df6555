"""Thread CPU time per sample of LoKO variants against LoRA/AdamW, interleaved sample by sample (issue 22, item 1).

    python docs/benchmarks/research/loko_cost_bench.py --task cv_mnist --samples 300 \
        --row "" --row trust_check=predicted --row truncation=whitened

On a shared machine the thread CPU time of one step varies by up to 2x with the load of the other core (hyperthreads,
caches). ``kalmanopt bench online --cost-only`` interleaves whole rows (3 rounds); here every contender takes its step
on sample i before any takes sample i + 1, so a change of load hits them all alike, and the ratio to LoRA/AdamW is
what is reported (median of the per-block ratios over blocks of 50 samples, and the ratio of the totals). Same
models, seeds and stream order (order 0) as the benchmark; one thread. Also the minor page faults per step (of the
process, read around each step). ``--no-workspace`` adds every LoKO row once more with LoFi's CPU workspace off
(``opt._workspace = lambda device: None``: fresh temporaries every step, as before it existed). ``--before REV`` adds
every LoKO row once more with LoKO as it was at git revision ``REV`` (``src/kalmanopt/optim/loko/`` and ``lofi.py``
read with ``git show`` and imported as a separate package beside the current one; same options, same models), so
that a change is measured against its "before" in the same process: ``[REV]`` rows. ``--floor`` adds the work that
any step measuring the outputs must do, with no filter update: ``floor: forward + C rows`` (the forward with its
graph and the Jacobian rows of every output, as LoKO's default takes them) and ``floor: forward + 1 row`` (one
vector-Jacobian product: a gradient's worth).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import resource
import statistics as st
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kalmanopt.bench.online.suite import _order, parse_ablation
from kalmanopt.bench.online.tasks import build, load_task
from kalmanopt.online import _default_forward, _to, default_collate
from kalmanopt.optim.loko.jacobian import jacobian_rows


def loko_at(rev: str) -> type:
    """The ``LoKO`` class of git revision ``rev``: its ``loko/`` package and ``lofi.py``, imported as the package
    ``loko_at_REV`` (relative imports of the rest of ``kalmanopt.optim`` point at the current code)."""
    root = Path(__file__).resolve().parents[3]
    name = "loko_at_" + re.sub(r"\W", "_", rev)
    pkg = Path(tempfile.mkdtemp()) / name
    pkg.mkdir()

    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, check=True, capture_output=True,
                              text=True).stdout
    files = subprocess.run(["git", "ls-tree", "--name-only", rev, "src/kalmanopt/optim/loko/"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split()
    for path in files:
        text = show(path).replace("from .. import lofi", "from . import lofi")
        text = re.sub(r"from \.\.(\w+) import", r"from kalmanopt.optim.\1 import", text)
        (pkg / Path(path).name).write_text(text)
    (pkg / "lofi.py").write_text(show("src/kalmanopt/optim/lofi.py"))
    spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.LoKO


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="cv_mnist")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--skip", type=int, default=0, help="samples stepped before timing starts (warm state)")
    ap.add_argument("--row", action="append", default=None)
    ap.add_argument("--no-workspace", action="store_true")
    ap.add_argument("--before", default=None, help="git revision: every LoKO row also with LoKO as it was there")
    ap.add_argument("--floor", action="store_true", help="rows of the measurement's work alone (no update)")
    args = ap.parse_args()
    old_loko = loko_at(args.before) if args.before else None
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
        if old_loko is not None and row != "AdamW":
            model, opt = build(task, "LoRA", "LoKO", None, 0, parse_ablation(row) if row else {})
            model.eval()
            # the same param groups (every option spelled out) for the class of then
            opt = old_loko([dict(g) for g in opt.param_groups])
            contenders.append(((row or "defaults") + f" [{args.before}]", model, opt))
    if args.floor:
        for name in ("floor: forward + C rows", "floor: forward + 1 row"):
            model, _ = build(task, "LoRA", "LoKO", None, 0)  # the model LoKO's rows see: no optimizer steps it
            model.eval()
            contenders.append((name, model, [p for p in model.parameters() if p.requires_grad]))
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
            elif name.startswith("floor"):
                with torch.enable_grad():
                    out = _default_forward(model, batch)
                    flat = out.reshape(-1)
                    vectors = None if "C rows" in name else torch.ones((1, flat.numel()), dtype=flat.dtype)
                    jacobian_rows(flat, opt, "vmap", vectors)  # opt: the trainable parameters here
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
    if old_loko is not None:  # the same step before and after: the same parameters at the end, bit for bit?
        models = {name: model for name, model, _ in contenders}
        for name, model in models.items():
            before = models.get(f"{name} [{args.before}]")
            if before is not None:
                same = all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters(), strict=True))
                print(f"{name}: parameters after {args.skip + args.samples} steps equal to [{args.before}]'s bit "
                      f"for bit: {same}")


if __name__ == "__main__":
    main()
