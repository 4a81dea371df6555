"""Relabel the KOALA++ runs of `kalmanopt bench finetune` results recorded before `lr_adaptation` became the
default preset's (kalmanopt 0.2, git af31d74): they ran the fixed cap, which is the registry's ``koala++-fixed`` now.

    python docs/benchmarks/research/relabel_fixed_cap.py results/finetune/*.json results/research/finetune_lr/*.json

Every run and contender named ``koala++@RULE`` becomes ``koala++-fixed@RULE`` with that entry's label and note;
runs of another name are left alone. A file already relabelled is left as it is. The reports are then regenerated
with ``kalmanopt bench finetune ... --report-only --overwrite`` (or by the next ``--resume`` run).
"""

import json
import sys

from kalmanopt.bench import registry


def relabel(path: str) -> int:
    with open(path) as f:
        data = json.load(f)
    fixed = registry.get("koala++-fixed")

    def new_name(spec: str) -> str:
        name, at, rule = spec.partition("@")
        return f"koala++-fixed{at}{rule}" if name == "koala++" else spec

    count = 0
    for run in data["runs"]:
        if new_name(run["contender"]) != run["contender"]:
            run["contender"], run["optimizer"], run["label"] = new_name(run["contender"]), fixed.name, fixed.label
            count += 1
    data["contenders"] = {new_name(spec): ({**c, "optimizer": fixed.name, "label": fixed.label, "note": fixed.note}
                                           if new_name(spec) != spec else c)
                          for spec, c in data["contenders"].items()}
    data["same_as"] = {new_name(k): new_name(v) for k, v in data.get("same_as", {}).items()}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return count


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"{path}: {relabel(path)} runs relabelled")
