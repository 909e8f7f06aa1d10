"""What a command prints when it ends: accuracies with 95% Wilson intervals, what they mean, where the files are.

`opd distill` and `opd demo` print the run's table (teacher, student before and after, gap closed),
the review-checklist items that did not pass, and the paths of report.html and the student; all of
it is read back from the run directory, so it says what the files say. `opd sft` and `opd eval`
print the same kind of accuracy line.
"""

from __future__ import annotations

from pathlib import Path

from opd.stats import wilson

GAP_DEFINITION = "(after − before) / (teacher − before)"


def accuracy_text(accuracy: float, n: int) -> str:
    """'0.906 [0.878, 0.929] on 500 prompts': an accuracy with its 95% Wilson interval."""
    lo, hi = wilson(accuracy, n)
    return f"{accuracy:.3f} [{lo:.3f}, {hi:.3f}] on {n} prompts"


def _console(console):
    from rich.console import Console

    return console or Console()


def print_distill_summary(run_dir: str | Path, console=None, title: str | None = None,
                          notes: dict[str, str] | None = None) -> None:
    """The end-of-run summary of RUN (summary.json, config.yaml, eval.jsonl, the checklist in summary.json).

    `notes` adds a column, e.g. the demo's training times: {"teacher": "60s SFT", "before": ..., "after": ...}.
    """
    from rich.table import Table
    from rich.text import Text

    from opd.report.checklist import TITLES, accuracies, load_run

    console = _console(console)
    run = load_run(run_dir)
    acc = accuracies(run)
    summary, teacher_cfg = run.summary, run.config.get("teacher") or {}
    names = {"teacher": teacher_cfg.get("model") or teacher_cfg.get("url") or "",
             "before": (run.config.get("student") or {}).get("model") or ""}
    table = Table(title=Text(title or f"{summary.get('method') or 'opd'}: greedy accuracy on held-out prompts"))
    for col in ("model", "accuracy", "95% Wilson interval", "n", *(["time"] if notes else [])):
        table.add_column(col, justify="right" if col in ("accuracy", "n") else "left", overflow="fold")
    for key, label in (("teacher", "teacher"), ("before", "student before"), ("after", "student after")):
        cells = [label]
        if acc[key] is not None:
            p, n = acc[key]
            lo, hi = wilson(p, n)
            cells += [f"{p:.3f}", f"[{lo:.3f}, {hi:.3f}]", str(n)]
        elif key == "teacher" and teacher_cfg.get("url"):
            cells += ["served", "not evaluated locally", "-"]
        else:
            cells += ["-", "-", "-"]
        table.add_row(*cells, *([notes.get(key, "")] if notes else []))
    console.print(table)
    for role, name in (("teacher", names["teacher"]), ("student started from", names["before"])):
        if name:
            console.print(Text(f"{role}: {name}"))

    gap = summary.get("gap_closed")
    if gap is not None:
        console.print(f"gap closed: {gap:.0%} = {GAP_DEFINITION}")
    elif acc["teacher"] and acc["before"] and acc["teacher"][0] <= acc["before"][0]:
        console.print("gap closed: n/a (the student started at or above the teacher)")
    else:
        console.print(f"gap closed: n/a (needs the teacher's and both students' accuracies; {GAP_DEFINITION})")
    if summary.get("steps") is not None:
        console.print(f"{summary['steps']} steps"
                      + (f" in {summary['wall_seconds']:.0f}s" if summary.get("wall_seconds") is not None else "")
                      + (f", {summary['flops']:.2e} FLOPs" if summary.get("flops") else "")
                      + (f", objective {summary['objective']}" if summary.get("objective") else ""))

    checklist = summary.get("checklist") or {}
    flagged = {k: v for k, v in checklist.items() if v.get("status") not in ("pass", "unknown")}
    unknown = sum(1 for v in checklist.values() if v.get("status") == "unknown")
    if checklist:
        passed = sum(1 for v in checklist.values() if v.get("status") == "pass")
        console.print(f"review checklist: {passed} of {len(checklist)} pass"
                      + (f", {unknown} unknown" if unknown else ""))
        for name, result in flagged.items():
            console.print(Text(f"  {result['status'].upper()}: {TITLES.get(name, name)}: {result.get('evidence', '')}",
                               style="red" if result["status"] == "fail" else "yellow"))
    report, student = run.root / "report.html", run.root / "student"
    if report.exists():
        console.print(Text(f"report: {report}"))  # Text: a path is never read as rich markup
    if student.is_dir():
        console.print(Text(f"trained student: {student}"))


def print_sft_summary(result, out: str, planned_steps: int, eval_n: int = 0, console=None) -> None:
    """`opd sft`: steps, final loss, the last evaluation with its interval, where the model is."""
    console = _console(console)
    stopped = " (stopped early: --stop-at reached)" if result.steps < planned_steps else ""
    console.print(f"sft: {result.steps} steps{stopped}, final loss {result.final_loss:.4f}")
    if result.evals and eval_n:
        step, accuracy = result.evals[-1]
        console.print(f"eval accuracy at step {step}: {accuracy_text(accuracy, eval_n)} (greedy; 95% Wilson)")
    console.print(f"saved to {out}")


def print_eval_summary(result, model: str, console=None) -> None:
    """`opd eval`: accuracy with its 95% Wilson interval."""
    console = _console(console)
    console.print(f"{model}: accuracy {accuracy_text(result.accuracy, result.n)} (greedy; 95% Wilson)")
