"""`opd report RUN`: one self-contained RUN/report.html to review a distillation run.

Sections: the review checklist, accuracies with 95% intervals, curves over steps, a sample browser
(rollouts with each token coloured by teacher - student log-prob), the last evaluation's failures,
and the manifest and config. Plots are embedded base64 PNGs and the CSS is inline, so the file
can be mailed or archived and opens with no network; every piece of user text is HTML-escaped.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import opd
from opd.errors import OpdError
from opd.report.checklist import (FAILURES_ANCHOR, TITLES, RunFiles, accuracies, evaluate_checklist, load_run,
                                  merge_into_summary, wilson)
from opd.report.plots import curves
from opd.store.rundir import atomic_write_text

SAMPLES_PER_EVAL = 4
MAX_FAILURES = 20
GAP_SCALE = 4.0  # |teacher - student| log-prob (nats) at which a token's colour is fully saturated

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1150px;color:#1f2328;
line-height:1.4}h1{font-size:1.5em}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #d0d7de;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f6f8fa}.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{background:#1a7f37;color:#fff}.fail{background:#cf222e;color:#fff}.unknown{background:#6e7781;color:#fff}
.warn{background:#bf8700;color:#fff}
.badge{border-radius:10px;padding:1px 8px;font-size:.85em;font-weight:600}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:12px}
figure{margin:0;border:1px solid #d0d7de;padding:6px}figcaption{font-size:.85em;color:#57606a}
img{max-width:100%}code,pre,.tok{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}
pre{background:#f6f8fa;padding:10px;overflow:auto;max-height:480px;font-size:.85em}
.tok{white-space:pre;border-radius:2px;padding:0 1px}.muted{color:#57606a;font-size:.9em}
.legend span{padding:1px 6px;margin-right:4px}
.turn{display:block;margin:1px 0}.role{font-size:.8em;font-weight:600;margin-right:4px}
.env{color:#8c959f}.env .tok{background:#f6f8fa}
"""


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html (and the checklist into summary.json); returns the report's path."""
    return build_report(run_dir)[0]


def build_report(run_dir: str | Path) -> tuple[Path, dict]:
    """write_report, also returning the checklist it wrote."""
    run = load_run(run_dir)
    checklist = evaluate_checklist(run)
    merge_into_summary(run.root, checklist)
    sections = [checklist_section(checklist), summary_section(run), plots_section(run), samples_section(run),
                failures_section(run), manifest_section(run)]
    title = report_title(run)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>{escape(title)}</h1>\n"
            f"<p class=\"muted\">{escape(str(run.root.resolve()))} · written by opd {escape(opd.__version__)}</p>\n"
            + "\n".join(sections) + "\n</body></html>\n")
    path = run.root / "report.html"
    atomic_write_text(path, page)
    return path, checklist


def _model_name(run: RunFiles, role: str) -> str:
    """The model as the config names it (a folder by its last part), or the served teacher's URL."""
    cfg, entry = run.config.get(role) or {}, run.manifest.get(role) or {}
    name = str(cfg.get("model") or entry.get("name") or cfg.get("url") or "")
    return Path(name).name if name and not cfg.get("url") and Path(name).expanduser().is_absolute() else name


def task_names(run: RunFiles) -> list[str]:
    """The run's task: a built-in family, else the task tags of its eval answers, else its training file."""
    task = run.config.get("task") or {}
    if task.get("builtin"):
        return [task["builtin"]]
    store = run.store()
    if store is not None and store.parts("evals"):
        tags = [r["t"] for r in store.rows("select distinct task_tag as t from evals order by 1")]
        if tags and tags != ["default"]:
            return tags
    return [Path(task["train"]).name] if task.get("train") else []


def report_title(run: RunFiles) -> str:
    """'opd report: student S, teacher T, task reverse_addition', from config.yaml / manifest.json."""
    method = (run.config.get("method") or {}).get("name") or run.summary.get("method") or "opd"
    student, teacher, tasks = _model_name(run, "student"), _model_name(run, "teacher"), task_names(run)
    if not (student or teacher):
        return f"opd report: {run.root.resolve().name}"
    return (f"{method} report: student {student or '?'}, teacher {teacher or '?'}"
            + (f", task {', '.join(tasks)}" if tasks else ""))


