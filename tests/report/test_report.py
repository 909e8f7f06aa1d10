"""report.html on a real run, and the review checklist's pass / fail / unknown logic on hand-made runs."""

import argparse
import base64
import json
import re

import pytest

from opd.errors import OpdError
from opd.report.checklist import TITLES, evaluate_checklist, wilson
from opd.report.html import add_parsers, token_colour, write_report
from tests.report.runs import MANIFEST, answer, build_models, distill_run, good_run, make_run, rollout

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", re.I)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    paths, dirs = build_models(root)
    return distill_run(root / "run", paths, dirs)


def test_report_of_a_real_run_is_one_self_contained_file(real_run):
    before = json.loads((real_run / "summary.json").read_text())
    page = write_report(real_run).read_text()
    assert not EXTERNAL.search(page) and "<link" not in page and "<script" not in page
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 3
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    for title in TITLES.values():
        assert title in page, title
    for anchor in ('id="checklist"', 'id="summary"', 'id="curves"', 'id="samples"', 'id="failures"',
                   'id="manifest"', 'href="#failures"'):
        assert anchor in page, anchor
    # the manifest is there, escaped: the tokenizer's EOS '<eos>' never appears as a raw tag
    manifest = page[page.index('id="manifest"'):page.index('id="config"')]
    assert "&quot;weights_sha256&quot;" in manifest and "&lt;eos&gt;" in manifest and "<eos>" not in manifest
    # the sample browser shows tokens decoded with the run's tokenizer, coloured, with numbers in a tooltip
    assert 'class="tok"' in page and "teacher−student" in page and "&lt;eos&gt;</span>" in page
    # summary.json keeps its keys and gains the checklist
    summary = json.loads((real_run / "summary.json").read_text())
    assert set(summary["checklist"]) == set(TITLES)
    assert {k: summary[k] for k in before} == before
    assert summary["checklist"]["rollouts_fresh"]["status"] == "pass"  # strictly on-policy
    assert summary["checklist"]["filters_explicit"]["status"] == "pass"
    assert "min_tokens" in summary["checklist"]["filters_explicit"]["evidence"]
    assert summary["checklist"]["failures_logged"]["status"] == "pass"


def test_all_user_text_is_escaped(tmp_path):
    evil = "<script>alert('x')</script>"
    manifest = {**MANIFEST, "student": {**MANIFEST["student"], "name": evil}}
    run = good_run(tmp_path / "run", manifest=manifest,
                   rollouts=[rollout(2, prompt=evil, completion="ba")],
                   answers=[answer(2, prompt=evil, completion=evil, expected="&", correct=False)])
    page = write_report(run).read_text()
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert page.count(">&amp;<") >= 1  # the expected answer '&' in the failures table


def test_tokens_are_red_where_the_teacher_disagrees(tmp_path):
    page = write_report(good_run(tmp_path / "run")).read_text()
    red = token_colour(-4.0)
    assert red.startswith("rgba(207,34,46") and token_colour(0.0) == "transparent"
    assert f"background:{red}" in page and "teacher−student -4.00" in page
    assert "#5 " in page and "#2 " in page  # no tokenizer in a hand-made run: ids are shown


def test_report_of_an_unfinished_run(tmp_path):
    run = make_run(tmp_path / "run", config={"train": {"lr": 0.1}},
                   metrics=[{"step": 1, "loss": 2.0, "reverse_kl": 1.5, "completion_len": 4.0, "tokens_per_s": 9.0}])
    page = write_report(run).read_text()
    assert not (run / "summary.json").exists()  # not invented for an unfinished run
    assert page.count('<span class="badge unknown">') == 6  # nothing to judge any item by yet
    assert page.count("data:image/png;base64,") == 4


def test_cli_errors_are_one_line(tmp_path):
    parser = argparse.ArgumentParser(prog="opd")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    with pytest.raises(OpdError, match="run directory not found"):
        args.func(args)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OpdError, match="not a run directory"):
        write_report(tmp_path / "empty")


# -- the checklist on hand-made runs ----------------------------------------------------------------
def statuses(run) -> dict:
    return {k: v["status"] for k, v in evaluate_checklist(run).items()}


