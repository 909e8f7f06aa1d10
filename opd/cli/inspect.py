"""`opd inspect RUN`: read a run's stored rollouts and eval answers (RUN/samples, via DuckDB).

    opd inspect runs/x                      the most recent rollouts
    opd inspect runs/x --rejected           rejected rollouts and the filter rule that rejected each
    opd inspect runs/x --failures           wrong eval answers at the latest (or --step) eval
    opd inspect runs/x --sql "select reject_rule, count(*) from rollouts group by 1"

Where teacher and student disagree: each rollout's completion is shown token by token, with the
3 tokens of largest |teacher log-prob - student log-prob| in bold red. Tokens are decoded one at a
time from `completion_ids` with the run's own tokenizer (RUN/student, else the latest checkpoint),
so highlights sit exactly on the scored tokens. Without a tokenizer the stored completion text is
shown plain, followed by the positions and ids of those tokens. A multi-turn episode (a row with a
`transcript`) is shown turn by turn: the model's turns token by token as above, the environment's
(tool results, follow-ups) dimmed, a malformed call's tool answer with its error.
"""

from __future__ import annotations

from pathlib import Path

from opd.errors import OpdError
from opd.store.rundir import load_tokenizer

TOP_DISAGREEMENTS = 3
HIGHLIGHT = "bold red"
ENVIRONMENT = "dim"  # an episode's tool results and other environment messages
MAX_CELL = 160


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show a run's rollouts, rejections, eval failures, or SQL over them")
    p.add_argument("run", help="run directory (the config's 'out')")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--rejected", action="store_true", help="only rollouts a filter rejected, with the rule")
    view.add_argument("--failures", action="store_true", help="wrong eval answers at the latest (or --step) eval")
    view.add_argument("--sql", metavar="QUERY", help="DuckDB SQL over the tables 'rollouts' and 'evals'")
    p.add_argument("--step", type=int, default=None, help="only this training/eval step")
    p.add_argument("--task", default=None, help="only rows with this task tag")
    p.add_argument("--limit", type=int, default=10, help="rows to show")
    p.set_defaults(func=run_inspect)


def run_inspect(args, console=None) -> None:
    from rich.console import Console

    from opd.store.samples import SampleStore

    run = Path(args.run)
    if not run.is_dir():
        raise OpdError(f"run directory not found: {run}")
    store = SampleStore(run)
    if not store.parts("rollouts") and not store.parts("evals"):
        raise OpdError(f"no samples in {run} yet (RUN/samples is written at each checkpoint and at the end of a run)")
    if args.limit <= 0:
        raise OpdError(f"--limit must be positive, got {args.limit}")
    console = console or Console()
    if args.sql:
        console.print(sql_table(store.query(args.sql), args.sql))
    elif args.failures:
        console.print(failures_table(store, args))
    else:
        console.print(rollouts_table(store, args, load_tokenizer(run)))


def _filters(args, rejected: bool = False) -> tuple[str, list]:
    """A WHERE clause (with bound parameters) for --step, --task and --rejected."""
    clauses, params = ["true"], []
    if args.step is not None:
        clauses.append("step = ?")
        params.append(args.step)
    if args.task is not None:
        clauses.append("task_tag = ?")
        params.append(args.task)
    if rejected:
        clauses.append("not kept")
    return " and ".join(clauses), params


def rollouts_table(store, args, tokenizer=None):
    from rich.table import Table
    from rich.text import Text

    where, params = _filters(args, rejected=args.rejected)
    rows = store.rows(f"select * from rollouts where {where} order by step desc limit ?", params + [args.limit])
    kind = "rejected rollouts" if args.rejected else "rollouts"
    tasks, one_task = _tasks(rows)
    table = Table(title=f"{kind}: {len(rows)} most recent" + ("" if rows else " (none match)") + one_task,
                  caption=f"bold red = the {TOP_DISAGREEMENTS} tokens with the largest |teacher - student| log-prob; "
                          "ok = correct; t-s lp = mean teacher - student log-prob per token")
    _columns(table, [("step", {"no_wrap": True, "justify": "right"}), *tasks, ("prompt", {}), ("completion", {}),
                     ("filter", _short(r["reject_rule"] or "kept" for r in rows)), ("ok", {"no_wrap": True}),
                     ("t-s lp", {"no_wrap": True, "justify": "right"})])
    for r in rows:
        s_lp, t_lp = r["student_logprobs"] or [], r["teacher_logprobs"] or []
        gaps = [t - s for s, t in zip(s_lp, t_lp)]
        table.add_row(str(r["step"]), *([_cell(r["task_tag"])] if tasks else []), _cell(r["prompt"]),
                      episode_text(r, gaps, tokenizer) if r.get("transcript") else
                      completion_text(r["completion"], r["completion_ids"] or [], gaps, tokenizer),
                      "kept" if r["kept"] else Text(r["reject_rule"] or "rejected", style="red"),
                      _yes_no(r["correct"]), f"{sum(gaps) / len(gaps):+.3f}" if gaps else "-")
    return table


