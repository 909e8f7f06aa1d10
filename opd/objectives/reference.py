"""Float64 reference divergences written directly from the definitions, with explicit probabilities.

Slow and memory-hungry on purpose (probabilities, then `log`): for tests only, never for training.
Every function returns per-position values [B,T]; the teacher is detached like in the real ones.
"""

from __future__ import annotations

import torch


def probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_v p(v) (log p(v) - log q(v))."""
    return (p * (p.log() - q.log())).sum(-1)


def _pq(student_logits, teacher_logits, temperature):
    return probs(student_logits, temperature), probs(teacher_logits.detach(), temperature)


def reverse_kl(student_logits, teacher_logits, temperature=1.0):
    p_s, p_t = _pq(student_logits, teacher_logits, temperature)
    return kl(p_s, p_t)


def forward_kl(student_logits, teacher_logits, temperature=1.0):
    p_s, p_t = _pq(student_logits, teacher_logits, temperature)
    return kl(p_t, p_s)


def jsd(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    p_s, p_t = _pq(student_logits, teacher_logits, temperature)
    if beta == 0:
        return kl(p_t, p_s)
    if beta == 1:
        return kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)


def skew_kl(student_logits, teacher_logits, alpha=0.1, temperature=1.0):
    p_s, p_t = _pq(student_logits, teacher_logits, temperature)
    return kl(p_t, alpha * p_t + (1 - alpha) * p_s)


def skew_reverse_kl(student_logits, teacher_logits, alpha=0.1, temperature=1.0):
    p_s, p_t = _pq(student_logits, teacher_logits, temperature)
    return kl(p_s, alpha * p_s + (1 - alpha) * p_t)


def topk_buckets(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature=1.0):
    """(student, teacher) probabilities of the K+1 buckets: the K teacher ids, then 1 - their sum."""
    p_s = probs(student_logits, temperature).gather(-1, teacher_topk_ids)
    p_t = teacher_topk_logprobs.detach().double().exp()
    def with_tail(p):
        return torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    return with_tail(p_s), with_tail(p_t)


def topk_forward_kl(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature=1.0):
    p_s, p_t = topk_buckets(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature)
    return kl(p_t, p_s)


def topk_reverse_kl(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature=1.0):
    p_s, p_t = topk_buckets(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature)
    return kl(p_s, p_t)


def masked_mean(values, mask, normalizer=None):
    m = mask.double()
    return (values.double() * m).sum() / (m.sum() if normalizer is None else normalizer)


REFERENCES = {"reverse_kl": reverse_kl, "forward_kl": forward_kl, "jsd": jsd, "skew_kl": skew_kl,
              "skew_reverse_kl": skew_reverse_kl}