def test_every_item_passes_on_a_good_run(tmp_path):
    result = evaluate_checklist(good_run(tmp_path / "run"))
    assert {k: v["status"] for k, v in result.items()} == {k: "pass" for k in TITLES}
    assert "significant" in result["teacher_stronger"]["evidence"]
    assert "not significant" not in result["student_improved"]["evidence"]
    assert "1 wrong of 2" in result["failures_logged"]["evidence"]
    assert "min_tokens (rejected 2)" in result["filters_explicit"]["evidence"]


def test_wilson_interval():
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0.0, 30)[0] == 0.0 and wilson(0.0, 30)[1] == pytest.approx(0.1135, abs=1e-3)
    assert wilson(0.3, 0) == (0.0, 1.0)


def test_accuracy_items_fail_and_report_significance(tmp_path):
    weak_teacher = {"teacher_accuracy": 0.4, "student_accuracy_before": 0.5, "student_accuracy_after": 0.52,
                    "eval_n": 50}
    result = evaluate_checklist(good_run(tmp_path / "a", summary=weak_teacher))
    assert result["teacher_stronger"]["status"] == "fail"
    assert result["student_improved"]["status"] == "pass"
    assert "not significant (95% intervals overlap)" in result["student_improved"]["evidence"]
    worse = {**weak_teacher, "teacher_accuracy": 0.9, "student_accuracy_after": 0.5}
    assert statuses(good_run(tmp_path / "b", summary=worse))["student_improved"] == "fail"


def test_accuracies_fall_back_to_eval_jsonl_and_are_unknown_without_it(tmp_path):
    run = good_run(tmp_path / "a", summary=None)  # eval.jsonl alone still answers both
    assert statuses(run)["teacher_stronger"] == "pass" and statuses(run)["student_improved"] == "pass"
    run = good_run(tmp_path / "b", summary=None, evals=[{"step": 0, "accuracy": 0.3, "teacher_accuracy": 0.9, "n": 9}])
    assert statuses(run)["student_improved"] == "unknown"
    run = good_run(tmp_path / "c", summary=None, evals=None)
    assert statuses(run)["teacher_stronger"] == "unknown"


def test_a_served_teacher_is_unknown_because_it_cannot_be_evaluated_locally(tmp_path):
    served = {"student_accuracy_before": 0.3, "student_accuracy_after": 0.5, "teacher_accuracy": None, "eval_n": 100}
    run = good_run(tmp_path / "run", summary=served, config={"teacher": {"url": "http://127.0.0.1:8000"}},
                   evals=[{"step": 0, "accuracy": 0.3, "n": 100}, {"step": 2, "accuracy": 0.5, "n": 100}])
    result = evaluate_checklist(run)["teacher_stronger"]
    assert result["status"] == "unknown"
    assert "served (http://127.0.0.1:8000) and could not be evaluated locally" in result["evidence"]


def test_prompt_schema(tmp_path):
    differs = {**MANIFEST, "prompt_schema": {**MANIFEST["prompt_schema"], "allow_mismatch": True,
                                             "teachers": {"big": {"identical": False, "hash": "f00"}}}}
    result = evaluate_checklist(good_run(tmp_path / "a", manifest=differs))["prompt_schema_identical"]
    assert result["status"] == "fail" and "big" in result["evidence"] and "allow_schema_mismatch" in result["evidence"]
    no_hash = {**MANIFEST, "prompt_schema": {"kind": "format", "template": "{prompt}"}}
    assert statuses(good_run(tmp_path / "b", manifest=no_hash))["prompt_schema_identical"] == "unknown"


def test_rollout_freshness_uses_the_configured_bound(tmp_path):
    stale = [rollout(1), rollout(2), rollout(3, lag=2)]
    result = evaluate_checklist(good_run(tmp_path / "a", rollouts=stale))["rollouts_fresh"]
    assert result["status"] == "fail" and "max policy lag 2" in result["evidence"] and "bound 0" in result["evidence"]
    allowed = {"rollout": {"max_staleness": 2}}
    assert statuses(good_run(tmp_path / "b", rollouts=stale, config=allowed))["rollouts_fresh"] == "pass"
    assert statuses(good_run(tmp_path / "c", rollouts=stale, config={}))["rollouts_fresh"] == "fail"  # absent = 0
    assert statuses(good_run(tmp_path / "d", rollouts=None, answers=None))["rollouts_fresh"] == "unknown"


