"""Supervised KD (method kd, GKD with λ = 0): the teacher writes the sequences, the student lowers
the divergence to the teacher on them. One file (opd/methods/kd.py) plus this test."""

import json

import pytest

import opd.loop as loop
from tests.test_loop import config, task_and_models  # noqa: F401  (module fixture: teacher + weak student)


@pytest.mark.slow
def test_kd_trains_on_teacher_sequences_with_the_divergence(task_and_models):  # noqa: F811
    root, paths, dirs = task_and_models
    out = root / "m-kd"
    summary = loop.distill(config(root, paths, dirs, f"out={out}", "method=kd", "train.steps=30",
                                  "train.eval_every=30"), progress=False)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["sampled_by"] for m in metrics} == {"teacher"}
    assert all("reverse_kl" in m for m in metrics)  # scored by the teacher, trained on the divergence
    assert sum(m["reverse_kl"] for m in metrics[-5:]) < sum(m["reverse_kl"] for m in metrics[:5])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["name"] == "kd" and manifest["rollout"]["policy"] == "teacher"
    assert summary["objective"] == "reverse_kl"


def test_kd_needs_a_teacher_that_generates():
    from opd.config import load_config
    from opd.errors import OpdError

    with pytest.raises(OpdError, match="method kd needs the teacher to generate"):
        load_config(None, ["teacher.url=http://127.0.0.1:1", "student.model=s", "task.builtin=x", "method=kd"])
