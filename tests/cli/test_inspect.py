"""`opd inspect`: recent rollouts, rejections with their rule, eval failures, SQL, one-line errors."""

import argparse

import pytest
from rich.console import Console

from opd.cli.inspect import add_parser, completion_text, top_disagreements
from opd.errors import OpdError
from opd.store.samples import SampleStore


def parse(*argv):
    parser = argparse.ArgumentParser(prog="opd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["inspect", *argv])


def show(*argv, width: int = 240) -> str:
    console = Console(record=True, width=width, color_system=None)
    args = parse(*argv)
    args.func(args, console)
    return console.export_text()


def rollout(step, prompt, completion, kept=True, rule=None, task="add"):
    ids = [5 + i for i in range(len(completion))] + [2]
    return {"step": step, "policy_version": step - 1, "task_tag": task, "prompt": prompt, "completion": completion,
            "completion_ids": ids, "student_logprobs": [-0.5] * len(ids),
            "teacher_logprobs": [-0.5] * (len(ids) - 1) + [-4.5], "kept": kept, "reject_rule": rule,
            "correct": kept, "teacher": "t", "truncated": False}


def evaluation(step, prompt, completion, expected, correct):
    return {"step": step, "prompt": prompt, "completion": completion, "expected": expected, "correct": correct,
            "well_formed": True, "task_tag": "add"}


@pytest.fixture()
def run(tmp_path):
    store = SampleStore(tmp_path)
    store.add_rollouts([rollout(1, "1+1=", "2"), rollout(1, "2+2=", "[b]x", kept=False, rule="regex")])
    store.add_evals([evaluation(1, "3+3=", "7", "6", False)])
    store.flush(1)
    store.add_rollouts([rollout(2, "4+4=", "8"), rollout(2, "5+5=", "1010101", kept=False, rule="repetition"),
                        rollout(2, "aa=", "bb", task="rev")])
    store.add_evals([evaluation(2, "3+3=", "6", "6", True), evaluation(2, "9+9=", "17", "18", False)])
    store.flush(2)
    return tmp_path


def test_default_view_shows_recent_rollouts_with_reasons(run):
    out = show(str(run))
    assert "rollouts: 5 most recent" in out
    for text in ("4+4=", "5+5=", "1010101", "repetition", "regex", "[b]x", "kept", "-0.800"):
        assert text in out, text  # -0.800: '[b]x' + EOS = 5 tokens, one gap of -4


def test_limit_step_and_task(run):
    out = show(str(run), "--limit", "1", "--step", "1")
    assert "1 most recent" in out and out.count("1+1=") + out.count("2+2=") == 1
    out = show(str(run), "--task", "rev")
    assert "aa=" in out and "4+4=" not in out


def test_rejected_shows_only_rejected_rollouts_with_their_rule(run):
    out = show(str(run), "--rejected")
    assert "rejected rollouts: 2" in out
    assert "repetition" in out and "regex" in out and "4+4=" not in out and "1+1=" not in out


def test_failures_of_the_latest_eval(run):
    out = show(str(run), "--failures")
    assert "eval failures at step 2: 1 of 2 wrong" in out
    assert "9+9=" in out and "17" in out and "18" in out and "3+3=" not in out
    out = show(str(run), "--failures", "--step", "1")
    assert "step 1: 1 of 1 wrong" in out and "3+3=" in out


def test_sql_prints_the_result(run):
    sql = "select reject_rule, count(*) as n from rollouts where not kept group by 1 order by 1"
    out = show(str(run), "--sql", sql)
    assert "2 rows" in out and "reject_rule" in out
    assert any("regex" in line and "1" in line for line in out.splitlines())


def test_tokens_decoded_with_the_run_tokenizer(tmp_path):
    """With RUN/student's tokenizer each token is decoded on its own and the top-3 gaps are styled."""
    from opd.backends.hf import build_char_tokenizer

    tokenizer = build_char_tokenizer(["0123456789+="])
    tokenizer.save_pretrained(tmp_path / "student")
    ids = tokenizer("4213", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    gaps = [0.0, -3.0, 0.5, 0.1, 2.0]
    text = completion_text("4213", ids, gaps, tokenizer)
    assert text.plain == "4213<eos>"
    assert [text.plain[s.start:s.end] for s in text.spans if s.style == "bold red"] == ["2", "1", "<eos>"]
    store = SampleStore(tmp_path)
    store.add_rollouts([{**rollout(1, "9+9=", "4213"), "completion_ids": ids, "student_logprobs": [-1.0] * 5,
                         "teacher_logprobs": [-1.0 + g for g in gaps]}])
    store.flush(1)
    out = show(str(tmp_path))
    assert "4213<eos>" in out and "-0.080" in out


def test_without_tokenizer_the_top_tokens_are_listed():
    text = completion_text("abcd", [7, 8, 9, 10, 2], [0.0, -2.0, 0.1, 3.0, -0.5])
    assert text.plain.splitlines() == ["abcd", "#1:8 (-2.00)  #3:10 (+3.00)  #4:2 (-0.50)"]
    assert top_disagreements([0.0, -2.0, 0.1, 3.0, -0.5], k=2) == {1, 3}


@pytest.mark.parametrize("argv,message", [
    (["missing"], "run directory not found"),
    ([], "no samples in"),
])
def test_missing_run_or_samples_is_one_line(tmp_path, argv, message):
    target = str(tmp_path / argv[0]) if argv else str(tmp_path)
    with pytest.raises(OpdError, match=message):
        show(target)


def test_bad_sql_and_bad_limit_are_opd_errors(run):
    with pytest.raises(OpdError, match="query failed"):
        show(str(run), "--sql", "select nope from rollouts")
    with pytest.raises(OpdError, match="--limit must be positive"):
        show(str(run), "--limit", "0")


def test_views_are_mutually_exclusive():
    with pytest.raises(SystemExit):
        parse("r", "--rejected", "--failures")


def test_tables_read_at_80_columns(run):
    """Nothing is cut off at the right, and short fields (rule names, numbers) stay whole on one line."""
    for argv in ((), ("--rejected",), ("--failures",), ("--sql", "select step, reject_rule from rollouts")):
        out = show(str(run), *argv, width=80)
        assert max(map(len, out.splitlines())) <= 80, out
    out = show(str(run), "--rejected", width=80)
    assert "rejected rollouts: 2 most recent · task add" in out  # one task: named once, no column for it
    assert "repetition" in out and "1010101" in out and "-0.800" in out
