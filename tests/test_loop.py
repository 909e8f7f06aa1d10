"""The OPD loop end to end on a tiny string-reversal task, through the user's JSONL path."""

import itertools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import opd.loop as loop
import opd.rollout.backend as backend_module
import opd.run as run_module
import opd.teachers.local as local_teacher_module
from opd.backends.hf import init_model, load_model, weights_sha256
from opd.backends.weights import files_sha256, safetensors_files
from opd.config import load_config
from opd.train.sft import run_sft
from opd.tasks.data import load_jsonl
from opd.tasks.schema import PromptSchema


def write_reversal_task(root, n_train=1500, n_eval=150):
    """Reverse a 1-4 letter string: prompt 'abca=' -> answer 'acba'. Disjoint train/eval prompts."""
    words = ["".join(p) for n in range(1, 5) for p in itertools.product("abcd", repeat=n)]
    rng = random.Random(0)
    rng.shuffle(words)
    held = set(words[:60])
    rows = {"train": [w for w in words if w not in held], "eval": sorted(held)}
    paths = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        pool = rows[split]
        paths[split] = root / f"{split}.jsonl"
        with open(paths[split], "w") as f:
            for i in range(n if split == "train" else len(pool)):
                w = pool[i % len(pool)] if split == "eval" else rng.choice(pool)
                f.write(json.dumps({"prompt": w + "=", "answer": w[::-1]}) + "\n")
    return paths


@pytest.fixture(scope="module")
def task_and_models(tmp_path_factory):
    """A strong teacher (SFT to ~1.0; 500 steps: 300 gave 0.87 on AMD EPYC) and a weak student (a few SFT steps), both from a config."""
    root = tmp_path_factory.mktemp("opd-loop")
    paths = write_reversal_task(root)
    train = load_jsonl(paths["train"])
    schema = PromptSchema.from_spec("{prompt}")
    dirs = {}
    for name, layers, hidden, steps in (("teacher", 2, 64, 500), ("student", 2, 32, 60)):
        out = init_model("qwen3", layers, hidden, 4, ["abcd="], root / name, seed=0)
        m = load_model(str(out), trainable=True)
        run_sft(m.model, m.tokenizer, train, schema, steps=steps, batch_size=32, lr=3e-3, warmup_steps=20,
                progress=False)
        m.model.save_pretrained(out)
        dirs[name] = out
    return root, paths, dirs


def config(root, paths, dirs, *extra):
    return load_config(None, [f"teacher.model={dirs['teacher']}", f"student.model={dirs['student']}",
                              f"task.train={paths['train']}", f"task.eval={paths['eval']}",
                              "rollout.batch_size=32", "rollout.max_new_tokens=8", "train.steps=300",
                              "train.lr=3e-3", "train.eval_every=100", "train.checkpoint_every=0",
                              "train.warmup_steps=5", f"out={root / 'run'}", *extra])