def task_descriptions(tags) -> list[str]:
    """'reverse_addition: a+b= -> digits of a+b, least significant first' for each built-in task among `tags`."""
    from opd.tasks.builtin import BUILTIN_TASKS

    return [f"{t}: {BUILTIN_TASKS[t].description}" for t in tags if t in BUILTIN_TASKS]


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class=\"{cls}\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def checklist_section(checklist: dict) -> str:
    rows = []
    for name, result in checklist.items():
        evidence = escape(result["evidence"]).replace(escape(FAILURES_ANCHOR), "<a href=\"#failures\">failures</a>")
        badge = f"<span class=\"badge {escape(result['status'])}\">{escape(result['status'])}</span>"
        rows.append([badge, escape(TITLES.get(name, name)), evidence])
    return "<h2 id=\"checklist\">Review checklist</h2>" + _table(["status", "check", "evidence"], rows, "checklist")


def summary_section(run: RunFiles) -> str:
    acc = accuracies(run)
    names = {k: (run.manifest.get(k) or {}).get("name") or (run.config.get(k) or {}).get("model") or ""
             for k in ("teacher", "student")}
    base = acc["before"][0] if acc["before"] else None
    rows = []
    for key, label, model in (("teacher", "teacher", names["teacher"]), ("before", "student before (baseline)",
                              names["student"]), ("after", "student after", _final_model(run))):
        if acc[key] is None:
            rows.append([escape(label), escape(model), "-", "-", "-", "-"])
            continue
        p, n = acc[key]
        lo, hi = wilson(p, n)
        delta = f"{p - base:+.3f}" if base is not None and key != "before" else ""
        rows.append([escape(label), escape(model), f"{p:.3f}", f"[{lo:.3f}, {hi:.3f}]", str(n), delta])
    s = run.summary
    facts = [(k, s.get(k)) for k in ("method", "objective", "gap_closed", "steps", "flops", "wall_seconds")
             if s.get(k) is not None]
    facts_html = " · ".join(f"{escape(k)}: <b>{escape(_fmt(v))}</b>" for k, v in facts)
    return ("<h2 id=\"summary\">Summary</h2>"
            + _table(["model", "name", "accuracy", "95% Wilson interval", "n", "Δ vs baseline"], rows, "summary")
            + f"<p>{facts_html or 'no summary.json yet (unfinished run)'}</p>")


def _final_model(run: RunFiles) -> str:
    return str(run.root / "student") if (run.root / "student").is_dir() else ""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plots_section(run: RunFiles) -> str:
    plots, omitted = curves(run)
    figures = [f"<figure><img alt=\"{escape(p.title)}\" src=\"data:image/png;base64,{p.png_base64}\">"
               f"<figcaption><b>{escape(p.title)}</b>{' — ' + escape(p.note) if p.note else ''}</figcaption></figure>"
               for p in plots]
    body = f"<div class=\"plots\">{''.join(figures)}</div>" if figures else "<p>no metrics logged yet</p>"
    if omitted:
        body += "<p class=\"muted\">Not drawn, as they carry no information for this run: " + "; ".join(map(escape, omitted)) + ".</p>"
    return "<h2 id=\"curves\">Curves</h2>" + body


def token_colour(gap: float) -> str:
    """Background for a token: red where the teacher gives it less log-prob than the student, green where more."""
    strength = min(abs(gap) / GAP_SCALE, 1.0)
    rgb = "207,34,46" if gap < 0 else "26,127,55"
    return f"rgba({rgb},{0.08 + 0.55 * strength:.2f})" if strength > 0.02 else "transparent"


