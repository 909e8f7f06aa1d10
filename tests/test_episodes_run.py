"""`opd distill` on a multi-turn task: a user environment from its own module (`task.env`,
`task.env_params`, `rollout.max_turns`), episodes sampled, scored, filtered, trained and stored."""

import json

import pytest

from opd.backends.hf import init_model, load_model
from opd.config import load_config
from opd.errors import OpdError
from opd.loop import distill
from opd.store.samples import SampleStore
from tests.rollout.test_episodes import TEMPLATE

ENV = "python:tests.rollout.toy_envs:LookupEnv"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("episodes-run")
    dirs = {}
    for name, hidden, seed in (("student", 32, 0), ("teacher", 48, 1)):
        path = init_model("qwen3", 2, hidden, 4, ["abc?ok[]uatsmore 0123456789"], root / name, seed=seed)
        loaded = load_model(str(path))
        loaded.tokenizer.chat_template = TEMPLATE
        loaded.tokenizer.save_pretrained(path)
        dirs[name] = path
    for split, n in (("train", 40), ("eval", 8)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": f"a{i}", "answer": str(i % 10)}) + "\n"
                                                     for i in range(n)))
    return root, dirs


def config(root, dirs, out, *extra):
    return load_config(None, [f"teacher.model={dirs['teacher']}", f"student.model={dirs['student']}",
                              f"task.train={root / 'train.jsonl'}", f"task.eval={root / 'eval.jsonl'}",
                              f"task.env={ENV}", "task.env_params={reply: ok, max_calls: 2}", "rollout.max_turns=3",
                              "rollout.batch_size=8", "rollout.max_new_tokens=4", "train.steps=3",
                              "train.eval_every=3", "train.checkpoint_every=0", "logging.report=false",
                              f"out={root / out}", *extra])


def test_distill_runs_episodes_end_to_end(setup):
    root, dirs = setup
    cfg = config(root, dirs, "run", 'filters=[{rule: max_tool_calls, max: 1}]')
    summary = distill(cfg, progress=False)
    run = root / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["episode/turns"] >= 1 for m in metrics) and "episode/redundant_calls" in metrics[0]
    rows = SampleStore(run).rows("select transcript, turn_tokens, completion_ids, kept, reject_rule from rollouts")
    assert len(rows) == 24 and all(r["transcript"] for r in rows)
    for r in rows:  # the stored tokens are the model's, turn by turn
        messages = json.loads(r["transcript"])
        assert sum(r["turn_tokens"]) == len(r["completion_ids"])
        assert len(r["turn_tokens"]) == sum(m["role"] == "assistant" for m in messages)
        if sum(m["role"] == "tool" for m in messages) > 1:
            assert r["reject_rule"] == "max_tool_calls"
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and "episode/tool_calls" in evals[-1]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["task"]["env"] == ENV and manifest["task"]["env_params"] == {"reply": "ok", "max_calls": 2}
    assert summary["steps"] == 3


def test_episodes_refuse_what_cannot_read_the_same_transcript(setup):
    root, dirs = setup
    with pytest.raises(OpdError, match="teacher prompt schema is not supported"):
        distill(config(root, dirs, "r2", "task.teacher_prompt_schema=Q: {prompt}", "task.allow_schema_mismatch=true"),
                progress=False)
    with pytest.raises(OpdError, match="step\\(\\) must return \\(messages, done\\)|cannot load it"):
        distill(config(root, dirs, "r3", "task.env=python:tests.rollout.toy_envs:Missing"), progress=False)