def crash_at_update(monkeypatch, n: int, cfg) -> None:
    """Run distill with the n-th update raising (a simulated crash), then restore the real update."""
    real_update, calls = loop.update, {"n": 0}

    def crashing_update(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real_update(*a, **kw)

    monkeypatch.setattr(loop, "update", crashing_update)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.distill(cfg, progress=False)
    monkeypatch.setattr(loop, "update", real_update)


@pytest.mark.slow
def test_distill_moves_a_weak_student_to_the_teacher(task_and_models, monkeypatch):
    root, paths, dirs = task_and_models
    loaded, generated_by = {}, []
    real_load, real_generate = run_module.load_model, backend_module.generate

    def spy_load(name, **kw):
        m = real_load(name, **kw)
        loaded["student" if kw.get("trainable") else "teacher"] = m
        return m

    def spy_generate(model, *a, **kw):
        if not kw.get("greedy"):  # a rollout (greedy decoding is evaluation)
            generated_by.append(model)
        return real_generate(model, *a, **kw)

    monkeypatch.setattr(run_module, "load_model", spy_load)
    monkeypatch.setattr(local_teacher_module, "load_model", spy_load)
    monkeypatch.setattr(backend_module, "generate", spy_generate)  # the student's rollouts
    monkeypatch.setattr(local_teacher_module, "generate", spy_generate)  # a teacher's (must not happen)
    cfg = config(root, paths, dirs, f"out={root / 'run-main'}")
    summary = loop.distill(cfg, progress=False)

    # The teacher is strong, the student starts weak and closes most of the gap.
    assert summary["teacher_accuracy"] >= 0.9
    assert summary["teacher_accuracy"] - summary["student_accuracy_before"] >= 0.3
    assert summary["gap_closed"] >= 0.6, summary
    # Rollouts come from the student, never the teacher; the teacher's weights never change.
    assert generated_by and all(m is loaded["student"].model for m in generated_by)
    manifest = json.loads((root / "run-main" / "manifest.json").read_text())
    fresh = load_model(str(dirs["teacher"])).model
    # the weights as stored: the safetensors files, streamed (what `sha256sum`-style checks see)
    assert manifest["teacher"]["weights_sha256"] == files_sha256(safetensors_files(dirs["teacher"]))
    assert manifest["teacher"]["weights_hashed"] == "safetensors files"
    used = manifest["teacher"]["precision"]["dtype"]  # scored in this precision (auto: bf16 if native)
    assert weights_sha256(loaded["teacher"].model) == weights_sha256(fresh.to(getattr(torch, used)))
    assert files_sha256(safetensors_files(root / "run-main" / "student")) != manifest["student"]["weights_sha256"]
    assert not any(p.requires_grad for p in loaded["teacher"].model.parameters())


@pytest.mark.slow
def test_run_directory_has_every_record(task_and_models):
    root, paths, dirs = task_and_models
    out = root / "run-files"
    loop.distill(config(root, paths, dirs, f"out={out}", "train.steps=12", "train.eval_every=5"), progress=False)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    for key in ("loss", "reverse_kl", "completion_len", "tokens_per_s"):
        assert all(isinstance(m[key], float) for m in metrics), key
    evals = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 5, 10, 12]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "steps", "wall_seconds"):
        assert key in summary
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["objective"]["name"] == "reverse_kl" and manifest["objective"]["requested"] == "auto"
    assert len(manifest["teacher"]["weights_sha256"]) == 64 and manifest["prompt_schema"]["hash"]
    for key in ("tokenizer", "rollout", "seeds", "code", "versions", "filters"):
        assert key in manifest
    assert (out / "config.yaml").exists()
    AutoModelForCausalLM.from_pretrained(out / "student")


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_uninterrupted_run(task_and_models, monkeypatch):
    root, paths, dirs = task_and_models
    common = ["train.steps=10", "train.checkpoint_every=4", "train.eval_every=5"]
    straight = loop.distill(config(root, paths, dirs, f"out={root / 'r-straight'}", *common), progress=False)

    cfg = config(root, paths, dirs, f"out={root / 'r-crash'}", *common)
    crash_at_update(monkeypatch, 7, cfg)
    resumed = loop.distill(cfg, resume=True, progress=False)

    a = load_model(str(root / "r-straight" / "student")).model
    b = load_model(str(root / "r-crash" / "student")).model
    assert weights_sha256(a) == weights_sha256(b)
    steps = [json.loads(l)["step"] for l in (root / "r-crash" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
    from opd.store.samples import SampleStore

    per_step = SampleStore(root / "r-crash").rows("select step, count(*) as n from rollouts group by 1 order by 1")
    assert per_step == [{"step": s, "n": 32} for s in range(1, 11)]  # each step's rollouts stored once
    assert resumed["student_accuracy_after"] == straight["student_accuracy_after"]


@pytest.mark.slow
def test_non_finite_loss_skips_the_update_then_aborts(task_and_models, monkeypatch):
    """A NaN loss must not touch the weights; K in a row stop the run with a clear message."""
    from opd.errors import OpdError

    root, paths, dirs = task_and_models
    real_loss = run_module.make_objective(load_config(None, ["teacher.model=t", "student.model=s",
                                                             "task.builtin=x"]).objective)
    poisoned_steps = {3, 5, 6, 7}
    state = {"step": 0}
    real_update = loop.update

    def counting_update(*a, **kw):
        state["step"] += 1
        return real_update(*a, **kw)

    class NaNOnSomeSteps:
        name, params, is_sampled, temperature = real_loss.name, real_loss.params, False, 1.0

        def loss(self, *a, **kw):
            value = real_loss.loss(*a, **kw)
            return value * float("nan") if state["step"] in poisoned_steps else value

    monkeypatch.setattr(loop, "update", counting_update)
    monkeypatch.setattr(run_module, "make_objective", lambda *a, **kw: NaNOnSomeSteps())
    out = root / "run-nan"
    with pytest.raises(OpdError, match="aborting at step 7: 3 consecutive non-finite"):
        loop.distill(config(root, paths, dirs, f"out={out}", "train.steps=20"), progress=False)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 8))
    assert [m["update_applied"] for m in metrics] == [True, True, False, True, False, False, False]


