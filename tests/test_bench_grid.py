"""The development-grid table (kalmanopt.bench.grid): the cells for runs that are missing, unscheduled or diverged."""

import math

from kalmanopt.bench.grid import task_table


def _run(name: str, final: float, *, schedule: str = "cosine", diverged: bool = False) -> dict:
    history = [{"epoch": 0}, {"epoch": 1, "test_ppl": final}]
    return {"optimizer": name, "label": name.upper(), "lr": 0.1, "diverged": diverged, "schedule": schedule,
            "final": {"test_ppl": math.nan if diverged else final}, "history": history}


def _result(runs: list[dict]) -> dict:
    return {"suite": "lm", "runs": runs}


def _rows(table: str) -> dict[str, list[str]]:
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and "(lr " in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].split(" (lr")[0]] = cells[1:]
    return rows


def test_missing_unscheduled_and_diverged_cells():
    unscheduled = "none (sets its own step size)"
    constant = _result([_run("adamw", 12.0, schedule="constant"), _run("sf", 11.0, schedule=unscheduled)])
    cosine = _result([_run("adamw", 13.0), _run("kfac", 16.0), _run("shampoo", 0.0, diverged=True),
                      _run("shampoo", 0.0, diverged=True), _run("adagrad", 17.0), _run("adagrad", 0.0, diverged=True)])
    rows = _rows(task_table(constant, cosine))
    # constant: value, vs AdamW, drop; cosine: value, vs AdamW
    assert rows["ADAMW"][0].startswith("12.000") and rows["ADAMW"][3].startswith("13.000")
    assert rows["SF"][3] == "(takes no schedule)"  # it sets its own step size: its constant row stands for both
    assert rows["KFAC"][0] == "not run" and rows["KFAC"][3].startswith("16.000")  # a scheduled optimizer left out
    assert rows["SHAMPOO"][3] == "diverged (2/2)" and rows["SHAMPOO"][4] == ""
    assert rows["ADAGRAD"][3] == "17.000 ± 0.000 (n=1, 1 diverged)" and rows["ADAGRAD"][4] == f"{17 / 13:.3f}x"
