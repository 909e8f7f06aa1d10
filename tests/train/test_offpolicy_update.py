"""The fixes of the review, through the update step: stale rows weighted by their prefix (B1), the
reward term refused on stale rollouts (B2), one temperature for both models (B3), the sampled
estimator only on rows it is valid for (B4)."""

import pytest
import torch

from opd.config import load_config
from opd.errors import OpdError
from opd.methods import make_method, method_class
from opd.objectives.divergences import per_token_reverse_kl
from opd.objectives.offpolicy import prefix_weights
from opd.objectives.select import IS_CLIP, make_objective, token_logprobs
from opd.batch import completion_logits
from opd.teachers.local import score
from opd.train.optim import make_optimizer
from opd.train.step import update, weighted_rows
from tests.train.test_step import _tiny_batch, student_and_teacher

BASE = ["teacher.model=t", "student.model=s", "task.builtin=x", "train.grad_clip=0"]


def _run(student, teacher, batch, objective_name, *, weighted=None, temperature=1.0, rollout_temperature=1.0,
         method="opd"):
    cfg = load_config(None, BASE + [f"objective.name={objective_name}", f"objective.temperature={temperature}"])
    opt, sched = make_optimizer(student.model, lr=0.0)
    params = [p for p in student.model.parameters()]
    captured, real_step = {}, opt.step

    def capture():
        captured["g"] = torch.cat([p.grad.flatten() for p in params if p.grad is not None]).clone()
        real_step()

    opt.step = capture
    stats = update(student.model, opt, sched, make_method(method_class(method).Options()),
                   make_objective(cfg.objective), batch, cfg.train, scores=score(teacher.model, batch),
                   weighted=weighted, rollout_temperature=rollout_temperature)
    return stats, captured["g"]


def test_stale_rows_weight_the_exact_kl_by_their_prefix_ratio(tiny_model_dir):
    """B1: position t of a stale row is weighted by prod_{j<t} p_S/q, so the first token's weight is 1 and
    the loss is sum_t w_t KL_t / N (the old code weighted each position by its own token's ratio)."""
    student, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(student.tokenizer)
    with torch.no_grad():
        s_logits = completion_logits(student.model, batch).float()
        t_logits = completion_logits(teacher.model, batch).float()
        current = token_logprobs(s_logits, batch.completion_ids)
    batch.sample_logprobs = current + torch.tensor([[0.7, -0.4, 0.2, 0.0], [0.3, 0.5, -0.6, 0.1]])  # an older q
    stats, _ = _run(student, teacher, batch, "reverse_kl", weighted=torch.tensor([True, False]))
    mask = batch.completion_mask
    w = prefix_weights(current, batch.sample_logprobs, mask, clip=IS_CLIP)
    w[1] = mask[1].float()  # the fresh row keeps weight 1
    kl = per_token_reverse_kl(s_logits, t_logits)
    expected = float((w * kl * mask).sum() / mask.sum())
    old = float(((current - batch.sample_logprobs).exp().clamp(max=2.0) * torch.tensor([[1.0], [0.0]])
                 + torch.tensor([[0.0], [1.0]])).mul(kl * mask).sum() / mask.sum())
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(stats["loss"] - old) > 1e-3  # what the token-ratio weighting would have given


@pytest.mark.parametrize("method", ["rl", "opd+rl"])
def test_reward_methods_refuse_stale_rollouts(method):
    """B2: the reward term has no correct off-policy weight here, so the combination is refused."""
    with pytest.raises(OpdError, match="rollout.max_staleness: 0"):
        load_config(None, BASE + [f"method={method}", "rollout.max_staleness=1", "train.checkpoint_every=0"])


@pytest.mark.parametrize("objective", ["reverse_kl", "forward_kl", "jsd", "skew_kl", "skew_reverse_kl",
                                       "topk_reverse_kl", "topk_forward_kl", "sampled_reverse_kl"])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("rows", ["student", "teacher", "anchor"])
def test_a_student_equal_to_its_teacher_gets_no_gradient(tiny_model_dir, objective, temperature, rows):
    """B3/B4: with both models' log-probs at the same temperature, student = teacher is a fixed point of
    every objective, whoever sampled the rows (the old sampled estimator compared a teacher at T = 1
    with a student at T and moved it)."""
    from opd.backends.hf import load_model

    student = load_model(str(tiny_model_dir), trainable=True)
    teacher = load_model(str(tiny_model_dir))
    batch = _tiny_batch(student.tokenizer)
    with torch.no_grad():  # the sampler's log-probs, at the rollout temperature 1 (another policy for teacher rows)
        batch.sample_logprobs = token_logprobs(completion_logits(student.model, batch), batch.completion_ids) - 0.3
    cfg = load_config(None, BASE + [f"objective.name={objective}", f"objective.temperature={temperature}"])
    weighted = weighted_rows(make_objective(cfg.objective), [rows] * 2, lag=0, rollout_temperature=1.0)
    stats, grad = _run(student, teacher, batch, objective, weighted=weighted, temperature=temperature)
    assert float(grad.abs().max()) < 1e-6, (objective, temperature, rows, float(grad.abs().max()))


def test_which_rows_are_weighted():
    """B4: exact divergences reweight stale student rows only; the sampled estimator every row it was not
    sampled from (stale, teacher-sampled, another rollout temperature)."""
    cfg = load_config(None, BASE)
    exact = make_objective(cfg.objective)
    sampled = make_objective(load_config(None, BASE + ["objective.name=sampled_reverse_kl"]).objective)
    sources = ["student", "teacher", "anchor"]
    assert weighted_rows(exact, sources, lag=0, rollout_temperature=1.0).tolist() == [False, False, False]
    assert weighted_rows(exact, sources, lag=1, rollout_temperature=1.0).tolist() == [True, False, False]
    assert weighted_rows(sampled, sources, lag=0, rollout_temperature=1.0).tolist() == [False, True, True]
    assert weighted_rows(sampled, sources, lag=0, rollout_temperature=0.7).tolist() == [True, True, True]


def test_the_sampled_estimator_refuses_anchors_and_served_temperatures():
    with pytest.raises(OpdError, match="anchors have no sampling log-probs"):
        load_config(None, BASE + ["objective.name=sampled_reverse_kl", "anchors={path: a.jsonl, fraction: 0.25}"])
    with pytest.raises(OpdError, match="temperature must be 1 with a served teacher"):
        load_config(None, ["teacher.url=http://127.0.0.1:1", "student.model=s", "task.builtin=x",
                           "objective.temperature=2"])


def test_eval_interval_is_wilson():
    """B5: one interval everywhere; at accuracy 1 it is not the degenerate [1, 1] of the Wald interval."""
    from opd.eval.evaluate import EvalResult
    from opd.stats import wilson

    lo, hi = EvalResult(accuracy=1.0, n=20).interval95()
    assert (lo, hi) == wilson(1.0, 20) and lo < 0.9 and hi == 1.0
