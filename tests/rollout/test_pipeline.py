"""Rollout pipeline: anchors, policy lag with importance weights, multi-teacher routing, schema check."""

import json

import pytest
import torch

import opd.loop as loop
from opd.config import load_config
from opd.errors import OpdError
from opd.objectives.select import make_objective
from opd.store.samples import SampleStore
from tests.test_loop import config, task_and_models  # noqa: F401  (module fixture: teacher + weak student)


def metrics_of(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_anchor_fraction_of_every_batch(task_and_models, tmp_path):
    root, paths, dirs = task_and_models
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("".join(json.dumps({"prompt": w + "=", "answer": w[::-1]}) + "\n" for w in ("abcd", "dcba")))
    out = root / "p-anchors"
    loop.distill(config(root, paths, dirs, f"out={out}", "train.steps=4", "rollout.batch_size=8",
                        f"anchors={{path: {anchors}, fraction: 0.25}}"), progress=False)
    rows = SampleStore(out).rows("select step, source, completion from rollouts")
    for step in range(1, 5):
        sources = [r["source"] for r in rows if r["step"] == step]
        assert sources.count("anchor") == 2 and sources.count("student") == 6
    assert {r["completion"] for r in rows if r["source"] == "anchor"} <= {"dcba", "abcd"}
    assert all(m["anchors"] == 2 for m in metrics_of(out))


@pytest.mark.slow
def test_staleness_tags_policy_versions_and_logs_the_lag(task_and_models):
    root, paths, dirs = task_and_models
    out = root / "p-stale"
    loop.distill(config(root, paths, dirs, f"out={out}", "train.steps=6", "rollout.batch_size=8",
                        "rollout.max_staleness=2"), progress=False)
    assert [m["policy_lag"] for m in metrics_of(out)] == [0, 1, 2, 0, 1, 2]
    versions = SampleStore(out).rows("select step, min(policy_version) as v, max(policy_version) as w "
                                     "from rollouts group by step order by step")
    assert [(r["v"], r["w"]) for r in versions] == [(0, 0), (0, 0), (0, 0), (3, 3), (3, 3), (3, 3)]
    with pytest.raises(OpdError, match="multiple of rollout.max_staleness"):
        config(root, paths, dirs, "rollout.max_staleness=2", "train.checkpoint_every=4")


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "sampled_reverse_kl"])
def test_importance_weight_for_stale_rollouts(name):
    """Stale rows carry truncated importance weights. Changed with the B1 fix (docs/objectives.md): the
    weight of position t is the *prefix* ratio prod_{j<t} p_S/p_sample (times the token's own ratio for
    the sampled estimator), no longer the token's ratio alone, which corrected nothing for exact KLs.
    Kept from before: weight 1 when sampled by the current policy, truncation at 2, a weight of 1/2
    halves the gradient."""
    from opd.methods.base import Chunk
    from opd.objectives.offpolicy import prefix_weights

    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7, requires_grad=True), torch.randn(2, 3, 7)
    ids = torch.randint(0, 7, (2, 3))
    mask = torch.ones(2, 3)
    objective = make_objective(load_config(None, ["teacher.model=t", "student.model=s", "task.builtin=x",
                                                  f"objective.name={name}", "objective.clip=null"]).objective)
    current = torch.log_softmax(s.detach(), -1).gather(-1, ids[..., None]).squeeze(-1)
    t_lp = torch.log_softmax(t, -1).gather(-1, ids[..., None]).squeeze(-1)

    def grad(sampling):
        weights = None if sampling is None else prefix_weights(
            current, sampling, mask, token_logprobs=current if objective.is_sampled else None)
        chunk = Chunk(student_logits=s, ids=ids, normalizer=6, teacher_logits=t, teacher_logprobs=t_lp,
                      weights=weights)
        return torch.autograd.grad(objective.loss(chunk), s)[0], weights

    fresh, _ = grad(None)
    same, w = grad(current)
    torch.testing.assert_close(same, fresh)  # sampled by the current policy: weight 1
    assert torch.equal(w, torch.ones_like(w))
    far, w = grad(current - 5.0)  # p_S/p_sample = e^5 per token: every weight truncated to 2 ...
    first = 1.0 if not objective.is_sampled else 2.0  # ... except an exact KL's first position (empty prefix)
    assert w[:, 0].tolist() == [first, first] and torch.equal(w[:, 1:], torch.full((2, 2), 2.0))
    torch.testing.assert_close(far, fresh * w[..., None])
    half, w = grad(current + torch.log(torch.tensor(2.0)))  # sampler twice as likely at every token
    expected = torch.tensor([1.0, 0.5, 0.25]) if not objective.is_sampled else torch.tensor([0.5, 0.25, 0.125])
    torch.testing.assert_close(w, expected.expand(2, 3))
    torch.testing.assert_close(half, fresh * w[..., None])


@pytest.mark.slow
def test_each_rollout_is_scored_by_the_teacher_of_its_task(task_and_models, tmp_path):
    root, paths, dirs = task_and_models
    def tag_file(src, dst):
        rows = [json.loads(l) for l in src.read_text().splitlines()]
        dst.write_text("".join(json.dumps({**r, "tag": "short" if len(r["prompt"]) <= 3 else "long"}) + "\n"
                               for r in rows))
        return dst

    tagged = tag_file(paths["train"], tmp_path / "tagged.jsonl")
    tagged_eval = tag_file(paths["eval"], tmp_path / "tagged_eval.jsonl")
    out = root / "p-multi"
    teachers = (f"teachers=[{{name: strong, model: {dirs['teacher']}, tasks: [long]}}, "
                f"{{name: weak, model: {dirs['student']}, tasks: [short]}}]")
    loop.distill(config(root, paths, dirs, f"out={out}", f"task.train={tagged}", f"task.eval={tagged_eval}",
                        "train.steps=3", teachers),
                 progress=False)
    stored = SampleStore(out).rows("select prompt, task_tag, teacher from rollouts")
    assert {r["task_tag"] for r in stored} == {"short", "long"}
    for r in stored:
        assert r["teacher"] == ("weak" if r["task_tag"] == "short" else "strong")
    logged = {k for m in metrics_of(out) for k in m}
    assert {"teacher_logprob/strong", "teacher_logprob/weak"} <= logged
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in manifest["teachers"]] == ["strong", "weak"]
    with pytest.raises(OpdError, match="no teacher for task tag 'short'"):
        loop.distill(config(root, paths, dirs, f"out={root / 'p-multi-bad'}", f"task.train={tagged}",
                            f"task.eval={tagged_eval}",
                            "train.steps=1", f"teachers=[{{name: strong, model: {dirs['teacher']}, tasks: [long]}}]"),
                     progress=False)


@pytest.mark.slow
def test_schema_mismatch_is_an_error_unless_allowed(task_and_models):
    root, paths, dirs = task_and_models
    with pytest.raises(OpdError, match="prompt schema mismatch"):
        loop.distill(config(root, paths, dirs, f"out={root / 'p-schema'}", "task.teacher_prompt_schema='a{prompt}'"),
                     progress=False)
    out = root / "p-schema-ok"
    loop.distill(config(root, paths, dirs, f"out={out}", "task.teacher_prompt_schema='a{prompt}'",
                        "task.allow_schema_mismatch=true", "train.steps=2"), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt_schema"]["teachers"]["teacher"]["identical"] is False
    same = root / "p-schema-same"
    loop.distill(config(root, paths, dirs, f"out={same}", "train.steps=1"), progress=False)
    assert json.loads((same / "manifest.json").read_text())["prompt_schema"]["teachers"]["teacher"]["identical"]
