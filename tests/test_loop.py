"""The OPD loop end to end on a tiny string-reversal task, through the user's JSONL path."""

import itertools
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

import opd.loop as loop
import opd.rollout.producer as producer_module
import opd.rollout.teachers as teachers_module
from opd.backends.hf import init_model, load_model, weights_sha256
from opd.config import load_config
from opd.objectives.select import make_objective
from opd.rollout.sampler import Batch
from opd.train.optim import make_optimizer
from opd.train.sft import run_sft
from opd.train.step import score
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
    """A strong teacher (SFT to ~1.0) and a weak student (a few SFT steps), both from a config."""
    root = tmp_path_factory.mktemp("opd-loop")
    paths = write_reversal_task(root)
    train = load_jsonl(paths["train"])
    schema = PromptSchema.from_spec("{prompt}")
    dirs = {}
    for name, layers, hidden, steps in (("teacher", 2, 64, 300), ("student", 2, 32, 60)):
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


@pytest.mark.slow
def test_distill_moves_a_weak_student_to_the_teacher(task_and_models, monkeypatch):
    root, paths, dirs = task_and_models
    loaded, generated_by = {}, []
    real_load, real_generate = loop.load_model, producer_module.generate

    def spy_load(name, **kw):
        m = real_load(name, **kw)
        loaded["student" if kw.get("trainable") else "teacher"] = m
        return m

    def spy_generate(model, *a, **kw):
        generated_by.append(model)
        return real_generate(model, *a, **kw)

    monkeypatch.setattr(loop, "load_model", spy_load)
    monkeypatch.setattr(teachers_module, "load_model", spy_load)
    monkeypatch.setattr(producer_module, "generate", spy_generate)
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
    assert weights_sha256(fresh) == manifest["teacher"]["weights_sha256"]  # the weights as stored
    used = manifest["teacher"]["precision"]["dtype"]  # scored in this precision (auto: bf16 if native)
    assert weights_sha256(loaded["teacher"].model) == weights_sha256(fresh.to(getattr(torch, used)))
    assert weights_sha256(loaded["student"].model) != manifest["student"]["weights_sha256"]
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

    real_update = loop.update
    calls = {"n": 0}

    def crashing_update(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return real_update(*a, **kw)

    monkeypatch.setattr(loop, "update", crashing_update)
    cfg = config(root, paths, dirs, f"out={root / 'r-crash'}", *common)
    with pytest.raises(RuntimeError):
        loop.distill(cfg, progress=False)
    monkeypatch.setattr(loop, "update", real_update)
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


def _tiny_batch(tok):
    ids = [tok(w).input_ids for w in ("ab=", "abcd=")]
    from opd.rollout.sampler import left_pad

    p_ids, p_mask = left_pad(ids, tok.pad_token_id)
    a, b = (tok(c, add_special_tokens=False).input_ids[0] for c in "ab")
    eos, pad = tok.eos_token_id, tok.pad_token_id
    c_ids = torch.tensor([[b, a, eos, pad], [a, b, a, eos]])
    c_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    return Batch(p_ids, p_mask, c_ids, c_mask, torch.zeros(2, 4), torch.zeros(2, dtype=torch.bool))


def student_and_teacher(model_dir):
    """A trainable student and a frozen teacher that differs from it (perturbed copy)."""
    student = load_model(str(model_dir), trainable=True)
    teacher = load_model(str(model_dir))
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def _grads(student, teacher, batch, objective_name="auto", micro=0, chunk=None, method="opd", precision="float32"):
    cfg = load_config(None, ["teacher.model=t", "student.model=s", "task.builtin=x",
                             f"objective.name={objective_name}", f"train.micro_batch_size={micro}",
                             f"train.precision={precision}"]  # exact identities need float32 arithmetic
                      + ([f"train.logits_chunk={chunk}"] if chunk else []))
    student.model.zero_grad()
    opt, sched = make_optimizer(student.model, lr=0.0)
    objective = make_objective(cfg.objective)
    teacher_scores, teacher_lp = score(teacher.model, batch)
    # lr=0: the update leaves weights alone but the gradients are computed (clipping off to compare raw)
    cfg.train.grad_clip = 0
    params = list(student.model.parameters())
    captured = {}
    real_step = opt.step

    def capture():
        captured["g"] = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone()
        real_step()

    opt.step = capture
    advantages = torch.linspace(-1, 1, batch.prompt_ids.shape[0]) if method in ("rl", "opd+rl") else None
    stats = loop.update(student.model, opt, sched, objective, batch, teacher_scores, cfg.train, method=method,
                        teacher_logprobs=teacher_lp, advantages=advantages)
    return captured["g"], stats


@pytest.mark.parametrize("objective", ["reverse_kl", "sampled_reverse_kl", "jsd"])
def test_prompt_and_padding_never_enter_the_loss(tiny_model_dir, objective):
    student, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(student.tokenizer)
    g0, s0 = _grads(student, teacher, batch, objective)
    assert g0.abs().sum() > 0
    batch.completion_ids[0, 3] = 5  # after EOS: padding
    batch.prompt_ids[0, 0] = 6  # left padding of the shorter prompt
    g1, s1 = _grads(student, teacher, batch, objective)
    torch.testing.assert_close(g0, g1)
    assert s0["loss"] == pytest.approx(s1["loss"], rel=1e-5)


@pytest.mark.parametrize("objective,method", [("reverse_kl", "opd"), ("sampled_reverse_kl", "opd"), ("jsd", "opd"),
                                              ("forward_kl", "opd+rl"), ("auto", "sft"), ("auto", "rl")])
def test_chunked_loss_equals_the_whole_batch_loss(tiny_model_dir, objective, method):
    """Token chunks of 1..3 tokens (logits_chunk below the vocabulary size) give the loss, the
    gradient and the statistics of a single whole-batch chunk."""
    student, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(student.tokenizer)
    vocab = student.model.config.vocab_size
    g_whole, s_whole = _grads(student, teacher, batch, objective, method=method, chunk=vocab * 64)
    for chunk in (1, 2 * vocab + 1, 3 * vocab):  # 1 = a token per chunk (the minimum)
        g_chunk, s_chunk = _grads(student, teacher, batch, objective, method=method, chunk=chunk)
        torch.testing.assert_close(g_whole, g_chunk, atol=1e-6, rtol=1e-4)
        for key in s_whole:
            assert s_chunk[key] == pytest.approx(s_whole[key], rel=1e-5, abs=1e-7), key


def test_chunked_teacher_logits_match_a_plain_forward(tiny_model_dir):
    """Hidden states + head (what the teacher keeps) reproduce the model's own logits and log-probs."""
    from opd.rollout.sampler import completion_logits
    from opd.objectives.select import token_logprobs

    _, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(teacher.tokenizer)
    scores, logprobs = score(teacher.model, batch)
    direct = completion_logits(teacher.model, batch).float()
    torch.testing.assert_close(scores.logits(), direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logprobs, token_logprobs(direct, batch.completion_ids) * batch.completion_mask,
                               atol=1e-5, rtol=1e-5)


def test_bfloat16_autocast_update_stays_close_to_float32(tiny_model_dir):
    """train.precision bfloat16: the student's matmuls run in bf16 (the gradient differs from float32)
    while weights, loss and optimizer stay float32 (the difference is small)."""
    student, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(student.tokenizer)
    g32, s32 = _grads(student, teacher, batch, precision="float32")
    g16, s16 = _grads(student, teacher, batch, precision="bfloat16")
    assert not torch.equal(g32, g16)
    assert float((g16 - g32).norm() / g32.norm()) < 0.05
    assert s16["loss"] == pytest.approx(s32["loss"], rel=0.05)
    assert all(p.dtype == torch.float32 for p in student.model.parameters())


def test_micro_batches_give_the_same_update(tiny_model_dir):
    student, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(student.tokenizer)
    g_full, s_full = _grads(student, teacher, batch, micro=0)
    g_split, s_split = _grads(student, teacher, batch, micro=1)
    torch.testing.assert_close(g_full, g_split, atol=1e-6, rtol=1e-4)
    assert s_full["loss"] == pytest.approx(s_split["loss"], rel=1e-5)


@pytest.mark.slow
def test_non_finite_loss_skips_the_update_then_aborts(task_and_models, monkeypatch):
    """A NaN loss must not touch the weights; K in a row stop the run with a clear message."""
    from opd.errors import OpdError

    root, paths, dirs = task_and_models
    real_loss = loop.make_objective(load_config(None, ["teacher.model=t", "student.model=s", "task.builtin=x"]).objective)
    poisoned_steps = {3, 5, 6, 7}
    state = {"step": 0}
    real_update = loop.update

    def counting_update(*a, **kw):
        state["step"] += 1
        return real_update(*a, **kw)

    class NaNOnSomeSteps:
        name, params = real_loss.name, real_loss.params

        def loss(self, *a, **kw):
            value = real_loss.loss(*a, **kw)
            return value * float("nan") if state["step"] in poisoned_steps else value

    monkeypatch.setattr(loop, "update", counting_update)
    monkeypatch.setattr(loop, "make_objective", lambda *a, **kw: NaNOnSomeSteps())
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
    real_update, calls = loop.update, {"n": 0}

    def crashing_update(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash before any checkpoint")
        return real_update(*a, **kw)

    monkeypatch.setattr(loop, "update", crashing_update)
    with pytest.raises(RuntimeError):
        loop.distill(cfg, progress=False)
    monkeypatch.setattr(loop, "update", real_update)
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


@pytest.mark.parametrize("objective", ["reverse_kl", "jsd"])
def test_logged_reverse_kl_is_the_exact_per_token_kl(tiny_model_dir, objective):
    """The metric is KL(student || teacher) per completion token, whichever loss is trained."""
    from opd.objectives.divergences import per_token_reverse_kl
    from opd.rollout.sampler import completion_logits

    student, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(student.tokenizer)
    with torch.no_grad():
        expected = per_token_reverse_kl(completion_logits(student.model, batch), completion_logits(teacher.model, batch))
    mask = batch.completion_mask.bool()
    _, stats = _grads(student, teacher, batch, objective)
    assert stats["reverse_kl"] == pytest.approx(float(expected[mask].mean()), rel=1e-5)


def test_a_model_whose_head_is_not_a_plain_linear_keeps_full_logits(tiny_model_dir):
    """If head(body(x)) does not reproduce the model's logits (e.g. logit soft-capping), the chunked
    path falls back to the model's own logits instead of silently training on the wrong ones."""
    from opd.train.chunked import split_lm
    from opd.rollout.sampler import completion_logits

    teacher = load_model(str(tiny_model_dir)).model
    real_forward = teacher.forward

    def capped(*a, **kw):
        out = real_forward(*a, **kw)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out

    teacher.forward = capped
    body, head = split_lm(teacher)
    assert body is None and head(torch.ones(2)).tolist() == [1.0, 1.0]
    batch = _tiny_batch(load_model(str(tiny_model_dir)).tokenizer)
    scores, _ = score(teacher, batch)
    torch.testing.assert_close(scores.logits(), completion_logits(teacher, batch).float())


@pytest.mark.parametrize("method", ["opd", "rl"])
def test_update_gradient_equals_plain_autograd_on_full_logits(tiny_model_dir, method):
    """The chunked update (student body once, head + loss per chunk, gradient handed back to the body;
    the head tied to the embedding) gives the gradient of the textbook loss on full logits."""
    from opd.objectives.divergences import reverse_kl
    from opd.objectives.reward import policy_gradient_loss
    from opd.objectives.select import token_logprobs
    from opd.rollout.sampler import completion_logits

    student, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(student.tokenizer)
    advantages = torch.tensor([1.0, -0.5])
    mask, model = batch.completion_mask, student.model
    logits = completion_logits(model, batch).float()
    if method == "opd":
        loss = reverse_kl(logits, completion_logits(teacher.model, batch).float().detach(), mask, normalizer=mask.sum())
    else:
        loss = policy_gradient_loss(token_logprobs(logits, batch.completion_ids), advantages, mask, normalizer=mask.sum())
    model.zero_grad()
    loss.backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
    model.zero_grad()
    cfg = load_config(None, ["teacher.model=t", "student.model=s", "task.builtin=x", "train.precision=float32",
                             "train.grad_clip=0"])
    opt, sched = make_optimizer(model, lr=0.0)
    captured, real_step = {}, opt.step

    def capture():
        captured["g"] = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
        real_step()

    opt.step = capture
    scores, teacher_lp = score(teacher.model, batch)
    stats = loop.update(model, opt, sched, make_objective(cfg.objective), batch, scores, cfg.train, method=method,
                        teacher_logprobs=teacher_lp, advantages=advantages if method == "rl" else None)
    assert stats["loss"] == pytest.approx(float(loss), rel=1e-5)
    torch.testing.assert_close(captured["g"], expected, atol=1e-6, rtol=1e-4)
