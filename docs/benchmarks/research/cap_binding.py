"""How often the default KOALA++ step is its cap lr/q rather than the filter's own step loss_fraction * loss / S.

    python docs/benchmarks/research/cap_binding.py TASK [LR ...]

TASK as in ablation.py (fm10k, mnist, lm, digits); one epoch, seed 0, one torch thread, KOALA++ at its defaults with
each LR (default 1e-3). Prints, per lr, the share of (step, tensor) pairs where the cap binds and the quartiles of
(loss_fraction * loss / S) / (lr / q) over all of them: above 1 the cap decides the step.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import ablation  # noqa: E402

import kalmanopt  # noqa: E402

if __name__ == "__main__":
    task, lrs = sys.argv[1], [float(x) for x in sys.argv[2:]] or [1e-3]
    d, _, bs = ablation.task_data(task)
    for lr in lrs:
        torch.manual_seed(0)
        model = ablation.make_model(task, d)
        opt = kalmanopt.KOALAPlusPlus(model.parameters(), lr=lr)
        x, y = d["train"]
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        ratios = []
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            opt.zero_grad(set_to_none=True)
            out = model(x[idx])
            losses = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1), reduction="none")
            losses.mean().backward()
            opt.step(loss=losses)
            (diag,) = opt.diagnostics()
            ratios.append(diag["loss"] / diag["S"] / (lr / 0.1))
        r = torch.cat(ratios).double()
        q = torch.quantile(r, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        print(f"{task} lr={lr:g}: cap binds on {(r >= 1).double().mean().item():.1%} of {r.numel()} (step, tensor) "
              f"pairs; (loss/S)/(lr/q) quartiles {q[0].item():.3g} / {q[1].item():.3g} / {q[2].item():.3g}", flush=True)
