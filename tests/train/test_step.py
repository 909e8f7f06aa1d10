"""The update step: what enters the loss, chunking, micro-batches, precision, and the gradient
against plain autograd on full logits (opd/train/step.py, opd/train/chunked.py)."""

import pytest
import torch

from opd.backends.hf import load_model
from opd.config import load_config
from opd.objectives.select import make_objective
from opd.rollout.sampler import Batch
from opd.train.optim import make_optimizer
from opd.methods import make_method, method_class
from opd.teachers.local import score as teacher_scores
from opd.train.step import update as train_update


def score(model, batch):
    """The teacher's scores of a batch and its log-probs of the sampled tokens."""
    scores = teacher_scores(model, batch)
    return scores, scores.logprobs


def update(model, opt, sched, objective, batch, scores, train_cfg, *, method="opd", teacher_logprobs=None,
           advantages=None):
    """One update step by the named method (its default options)."""
    m = make_method(method_class(method).Options())
    return train_update(model, opt, sched, m, objective, batch, train_cfg,
                        scores=scores if m.uses_teacher else None, advantages=advantages)


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
    stats = update(student.model, opt, sched, objective, batch, teacher_scores, cfg.train, method=method,
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
    stats = update(model, opt, sched, make_objective(cfg.objective), batch, scores, cfg.train, method=method,
                        teacher_logprobs=teacher_lp, advantages=advantages if method == "rl" else None)
    assert stats["loss"] == pytest.approx(float(loss), rel=1e-5)
    torch.testing.assert_close(captured["g"], expected, atol=1e-6, rtol=1e-4)