def tokens_html(row: dict, tokenizer) -> str:
    """A completion token by token, coloured by teacher - student log-prob, with the numbers as a tooltip;
    an episode (a row with a transcript) turn by turn (episode_html)."""
    if row.get("transcript"):
        return episode_html(row, tokenizer)
    ids, s_lp, t_lp = row["completion_ids"] or [], row["student_logprobs"] or [], row["teacher_logprobs"] or []
    return _token_spans(ids, s_lp, t_lp, tokenizer, row["completion"])


def episode_html(row: dict, tokenizer) -> str:
    """An episode's turns after its opening messages, one line each: the model's turns token by token,
    coloured as single completions are, the environment's (tool results, follow-ups) greyed."""
    from opd.report.episodes import episode_turns

    turns = episode_turns(row)
    if turns is None:  # an unreadable transcript: its final answer
        return f"<span class=\"tok\">{escape(row.get('completion') or '')}</span>"
    lines = []
    for turn in turns:
        role = f"<span class=\"role\">{escape(turn.role)}</span>"
        if turn.from_model:
            body = _token_spans(turn.ids, turn.student, turn.teacher, tokenizer, turn.content)
            lines.append(f"<span class=\"turn\">{role}{body}</span>")
        else:
            error = f" <i>(error: {escape(str(turn.error))})</i>" if turn.error else ""
            lines.append(f"<span class=\"turn env\">{role}<span class=\"tok\">{escape(turn.content)}</span>{error}</span>")
    return "".join(lines)


def _token_spans(ids, s_lp, t_lp, tokenizer, text_if_no_ids: str) -> str:
    if not ids:
        return f"<span class=\"tok\">{escape(text_if_no_ids)}</span>"
    spans = []
    for i, tok_id in enumerate(ids):
        text = tokenizer.decode([tok_id]) if tokenizer is not None else f"#{tok_id} "
        tip = f"id {tok_id}"
        style = ""
        if i < len(s_lp) and i < len(t_lp):
            gap = t_lp[i] - s_lp[i]
            tip += f" · student {s_lp[i]:.2f} · teacher {t_lp[i]:.2f} · teacher−student {gap:+.2f}"
            style = f" style=\"background:{token_colour(gap)}\""
        spans.append(f"<span class=\"tok\" title=\"{escape(tip)}\"{style}>{escape(text.replace(chr(10), '↵'))}</span>")
    return "".join(spans)


def samples_section(run: RunFiles) -> str:
    head = "<h2 id=\"samples\">Sample browser</h2>"
    store = run.store()
    steps = [e["step"] for e in run.evals if e["step"] > 0]
    if store is None or not store.parts("rollouts") or not steps:
        return head + "<p>no stored rollouts (RUN/samples/rollouts) at an evaluation step</p>"
    from opd.store.rundir import load_tokenizer

    tokenizer = load_tokenizer(run.root)
    legend = ("<p class=\"legend muted\">tokens coloured by teacher − student log-prob: "
              f"<span style=\"background:{token_colour(-GAP_SCALE)}\">teacher disagrees</span>"
              f"<span style=\"background:{token_colour(-GAP_SCALE / 4)}\">slightly</span>"
              "<span>agrees</span>"
              f"<span style=\"background:{token_colour(GAP_SCALE / 2)}\">teacher more confident</span>"
              " (hover a token for the numbers)" + ("" if tokenizer else "; no tokenizer found, ids shown")
              + "; in episodes, the environment's turns (tool results) are <span class=\"env\">greyed</span></p>")
    parts = [head, legend]
    accuracy = {e["step"]: e.get("accuracy") for e in run.evals}
    for step in steps:
        rows = store.rows("select * from rollouts where step = (select max(step) from rollouts where step <= ?) "
                          "order by hash(prompt || completion) limit ?", [step, SAMPLES_PER_EVAL])
        if not rows:
            continue
        table = [[escape(r["prompt"]), tokens_html(r, tokenizer), escape(r.get("source") or "student"),
                  "kept" if r["kept"] else f"rejected: {escape(r['reject_rule'] or '?')}",
                  _yes_no(r["correct"]), str(r["step"] - 1 - r["policy_version"])] for r in rows]
        acc = f" (held-out accuracy {accuracy[step]:.3f})" if accuracy.get(step) is not None else ""
        sampled = rows[0]["step"]
        when = ("sampled in that step" if sampled == step else f"sampled in step {sampled}, the latest stored")
        parts.append(f"<h3>After {step} training steps{acc}: rollouts {when}</h3>"
                     + _table(["prompt", "completion", "written by", "filter", "correct", "lag"], table))
    return "\n".join(parts)


