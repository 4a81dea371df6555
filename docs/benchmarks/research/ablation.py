"""The KOALA++ ablation runs behind docs/algorithms.md ("the default step-size rule").

    python docs/benchmarks/research/ablation.py TASK SEED SPEC [SPEC ...]
    python docs/benchmarks/research/show.py [FILTER]        # the table of what ran

TASK: fm10k (Fashion-MNIST CNN, 10k images, 3 epochs, batch 128), mnist (MNIST subset, 5 epochs, batch 64), digits
(sklearn digits MLP, 30 epochs), lm (character GPT, 300k characters of Moby-Dick, 2 epochs, batch 32). Constant lr, no
weight decay, one torch thread. SPEC = name:key=value,... with name one of adamw, rms (Adam with beta1 = 0), sgd, sf
(Schedule-Free AdamW), momoadam, kpp_lib (kalmanopt.KOALAPlusPlus with those arguments) and kpp (the research
re-implementation in kpp_variants.py, for the variants the library does not offer: r="scaled"/"init", track=0,
beta1, cap; slow: a per-tensor Python loop with host synchronisations). Each run appends a JSON line to
results/research/koala_pp_ablation.jsonl (the committed file holds the runs quoted in the docs).
"""
import json, sys, time, math
import torch, torch.nn.functional as F
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from kpp_variants import KPP
import kalmanopt
from kalmanopt.bench import vision, models

torch.set_num_threads(1)

def task_data(task):
    if task.startswith("fm10k"):
        d = vision.prepare("fashion_mnist", None, train_size=10000, valid_size=5000, test_size=None)
        return d, 3, 128
    if task == "fm60k":
        d = vision.prepare("fashion_mnist", None, train_size=None, valid_size=0, test_size=None)
        return d, 2, 128
    if task == "mnist":
        d = vision.prepare("mnist_subset", None, train_size=None, valid_size=1000, test_size=None)
        return d, 5, 64
    if task == "digits":
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16; y = torch.tensor(y)
        g = torch.Generator().manual_seed(0); perm = torch.randperm(len(x), generator=g)
        te, tr = perm[:500], perm[500:]
        m, s = x[tr].mean(0), x[tr].std(0) + 1e-3
        return {"train": ((x[tr]-m)/s, y[tr]), "test": ((x[te]-m)/s, y[te]), "num_classes": 10}, 30, 32
    if task == "lm":
        from kalmanopt import data
        from kalmanopt.bench import lm
        c = data.load("moby_dick")
        text = c.train[:300_000]
        tok = models.CharTokenizer(text)
        tr = lm.windows(tok.encode(text), 64)
        te = lm.windows(tok.encode(c.test[:20_000]), 64)
        return {"train": (tr[:, :-1], tr[:, 1:]), "test": (te[:, :-1], te[:, 1:]), "vocab": tok.vocab_size, "lm": True}, 2, 32
    raise ValueError(task)

def make_model(task, d):
    if task == "lm":
        return models.GPT(d["vocab"], context=64, d_model=64, n_layers=4, n_heads=4, dropout=0.0)
    if task == "digits":
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return models.SmallCNN(in_channels=1, num_classes=10)

def parse(spec):
    name, _, rest = spec.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try: v = float(v) if "." in v or "e" in v else int(v)
        except ValueError: pass
        if v == "None": v = None
        if v in ("True", "False"): v = v == "True"
        kw[k] = v
    return name, kw

def build(name, kw, params):
    kw = dict(kw)
    if name == "adamw": return torch.optim.AdamW(params, **kw), "plain"
    if name == "rms": return torch.optim.AdamW(params, betas=(0.0, 0.999), **kw), "plain"
    if name == "sgd": return torch.optim.SGD(params, **kw), "plain"
    if name == "sf":
        import schedulefree; return schedulefree.AdamWScheduleFree(params, **kw), "sf"
    if name == "momoadam":
        import momo; return momo.MomoAdam(params, **kw), "momo"
    if name == "prodigy":
        import prodigyopt; return prodigyopt.Prodigy(params, **kw), "plain"
    if name == "kpp_lib": return kalmanopt.KOALAPlusPlus(params, **kw), "kalman"
    if name == "kpp": return KPP(params, **kw), "kpp"
    if name in ("kpp_hd", "kpp_dist"):
        import self_sized; return self_sized.build(name, kw)(params), "kalman"
    raise ValueError(name)

def evaluate(model, x, y):
    if x.dtype == torch.long:
        model.eval(); tot = 0.0; cnt = 0
        with torch.no_grad():
            for i in range(0, len(x), 64):
                lo = model(x[i:i+64]); tot += F.cross_entropy(lo.reshape(-1, lo.shape[-1]), y[i:i+64].reshape(-1), reduction="sum").item(); cnt += y[i:i+64].numel()
        model.train(); return math.exp(tot / cnt), tot / cnt
    model.eval()
    with torch.no_grad():
        correct = 0; loss = 0.0
        for i in range(0, len(x), 1000):
            out = model(x[i:i+1000]); correct += (out.argmax(1) == y[i:i+1000]).sum().item()
            loss += F.cross_entropy(out, y[i:i+1000], reduction="sum").item()
    model.train()
    return correct / len(x), loss / len(x)

def run(task, seed, spec, d, epochs, bs):
    name, kw = parse(spec)
    torch.manual_seed(seed)
    model = make_model(task, d)
    opt, kind = build(name, kw, model.parameters())
    g = torch.Generator().manual_seed(seed)
    x, y = d["train"]; xt, yt = d["test"]
    n = len(x); accs = []; t0 = time.time(); trl = []
    for ep in range(epochs):
        if kind == "sf": opt.train()
        perm = torch.randperm(n, generator=g); tot = 0.0; nb = 0
        for i in range(0, n, bs):
            idx = perm[i:i+bs]
            opt.zero_grad(set_to_none=True)
            out = model(x[idx])
            losses = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1), reduction="none")
            losses.mean().backward()
            if kind == "plain" or kind == "sf": opt.step()
            elif kind == "momo": opt.step(loss=losses.mean())
            else: opt.step(loss=losses)
            tot += losses.mean().item(); nb += 1
        if kind == "sf": opt.eval()
        acc, tl = evaluate(model, xt, yt)
        accs.append(acc); trl.append(tot / nb)
        if not math.isfinite(tot): break
    extra = {"cap_trace": [round(m, 4) for m in opt.trace[::max(1, len(opt.trace) // 20)]]} if hasattr(opt, "trace") else {}
    return dict(task=task, seed=seed, spec=spec, accs=accs, train_loss=trl, secs=time.time() - t0, **extra)

if __name__ == "__main__":
    task, seed = sys.argv[1], int(sys.argv[2])
    d, epochs, bs = task_data(task)
    for spec in sys.argv[3:]:
        r = run(task, seed, spec, d, epochs, bs)
        print(json.dumps(r), flush=True)
        with open("results/research/koala_pp_ablation.jsonl", "a") as f: f.write(json.dumps(r) + "\n")
