"""The review checklist: six questions a reviewer asks of every distillation run, answered from its files.

Each item is {"status": "pass" | "fail" | "warn" | "unknown", "evidence": "..."}: "unknown" means the
run directory lacks what the answer needs (an unfinished run, no sample store, a teacher that can
only be reached through its server), never a guess; "warn" means the question does not apply as
asked (no filters were configured) and a reviewer should look. The result is shown in report.html
and merged into summary.json under `checklist`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from opd.errors import OpdError
from opd.stats import wilson  # noqa: F401  (re-exported for plots/html)
from opd.store.rundir import atomic_write_text, read_jsonl

TITLES = {
    "teacher_stronger": "Teacher stronger than the student on the eval set",
    "prompt_schema_identical": "Prompt schema identical for teacher and student",
    "rollouts_fresh": "Rollouts fresh (policy lag within bound)",
    "filters_explicit": "Filters explicit (rules in the manifest, reject counts logged)",
    "student_improved": "Student improved on held-out prompts",
    "failures_logged": "Failure cases of the last evaluation logged",
}
FAILURES_ANCHOR = "report.html#failures"


@dataclass
class RunFiles:
    """What a run directory holds; missing files read as empty (a report of an unfinished run still works)."""

    root: Path
    config: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)

    def store(self):
        """The run's SampleStore, or None when it has no sample parts."""
        from opd.store.samples import SampleStore

        store = SampleStore(self.root)
        return store if store.parts("rollouts") or store.parts("evals") else None


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OpdError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run directory; an absent directory or one with no run files is an OpdError."""
    import yaml

    root = Path(run_dir)
    if not root.is_dir():
        raise OpdError(f"run directory not found: {root}")
    names = ("config.yaml", "manifest.json", "summary.json", "metrics.jsonl", "eval.jsonl")
    if not any((root / n).exists() for n in names):
        raise OpdError(f"{root} is not a run directory (none of {', '.join(names)})")
    config = yaml.safe_load((root / "config.yaml").read_text()) if (root / "config.yaml").exists() else {}
    return RunFiles(root, config or {}, _read_json(root / "manifest.json"), _read_json(root / "summary.json"),
                    read_jsonl(root / "metrics.jsonl"), read_jsonl(root / "eval.jsonl"))


def accuracies(run: RunFiles) -> dict[str, tuple[float, int] | None]:
    """(accuracy, n) of the teacher, the student before and after; from summary.json, else eval.jsonl."""
    first = run.evals[0] if run.evals else {}
    last = run.evals[-1] if len(run.evals) > 1 else {}
    default_n = run.summary.get("eval_n") or first.get("n") or 0

    def pick(summary_key: str, line: dict, line_key: str):
        value = run.summary.get(summary_key, line.get(line_key))
        n = line.get("n") or default_n
        return (float(value), int(n)) if value is not None and n else None

    return {"teacher": pick("teacher_accuracy", first, "teacher_accuracy"),
            "before": pick("student_accuracy_before", first, "accuracy"),
            "after": pick("student_accuracy_after", last, "accuracy")}


def _acc_text(name: str, acc: tuple[float, int]) -> str:
    lo, hi = wilson(*acc)
    return f"{name} {acc[0]:.3f} [{lo:.3f}, {hi:.3f}] (n={acc[1]})"


def _compare(hi_name, hi_acc, lo_name, lo_acc, unknown: str) -> dict:
    """pass when hi > lo; evidence gives both Wilson intervals and whether they separate."""
    if hi_acc is None or lo_acc is None:
        return item("unknown", unknown)
    text = f"{_acc_text(hi_name, hi_acc)} vs {_acc_text(lo_name, lo_acc)}"
    if hi_acc[0] <= lo_acc[0]:
        return item("fail", f"{text}: {hi_name} is not above {lo_name}")
    significant = wilson(*hi_acc)[0] > wilson(*lo_acc)[1]
    return item("pass", f"{text}: " + ("significant (95% intervals do not overlap)" if significant
                                       else "not significant (95% intervals overlap)"))


def item(status: str, evidence: str) -> dict:
    return {"status": status, "evidence": evidence}


def check_teacher_stronger(run: RunFiles) -> dict:
    acc = accuracies(run)
    url = (run.config.get("teacher") or {}).get("url")
    if acc["teacher"] is None and url and acc["before"] is not None:
        return item("unknown", f"the teacher is served ({url}) and could not be evaluated locally; "
                               f"{_acc_text('student before', acc['before'])}")
    return _compare("teacher", acc["teacher"], "student before", acc["before"],
                    "no step-0 evaluation of teacher and student yet")


def check_student_improved(run: RunFiles) -> dict:
    acc = accuracies(run)
    return _compare("student after", acc["after"], "student before", acc["before"],
                    "no evaluation after training yet")


def check_prompt_schema(run: RunFiles) -> dict:
    schema = run.manifest.get("prompt_schema") or {}
    if not schema.get("hash"):
        return item("unknown", "the manifest records no prompt schema hash")
    per_teacher = schema.get("teachers") or {}  # teacher name -> {"identical": bool, "hash": ...}
    differing = sorted(name for name, c in per_teacher.items() if isinstance(c, dict) and c.get("identical") is False)
    mismatch = schema.get("mismatch") or run.manifest.get("schema_mismatch")
    if differing:
        opt_in = " (allowed by task.allow_schema_mismatch)" if schema.get("allow_mismatch") else ""
        return item("fail", f"teacher(s) {', '.join(differing)} see a different rendered prompt than the student"
                            f"{opt_in}; student schema hash {schema['hash']}")
    if mismatch:
        return item("fail", f"schema mismatch recorded: {mismatch}")
    toks = [run.manifest.get(m, {}).get("tokenizer_sha256") for m in ("teacher", "student")]
    tok_note = "" if None in toks else ("; tokenizer hashes equal" if toks[0] == toks[1] else
                                        "; note: tokenizer files differ (vocabularies were checked equal)")
    checked = f"rendered prompts compared for {', '.join(sorted(per_teacher))}; " if per_teacher else ""
    return item("pass", f"schema hash {schema['hash']}; {checked}no mismatch recorded{tok_note}")


def staleness_bound(run: RunFiles) -> int:
    """rollout.max_staleness from the config; absent means strictly on-policy (0)."""
    return int((run.config.get("rollout") or {}).get("max_staleness") or 0)


def check_rollouts_fresh(run: RunFiles) -> dict:
    store = run.store()
    if store is None or not store.parts("rollouts"):
        return item("unknown", "no rollouts in the sample store (RUN/samples/rollouts)")
    row = store.rows("select count(*) as n, max(step - 1 - policy_version) as max_lag, "
                     "avg(step - 1 - policy_version) as mean_lag from rollouts")[0]
    bound = staleness_bound(run)
    teacher_steps = sum(1 for m in run.metrics if m.get("sampled_by") == "teacher")
    note = f"; {teacher_steps} of {len(run.metrics)} steps were sampled by the teacher" if teacher_steps else ""
    text = (f"max policy lag {row['max_lag']} (mean {row['mean_lag']:.2f}) over {row['n']} rollouts; "
            f"bound {bound}{note}")
    return item("pass" if row["max_lag"] <= bound else "fail", text)


def check_filters_explicit(run: RunFiles) -> dict:
    if not run.manifest:
        return item("unknown", "no manifest.json")
    rules = run.manifest.get("filters")
    if rules is None:
        return item("fail", "the manifest lists no filter rules (key 'filters' missing)")
    names = [r.get("name") or r.get("rule") for r in rules]
    # a cross-tokenizer teacher rejects the completions it cannot align, under names its entry declares
    names += [n for t in run.manifest.get("teachers") or [] for n in (t.get("cross_tokenizer") or {}).get("rejects", [])]
    totals: dict[str, int] = {}
    for m in run.metrics:
        for key, value in m.items():
            if key.startswith("reject/"):
                totals[key[7:]] = totals.get(key[7:], 0) + int(value)
    if not names:
        if totals:
            return item("fail", f"no filter rules in the manifest, but metrics count rejections by {sorted(totals)}")
        return item("warn", "no filters configured: every rollout trains, nothing was checked or dropped")
    undeclared = sorted(set(totals) - set(names))
    unlogged = [n for n in names if n not in totals] if run.metrics else []
    text = f"{len(names)} rule(s) in order: " + ", ".join(f"{n} (rejected {totals.get(n, 0)})" for n in names)
    if undeclared or unlogged:
        why = (f"; rejections by rules not in the manifest: {undeclared}" if undeclared else "") + \
              (f"; no reject counts in metrics for: {unlogged}" if unlogged else "")
        return item("fail", text + why)
    return item("pass", text)


def check_failures_logged(run: RunFiles) -> dict:
    store = run.store()
    if store is None or not store.parts("evals"):
        return item("unknown", "no eval answers in the sample store (RUN/samples/evals)")
    last = run.evals[-1]["step"] if run.evals else None
    step = store.rows("select max(step) as s from evals")[0]["s"]
    if last is not None and step != last:
        return item("fail", f"the last evaluation (step {last}) has no stored answers (latest stored: step {step})")
    row = store.rows("select count(*) as n, count(*) filter (where not correct) as bad from evals where step = ?",
                     [step])[0]
    return item("pass", f"{row['bad']} wrong of {row['n']} answers stored for the evaluation at step {step}; "
                        f"see {FAILURES_ANCHOR}")


CHECKS = {"teacher_stronger": check_teacher_stronger, "prompt_schema_identical": check_prompt_schema,
          "rollouts_fresh": check_rollouts_fresh, "filters_explicit": check_filters_explicit,
          "student_improved": check_student_improved, "failures_logged": check_failures_logged}


def evaluate_checklist(run_dir: str | Path | RunFiles) -> dict[str, dict]:
    """Every checklist item for a run directory: name -> {"status", "evidence"}."""
    run = run_dir if isinstance(run_dir, RunFiles) else load_run(run_dir)
    return {name: check(run) for name, check in CHECKS.items()}


def merge_into_summary(run_dir: str | Path, checklist: dict) -> bool:
    """Add `checklist` to summary.json (atomic rewrite); False when the run has no summary yet."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return False
    summary = _read_json(path)
    summary["checklist"] = checklist
    atomic_write_text(path, json.dumps(summary, indent=2, default=str) + "\n")
    return True
