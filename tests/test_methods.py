"""Baseline methods share the loop: who samples, which loss, and the compute-matched comparison."""

import json

import pytest

import opd.loop as loop
import opd.rollout.backend as backend_module
import opd.teachers.local as local_teacher_module
import opd.teachers.pool as pool_module
from opd.compare import compare, flops_to
from tests.test_loop import config, task_and_models  # noqa: F401  (module fixture: teacher + weak student)


def spy(monkeypatch):
    calls = {"generate": [], "score": 0}
    real_generate, real_teacher_generate = backend_module.generate, local_teacher_module.generate
    real_score = pool_module.TeacherPool.score

    def generate(model, *a, **kw):
        calls["generate"].append(model)
        return real_generate(model, *a, **kw)

    def score(*a, **kw):
        calls["score"] += 1
        return real_score(*a, **kw)

    def teacher_generate(model, *a, **kw):
        calls["generate"].append(model)
        return real_teacher_generate(model, *a, **kw)

    monkeypatch.setattr(backend_module, "generate", generate)
    monkeypatch.setattr(local_teacher_module, "generate", teacher_generate)
    monkeypatch.setattr(pool_module.TeacherPool, "score", score)  # a training step's scoring
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("method,sampled_by,scored", [("sft", {"teacher"}, 0), ("rl", {"student"}, 0),
                                                      ("opd+rl", {"student"}, 8), ("opd", {"student"}, 8)])
def test_who_samples_and_who_scores(task_and_models, monkeypatch, method, sampled_by, scored):
    root, paths, dirs = task_and_models
    calls = spy(monkeypatch)
    out = root / f"m-{method.replace('+', '_')}"
    summary = loop.distill(config(root, paths, dirs, f"out={out}", f"method={method}", "train.steps=8",
                                  "rollout.samples_per_prompt=4", "rollout.batch_size=8"), progress=False)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["sampled_by"] for m in metrics} == sampled_by
    # rl and sft never need the teacher's scores to train; the preflight scores once before step 1
    assert calls["score"] == scored + 1
    assert all(m["flops"] > 0 for m in metrics) and metrics[-1]["flops"] > metrics[0]["flops"]
    assert summary["method"] == method
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["name"] == method


@pytest.mark.slow
def test_mixed_samples_from_the_student_with_probability_lambda(task_and_models):
    root, paths, dirs = task_and_models
    out = root / "m-mixed"
    loop.distill(config(root, paths, dirs, f"out={out}", "method={name: mixed, lmbda: 0.25}", "train.steps=40",
                        "rollout.batch_size=4", "train.eval_every=100"), progress=False)
    by = [json.loads(l)["sampled_by"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert 3 <= by.count("student") <= 18  # Binomial(40, 0.25): mean 10


@pytest.mark.slow
def test_sft_from_a_traces_file_trains_on_those_traces(task_and_models, tmp_path):
    root, paths, dirs = task_and_models
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": w + "=", "answer": w[::-1]}) + "\n" for w in ("ab", "cd", "abc")))
    out = root / "m-traces"
    loop.distill(config(root, paths, dirs, f"out={out}", "method={name: sft, traces: " + str(traces) + "}",
                        "train.steps=3"), progress=False)
    from opd.store.samples import SampleStore

    completions = {r["completion"] for r in SampleStore(out).rows("select completion from rollouts")}
    assert completions == {"ba", "dc", "cba"}


@pytest.mark.slow
def test_compare_writes_curves_budget_and_plot(task_and_models, tmp_path):
    root, paths, dirs = task_and_models
    base = config(root, paths, dirs, "train.steps=20", "train.eval_every=5")
    report = compare(base, ["opd", "sft", "rl"], seeds=2, out=tmp_path / "cmp", rl_budget=2.0,
                     method_overrides={"rl": ["rollout.samples_per_prompt=4", "rollout.batch_size=8"]},
                     progress=False)
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["target"] == pytest.approx(0.9 * saved["teacher_accuracy"])
    for method in ("opd", "sft", "rl"):
        entry = saved["methods"][method]
        assert len(entry["final_accuracy"]) == 2 and len(entry["flops_to_target"]) == 2
        for curve in entry["curve"]:
            assert curve[0][0] == 0.0 and all(b[0] >= a[0] for a, b in zip(curve, curve[1:]))
    opd_spent = max(c[-1][0] for c in saved["methods"]["opd"]["curve"])
    reached = [b[1] for b in saved["methods"]["opd"]["flops_to_target"] if b]  # [last below, first at/above]
    assert saved["rl_budget_flops"] == pytest.approx(2.0 * (max(reached) if reached else opd_spent))
    for curve in saved["methods"]["rl"]["curve"]:  # RL stops at its budget (or at the target)
        assert curve[-2][0] < saved["rl_budget_flops"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert report["methods"]["opd"]["final_accuracy"] == saved["methods"]["opd"]["final_accuracy"]


def test_flops_to_target_is_the_first_crossing():
    assert flops_to([[0, 0.1], [5, 0.95], [9, 0.5], [12, 0.99]], 0.9) == 5
    assert flops_to([[0, 0.1], [5, 0.2]], 0.9) is None
