import sys, json, collections
rows = collections.defaultdict(list)
for l in open("results/research/koala_pp_ablation.jsonl"):
    r = json.loads(l); rows[(r["task"], r["spec"])].append(r)
flt = sys.argv[1] if len(sys.argv) > 1 else ""
for (t, s), rs in sorted(rows.items()):
    if flt not in t + s: continue
    scale = 1 if t == "lm" else 100  # lm: perplexity (lower is better), else accuracy in %
    fin = [r["accs"][-1] * scale for r in rs]; best = [(min if t == "lm" else max)(r["accs"]) * scale for r in rs]
    print(f"{t:7} {s:55} n={len(rs)} final={sum(fin)/len(fin):6.2f} best={sum(best)/len(best):6.2f} "
          f"curve0={[round(a*scale,1) for a in rs[0]['accs']][-4:]} loss={rs[0]['train_loss'][-1]:.3f}")
