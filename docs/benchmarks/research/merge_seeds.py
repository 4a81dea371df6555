"""Merge the per-seed results files of one benchmark configuration into one file for ``kalmanopt report``.

    python docs/benchmarks/research/merge_seeds.py OUT.json IN_SEED0.json IN_SEED1.json ...

The long runs (issue 19, item 7) run one seed per command, so that a stopped session keeps every finished seed; this
joins them: the runs concatenated, ``config.seeds`` the union, the optimizers' labels the union, the first file's
provenance with every command listed.
"""
import json
import sys
from pathlib import Path

out, inputs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
merged = None
for path in inputs:
    result = json.loads(path.read_text())
    if merged is None:
        merged = result
        merged["provenance"]["commands"] = [result["provenance"].get("command")]
        continue
    merged["runs"] += result["runs"]
    for name, entry in result.get("optimizers", {}).items():  # a file of other optimizers (e.g. one per seed)
        merged.setdefault("optimizers", {}).setdefault(name, entry)
    merged["config"]["seeds"] = sorted(set(merged["config"]["seeds"]) | set(result["config"]["seeds"]))
    merged["provenance"]["commands"].append(result["provenance"].get("command"))
merged["provenance"]["command"] = " ; ".join(c for c in merged["provenance"]["commands"] if c)
out.write_text(json.dumps(merged, indent=1))
print(f"wrote {out}: {len(merged['runs'])} runs, seeds {merged['config']['seeds']}")