def completion_text(completion: str, ids: list[int], gaps: list[float], tokenizer=None):
    """The completion with its most teacher/student-disagreeing tokens highlighted (a rich Text)."""
    from rich.text import Text

    top = top_disagreements(gaps)
    if tokenizer is None:
        text = Text(_clip(completion))
        if top:
            text.append("\n")
            text.append("  ".join(f"#{i}:{ids[i]} ({gaps[i]:+.2f})" for i in sorted(top) if i < len(ids)),
                        style=HIGHLIGHT)
        return text
    text = Text()
    for i, tok_id in enumerate(ids):
        text.append(tokenizer.decode([tok_id]), style=HIGHLIGHT if i in top else None)
    return text


def episode_text(row: dict, gaps: list[float], tokenizer=None):
    """An episode turn by turn, one line each ("assistant: ...", "tool: ..."): the model's turns token by
    token with the episode's most disagreeing tokens highlighted, the environment's turns dimmed."""
    from rich.text import Text

    from opd.report.episodes import episode_turns

    turns = episode_turns(row)
    if turns is None:  # an unreadable transcript: the final answer, as a single-turn row
        return completion_text(row["completion"], row.get("completion_ids") or [], gaps, tokenizer)
    top, offset, text = top_disagreements(gaps), 0, Text()
    for k, turn in enumerate(turns):
        text.append(("\n" if k else "") + f"{turn.role}: ", style="bold" if turn.from_model else ENVIRONMENT)
        if not turn.from_model:
            text.append(_clip(turn.content) + (f"  [error: {turn.error}]" if turn.error else ""), style=ENVIRONMENT)
        elif tokenizer is None or not turn.ids:
            text.append(_clip(turn.content))
        else:
            for i, tok_id in enumerate(turn.ids):
                text.append(tokenizer.decode([tok_id]), style=HIGHLIGHT if offset + i in top else None)
        offset += len(turn.ids)
    return text


def top_disagreements(gaps: list[float], k: int = TOP_DISAGREEMENTS) -> set[int]:
    """Token positions of the k largest |teacher - student| log-prob gaps."""
    return set(sorted(range(len(gaps)), key=lambda i: -abs(gaps[i]))[:k])




def failures_table(store, args):
    from rich.table import Table

    where, params = _filters(args)
    step = args.step
    if step is None:
        step = store.rows(f"select max(step) as s from evals where {where}", params)[0]["s"]
        if step is None:
            raise OpdError("no eval rows in this run" + (f" for task '{args.task}'" if args.task else ""))
        where, params = where + " and step = ?", params + [step]
    counts = f"select count(*) as n, count(*) filter (not correct) as bad from evals where {where}"
    total = store.rows(counts, params)[0]
    rows = store.rows(f"select * from evals where {where} and not correct limit ?", params + [args.limit])
    from opd.report.html import task_descriptions

    tasks, one_task = _tasks(rows)
    described = task_descriptions(sorted({r["task_tag"] for r in rows}))
    table = Table(title=f"eval failures at step {step}: {total['bad']} of {total['n']} wrong"
                        + (f" (showing {len(rows)})" if total["bad"] > len(rows) else "") + one_task,
                  caption="; ".join(described) or None)  # e.g. that reverse_addition's answers are written reversed
    _columns(table, [*tasks, ("prompt", {}), ("completion", {}), ("expected", {}), ("well-formed", {"no_wrap": True})])
    for r in rows:
        table.add_row(*([_cell(r["task_tag"])] if tasks else []), _cell(r["prompt"]),
                      episode_text(r, []) if r.get("transcript") else _cell(r["completion"]),
                      _cell(r["expected"]), _yes_no(r["well_formed"]))
    return table


def _tasks(rows) -> tuple[list, str]:
    """A task column when the rows mix tasks; for one task, its name goes in the title instead (saves width)."""
    tags = sorted({r["task_tag"] or "" for r in rows})
    if len(tags) > 1:
        return [("task", {"max_width": 16})], ""  # folds before the other columns do
    return [], (f" · task {tags[0]}" if tags and tags[0] not in ("", "default") else "")


def sql_table(result, sql: str):
    """Any query result (a pyarrow.Table) as a rich table under the query; long cells are clipped."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table()
    for name in result.column_names:
        table.add_column(name, overflow="fold")
    for row in result.to_pylist():
        table.add_row(*(_cell(str(v)) if v is not None else Text("NULL", style="dim") for v in row.values()))
    return Group(Text(f"{result.num_rows} rows: {_clip(sql, 300)}"), table)


def _short(values, cap: int = 12) -> dict:
    """Column options that keep a short field (a task tag, a rule name) on one line up to `cap` characters."""
    return {"min_width": min(max((len(v or "") for v in values), default=1), cap)}


def _columns(table, columns: list[tuple[str, dict]]) -> None:
    """Add columns that read at 80 terminal columns: long text folds, short fields never wrap."""
    for name, options in columns:
        table.add_column(name, **{"overflow": "fold", **options})


def _cell(text: str | None):
    """User text as a rich Text, so brackets in prompts are never read as markup."""
    from rich.text import Text

    return Text(_clip(text or ""))


def _clip(text: str, width: int = MAX_CELL) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")
