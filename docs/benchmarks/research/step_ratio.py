"""How long KOALA++'s update is against AdamW's, step by step, on the fine-tuning task BBC News + MiniLM LoRA.

    python docs/benchmarks/research/step_ratio.py koala++-fixed 5e-3 0     # or: adamw, koala++, koala++:0.1
    python docs/benchmarks/research/step_ratio.py koala++ 5e-5 0 full      # full fine-tuning (the regime: lora, full)

Prints every fifth step: the minibatch loss and the ratio of the parameter change to lr * g / (sqrt(v_hat) + eps)
(AdamW's step without momentum, from the optimizer's own second moment), over all trainable tensors and for the head;
for KOALA++ also `correction_ratio`, the same ratio for the correction before momentum, (m_k - mu m_{k-1}) / (1 - mu)
from the momentum buffer (`python docs/benchmarks/research/step_ratio.py koala++ 5e-3 0`: median 1.6, 1.0-2.0); then the test
accuracy. `koala++:L=1` runs the default with length_bound=1. Issue notes: at the same lr KOALA++'s ratio is 0.5-1.4, AdamW's momentum-averaged 0.2-0.4.
"""
import json
import math
import sys

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
from kalmanopt import KOALAPlusPlus
from kalmanopt.bench.finetune import tasks

name, lr, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
regime = sys.argv[4] if len(sys.argv) > 4 else "lora"
data = tasks.load_data("bbc", train_size=None, test_size=None, progress=False)
torch.manual_seed(seed)
model = tasks.build_model(data, regime)
params = [p for p in model.parameters() if p.requires_grad]
names = [n for n, p in model.named_parameters() if p.requires_grad]
if name == "adamw":
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0)
else:
    kw = {"koala++": {}, "koala++-fixed": {"lr_adaptation": None}}.get(name)
    if kw is None:
        value = name.split(":")[1]
        kw = {"length_bound": float(value[2:])} if value.startswith("L=") else {"lr_adaptation": float(value)}
    opt = KOALAPlusPlus(params, lr=lr, **kw)
g = torch.Generator().manual_seed(seed)
x_tr, y_tr = data.train
rows = []
for step, (x, y) in enumerate(tasks.batches(x_tr, y_tr, 16, g)):
    before = [p.detach().clone() for p in params]
    mprev = None if name == "adamw" else [opt.state[p]["momentum_buffer"].clone() if "momentum_buffer" in opt.state[p]
                                          else torch.zeros_like(p) for p in params]
    losses = F.cross_entropy(tasks.logits(model, x), y, reduction="none")
    opt.zero_grad(); losses.mean().backward()
    if name == "adamw": opt.step()
    else: opt.step(loss=losses)
    # AdamW-sized reference: lr * g / (sqrt(v_hat)+eps) with the optimizer's own second moment
    num = den = cnum = 0.0; head_num = head_den = 0.0
    for i, (n, p, b) in enumerate(zip(names, params, before)):
        if p.grad is None:  # a parameter the loss does not reach (full fine-tuning: MiniLM's unused pooler): unmoved
            continue
        st = opt.state[p]
        v = st.get("exp_avg_sq")
        k = step + 1
        d = (p.detach() - b)
        ref = lr * p.grad / ((v / (1 - 0.999 ** k)).sqrt() + 1e-8) if v is not None else None
        num += float(d.pow(2).sum()); den += float(ref.pow(2).sum()) if ref is not None else 0
        if mprev is not None:  # the correction before momentum, from the buffer (momentum 0.9)
            cnum += float(((st["momentum_buffer"] - 0.9 * mprev[i]) / 0.1).pow(2).sum())
        if "head" in n or "classifier" in n:
            head_num += float(d.pow(2).sum()); head_den += float(ref.pow(2).sum()) if ref is not None else 0
    diag = {}
    if name != "adamw":
        dg = opt.diagnostics()
        ss = torch.cat([dd["step_size"] for dd in dg]) if dg and "step_size" in dg[0] else None
        if dg and "lr_scale" in dg[0]: diag["lr_scale"] = float(dg[0]["lr_scale"])
    rows.append(dict(step=step, loss=float(losses.detach().mean()), ratio=math.sqrt(num / den) if den else None,
                     head_ratio=math.sqrt(head_num / head_den) if head_den else None,
                     correction_ratio=math.sqrt(cnum / den) if mprev is not None and den else None, **diag))
ev = tasks.evaluate(model, *data.test)
for r in rows[::5] + rows[-1:]:
    print(json.dumps(r))
print(name, lr, seed, ev)
