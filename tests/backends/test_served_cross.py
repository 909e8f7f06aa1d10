"""A served teacher with another tokenizer (`teacher.tokenizer`): wrapped like a local one
(opd/teachers/cross.py), sent its own token ids, its span scores equal the same teacher loaded locally,
`opd distill` runs through it, and a wrong `teacher.tokenizer` is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch

from opd.backends.hf import load_model
from opd.config import load_config
from opd.errors import OpdError
from opd.loop import distill
from opd.teachers.cross import CrossTokenizerTeacher
from opd.teachers.pool import load_teachers
from tests.backends.test_server import free_port, stop
from tests.teachers.test_cross import EXAMPLES, SCHEMA, on_policy, sample, written
from tests.teachers.test_cross_distill import task  # noqa: F401  (module fixture: data, char and bpe models)

START = ("import sys; from opd.backends.server import serve; "
         "serve(sys.argv[1], port=int(sys.argv[2]), max_logprobs=512)")


@pytest.fixture(scope="module")
def served_bpe(task):  # noqa: F811
    """`opd serve-teacher` of the BPE model, answering top-k up to its whole vocabulary."""
    _, models = task
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", START, str(models["bpe"]), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()
    yield url
    stop(proc)


def config(root, models, url, *extra, teacher=None):
    """teacher: the teacher's keys (default: served at `url`, with the BPE tokenizer)."""
    teacher = teacher or [f"teacher.url={url}", f"teacher.tokenizer={models['bpe']}"]
    return load_config(None, [*teacher, f"student.model={models['char']}", f"task.train={root / 'train.jsonl'}",
                              f"task.eval={root / 'eval.jsonl'}", "rollout.batch_size=16",
                              "rollout.max_new_tokens=6", "train.steps=3", "train.eval_every=3",
                              "train.checkpoint_every=0", "logging.report=false", f"out={root / 'served-cross'}",
                              *extra])


def test_served_span_scores_equal_the_local_teachers(task, served_bpe):  # noqa: F811
    root, models = task
    student = load_model(str(models["char"]))
    tok = student.tokenizer
    batches = [on_policy(student.model, written(tok, ["64", "21", "1001", "7"])), sample(student, n_new=8)]

    def served(top_k):
        cfg = config(root, models, served_bpe, f"teacher.top_k={top_k}")
        [teacher] = load_teachers(cfg, tok, SCHEMA)
        teacher.prepare(EXAMPLES)
        return teacher

    full = served(1000)  # capped at the teacher's vocabulary: every extension is in its top-k
    assert isinstance(full, CrossTokenizerTeacher) and full.inner.top_k == len(full.tokenizer)
    local_cfg = config(root, models, None, teacher=[f"teacher.model={models['bpe']}", "teacher.dtype=float32"])
    [local] = load_teachers(local_cfg, tok, SCHEMA)
    plain = served(0)
    assert "served top-" in full.describe()["cross_tokenizer"]["extensions"]
    assert plain.describe()["cross_tokenizer"]["extensions"].startswith("none")
    for batch in batches:
        mine, theirs = full.score(batch, EXAMPLES), local.score(batch, EXAMPLES)
        # the estimator's per-token advantage is clip(target - sample log-prob): equal targets, equal advantages
        torch.testing.assert_close(mine.logprobs, theirs.logprobs, atol=1e-5, rtol=0)
        assert mine.alignment == theirs.alignment
    # the extensions matter on these rows: without a top-k the served scores are the token log-probs only
    assert (plain.score(batches[0], EXAMPLES).logprobs - local.score(batches[0], EXAMPLES).logprobs).abs().max() > 1e-3


def test_distill_through_a_served_teacher_of_another_tokenizer(task, served_bpe):  # noqa: F811
    root, models = task
    summary = distill(config(root, models, served_bpe), progress=False)
    assert summary["objective"] == "sampled_reverse_kl" and summary["steps"] == 3
    run = root / "served-cross"
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["teachers"][0]
    assert entry["url"] == served_bpe and entry["cross_tokenizer"]["teacher_tokenizer_sha256"] == \
        entry["health"]["tokenizer_sha256"] != manifest["tokenizer"]["sha256"]
    assert "served top-20" in entry["cross_tokenizer"]["extensions"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3
    for m in metrics:
        assert {"align/one_to_one", "align/student_span_len", "align/teacher_span_len", "align/unaligned"} <= set(m)
        assert 0 < m["align/one_to_one"] <= 1 and m["align/teacher_span_len"] > 0
    assert summary["teacher_accuracy"] is not None  # evaluated through the server's greedy endpoint


def test_a_wrong_teacher_tokenizer_is_one_line(task, served_bpe):  # noqa: F811
    root, models = task
    # the student is BPE and teacher.tokenizer names the char one, but the server serves the BPE model
    cfg = config(root, models, served_bpe, f"teacher.tokenizer={models['char']}", f"student.model={models['bpe']}",
                 f"out={root / 'wrong'}")
    with pytest.raises(OpdError, match=r"another tokenizer .* than teacher\.tokenizer") as err:
        distill(cfg, progress=False)
    assert "\n" not in str(err.value)


def test_teacher_tokenizer_is_for_a_served_teacher_only(task):  # noqa: F811
    root, models = task
    with pytest.raises(OpdError, match="'tokenizer' names a served teacher's tokenizer"):
        config(root, models, None, teacher=[f"teacher.model={models['bpe']}", f"teacher.tokenizer={models['bpe']}"])