def _yes_no(value) -> str:
    return "-" if value is None else ("yes" if value else "no")


def failures_section(run: RunFiles) -> str:
    head = "<h2 id=\"failures\">Failure cases (last evaluation)</h2>"
    store = run.store()
    if store is not None and store.parts("evals"):
        step = store.rows("select max(step) as s from evals")[0]["s"]
        total = store.rows("select count(*) as n, count(*) filter (where not correct) as bad from evals "
                           "where step = ?", [step])[0]
        rows = store.rows("select * from evals where step = ? and not correct order by prompt limit ?",
                          [step, MAX_FAILURES])
        intro = f"<p>evaluation after {step} training steps: {total['bad']} of {total['n']} answers wrong"
    elif run.evals and run.evals[-1].get("failures") is not None:
        step, rows = run.evals[-1]["step"], run.evals[-1]["failures"][:MAX_FAILURES]
        intro = f"<p>evaluation after {step} training steps (from eval.jsonl, no sample store): {len(rows)} failures logged"
    else:
        return head + "<p>no failure cases logged</p>"
    intro += f" (showing {len(rows)})</p>" if rows else "</p>"
    described = task_descriptions(sorted({r.get("task_tag") or r.get("tag") or "" for r in rows}))
    if described:  # e.g. that reverse_addition's expected answers are written least significant digit first
        intro += "<p>Task " + "; ".join(map(escape, described)) + ".</p>"
    tags = [r.get("task_tag") or r.get("tag") or "" for r in rows]
    mixed = len(set(tags)) > 1  # one task is named above the table, not in every row
    table = [[escape(t)] * mixed + [escape(r["prompt"]), episode_html(r, None) if r.get("transcript")
                                    else f"<code>{escape(r['completion'])}</code>",
                                    f"<code>{escape(str(r.get('expected')))}</code>", _yes_no(r.get("well_formed"))]
             for t, r in zip(tags, rows)]
    headers = ["task"] * mixed + ["prompt", "completion", "expected", "well-formed"]
    return head + intro + (_table(headers, table) if rows else "")


def manifest_section(run: RunFiles) -> str:
    import yaml

    manifest = json.dumps(run.manifest, indent=2, default=str) if run.manifest else "no manifest.json"
    config = yaml.safe_dump(run.config, sort_keys=False) if run.config else "no config.yaml"
    return (f"<h2 id=\"manifest\">Manifest</h2><pre class=\"manifest\">{escape(manifest)}</pre>"
            f"<h2 id=\"config\">Config</h2><pre>{escape(config)}</pre>")


# -- CLI ------------------------------------------------------------------------------------------
def add_parsers(subparsers) -> None:
    """Register `opd report RUN` and `opd diff RUN_A RUN_B`."""
    p = subparsers.add_parser("report", help="write RUN/report.html: checklist, curves, samples, failures, manifest")
    p.add_argument("run", help="run directory (the config's 'out')")
    p.set_defaults(func=run_report)
    p = subparsers.add_parser("diff", help="config/manifest keys that differ between two runs, and metric deltas")
    p.add_argument("run_a", help="the first run directory (a)")
    p.add_argument("run_b", help="the second run directory (b); deltas are b - a")
    p.set_defaults(func=_run_diff)


def _run_diff(args) -> None:
    from opd.report.diff import run_diff

    run_diff(args)


def run_report(args) -> None:
    if not Path(args.run).is_dir():
        raise OpdError(f"run directory not found: {args.run}")
    path, checklist = build_report(args.run)
    counts = {s: sum(1 for r in checklist.values() if r["status"] == s) for s in ("pass", "fail", "warn", "unknown")}
    print(f"wrote {path} (checklist: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ")")