def test_filters_must_be_declared_and_counted(tmp_path):
    no_key = {k: v for k, v in MANIFEST.items() if k != "filters"}
    assert statuses(good_run(tmp_path / "a", manifest=no_key))["filters_explicit"] == "fail"
    undeclared = [{"step": 1, "kept": 2, "reject/min_tokens": 0, "reject/regex": 2}]
    result = evaluate_checklist(good_run(tmp_path / "b", metrics=undeclared))["filters_explicit"]
    assert result["status"] == "fail" and "regex" in result["evidence"]
    none = {**MANIFEST, "filters": []}
    result = evaluate_checklist(good_run(tmp_path / "c", manifest=none, metrics=[{"step": 1, "kept": 4}]))
    assert result["filters_explicit"]["status"] == "warn"  # nothing filtered is not "filters explicit"
    assert "no filters configured" in result["filters_explicit"]["evidence"]
    assert statuses(good_run(tmp_path / "d", manifest=None))["filters_explicit"] == "unknown"


def test_failures_must_be_stored_for_the_last_evaluation(tmp_path):
    old_only = [answer(0, correct=False)]
    result = evaluate_checklist(good_run(tmp_path / "a", answers=old_only))["failures_logged"]
    assert result["status"] == "fail" and "step 2" in result["evidence"]
    assert statuses(good_run(tmp_path / "b", rollouts=None, answers=None))["failures_logged"] == "unknown"


# -- what the page says about the run -----------------------------------------------------------------
def png_height(b64: str) -> int:
    return int.from_bytes(base64.b64decode(b64)[20:24], "big")  # IHDR: width, then height


def figures(page: str) -> dict[str, str]:
    """figure caption title -> its PNG (base64)."""
    return dict((title, png) for png, title in
                re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"><figcaption><b>([^<]+)</b>', page))


def test_plots_that_carry_no_information_are_left_out_and_said_so(tmp_path):
    page = write_report(good_run(tmp_path / "a")).read_text()  # loss == reverse KL, every lag 0
    shown = figures(page)
    assert "Reverse KL to the teacher (= training loss)" in shown and "Training loss" not in shown
    assert "Rollout staleness" not in shown
    assert "training loss: identical to the reverse KL" in page and "policy lag: 0 at every step" in page
    # rejects get their own axis under the kept count, so the figure is taller than a one-axis plot
    assert png_height(shown["Rollouts rejected by rule"]) > png_height(shown["Completion length"])

    distinct = [{"step": s, "loss": 2.0 / s, "reverse_kl": 1.0 / s, "kept": 4, "reject/min_tokens": 0,
                 "completion_len": 3.0, "tokens_per_s": 100.0} for s in (1, 2)]
    stale = good_run(tmp_path / "b", metrics=distinct, config={"rollout": {"max_staleness": 1}},
                     rollouts=[rollout(1), rollout(2, lag=1)])
    page = write_report(stale).read_text()
    shown = figures(page)
    assert {"Reverse KL to the teacher", "Training loss", "Rollout staleness"} <= set(shown)
    assert "Rollouts rejected by rule" not in shown and "rejects by rule: no rollout was rejected" in page


def test_title_headings_and_task_description_say_what_the_run_is(tmp_path):
    config = {"teacher": {"model": "runs/teacher"}, "student": {"model": "runs/student"},
              "task": {"builtin": "reverse_addition"}, "rollout": {"max_staleness": 0}}
    answers = [answer(0), answer(2), {**answer(2, "12+9=", "12", "12", correct=False), "task_tag": "reverse_addition"}]
    page = write_report(good_run(tmp_path / "run", config=config, answers=answers)).read_text()
    assert "<h1>opd report: student runs/student, teacher runs/teacher, task reverse_addition</h1>" in page
    assert "<h3>After 2 training steps (held-out accuracy 0.800): rollouts sampled in that step</h3>" in page
    assert "reverse_addition: a+b= -&gt; digits of a+b, least significant first" in page
