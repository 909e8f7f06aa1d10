"""Per-token divergences between the student's and the teacher's next-token distributions.

Shapes: `student_logits`, `teacher_logits` [B,T,V]; `mask` [B,T] (bool or 0/1; 1 = a completion token
that enters the loss). Every loss returns `sum(mask * per_token) / normalizer` (see `masked_mean`).

Conventions shared by every function here:
- log-probs come from `log_softmax(logits / temperature)`; no temperature**2 factor is applied.
- compute is float32 (bf16/fp16 inputs are upcast); float64 inputs stay float64 (for gradcheck).
- the teacher is a constant: its logits / log-probs are detached, gradients reach the student only.
"""

from __future__ import annotations

import math

import torch

TINY = 1e-12  # mass added to both tail buckets of the top-k variants (keeps them finite at k = V)
LOG_TINY = math.log(TINY)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, normalizer: float | None = None) -> torch.Tensor:
    """sum_{b,t} mask[b,t] * values[b,t] / N, with N = `normalizer` if given else mask.sum().

    Pass normalizer = masked tokens of the WHOLE batch when a batch is split into micro-batches: the
    micro-batch losses (and gradients) then sum exactly to the full-batch loss. Masked-out positions are
    selected away (not multiplied by 0), so they get exactly zero gradient. An empty mask gives 0.
    """
    assert values.shape == mask.shape, f"values {tuple(values.shape)} vs mask {tuple(mask.shape)}"
    keep = mask.bool()
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    if normalizer is None:
        return total / keep.sum().clamp(min=1).to(total.dtype)
    assert normalizer > 0, f"normalizer must be positive, got {normalizer}"
    return total / float(normalizer)


def _dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_probs(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    assert temperature > 0, f"temperature must be positive, got {temperature}"
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def _student_teacher(student_logits, teacher_logits, temperature):
    """(log p_S, log p_T) in the compute dtype; the teacher is detached."""
    assert student_logits.shape == teacher_logits.shape, \
        f"student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}"
    assert student_logits.dim() == 3, f"logits must be [B,T,V], got {tuple(student_logits.shape)}"
    dtype = _dtype(student_logits, teacher_logits)
    return _log_probs(student_logits, temperature, dtype), _log_probs(teacher_logits.detach(), temperature, dtype)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p||q) = sum_v p(v) (log p(v) - log q(v)) over the last dim."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _log_mix(w: float, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """log(w p + (1 - w) q), computed with logsumexp."""
    assert 0.0 <= w <= 1.0, f"mixture weight must be in [0, 1], got {w}"
    if w == 0.0:
        return logq
    if w == 1.0:
        return logp
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def _check_mask(student_logits: torch.Tensor, mask: torch.Tensor) -> None:
    assert mask.shape == student_logits.shape[:-1], \
        f"mask {tuple(mask.shape)} must be [B,T] of logits {tuple(student_logits.shape)}"


# ----------------------------------------------------------------------------- per-token values [B,T]

def per_token_reverse_kl(student_logits, teacher_logits, *, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_S||p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v)) at every position: [B,T]."""
    s, t = _student_teacher(student_logits, teacher_logits, temperature)
    return _kl(s, t)


