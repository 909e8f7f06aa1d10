"""`opd distill` with a teacher of another tokenizer: wrapped, scored by spans, no row rejected for its
alignment (cut rows are penalised and counted), alignment metrics logged, both tokenizers in the
manifest (opd/teachers/cross.py)."""

from __future__ import annotations

import json

import pytest

from opd.backends.hf import init_model
from opd.config import load_config
from opd.errors import OpdError
from opd.loop import distill
from opd.report.checklist import evaluate_checklist
from opd.store.samples import SampleStore
from opd.teachers.align import UNALIGNED


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross-distill")
    for split, n in (("train", 200), ("eval", 16)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                a, b = (i * 7) % 50, (i * 13 + int(split == "eval") * 5) % 50
                f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)[::-1]}) + "\n")
    texts = [(root / "train.jsonl").read_text()]
    models = {kind: init_model("qwen3", 1, 32, 2, texts, root / kind, seed=i, tokenizer=kind,
                               vocab_size=280 if kind == "bpe" else None) for i, kind in enumerate(("char", "bpe"))}
    return root, models


def cfg(root, models, teacher, student, *extra):
    return load_config(None, [f"teacher.model={models[teacher]}", f"student.model={models[student]}",
                              f"task.train={root / 'train.jsonl'}", f"task.eval={root / 'eval.jsonl'}",
                              "rollout.batch_size=16", "rollout.max_new_tokens=6", "train.steps=3",
                              "train.eval_every=3", "train.checkpoint_every=0", "logging.report=false",
                              f"out={root / f'run-{teacher}-{student}'}", *extra])


@pytest.mark.parametrize("teacher,student", [("char", "bpe"), ("bpe", "char")])
def test_distill_with_another_tokenizer(task, teacher, student):
    root, models = task
    config = cfg(root, models, teacher, student)
    summary = distill(config, progress=False)
    assert summary["objective"] == "sampled_reverse_kl" and summary["steps"] == 3
    run = root / f"run-{teacher}-{student}"
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["teachers"][0]["cross_tokenizer"]
    assert entry["student_tokenizer_sha256"] == manifest["tokenizer"]["sha256"] != entry["teacher_tokenizer_sha256"]
    assert manifest["prompt_schema"]["teachers"]["teacher"]["cross_tokenizer"] is True
    # the preflight shows an aligned example per prompt and the EOS mapping instead of requiring one EOS id
    assert all("<->" in r["aligned"] or "not aligned" in r["aligned"] for r in manifest["preflight"]["prompts"])
    assert any("student EOS -> teacher EOS" in note for note in manifest["preflight"]["tokens"]["notes"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert {"align/one_to_one", "align/student_span_len", "align/teacher_span_len", "align/unaligned"} <= set(m)
        cuts = sum(m[f"align/penalised_{name}"] for name in UNALIGNED) + m["align/cut_char_at_end"]
        assert m["align/unaligned"] == cuts and not any(f"reject/{name}" in m for name in UNALIGNED)
    assert sum(m["align/unaligned"] for m in metrics) > 0  # untrained students write special tokens: cut, trained
    rows = SampleStore(run).query("select reject_rule, kept from rollouts").to_pylist()
    assert all(r["kept"] and r["reject_rule"] is None for r in rows)  # no filters configured: every row trains
    assert entry["unreadable"]["penalty"] == -1.0  # auto: clip 1
    assert evaluate_checklist(run)["filters_explicit"]["status"] != "fail"


def test_a_method_that_trains_on_teacher_rows_is_refused(task):
    root, models = task
    with pytest.raises(OpdError, match="method mixed"):
        distill(cfg(root, models, "char", "bpe", "method.name=mixed", f"out={root / 'mixed'}"), progress=False)
