"""One training step's pieces: teacher scoring, and the update for every method.

Methods (config `method.name`):
  opd     student samples; divergence to the teacher on its own samples (the default)
  sft     teacher samples (or a traces file); cross-entropy on the teacher's tokens
  mixed   GKD's λ: a batch is student-sampled with probability λ, else teacher-sampled; divergence
  rl      student samples G per prompt; REINFORCE with a group baseline on the 0/1 verifier reward
  opd+rl  the divergence plus a weighted verifier-reward policy gradient
"""

from __future__ import annotations

import torch

from opd.objectives.divergences import per_token_reverse_kl
from opd.objectives.reward import policy_gradient_loss
from opd.objectives.sampled import k3
from opd.objectives.select import token_logprobs
from opd.rollout.sampler import Batch
from opd.train.chunked import (DEFAULT_CHUNK_ELEMENTS, TeacherScores, chunk_ranges, completion_hidden, split_lm,
                               token_logprobs_chunked)
from opd.train.optim import optimizer_step

METHODS = ("opd", "sft", "mixed", "rl", "opd+rl")
USES_TEACHER_SCORES = {"opd", "mixed", "opd+rl"}
USES_REWARD = {"rl", "opd+rl"}


@torch.inference_mode()
def teacher_hidden(teacher, batch: Batch) -> torch.Tensor:
    """The teacher's final hidden states [B, T, H] at the completion positions (no gradient, no logits)."""
    return completion_hidden(teacher, batch)


def score(teacher, batch: Batch, hidden: torch.Tensor | None = None) -> tuple[TeacherScores, torch.Tensor]:
    """One local teacher's scores for a batch, and its log-prob of each sampled token [B, T] (masked).

    `hidden`: the teacher's hidden states if a worker already computed them (scale.teacher_workers)."""
    hidden = teacher_hidden(teacher, batch) if hidden is None else hidden
    _, head = split_lm(teacher)
    sel = batch.completion_mask.bool()
    logprobs = torch.zeros(batch.completion_ids.shape)
    with torch.no_grad():
        logprobs[sel] = token_logprobs_chunked(head, hidden[sel], batch.completion_ids[sel], teacher.config.vocab_size)
    return TeacherScores([hidden], [head], torch.zeros(hidden.shape[0], dtype=torch.long)), logprobs


def student_precision(name: str) -> str:
    """train.precision resolved: auto = bfloat16 autocast where this machine computes bf16 natively."""
    from opd.backends.hf import native_bf16

    return ("bfloat16" if native_bf16() else "float32") if name == "auto" else name


def update(student, optimizer, scheduler, objective, batch: Batch, teacher: TeacherScores | None, cfg, *,
           teacher_logprobs=None, method: str = "opd", advantages=None, reward_weight: float = 1.0,
           stale: bool = False) -> dict:
    """One optimizer step, in micro-batches of rows and chunks of completion tokens.

    Every loss is a sum over completion tokens divided by the token count of the whole batch, so
    neither micro-batches (gradient accumulation) nor token chunks change the loss or the gradient.
    The student's body runs once per micro-batch; its head, the teacher's head and the loss run per
    chunk of at most `cfg.logits_chunk` logits, with the chunk's gradient handed back to the body.
    """
    n_tokens = max(int(batch.completion_mask.sum()), 1)
    rows = batch.prompt_ids.shape[0]
    micro = cfg.micro_batch_size or rows
    chunk_elements = cfg.logits_chunk or DEFAULT_CHUNK_ELEMENTS
    # bf16 autocast for the student's matmuls (weights, gradients, optimizer and the loss stay float32)
    autocast = torch.autocast(student.device.type, dtype=torch.bfloat16,
                              enabled=student_precision(cfg.precision) == "bfloat16")
    _, head = split_lm(student)
    vocab = student.config.vocab_size
    total_loss, kl_sum, teacher_lp_sum = 0.0, 0.0, 0.0
    scored = teacher is not None or teacher_logprobs is not None
    # the exact reverse KL at temperature 1 is its own per-token KL metric: no second vocabulary pass
    loss_is_kl = (method in USES_TEACHER_SCORES and objective.name == "reverse_kl" and not stale
                  and objective.params.get("temperature", 1.0) == 1.0)
    # sampled-token log-probs: only for the losses (and the k3 metric) that use them
    has_logits = teacher is not None and bool(teacher.heads)
    needs_s_lp = method == "sft" or method in USES_REWARD or (scored and not has_logits)
    for lo in range(0, rows, micro):
        sub = batch.rows(slice(lo, lo + micro))
        sel = sub.completion_mask.bool()
        n = int(sel.sum())
        if n == 0:
            continue
        with autocast:
            hidden = completion_hidden(student, sub)[sel]  # [n, H] (or [n, V] logits without a head split)
        leaf = hidden.detach().requires_grad_()
        ids = sub.completion_ids[sel][:, None]  # each token is a row of length 1: [n, 1]
        flat_teacher = teacher.rows(slice(lo, lo + micro)).flat(sel) if teacher is not None else None
        t_lp_all = teacher_logprobs[lo:lo + micro][sel][:, None] if teacher_logprobs is not None else None
        sampled_lp = sub.sample_logprobs[sel][:, None] if stale else None
        adv = advantages[lo:lo + micro][:, None].expand(sel.shape)[sel] if advantages is not None else None
        for a, b in chunk_ranges(n, vocab, chunk_elements):
            with autocast:
                s_logits = head(leaf[a:b])
            s_logits = s_logits.float()[:, None]  # [c, 1, V]
            mask = torch.ones(b - a, 1, dtype=torch.long)
            s_lp = token_logprobs(s_logits, ids[a:b]) if needs_s_lp else None
            loss = s_logits.new_zeros(())
            if method == "sft":
                loss = -s_lp.sum() / n_tokens
            if scored:
                t_logits = flat_teacher.logits(a, b)[:, None] if has_logits else None
                t_lp = t_lp_all[a:b] if t_lp_all is not None else token_logprobs(t_logits, ids[a:b])
                if method in USES_TEACHER_SCORES:
                    divergence = objective.loss(s_logits, t_logits, t_lp, ids[a:b], mask, normalizer=n_tokens,
                                                sampling_logprobs=sampled_lp[a:b] if stale else None,
                                                teacher_topk=flat_teacher.topk(a, b) if flat_teacher else None)
                    loss = loss + divergence
                if loss_is_kl:
                    kl_sum += divergence.item() * n_tokens
                elif t_logits is not None:  # exact per-token KL; with log-probs only, the k3 estimate
                    kl_sum += float(per_token_reverse_kl(s_logits.detach(), t_logits).sum())
                else:
                    kl_sum += float(k3(s_lp.detach(), t_lp).sum())
                teacher_lp_sum += float(t_lp.sum())
            if method in USES_REWARD:
                weight = 1.0 if method == "rl" else reward_weight
                loss = loss + weight * policy_gradient_loss(s_lp, adv[a:b], mask, normalizer=n_tokens)
            loss.backward()
            total_loss += loss.item()
        if leaf.grad is not None and hidden.requires_grad:
            hidden.backward(leaf.grad)
    grad_norm, applied = optimizer_step(student, optimizer, scheduler, cfg.grad_clip)
    stats = {"loss": total_loss, "grad_norm": grad_norm, "update_applied": applied}
    if scored:
        stats.update(reverse_kl=kl_sum / n_tokens, teacher_logprob=teacher_lp_sum / n_tokens)
    return stats
