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


def test_teacher_sampled_episodes_train_sft_and_mixed(setup):
    """method sft / mixed: the teacher writes the assistant turns of the same environment's episodes."""
    root, dirs = setup
    for method in ("sft", "mixed"):
        run = root / f"run-{method}"
        distill(config(root, dirs, run.name, f"method.name={method}", "train.steps=2", "train.eval_every=2"),
                progress=False)
        rows = SampleStore(run).rows("select source, transcript, turn_tokens, completion_ids from rollouts")
        assert len(rows) == 16 and all(r["transcript"] for r in rows)
        if method == "sft":
            assert {r["source"] for r in rows} == {"teacher"}
        assert all(sum(r["turn_tokens"]) == len(r["completion_ids"]) for r in rows)


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_ranks_run_the_same_episodes(setup, fsdp):
    """Episodes end at different turns on different ranks; replicated and FSDP2, the 2-rank job equals one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from opd.config import save_config

    root, dirs = setup
    single = f"one-{fsdp}"
    distill(config(root, dirs, single), progress=False)
    cfg = config(root, dirs, f"two-{fsdp}", f"train.fsdp={str(fsdp).lower()}")
    path = root / f"two-{fsdp}.yaml"
    save_config(cfg, path)
    assert yaml.safe_load(path.read_text())["task"]["env"] == ENV
    opd = str(Path(sys.executable).parent / "opd")
    done = subprocess.run([opd, "distill", str(path), "--nproc", "2", "--no-progress"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a = [json.loads(line) for line in (root / single / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (root / f"two-{fsdp}" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(a, b):
        assert (y["kept"], y["episode/turns"], y["episode/tool_calls"]) == (x["kept"], x["episode/turns"],
                                                                          x["episode/tool_calls"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-7)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4, abs=1e-7)


@pytest.mark.slow
def test_a_user_environment_with_a_teacher_made_by_opd_sft_on_transcripts(tmp_path):
    """The documented user path, no downloads: `opd init-model` (its chat template), `opd sft` on
    {"messages"} rows of the user's own environment, then `opd distill` with task.env from its module."""
    from opd.cli.main import main

    rows = [{"prompt": f"a{i}", "answer": str(i % 10)} for i in range(60)]
    for split, part in (("train", rows[:50]), ("eval", rows[50:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    # the teacher's episodes: ask the tool ("?"), read its reply, answer
    episodes = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": "?"},
                              {"role": "tool", "content": "ok"}, {"role": "assistant", "content": r["answer"]}]}
                for r in rows[:50]]
    (tmp_path / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    (tmp_path / "chars.txt").write_text("a0123456789?ok")
    for name, hidden in (("teacher", 48), ("student", 32)):
        assert main(["init-model", "--layers", "2", "--hidden", str(hidden), "--heads", "4", "--tokenizer-data",
                     str(tmp_path / "chars.txt"), "--out", str(tmp_path / f"{name}-init")]) == 0
    assert main(["sft", "--model", str(tmp_path / "teacher-init"), "--data", str(tmp_path / "episodes.jsonl"),
                 "--steps", "150", "--batch-size", "16", "--lr", "3e-3", "--warmup", "10",
                 "--out", str(tmp_path / "teacher"), "--no-progress"]) == 0
    cfg = load_config(None, [f"teacher.model={tmp_path / 'teacher'}", f"student.model={tmp_path / 'student-init'}",
                             f"task.train={tmp_path / 'train.jsonl'}", f"task.eval={tmp_path / 'eval.jsonl'}",
                             f"task.env={ENV}", "task.env_params={max_calls: 1}", "rollout.max_turns=3",
                             "rollout.batch_size=8", "rollout.max_new_tokens=3", "train.steps=4", "train.eval_every=4",
                             "train.checkpoint_every=0", "logging.report=false", f"out={tmp_path / 'run'}"])
    summary = distill(cfg, progress=False)
    evals = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    # the teacher learnt the episodes (one call, then the answer) and generalises to the 10 unseen prompts well
    # above chance (0.1): 0.9 on the earlier CI machine, 0.7 on this project's AMD EPYC machines (numerics)
    assert evals[0]["teacher_accuracy"] >= 0.6
    assert summary["steps"] == 4 and evals[-1]["episode/turns"] >= 1
