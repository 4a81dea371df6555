"""AdaFisher, **our implementation** (a benchmark baseline, not the authors' code), written from Gomes et al.,
"AdaFisher: Adaptive Second Order Optimization via Fisher Information", ICLR 2025.

For every ``nn.Linear``/``nn.Conv2d`` layer (see :mod:`._layers` for the rows):

1. the diagonals of the two Kronecker factors of the layer's empirical Fisher, from the batch's own forward and
   backward pass: ``h = mean over input rows of a**2`` (the activation factor, with the bias's constant 1 last) and
   ``s = mean over gradient rows of g**2`` (the output-gradient factor);
2. each min-max normalised to [0, 1] and averaged over steps, ``H <- gamma H + (1 - gamma) h`` (the first batch
   initialises them);
3. the Fisher diagonal of the layer's ``[W | b]``: ``F = s (x) h + lambda`` (the diagonal of the Kronecker product
   ``S (x) H`` of the diagonal factors, damped);
4. an Adam-like step with ``F`` in the place of Adam's ``sqrt(v) + eps``:
   ``m <- beta m + (1 - beta) (grad + wd theta)``, ``theta <- theta - lr / (1 - beta**t) * m / F``.

Parameters outside those layers (embeddings, normalisation layers, a weight shared by two layers) get ``F = 1``: bias-
corrected momentum SGD at the same ``lr``. Defaults follow the paper's: ``lr = 1e-3``, ``beta = 0.9``,
``gamma = 0.92``, ``lambda = 1e-3``; ``stats_every`` (the authors' ``TCov``) is how often the factors are refreshed.
Weight decay is the coupled L2 form (AdaFisher; the decoupled variant is AdaFisherW).

Differences from the authors' code, on purpose: the factors are averaged with a plain EMA ``gamma * old + (1 - gamma)
* new`` initialised by the first batch (their code starts from ones and weighs old and new by separate constants);
only Linear and Conv2d layers are preconditioned (they also give BatchNorm/LayerNorm a factor).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._layers import LayerHooks, trainable

__all__ = ["AdaFisher", "minmax"]


def minmax(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``(x - min) / (max - min + eps)``."""
    lo = x.min()
    return (x - lo) / (x.max() - lo + eps)


class AdaFisher(Optimizer):
    def __init__(self, model: nn.Module, lr: float = 1e-3, beta: float = 0.9, gamma: float = 0.92,
                 damping: float = 1e-3, weight_decay: float = 0.0, stats_every: int = 1) -> None:
        if lr < 0 or not 0 <= beta < 1 or not 0 <= gamma < 1 or damping <= 0 or stats_every < 1:
            raise ValueError(f"invalid AdaFisher settings: lr={lr}, beta={beta}, gamma={gamma}, damping={damping}, "
                             f"stats_every={stats_every}")
        super().__init__(trainable(model), dict(lr=lr, beta=beta, weight_decay=weight_decay))
        self.gamma, self.damping, self.stats_every = gamma, damping, stats_every
        self.steps = 0
        self.hooks = LayerHooks(model, capture=lambda: self.steps % self.stats_every == 0)

    def _update_factors(self) -> None:
        for layer in self.hooks.layers:
            if layer.a is None or layer.g is None:
                continue
            h = minmax(layer.a.square().mean(0))
            s = minmax(layer.g.square().mean(0))
            st = self.state[layer.module.weight]
            if "H" not in st:
                st["H"], st["S"] = h, s
            else:
                st["H"].mul_(self.gamma).add_(h, alpha=1 - self.gamma)
                st["S"].mul_(self.gamma).add_(s, alpha=1 - self.gamma)
        self.hooks.clear()

    def fisher(self) -> dict[nn.Parameter, Tensor]:
        """The damped Fisher diagonal ``F`` of every preconditioned parameter, shaped like it."""
        out: dict[nn.Parameter, Tensor] = {}
        for layer in self.hooks.layers:
            st = self.state[layer.module.weight]
            if "H" in st:
                out.update(layer.split(torch.outer(st["S"], st["H"]) + self.damping))
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update_factors()
        fisher = self.fisher()
        for group in self.param_groups:
            beta, lr, wd = group["beta"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["step"] = 0
                st["step"] += 1
                grad = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                st["exp_avg"].mul_(beta).add_(grad, alpha=1 - beta)
                step_size = lr / (1 - beta ** st["step"])
                f = fisher.get(p)
                if f is None:
                    p.add_(st["exp_avg"], alpha=-step_size)
                else:
                    p.addcdiv_(st["exp_avg"], f, value=-step_size)
        self.steps += 1
        return loss
