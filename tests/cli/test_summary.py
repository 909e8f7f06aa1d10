"""What `opd distill`, `opd sft` and `opd eval` print at the end, read from the run directory."""

from rich.console import Console

from opd.cli.summary import print_distill_summary, print_sft_summary
from opd.report.html import write_report
from opd.train.sft import SftResult
from tests.report.runs import MANIFEST, good_run


def shown(fn, *args, **kwargs) -> str:
    console = Console(record=True, width=120, color_system=None)
    fn(*args, console=console, **kwargs)
    return console.export_text()


def test_distill_summary_has_the_table_the_gap_and_the_paths(tmp_path):
    run = good_run(tmp_path / "run")
    (run / "student").mkdir()
    write_report(run)  # merges the checklist into summary.json, as distill does
    out = shown(print_distill_summary, run)
    for text in ("teacher", "0.900", "[0.826, 0.945]", "student before", "0.300", "student after", "0.800",
                 "gap closed: 83%", "(after − before) / (teacher − before)", "review checklist: 6 of 6 pass",
                 f"report: {run / 'report.html'}", f"trained student: {run / 'student'}"):
        assert text in out, text
    assert "FAIL" not in out


def test_failed_checklist_items_are_named_with_their_evidence(tmp_path):
    worse = {"teacher_accuracy": 0.9, "student_accuracy_before": 0.5, "student_accuracy_after": 0.4, "eval_n": 100,
             "gap_closed": -0.25, "steps": 2, "method": "opd"}
    run = good_run(tmp_path / "run", summary=worse,
                   evals=[{"step": 0, "accuracy": 0.5, "n": 100}, {"step": 2, "accuracy": 0.4, "n": 100}],
                   manifest={**MANIFEST, "filters": []},
                   metrics=[{"step": 1, "loss": 1.0, "reverse_kl": 1.0, "kept": 4}])
    write_report(run)
    out = shown(print_distill_summary, run)
    assert "review checklist: 4 of 6 pass" in out
    assert "FAIL: Student improved on held-out prompts: student after 0.400" in out
    assert "WARN: Filters explicit" in out and "no filters configured" in out
    assert "gap closed: -25%" in out and "trained student:" not in out  # no student folder was written


def test_a_served_teacher_is_said_to_be_served_not_missing(tmp_path):
    served = {"student_accuracy_before": 0.3, "student_accuracy_after": 0.5, "teacher_accuracy": None,
              "gap_closed": None, "eval_n": 100, "steps": 2}
    config = {"teacher": {"url": "http://127.0.0.1:8000"}, "student": {"model": "runs/s"}}
    run = good_run(tmp_path / "run", summary=served, config=config,
                   evals=[{"step": 0, "accuracy": 0.3, "n": 100}, {"step": 2, "accuracy": 0.5, "n": 100}])
    write_report(run)
    out = shown(print_distill_summary, run)
    assert "served" in out and "not evaluated locally" in out and "gap closed: n/a" in out
    assert "no step-0 evaluation" not in out


def test_sft_summary_gives_the_interval_and_says_when_it_stopped_early():
    result = SftResult(steps=40, final_loss=0.25, losses=[0.25], evals=[(20, 0.6), (40, 0.82)])
    out = shown(print_sft_summary, result, "runs/t", 300, eval_n=500)
    assert "sft: 40 steps (stopped early: --stop-at reached), final loss 0.2500" in out
    assert "eval accuracy at step 40: 0.820 [0.784, 0.851] on 500 prompts" in out and "saved to runs/t" in out
    out = shown(print_sft_summary, SftResult(steps=300, final_loss=0.1, losses=[0.1]), "runs/t", 300)
    assert "stopped early" not in out and "eval accuracy" not in out
