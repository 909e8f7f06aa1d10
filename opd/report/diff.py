"""`opd diff RUN_A RUN_B`: what differs between two runs, and what it did to the headline metrics.

Config and manifest are flattened to dotted keys (`config.train.lr`, `manifest.filters[0].rule`,
`manifest.teacher.weights_sha256`) and only differing keys are listed; keys that differ between
any two runs by nature (the output path, the command line, wall time) are ignored. Headline
metrics from summary.json are always listed, with the delta b - a.
"""

from __future__ import annotations

from opd.errors import OpdError
from opd.report.checklist import load_run

# dotted keys (or key prefixes) that differ between any two runs and say nothing about the setup
IGNORED = ("config.out", "config.logging", "manifest.command", "manifest.versions.platform", "summary.wall_seconds",
           "manifest.preflight.seconds")
HEADLINE = ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "gap_closed", "steps",
            "flops", "eval_n", "method", "objective")
MISSING = "(absent)"


def flatten(obj, prefix: str) -> dict:
    """Nested dicts/lists -> {dotted.key[i]: scalar}; an empty dict or list stays a value."""
    if isinstance(obj, dict) and obj:
        out = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}"))
        return out
    if isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        out = {}
        for i, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in IGNORED)


def diff_runs(run_a, run_b) -> list[tuple[str, object, object]]:
    """(key, value in a, value in b) for every differing config/manifest key, then the headline metrics."""
    a, b = load_run(run_a), load_run(run_b)
    flat_a = {**flatten(a.config, "config"), **flatten(a.manifest, "manifest")}
    flat_b = {**flatten(b.config, "config"), **flatten(b.manifest, "manifest")}
    rows = []
    for key in sorted(set(flat_a) | set(flat_b), key=_order):
        va, vb = flat_a.get(key, MISSING), flat_b.get(key, MISSING)
        if va != vb and not _ignored(key):
            rows.append((key, va, vb))
    for name in HEADLINE:
        if name in a.summary or name in b.summary:
            rows.append((f"summary.{name}", a.summary.get(name, MISSING), b.summary.get(name, MISSING)))
    return rows


def _order(key: str) -> tuple:
    """config keys first, then the manifest, each in alphabetical order."""
    return (not key.startswith("config."), key)


def delta(a, b) -> float | None:
    """b - a for two numbers, else None."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return b - a if numbers else None


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"  # a sha256: the first 12 hex digits tell two apart; the files have all 64
    return str(value)


def print_diff(rows: list[tuple], run_a: str = "a", run_b: str = "b", console=None) -> None:
    """The diff as a rich table that reads at 80 columns; metric rows carry b - a."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    setup = [r for r in rows if not r[0].startswith("summary.")]
    console.print(Text(f"a: {run_a}\nb: {run_b}"))
    table = Table(title=Text(f"{len(setup)} setting(s) differ" + ("" if setup else " (same setup)")))
    # keys stay whole up to a common length; the values share what is left of the width
    table.add_column("key", overflow="fold", min_width=min(max((len(r[0]) for r in rows), default=3), 32))
    table.add_column("a", overflow="fold", ratio=1)
    table.add_column("b", overflow="fold", ratio=1)
    table.add_column("b - a", justify="right", no_wrap=True)
    for i, (key, va, vb) in enumerate(rows):
        d = delta(va, vb) if key.startswith("summary.") else None
        group_ends = i + 1 < len(rows) and rows[i + 1][0].split(".")[0] != key.split(".")[0]
        table.add_row(Text(key), Text(_cell(va)), Text(_cell(vb)), "" if d is None else f"{d:+.4g}" if d else "0",
                      end_section=group_ends)
    console.print(table)


def run_diff(args, console=None) -> None:
    from pathlib import Path

    for run in (args.run_a, args.run_b):
        if not Path(run).is_dir():
            raise OpdError(f"run directory not found: {run}")
    print_diff(diff_runs(args.run_a, args.run_b), args.run_a, args.run_b, console)
