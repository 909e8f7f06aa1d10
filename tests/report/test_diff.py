"""`opd diff`: differing settings with both values, hashes, and headline metric deltas (b - a)."""

import argparse

import pytest
from rich.console import Console

from opd.errors import OpdError
from opd.report.diff import diff_runs, flatten, print_diff
from opd.report.html import add_parsers
from tests.report.runs import MANIFEST, build_models, distill_run, good_run


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """a and c: the same config; b: a different learning rate."""
    root = tmp_path_factory.mktemp("diff")
    paths, dirs = build_models(root)
    return (distill_run(root / "a", paths, dirs, "train.lr=0.001"),
            distill_run(root / "b", paths, dirs, "train.lr=0.003"),
            distill_run(root / "c", paths, dirs, "train.lr=0.001"))


def shown(rows, a="a", b="b", width: int = 250) -> str:
    console = Console(record=True, width=width, color_system=None)
    print_diff(rows, a, b, console)
    return console.export_text()


def test_one_changed_setting_is_listed_with_both_values_and_metric_deltas(three_runs):
    a, b, _ = three_runs
    rows = diff_runs(a, b)
    keys = {key: (va, vb) for key, va, vb in rows}
    assert keys["config.train.lr"] == (0.001, 0.003)
    setup = [k for k in keys if not k.startswith("summary.")]
    assert all(k == "config.train.lr" or "sha256" in k or k.startswith("manifest.code.") for k in setup), setup
    assert "config.out" not in keys and "manifest.command" not in keys and "summary.wall_seconds" not in keys
    for metric in ("summary.teacher_accuracy", "summary.student_accuracy_before", "summary.student_accuracy_after"):
        assert metric in keys
    out = shown(rows)
    assert "config.train.lr" in out and "0.001" in out and "0.003" in out and "b - a" in out


def test_identical_configs_differ_only_in_metrics_and_hashes(three_runs):
    a, _, c = three_runs
    rows = diff_runs(a, c)
    setup = [key for key, _, _ in rows if not key.startswith("summary.")]
    assert all("sha256" in k or k.startswith("manifest.code.") for k in setup), setup
    assert any(k.startswith("summary.") for k, _, _ in rows)
    if not setup:  # the usual case; the code version can only differ if opd itself changed in between
        assert "0 setting(s) differ (same setup)" in shown(rows)


def test_metric_deltas_are_b_minus_a(tmp_path):
    a = good_run(tmp_path / "a")
    better = {"teacher_accuracy": 0.9, "student_accuracy_before": 0.3, "student_accuracy_after": 0.85,
              "gap_closed": 0.9167, "steps": 2, "eval_n": 100, "method": "opd"}
    changed = {**MANIFEST, "teacher": {**MANIFEST["teacher"], "weights_sha256": "c" * 64},
               "filters": [{"rule": "min_tokens", "name": "min_tokens", "n": 2}]}
    b = good_run(tmp_path / "b", summary=better, manifest=changed)
    keys = {key: (va, vb) for key, va, vb in diff_runs(a, b)}
    assert keys["manifest.teacher.weights_sha256"] == ("a" * 64, "c" * 64)
    assert keys["manifest.filters[0].n"] == (1, 2)
    assert keys["summary.student_accuracy_after"] == (0.8, 0.85)
    out = shown(diff_runs(a, b))
    line = next(line for line in out.splitlines() if "summary.student_accuracy_after" in line)
    assert "+0.05" in line
    line = next(line for line in out.splitlines() if "summary.method" in line)
    assert "+" not in line  # no delta for text


def test_the_table_reads_at_80_columns(tmp_path):
    a = good_run(tmp_path / "a")
    b = good_run(tmp_path / "b", manifest={**MANIFEST, "teacher": {**MANIFEST["teacher"], "weights_sha256": "c" * 64}})
    out = shown(diff_runs(a, b), str(a), str(b), width=80)
    assert max(map(len, out.splitlines())) <= 80
    assert f"a: {a}" in out and "summary.student_accuracy_before" in out  # keys stay whole
    assert "cccccccccccc…" in out and "c" * 13 not in out  # a sha256 is shown by its first 12 digits


def test_flatten_keeps_scalar_lists_whole():
    flat = flatten({"a": {"b": [1, 2], "c": [{"d": 1}], "e": {}}}, "x")
    assert flat == {"x.a.b": [1, 2], "x.a.c[0].d": 1, "x.a.e": {}}


def test_missing_run_is_a_one_line_error(tmp_path):
    parser = argparse.ArgumentParser(prog="opd")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    good = good_run(tmp_path / "a")
    args = parser.parse_args(["diff", str(good), str(tmp_path / "nope")])
    with pytest.raises(OpdError, match="run directory not found: .*nope"):
        args.func(args)
