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
from opd.rollout.sampler import Batch, completion_logits
from opd.train.optim import optimizer_step

METHODS = ("opd", "sft", "mixed", "rl", "opd+rl")
USES_TEACHER_SCORES = {"opd", "mixed", "opd+rl"}
USES_REWARD = {"rl", "opd+rl"}


@torch.no_grad()
def score(teacher, batch: Batch) -> torch.Tensor:
    """Teacher logits [B,T,V] for every completion position (float32, no gradient)."""
    return completion_logits(teacher, batch).float()


def update(student, optimizer, scheduler, objective, batch: Batch, teacher_logits, cfg, *, teacher_logprobs=None,
           method: str = "opd", advantages=None, reward_weight: float = 1.0, stale: bool = False) -> dict:
    """One optimizer step, in micro-batches whose losses sum to the full-batch loss.

    Every loss is normalised by the completion-token count of the whole batch, so splitting into
    micro-batches (gradient accumulation) changes neither the loss nor the gradient.
    """
    n_tokens = max(int(batch.completion_mask.sum()), 1)
    rows = batch.prompt_ids.shape[0]
    micro = cfg.micro_batch_size or rows
    total_loss, kl_sum, teacher_lp_sum = 0.0, 0.0, 0.0
    scored = teacher_logits is not None or teacher_logprobs is not None
    # the exact reverse KL at temperature 1 is its own per-token KL metric: no second vocabulary pass
    loss_is_kl = (method in USES_TEACHER_SCORES and objective.name == "reverse_kl" and not stale
                  and objective.params.get("temperature", 1.0) == 1.0)
    for lo in range(0, rows, micro):
        sub = batch.rows(slice(lo, lo + micro))
        mask = sub.completion_mask
        s_logits = completion_logits(student, sub)
        # sampled-token log-probs: only for the losses (and the k3 metric) that use them
        needs_s_lp = method == "sft" or method in USES_REWARD or (scored and teacher_logits is None)
        s_lp = token_logprobs(s_logits, sub.completion_ids) if needs_s_lp else None
        loss = s_logits.new_zeros(())
        if method == "sft":
            loss = -(s_lp * mask).sum() / n_tokens
        if scored:
            t_logits = teacher_logits[lo:lo + micro] if teacher_logits is not None else None
            t_lp = teacher_logprobs[lo:lo + micro] if teacher_logprobs is not None \
                else token_logprobs(t_logits, sub.completion_ids)
            m = mask.float()
            if method in USES_TEACHER_SCORES:
                divergence = objective.loss(s_logits, t_logits, t_lp, sub.completion_ids, mask, normalizer=n_tokens,
                                            sampling_logprobs=sub.sample_logprobs if stale else None)
                loss = loss + divergence
            if loss_is_kl:
                kl_sum += divergence.item() * n_tokens
            elif t_logits is not None:  # exact per-token KL; with log-probs only, the k3 estimate
                kl_sum += float((per_token_reverse_kl(s_logits.detach(), t_logits) * m).sum())
            else:
                kl_sum += float((k3(s_lp.detach(), t_lp) * m).sum())
            teacher_lp_sum += float((t_lp * m).sum())
        if method in USES_REWARD:
            weight = 1.0 if method == "rl" else reward_weight
            loss = loss + weight * policy_gradient_loss(s_lp, advantages[lo:lo + micro], mask, normalizer=n_tokens)
        loss.backward()
        total_loss += loss.item()
    grad_norm, applied = optimizer_step(student, optimizer, scheduler, cfg.grad_clip)
    stats = {"loss": total_loss, "grad_norm": grad_norm, "update_applied": applied}
    if scored:
        stats.update(reverse_kl=kl_sum / n_tokens, teacher_logprob=teacher_lp_sum / n_tokens)
    return stats
