"""`opd compare` on equal grids: FLOPs-to-target brackets, ratio ranges, the FLOP grid, and one small real
comparison whose every evaluation lies on the shared step grid or the shared FLOP grid."""

import json
import math
from pathlib import Path

import pytest

from opd.compare import bracket, compare, flop_grid, flops_to, fmt_ratio, plot, print_table, ratio_range
from opd.errors import OpdError
from tests.test_loop import config, task_and_models  # noqa: F401  (module fixture: teacher + weak student)


def test_bracket_is_last_below_and_first_at_or_above():
    curve = [[0, 0.1], [5, 0.5], [9, 0.95], [12, 0.5], [20, 0.99]]
    assert bracket(curve, 0.9) == [5, 9]  # the first crossing, not the last
    assert flops_to(curve, 0.9) == 9
    assert bracket([[0, 0.95], [5, 0.99]], 0.9) == [0, 0]  # at the target from the start
    assert bracket([[0, 0.1], [5, 0.2]], 0.9) is None and flops_to([[0, 0.1], [5, 0.2]], 0.9) is None
    assert bracket([[0, 0.1], [5, 0.9]], 0.9) == [0, 5]  # "at" the target counts


def test_ratio_range_from_the_means_of_the_bracket_ends():
    opd = [[[0, 0], [4, 0.5], [6, 0.95]], [[0, 0], [6, 0.5], [8, 0.95]]]  # brackets [4, 6], [6, 8]: means 5, 7
    sft = [[[0, 0], [20, 0.5], [30, 0.95]], [[0, 0], [40, 0.5], [50, 0.95]]]  # [20, 30], [40, 50]: means 30, 40
    assert ratio_range(sft, opd, 0.9) == pytest.approx([30 / 7, 40 / 5])
    assert ratio_range(opd, opd, 0.9) == pytest.approx([5 / 7, 7 / 5])  # the grid's own resolution
    # a seed that never reached the target needed more than its last evaluation: lower end 60, upper unbounded
    rl = [[[0, 0], [20, 0.5], [30, 0.95]], [[0, 0], [60, 0.5]]]
    assert ratio_range(rl, opd, 0.9) == [pytest.approx((20 + 60) / 2 / 7), None]
    # OPD crossing at its first evaluation bounds nothing from below: the ratio has no upper bound
    fast_opd = [[[0, 0], [4, 0.95]]]
    assert ratio_range(sft, fast_opd, 0.9) == [pytest.approx(30 / 4), None]


def test_flop_grid_spaces_the_projected_opd_run():
    assert flop_grid(pilot_flops=1e9, pilot_steps=5, steps=300, evals_per_run=20) == pytest.approx(3e9)
    with pytest.raises(OpdError, match="pilot spent no FLOPs"):
        flop_grid(0.0, 5, 300, 20)


def synthetic_report():
    curve = [[0.0, 0.3], [1e9, 0.6], [2e9, 0.85], [3e9, 0.9]]
    entry = {"final_accuracy": [0.9], "final_interval": [[0.87, 0.92]], "flops_to_target": [[1e9, 2e9]],
             "flops_spent": [3e9], "curve": [curve], "runs": ["r"]}
    return {"teacher_accuracy": 0.89, "target": 0.801, "grid": {"eval_every": 15, "eval_every_flops": 1e9},
            "methods": {"opd": {**entry, "ratio_to_opd": None},
                        "rl": {**entry, "flops_to_target": [None], "ratio_to_opd": [5.6, None]}}}


def test_table_shows_brackets_intervals_and_ratios(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per row
    print_table(synthetic_report())
    text = capsys.readouterr().out
    assert "1.00e+09-2.00e+09" in text and "never (>3.00e+09)" in text and "[0.870,0.920]" in text
    assert ">=5.6x" in text and fmt_ratio([1.3, 1.72]) == "1.3-1.7x" and fmt_ratio(None) == ""
    plot(synthetic_report(), tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_the_step_grid_cannot_differ_between_methods(tmp_path):
    with pytest.raises(OpdError, match="step grid is shared"):
        compare(None, ["opd", "rl"], 1, tmp_path, method_overrides={"rl": ["train.eval_every=3"]})
    with pytest.raises(OpdError, match="unknown method"):
        compare(None, ["opd", "nosuch"], 1, tmp_path)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_every_method_is_evaluated_on_the_same_grids(task_and_models, tmp_path):
    """Each evaluation of each run is at step 0, on the step grid, at the first step whose FLOPs reach a
    multiple of the shared FLOP spacing, or at the run's last step, and every such step was evaluated."""
    root, paths, dirs = task_and_models
    base = config(root, paths, dirs, "train.steps=8", "train.eval_every=4", "rollout.batch_size=8")
    report = compare(base, ["opd", "sft", "rl"], seeds=1, out=tmp_path / "cmp", rl_budget=1.0, evals_per_run=3,
                     pilot_steps=2, method_overrides={"rl": ["rollout.samples_per_prompt=4"]}, progress=False)
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    grid = saved["grid"]
    assert grid["eval_every"] == 4 and grid["pilot"]["steps"] == 2
    assert read(Path(grid["pilot"]["run"]) / "eval.jsonl")[0]["teacher_measured"] is True
    assert grid["eval_every_flops"] == pytest.approx(grid["pilot"]["flops"] / 2 * 8 / 3)
    g = grid["eval_every_flops"]
    for method in ("opd", "sft", "rl"):
        entry = saved["methods"][method]
        run = tmp_path / "cmp" / "runs" / f"{method}-seed0"
        flops = {0: 0.0, **{m["step"]: m["flops"] for m in read(run / "metrics.jsonl")}}
        last = max(flops)
        due = {0} | {s for s in flops if s and (s % 4 == 0 or s == last
                                                 or math.floor(flops[s] / g) > math.floor(flops[s - 1] / g))}
        evals = read(run / "eval.jsonl")
        assert [e["step"] for e in evals] == sorted(due), method
        assert [e["flops"] for e in evals] == pytest.approx([flops[s] for s in sorted(due)])
        assert entry["curve"] == [[[e["flops"], e["accuracy"]] for e in evals]]
        # the teacher was measured once, in the pilot; every run carries that figure
        assert evals[0]["teacher_accuracy"] == saved["teacher_accuracy"] and evals[0]["teacher_measured"] is False
        assert entry["flops_to_target"] == [bracket(entry["curve"][0], saved["target"])]
        (lo, hi), acc = entry["final_interval"][0], entry["final_accuracy"][0]
        assert lo <= acc <= hi and hi - lo > 0
    assert len({math.floor(f / g) for f, _ in saved["methods"]["rl"]["curve"][0]}) > 1  # RL crossed grid lines
    rl_curve = saved["methods"]["rl"]["curve"][0]
    assert rl_curve[-2][0] < saved["rl_budget_flops"]  # RL stops at its budget (or at the target)
    assert report["methods"]["sft"]["ratio_to_opd"] == saved["methods"]["sft"]["ratio_to_opd"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
