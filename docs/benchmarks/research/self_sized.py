"""Research (issue: "a filter that sizes its own step"): two ways for KOALA++ to size the cap of its step itself,
as wrappers around the library's ``KOALAPlusPlus`` (``fused=False``; host synchronisations allowed, research only).

The default rule is gamma = min(loss_fraction * loss / S, lr / q); the cap binds on 90-100 % of the steps
(cap_binding.py), so ``lr`` decides the step. Both variants replace the fixed ``lr`` in the cap by an estimate that
starts at the user's ``lr`` and moves:

* ``kpp_hd`` (hypergradient of the cap, multiplicative; Baydin et al. 2018, "Online learning rate adaptation with
  hypergradient descent", in its normalised form): the derivative of the new minibatch loss with respect to the
  previous step's scale is -g_k . (theta_{k-1} - theta_{k-2}) / scale; its cosine form
  c_k = -cos(g_k, theta_{k-1} - theta_{k-2}) says whether the last step was too short (c > 0: the loss still falls
  along it) or too long (c < 0), and the cap moves multiplicatively, log lr_k = log lr_{k-1} + kappa * c_k. It is
  the filter's own alpha_k (h_k . H_{k-1}: the correlation of consecutive measurements) taken along the update.
* ``kpp_dist`` (distance estimate, Prodigy/D-Adaptation): lr_k = max(lr, d_k), d_k Prodigy's lower bound on the
  distance to the solution in Adam's units, d_k = max(d_{k-1}, sum_i d_i <g_i, x_0 - x_i> / ||sum_i d_i g_i||_1)
  (no EMA, as D-Adaptation). It can only raise the cap: a cure for a too-small lr, not a too-large one.

Spec keys: ``kappa`` (kpp_hd, default 0.05), ``bound`` (both: the cap stays within [lr / bound, lr * bound],
default 1000), the rest go to ``KOALAPlusPlus``.
"""
import math

import torch

import kalmanopt


class _CapEstimator:
    """Wraps a KOALAPlusPlus and rewrites its groups' ``lr`` before every step."""

    def __init__(self, params, bound=1000.0, **kw):
        # the wrappers move the cap themselves: on the fixed cap (lr_adaptation is the default preset's since af31d74)
        self.opt = kalmanopt.KOALAPlusPlus(params, fused=False, **{"lr_adaptation": None, **kw})
        self.lr0 = [g["lr"] for g in self.opt.param_groups]
        self.bound = bound
        self.trace = []  # the cap's lr multiplier per step, for the report

    @property
    def params(self):
        return [p for g in self.opt.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def set_multiplier(self, m):
        m = min(max(m, 1.0 / self.bound), self.bound)
        for g, lr0 in zip(self.opt.param_groups, self.lr0):
            g["lr"] = lr0 * m
        self.trace.append(m)
        return m


class HypergradientCap(_CapEstimator):
    def __init__(self, params, kappa=0.05, norm="cos", beta=0.9, **kw):
        super().__init__(params, **kw)
        self.kappa, self.log_m, self.prev_delta = kappa, 0.0, None
        self.norm, self.beta, self.scale = norm, beta, None

    @torch.no_grad()
    def step(self, loss):
        ps = self.params
        if self.prev_delta is not None:
            gs = [p.grad for p in ps]
            dot = sum((g * d).sum() for g, d in zip(gs, self.prev_delta) if g is not None)
            gn = math.sqrt(sum((g * g).sum().item() for g in gs if g is not None))
            dn = math.sqrt(sum((d * d).sum().item() for d in self.prev_delta))
            if gn > 0 and dn > 0 and math.isfinite(gn) and math.isfinite(dn):
                hyper = -dot.item()
                if self.norm == "cos":
                    signal = hyper / (gn * dn)
                else:  # "ema": the hypergradient over a running mean of its magnitude (scale-free, O(1) per step)
                    self.scale = abs(hyper) if self.scale is None else (
                        self.beta * self.scale + (1 - self.beta) * abs(hyper))
                    signal = hyper / self.scale if self.scale > 0 else 0.0
                self.log_m += self.kappa * signal
                self.log_m = min(max(self.log_m, -math.log(self.bound)), math.log(self.bound))
        self.set_multiplier(math.exp(self.log_m))
        before = [p.detach().clone() for p in ps]
        out = self.opt.step(loss=loss)
        self.prev_delta = [p.detach() - b for p, b in zip(ps, before)]
        return out


class DistanceCap(_CapEstimator):
    def __init__(self, params, d0=1e-6, **kw):
        super().__init__(params, **kw)
        self.x0 = [p.detach().clone() for p in self.params]
        self.d, self.num = d0, 0.0
        self.s = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, loss):
        ps = self.params
        for p, x0, s in zip(ps, self.x0, self.s):
            if p.grad is not None:
                self.num += self.d * (p.grad * (x0 - p)).sum().item()
                s.add_(p.grad, alpha=self.d)
        den = sum(s.abs().sum().item() for s in self.s)
        if den > 0 and self.num > 0:
            self.d = max(self.d, self.num / den)
        lr0 = self.lr0[0]
        self.set_multiplier(max(lr0, self.d) / lr0)
        return self.opt.step(loss=loss)


def build(name, kw):
    cls = {"kpp_hd": HypergradientCap, "kpp_dist": DistanceCap}[name]
    return lambda params: cls(params, **kw)