@pytest.mark.slow
def test_filters_reject_with_reasons_and_the_store_keeps_every_sample(task_and_models, capsys):
    """Rejected rollouts never train, are stored with their rule, counted per step, and inspectable."""
    from opd.cli.main import main
    from opd.store.samples import SampleStore

    root, paths, dirs = task_and_models
    out = root / "run-filters"
    filters = "filters=[{rule: max_tokens, n: 3}, {rule: verifier, keep: passing}]"
    loop.distill(config(root, paths, dirs, f"out={out}", "train.steps=6", "train.eval_every=3", filters),
                 progress=False)
    store = SampleStore(out)
    rows = store.rows("select step, kept, reject_rule, correct, completion_ids, truncated from rollouts")
    assert len(rows) == 6 * 32
    for r in rows:
        too_long = r["truncated"] or len(r["completion_ids"]) - 1 > 3
        expected = "max_tokens" if too_long else (None if r["correct"] else "verifier")
        assert r["reject_rule"] == expected and r["kept"] == (expected is None)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        step_rows = [r for r in rows if r["step"] == m["step"]]
        assert m["reject/verifier"] == sum(r["reject_rule"] == "verifier" for r in step_rows)
        assert m["kept"] == sum(r["kept"] for r in step_rows)
    assert {r["reject_rule"] for r in rows} >= {"verifier"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["rule"] for f in manifest["filters"]] == ["max_tokens", "verifier"]
    evals = store.rows("select step, count(*) as n from evals group by step order by step")
    assert [e["step"] for e in evals] == [0, 3, 6]

    capsys.readouterr()
    assert main(["inspect", str(out), "--rejected", "--limit", "5"]) == 0
    assert "verifier" in capsys.readouterr().out
    assert main(["inspect", str(out), "--failures"]) == 0
    assert "=" in capsys.readouterr().out  # prompts of failed eval answers
    assert main(["inspect", str(out), "--sql", "select reject_rule, count(*) as n from rollouts group by 1"]) == 0
    assert "verifier" in capsys.readouterr().out


def test_unknown_filter_rule_is_a_config_error():
    from opd.errors import OpdError

    with pytest.raises(OpdError, match="unknown filter rule 'lenght'"):
        load_config(None, ["teacher.model=t", "student.model=s", "task.builtin=x", "filters=[{rule: lenght}]"])


@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_over_without_duplicates(task_and_models, monkeypatch):
    root, paths, dirs = task_and_models
    cfg = config(root, paths, dirs, f"out={root / 'r-nockpt'}", "train.steps=6", "train.eval_every=3")
    crash_at_update(monkeypatch, 4, cfg)  # before any checkpoint
    loop.distill(cfg, resume=True, progress=False)
    steps = [json.loads(l)["step"] for l in (root / "r-nockpt" / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(l)["step"] for l in (root / "r-nockpt" / "eval.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7)) and evals == [0, 3, 6]


@pytest.mark.slow
def test_rl_with_anchors_gives_anchor_rows_no_reward_term(task_and_models):
    root, paths, dirs = task_and_models
    out = root / "r-rl-anchors"
    loop.distill(config(root, paths, dirs, f"out={out}", "method=rl", "rollout.batch_size=7",
                        "rollout.samples_per_prompt=3", f"anchors={{path: {paths['train']}, fraction: 0.3}}",
                        "train.steps=3"), progress=False)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["anchors"] for m in metrics] == [2, 2, 2]  # 5 prompts x 3 samples + 2 anchor traces


@pytest.mark.slow
def test_a_student_made_worse_is_reported_and_can_stop_the_run(task_and_models, capsys):
    """Held-out accuracy below the start by more than its interval at two evaluations in a row: a loud
    warning, and with train.stop_on_regression the run ends there."""
    root, paths, dirs = task_and_models
    out = root / "run-regress"
    summary = loop.distill(config(root, paths, dirs, f"out={out}", "train.steps=60", "train.eval_every=4",
                                  "train.lr=0.3", "train.warmup_steps=0", "train.stop_on_regression=true",
                                  "method=rl", "rollout.samples_per_prompt=4", "rollout.batch_size=8"),
                           progress=False)
    err = capsys.readouterr().err
    assert "WARNING: held-out accuracy fell" in err and "stopping (train.stop_on_regression)" in err
    assert summary["regressed_at"] and summary["steps"] == summary["regressed_at"][0] < 60
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["below_start"] for e in evals[-2:]] == [True, True]