def per_token_forward_kl(student_logits, teacher_logits, *, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_T||p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v)) at every position: [B,T]."""
    s, t = _student_teacher(student_logits, teacher_logits, temperature)
    return _kl(t, s)


def per_token_jsd(student_logits, teacher_logits, *, beta: float = 0.5, temperature: float = 1.0):
    """Generalized JSD (GKD, Agarwal et al. 2024), as in TRL's `generalized_jsd_loss`: [B,T].

    M = beta p_T + (1 - beta) p_S,  JSD_beta = beta KL(p_T||M) + (1 - beta) KL(p_S||M).
    Endpoints (TRL's convention): beta = 0 is forward KL(p_T||p_S), beta = 1 is reverse KL(p_S||p_T).
    These are the limits of JSD_beta / beta and JSD_beta / (1 - beta); JSD_beta itself tends to 0 there,
    so the value jumps at the endpoints.
    """
    assert 0.0 <= beta <= 1.0, f"beta must be in [0, 1], got {beta}"
    s, t = _student_teacher(student_logits, teacher_logits, temperature)
    if beta == 0.0:
        return _kl(t, s)
    if beta == 1.0:
        return _kl(s, t)
    log_m = _log_mix(beta, t, s)
    return beta * _kl(t, log_m) + (1.0 - beta) * _kl(s, log_m)


def per_token_skew_kl(student_logits, teacher_logits, *, alpha: float = 0.1, temperature: float = 1.0):
    """DistiLLM skew forward KL: KL(p_T || alpha p_T + (1 - alpha) p_S): [B,T]. alpha = 0 is forward KL."""
    s, t = _student_teacher(student_logits, teacher_logits, temperature)
    return _kl(t, _log_mix(alpha, t, s))


def per_token_skew_reverse_kl(student_logits, teacher_logits, *, alpha: float = 0.1, temperature: float = 1.0):
    """DistiLLM skew reverse KL: KL(p_S || alpha p_S + (1 - alpha) p_T): [B,T]. alpha = 0 is reverse KL."""
    s, t = _student_teacher(student_logits, teacher_logits, temperature)
    return _kl(s, _log_mix(alpha, s, t))


# ----------------------------------------------------------------------------- scalar losses

def reverse_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0, normalizer=None):
    """Masked mean of KL(p_S||p_T) (the on-policy distillation objective). See `per_token_reverse_kl`."""
    _check_mask(student_logits, mask)
    return masked_mean(per_token_reverse_kl(student_logits, teacher_logits, temperature=temperature),
                       mask, normalizer)


def forward_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0, normalizer=None):
    """Masked mean of KL(p_T||p_S). See `per_token_forward_kl`."""
    _check_mask(student_logits, mask)
    return masked_mean(per_token_forward_kl(student_logits, teacher_logits, temperature=temperature),
                       mask, normalizer)


def jsd(student_logits, teacher_logits, mask, *, beta: float = 0.5, temperature: float = 1.0, normalizer=None):
    """Masked mean of the generalized JSD_beta (beta=0: forward KL, beta=1: reverse KL). See `per_token_jsd`."""
    _check_mask(student_logits, mask)
    return masked_mean(per_token_jsd(student_logits, teacher_logits, beta=beta, temperature=temperature),
                       mask, normalizer)


def skew_kl(student_logits, teacher_logits, mask, *, alpha: float = 0.1, temperature: float = 1.0,
            normalizer=None):
    """Masked mean of KL(p_T || alpha p_T + (1 - alpha) p_S). See `per_token_skew_kl`."""
    _check_mask(student_logits, mask)
    return masked_mean(per_token_skew_kl(student_logits, teacher_logits, alpha=alpha, temperature=temperature),
                       mask, normalizer)


def skew_reverse_kl(student_logits, teacher_logits, mask, *, alpha: float = 0.1, temperature: float = 1.0,
                    normalizer=None):
    """Masked mean of KL(p_S || alpha p_S + (1 - alpha) p_T). See `per_token_skew_reverse_kl`."""
    _check_mask(student_logits, mask)
    return masked_mean(per_token_skew_reverse_kl(student_logits, teacher_logits, alpha=alpha,
                                                 temperature=temperature), mask, normalizer)


# ----------------------------------------------------------------------------- teacher known on its top-k only

def teacher_topk(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0):
    """The teacher's k most likely tokens per position: (log-probs [B,T,k], ids [B,T,k] long).

    Log-probs are of softmax(teacher_logits / temperature), float32 (float64 for float64 input), detached.
    """
    assert 1 <= k <= teacher_logits.shape[-1], f"k={k} must be in [1, V={teacher_logits.shape[-1]}]"
    logp = _log_probs(teacher_logits.detach(), temperature, _dtype(teacher_logits))
    values, ids = logp.topk(k, dim=-1)
    return values, ids


def _topk_buckets(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature):
    """Log-masses of the K+1 buckets (the teacher's K tokens, then the tail) for student and teacher.

    Teacher tail = 1 - sum_k p_T(k); student tail = sum of p_S over the complement of the K ids, taken
    by a logsumexp over the complement (no cancellation). Both tails get +TINY so they stay finite (and
    cancel) when k = V. Teacher log-probs are floored at log(TINY) (servers may return -inf).
    `teacher_topk_logprobs` must already be at `temperature` (see `teacher_topk`); only the student
    logits are divided by it here.
    """
    B, T, V = student_logits.shape
    K = teacher_topk_ids.shape[-1]
    assert teacher_topk_ids.shape == teacher_topk_logprobs.shape == (B, T, K), \
        f"top-k ids {tuple(teacher_topk_ids.shape)} / log-probs {tuple(teacher_topk_logprobs.shape)} vs [B,T]={B, T}"
    assert teacher_topk_ids.dtype == torch.long, f"top-k ids must be long, got {teacher_topk_ids.dtype}"
    assert 1 <= K <= V, f"K={K} must be in [1, V={V}]"
    dtype = _dtype(student_logits, teacher_topk_logprobs)
    s = _log_probs(student_logits, temperature, dtype)
    s_top = s.gather(-1, teacher_topk_ids)
    # the K top slots each hold TINY/K, so the complement logsumexp includes exactly +TINY
    s_tail = torch.logsumexp(s.scatter(-1, teacher_topk_ids, LOG_TINY - math.log(K)), dim=-1, keepdim=True)
    t_top = teacher_topk_logprobs.detach().to(dtype).clamp(min=LOG_TINY)
    t_tail = torch.log((1.0 - t_top.exp().sum(-1, keepdim=True)).clamp(min=0.0) + TINY)
    return torch.cat([s_top, s_tail], -1), torch.cat([t_top, t_tail], -1)


def per_token_topk_forward_kl(student_logits, teacher_topk_logprobs, teacher_topk_ids, *, temperature=1.0):
    """KL(p_T||p_S) over the K+1 buckets (teacher's top-k tokens + one tail bucket): [B,T]."""
    s, t = _topk_buckets(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature)
    return _kl(t, s)


def per_token_topk_reverse_kl(student_logits, teacher_topk_logprobs, teacher_topk_ids, *, temperature=1.0):
    """KL(p_S||p_T) over the K+1 buckets (teacher's top-k tokens + one tail bucket): [B,T]."""
    s, t = _topk_buckets(student_logits, teacher_topk_logprobs, teacher_topk_ids, temperature)
    return _kl(s, t)


def topk_forward_kl(student_logits, teacher_topk_logprobs, teacher_topk_ids, mask, *, temperature=1.0,
                    normalizer=None):
    """Masked mean of the (K+1)-bucket forward KL. With K = V it equals `forward_kl`."""
    _check_mask(student_logits, mask)
    return masked_mean(per_token_topk_forward_kl(student_logits, teacher_topk_logprobs, teacher_topk_ids,
                                                 temperature=temperature), mask, normalizer)


def topk_reverse_kl(student_logits, teacher_topk_logprobs, teacher_topk_ids, mask, *, temperature=1.0,
                    normalizer=None):
    """Masked mean of the (K+1)-bucket reverse KL. With K = V it equals `reverse_kl`."""
    _check_mask(student_logits, mask)
    return masked_mean(per_token_topk_reverse_kl(student_logits, teacher_topk_logprobs, teacher_topk_ids,
                                                 temperature=temperature), mask, normalizer)


DIVERGENCES = {
    "reverse_kl": reverse_kl,
    "forward_kl": forward_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
}
TOPK_DIVERGENCES = {"reverse_kl": topk_reverse_kl, "forward_kl": topk_forward_kl}
