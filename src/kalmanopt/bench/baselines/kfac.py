"""K-FAC, **our implementation** (a benchmark baseline): Martens & Grosse, "Optimizing Neural Networks with
Kronecker-factored Approximate Curvature", ICML 2015; convolutions as in Grosse & Martens, "A Kronecker-factored
approximate Fisher matrix for convolution layers", ICML 2016; the practical settings (damping added to the
eigenvalue products, KL clipping, momentum SGD on the preconditioned gradient) as in the widely used K-FAC baselines
the AdaFisher and KOALA++ papers compare with.

For every ``nn.Linear``/``nn.Conv2d`` layer with input rows ``a`` and gradient rows ``g`` (see :mod:`._layers`; the
gradients come from the training loss's own backward pass, so this is the *empirical* Fisher), every ``stats_every``
steps:

* ``A <- decay A + (1 - decay) a^T a / rows`` and ``G <- decay G + (1 - decay) n g^T g`` (``n`` the number of
  samples the mean loss averaged: ``n g`` is a per-sample gradient; for a convolution the factor ``n`` rather than
  ``rows`` is the spatial sum of Grosse & Martens' approximation), the first batch initialising them;
* every ``inverse_every`` steps the eigendecompositions ``A = Q_A diag(d_A) Q_A^T``, ``G = Q_G diag(d_G) Q_G^T``;
* the layer's ``[dW | db]`` is preconditioned by ``(A (x) G + damping I)^-1``:
  ``V = Q_G ((Q_G^T D Q_A) / (d_G d_A^T + damping)) Q_A^T``;
* all preconditioned gradients are scaled by ``nu = min(1, sqrt(kl_clip / sum(lr^2 V . D)))`` (KL clipping);
* then momentum SGD with coupled weight decay: ``buf <- momentum buf + (V + wd theta)``, ``theta <- theta - lr buf``.

Parameters outside those layers get the plain gradient in the same momentum SGD.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer

from ._layers import LayerHooks, trainable

__all__ = ["KFAC"]


class KFAC(Optimizer):
    def __init__(self, model: nn.Module, lr: float = 0.01, momentum: float = 0.9, damping: float = 1e-3,
                 weight_decay: float = 0.0, decay: float = 0.95, kl_clip: float | None = 1e-3, stats_every: int = 10,
                 inverse_every: int = 100) -> None:
        if lr < 0 or not 0 <= momentum < 1 or damping <= 0 or not 0 <= decay < 1 or stats_every < 1 \
                or inverse_every < 1:
            raise ValueError(f"invalid K-FAC settings: lr={lr}, momentum={momentum}, damping={damping}, "
                             f"decay={decay}, stats_every={stats_every}, inverse_every={inverse_every}")
        super().__init__(trainable(model), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.damping, self.decay, self.kl_clip = damping, decay, kl_clip
        self.stats_every, self.inverse_every = stats_every, inverse_every
        self.steps = 0
        self.hooks = LayerHooks(model, capture=lambda: self.steps % self.stats_every == 0)

    def _update_factors(self) -> None:
        for layer in self.hooks.layers:
            if layer.a is None or layer.g is None:
                continue
            a, g = layer.a, layer.g
            new_a = a.t() @ a / a.shape[0]
            new_g = (g.t() @ g) * layer.samples
            st = self.state[layer.module.weight]
            if "A" not in st:
                st["A"], st["G"] = new_a, new_g
            else:
                st["A"].mul_(self.decay).add_(new_a, alpha=1 - self.decay)
                st["G"].mul_(self.decay).add_(new_g, alpha=1 - self.decay)
        self.hooks.clear()

    def _update_inverses(self) -> None:
        for layer in self.hooks.layers:
            st = self.state[layer.module.weight]
            if "A" not in st:
                continue
            d_a, q_a = torch.linalg.eigh(st["A"])
            d_g, q_g = torch.linalg.eigh(st["G"])
            st["QA"], st["dA"] = q_a, d_a.clamp_min(0)
            st["QG"], st["dG"] = q_g, d_g.clamp_min(0)

    def preconditioned(self) -> dict[nn.Parameter, torch.Tensor]:
        """``(A (x) G + damping I)^-1`` applied to each layer's current gradient, split back per parameter."""
        out: dict[nn.Parameter, torch.Tensor] = {}
        for layer in self.hooks.layers:
            st = self.state[layer.module.weight]
            d = layer.grad_matrix()
            if d is None or "QA" not in st:
                continue
            v = st["QG"].t() @ d @ st["QA"]
            v = v / (torch.outer(st["dG"], st["dA"]) + self.damping)
            out.update(layer.split(st["QG"] @ v @ st["QA"].t()))
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update_factors()
        if self.steps % self.inverse_every == 0:
            self._update_inverses()
        updates = self.preconditioned()
        lr0 = self.param_groups[0]["lr"]
        if self.kl_clip is not None and updates:
            vg = sum(float((v * p.grad).sum()) for p, v in updates.items()) * lr0 ** 2
            nu = min(1.0, math.sqrt(self.kl_clip / vg)) if vg > 0 else 1.0
            updates = {p: v * nu for p, v in updates.items()}
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = updates.get(p, p.grad)
                if wd:
                    d = d.add(p, alpha=wd)
                st = self.state[p]
                if momentum:
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = d.clone()
                    else:
                        st["momentum_buffer"].mul_(momentum).add_(d)
                    d = st["momentum_buffer"]
                p.add_(d, alpha=-lr)
        self.steps += 1
        return loss
