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


def test_each_schedule_against_its_own_adamw_worst_drop_and_merged_lrs():
    """'vs AdamW' divides by AdamW under the same schedule; 'drop from best epoch' is the worst seed's; the lr cell
    lists each schedule's lr; 'diverged (k/n)' counts the seeds actually run."""

    def run(name, finals, lr=0.1, schedule="cosine", diverged=False):
        history = [{"epoch": 0}] + [{"epoch": e + 1, "test_ppl": v} for e, v in enumerate(finals)]
        return {"optimizer": name, "label": name.upper(), "lr": lr, "diverged": diverged, "schedule": schedule,
                "final": {"test_ppl": math.nan if diverged else finals[-1]}, "history": history}

    constant = _result([run("adamw", [13.0, 12.0], schedule="constant"),
                        run("koala", [10.0, 11.0], schedule="constant"),  # 1 above its best epoch
                        run("koala", [10.0, 14.0], schedule="constant"),  # 4 above: the worst seed
                        run("lion", [9.0], schedule="constant", diverged=True)])
    cosine = _result([run("adamw", [11.0, 10.0]), run("koala", [16.0, 15.0], lr=0.3)]
                     + [run("lion", [9.0], diverged=True)] * 3)
    table = task_table(constant, cosine)
    rows = _rows(table)
    assert rows["ADAMW"][:2] == ["12.000 ± 0.000 (n=1)", "1.000x"] and rows["ADAMW"][3:] == ["10.000 ± 0.000 (n=1)",
                                                                                            "1.000x"]
    koala = rows["KOALA"]
    assert koala[0].startswith("12.500 ± ") and koala[0].endswith("(n=2)")
    assert koala[1] == f"{12.5 / 12:.3f}x" and koala[2] == "4.00"  # constant: against AdamW's 12, worst drop 4
    assert koala[3] == "15.000 ± 0.000 (n=1)" and koala[4] == "1.500x"  # cosine: against AdamW's 10
    assert "| KOALA (lr 0.1, 0.3) |" in table and "| ADAMW (lr 0.1) |" in table
    assert rows["LION"][0] == "diverged (1/1)" and rows["LION"][3] == "diverged (3/3)"


def test_without_a_finite_adamw_run_the_gap_cells_stay_empty():
    cosine = _result([_run("adamw", 0.0, diverged=True), _run("koala", 12.0)])
    rows = _rows(task_table(None, cosine))
    assert rows["ADAMW"][3] == "diverged (1/1)"
    assert rows["KOALA"][3].startswith("12.000") and rows["KOALA"][4] == ""
