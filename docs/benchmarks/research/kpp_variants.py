"""KOALA++ variants for the ablation (a per-tensor Python loop in float32, with host synchronisations): research
code behind docs/algorithms.md, not library code. The library's KOALAPlusPlus reproduces its variants that it offers
(block, precondition, momentum, max_step, r) to the digit on the same runs."""
import math
import torch


class KPP(torch.optim.Optimizer):
    def __init__(self, params, lr=1.0, sigma=0.1, q=0.1, wd=0.0, block="tensor", r="paper", rho=0.02,
                 alpha_r=0.9, cap=None, target=None, symmetric=True, diag=None, beta2=0.999, eps=1e-8, beta1=0.0, mom=0.0, track=1):
        super().__init__(params, dict(lr=lr, sigma=sigma, q=q, wd=wd))
        self.block, self.r, self.rho, self.alpha_r, self.cap = block, r, rho, alpha_r, cap
        self.target, self.symmetric, self.diag, self.beta2, self.eps = target, symmetric, diag, beta2, eps
        self.R = 1.0
        self.beta1 = beta1
        self.mom = mom
        self.track = track
        self.k = 0
        self.l0 = None
        self.lstar = 0.0
        self.lmin = None
        self.diag_log = []

    @torch.no_grad()
    def step(self, loss):
        loss = loss.detach().float()
        lm = loss.mean().item()
        l2 = loss.square().mean().item()
        self.k += 1
        if self.l0 is None:
            self.l0 = lm
        # ---- R
        if self.r == "paper":
            self.R = self.alpha_r * self.R + (1 - self.alpha_r) * l2
        elif self.r == "scaled":    # rho * EMA(l^2)
            self._r2 = l2 if self.k == 1 else self.alpha_r * self._r2 + (1 - self.alpha_r) * l2
            self.R = self.rho * self._r2
        elif self.r == "init":      # rho * (initial loss)^2, frozen: loss-scale aware, constant
            self.R = self.rho * self.l0 ** 2
        elif self.r == "maxema":    # rho * max over time of EMA of loss squared
            self.R = max(self.R if self.k > 1 else 0.0, self.rho * l2)
        elif self.r == "lin":       # rho * l0 * EMA(l)  -> step ~ const SGD
            self._lema = lm if self.k == 1 else 0.9 * self._lema + 0.1 * lm
            self.R = self.rho * self.l0 * self._lema
        elif isinstance(self.r, float):
            self.R = self.r
        R = self.R
        # ---- residual
        resid = lm
        if self.target == "min":   # distance to an online lower bound: min seen loss * 0.5?
            self.lmin = lm if self.lmin is None else min(self.lmin, lm)
            resid = lm - 0.5 * self.lmin
        group = self.param_groups[0]
        lr, sigma, q, wd = group["lr"], group["sigma"], group["q"], group["wd"]
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        hs = []
        for p in ps:
            h = p.grad.float().reshape(-1).clone()
            if wd:
                h.add_(p.reshape(-1), alpha=wd)
            if self.beta1:
                st = self.state[p]
                if "m" not in st:
                    st["m"] = torch.zeros_like(h)
                st["m"].mul_(self.beta1).add_(h, alpha=1 - self.beta1)
                h = st["m"] / (1 - self.beta1 ** self.k)
            hs.append(h)
        # diagonal preconditioner (change of variables): h~ = D^1/2 h with D = 1/(sqrt(v2_hat)+eps); the filter
        # runs on h~ (isotropic sigma, Q in the tilde space) and the step is D^1/2 * gain~.
        sq = []
        for p, h in zip(ps, hs):
            st = self.state[p]
            if self.diag:
                if "g2" not in st:
                    st["g2"] = torch.zeros_like(h)
                st["g2"].mul_(self.beta2).addcmul_(h, h, value=1 - self.beta2)
                d = 1.0 / ((st["g2"] / (1 - self.beta2 ** self.k)).sqrt() + self.eps)
                if self.diag == "norm":   # keep the mean of D at 1 per tensor (scale-free shape only)
                    d = d / d.mean()
                sq.append(d.sqrt())
            else:
                sq.append(None)
        ht = [h * s if s is not None else h for h, s in zip(hs, sq)]
        stats = []
        for i, (p, h) in enumerate(zip(ps, ht)):
            st = self.state[p]
            if "H" not in st:
                st["H"] = h.clone(); st["v"] = sigma * h.clone()
            if not self.track:
                st["v"] = torch.zeros_like(h); st["H"] = h.clone(); st.pop("S", None)
            H, v = st["H"], st["v"]
            stats.append(dict(hh=h.dot(h).item(), hH=h.dot(H).item(), hv=h.dot(v).item(), HH=H.dot(H).item(),
                              Hv=H.dot(v).item()))
        blocks = [list(range(len(ps)))] if self.block == "group" else [[i] for i in range(len(ps))]
        total_pred = 0.0
        upd = []
        for blk in blocks:
            s = {k: sum(stats[i][k] for i in blk) for k in ("hh", "hH", "hv", "HH", "Hv")}
            Sp = self.state[ps[blk[0]]].get("S")
            if Sp is None:
                Sp = s["Hv"] + q * s["HH"] + R
            alpha = s["hH"] / s["HH"]
            lam = (s["hv"] + q * s["hH"]) / Sp
            w = (s["hv"] * s["HH"] - s["Hv"] * s["hH"]) / s["HH"] ** 2 if self.symmetric else 0.0
            a, c = alpha - lam, w - q * lam
            hv_new = a * s["hv"] + q * s["hh"] + c * s["hH"]
            S = hv_new + q * s["hh"] + R
            if not (S > 0) or not math.isfinite(S):
                S = (sigma + q) * s["hh"] + R; a, c = 0.0, 0.0
            res = resid + (0.5 * wd * sum(ps[i].square().sum().item() for i in blk) if wd else 0.0)
            gamma = lr * res / S
            total_pred += gamma * (S - R)
            if self.cap is not None:
                gamma = min(gamma, self.cap)
            for i in blk:
                upd.append((i, a, c, gamma, S))
        for i, a, c, gamma, S in upd:
            p, h = ps[i], ht[i]
            st = self.state[p]
            v = a * st["v"] + q * h + c * st["H"]
            gain = v + q * h
            if sq[i] is not None:
                gain = gain * sq[i]
            if self.mom:
                if "u" not in st:
                    st["u"] = torch.zeros_like(gain)
                st["u"].mul_(self.mom).add_(gain, alpha=gamma * (1 - self.mom))
                p.add_((-st["u"] / (1 - self.mom ** self.k)).view_as(p).to(p.dtype))
            else:
                p.add_((-gamma * gain).view_as(p).to(p.dtype))
            st["v"], st["H"], st["S"] = v, h.clone(), S
        self.diag_log.append(dict(R=R, loss=lm, pred=total_pred, S=upd[0][4], gamma=upd[0][3], hh=sum(s["hh"] for s in stats)))
        return loss
