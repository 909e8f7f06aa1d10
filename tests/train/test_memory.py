"""Memory settings that must not change the update: token-budget micro-batches, gradient
checkpointing, padded vocabularies; and bfloat16 weights with float32 master weights."""

import copy

import pytest
import torch

from opd.backends.hf import load_model
from opd.config import load_config
from opd.methods import make_method, method_class
from opd.objectives.select import make_objective
from opd.teachers.local import score, teacher_hidden
from opd.train.optim import MasterWeights, make_optimizer
from opd.train.step import micro_batches, update
from tests.train.test_step import _tiny_batch, student_and_teacher


def grads(student, teacher_model, batch, *overrides, vocab_size=None):
    """The update's gradient (lr 0, no clipping) and statistics under config overrides."""
    cfg = load_config(None, ["teacher.model=t", "student.model=s", "task.builtin=x", "train.precision=float32",
                             "train.grad_clip=0", *overrides])
    student.zero_grad()
    opt, sched = make_optimizer(student, lr=0.0)
    captured, real_step = {}, opt.step

    def capture():
        captured["g"] = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]).clone()
        real_step()

    opt.step = capture
    scores = score(teacher_model, batch, vocab_size=vocab_size)
    stats = update(student, opt, sched, make_method(method_class("opd").Options()), make_objective(cfg.objective),
                   batch, cfg.train, scores=scores, vocab_size=vocab_size)
    return captured["g"], stats


def test_micro_batches_respect_both_budgets():
    assert micro_batches(5, 10, 0, 0) == [slice(0, 5)]
    assert micro_batches(5, 10, 0, 25) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert micro_batches(5, 10, 1, 25) == [slice(i, i + 1) for i in range(5)]
    assert micro_batches(3, 100, 0, 25) == [slice(i, i + 1) for i in range(3)]  # a row wider than the budget


def test_a_token_budget_gives_the_same_update(tiny_model_dir):
    student, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(student.tokenizer)
    width = batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]
    g_whole, s_whole = grads(student.model, teacher.model, batch, "train.micro_batch_tokens=0")
    g_rows, s_rows = grads(student.model, teacher.model, batch, f"train.micro_batch_tokens={width}")  # a row each
    torch.testing.assert_close(g_whole, g_rows, atol=1e-6, rtol=1e-4)
    for key in ("loss", "reverse_kl", "teacher_logprob"):
        assert s_rows[key] == pytest.approx(s_whole[key], rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradient(tiny_model_dir):
    student, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(student.tokenizer)
    student.model.train()
    g_plain, _ = grads(student.model, teacher.model, batch)
    student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert getattr(student.model, "is_activation_checkpointing", None) or student.model.is_gradient_checkpointing
    g_ckpt, _ = grads(student.model, teacher.model, batch)
    torch.testing.assert_close(g_plain, g_ckpt, atol=1e-6, rtol=1e-5)


def padded(model, extra: int):
    """A copy whose (tied) embedding has `extra` rows past the tokenizer's ids, with large logits."""
    out = copy.deepcopy(model)
    rows = out.get_input_embeddings().num_embeddings
    out.resize_token_embeddings(rows + extra, mean_resizing=False)
    with torch.no_grad():
        out.get_input_embeddings().weight[rows:] = 3.0 * torch.randn(extra, out.config.hidden_size)
    return out


def test_padded_embeddings_are_compared_over_the_real_ids(tiny_model_dir):
    """Student padded by 8 rows, teacher by 24 (Qwen2.5 0.5B vs 7B): with vocab_size = the tokenizer's
    ids the update equals the unpadded one; the padding rows take no part."""
    student, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(student.tokenizer)
    real = len(student.tokenizer)
    g_plain, s_plain = grads(student.model, teacher.model, batch, vocab_size=real)
    big_student, big_teacher = padded(student.model, 8), padded(teacher.model, 24)
    g_padded, s_padded = grads(big_student, big_teacher, batch, vocab_size=real)
    emb = student.model.get_input_embeddings().weight.numel()  # the first parameter (tied with the head)
    shared = g_plain.numel() - emb
    # the embedding's real rows, and every other parameter
    torch.testing.assert_close(g_padded[:emb], g_plain[:emb], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(g_padded[-shared:], g_plain[-shared:], atol=1e-6, rtol=1e-4)
    assert s_padded["reverse_kl"] == pytest.approx(s_plain["reverse_kl"], rel=1e-5)
    with pytest.raises(AssertionError, match="student .* vs teacher"):  # unbounded: the widths differ
        grads(big_student, big_teacher, batch)


def test_the_teachers_forward_in_token_budgeted_groups_is_the_same(tiny_model_dir):
    _, teacher = student_and_teacher(tiny_model_dir)
    batch = _tiny_batch(teacher.tokenizer)
    whole = teacher_hidden(teacher.model, batch)
    grouped = teacher_hidden(teacher.model, batch, max_tokens=1)  # one row per forward
    torch.testing.assert_close(whole, grouped, atol=1e-5, rtol=1e-5)


def test_bfloat16_weights_keep_float32_masters_so_small_updates_accumulate(tiny_model_dir):
    """Ten AdamW steps of lr 1e-4 on bf16 weights: plain bf16 AdamW rounds most of them away (relative
    step 1e-4 < bf16's 2^-8 resolution); with float32 masters the weights follow the float32 run."""
    def run(model, optimizer):
        torch.manual_seed(0)
        x = torch.randint(0, model.config.vocab_size, (4, 6))
        for _ in range(10):
            loss = model(input_ids=x, labels=x).loss.float()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return torch.cat([p.detach().float().flatten() for p in model.parameters()])

    ref = load_model(str(tiny_model_dir), trainable=True).model
    start = torch.cat([p.detach().float().flatten() for p in ref.parameters()])
    w32 = run(ref, torch.optim.AdamW(ref.parameters(), lr=1e-4))
    bf = load_model(str(tiny_model_dir), dtype="bfloat16", trainable=True).model
    w_plain = run(bf, torch.optim.AdamW(bf.parameters(), lr=1e-4))
    bf = load_model(str(tiny_model_dir), dtype="bfloat16", trainable=True).model
    masters = MasterWeights(bf.parameters(), lr=1e-4)
    w_master = run(bf, masters)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    assert all(m.dtype == torch.float32 for m in masters.masters)
    moved = (w32 - start).norm()
    assert (torch.cat([m.flatten() for m in masters.masters]) - w32).norm() < 0.1 * moved
    assert (w_plain - w32).norm() > 2 * (w_master - w32).norm()


def test_master_weights_resume_exactly(tiny_model_dir):
    def step(model, opt):
        x = torch.arange(6)[None].remainder(model.config.vocab_size)
        model(input_ids=x, labels=x).loss.float().backward()
        opt.step()
        opt.zero_grad()

    a = load_model(str(tiny_model_dir), dtype="bfloat16", trainable=True).model
    opt_a, _ = make_optimizer(a, lr=1e-3, master_weights=True)
    step(a, opt_a)
    state = copy.deepcopy(opt_a.state_dict())
    b = copy.deepcopy(a)
    opt_b, _ = make_optimizer(b, lr=1e-3, master_weights=True)
    opt_b.load_state_dict(state)
    step(a, opt_a)
    step(b, opt_b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert all(torch.equal(x, y) for x, y in zip(opt_a.masters, opt_b.masters))
