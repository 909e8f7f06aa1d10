"""Reverse KL from the sampled tokens only (the teacher returns per-token log-probs, not logits).

Shapes: `student_logprobs`, `teacher_logprobs`, `sampling_logprobs`, `mask` are [B,T]: the log-prob of
the sampled token x_t under the current student (carries the gradient), under the teacher, and under
the policy that actually sampled it. Compute is float32 (float64 inputs stay float64).

Why it works: x ~ p_S at each position, and with A(x) = log p_T(x) - log p_S(x) (held constant),
    E_{x~p_S}[A(x) grad log p_S(x)] = sum_x p_S(x) (log p_T(x) - log p_S(x)) grad log p_S(x)
                                    = -grad KL(p_S||p_T)
(the term from differentiating the log p_S inside the KL is sum_x grad p_S(x) = 0). So minimising
-A * log p_S(x) is a one-sample, unbiased estimate of the reverse-KL gradient: policy gradient with a
per-token reward log p_T - log p_S, as in tinker-cookbook's on-policy distillation.
"""

from __future__ import annotations

import torch

from opd.objectives.divergences import masked_mean


def _dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> None:
    assert student_logprobs.shape == teacher_logprobs.shape, \
        f"student {tuple(student_logprobs.shape)} vs teacher {tuple(teacher_logprobs.shape)}"
    assert student_logprobs.dim() == 2, f"per-token log-probs must be [B,T], got {tuple(student_logprobs.shape)}"


def sampled_token_advantage(student_logprobs, teacher_logprobs, *, clip: float | None = 5.0) -> torch.Tensor:
    """A = log p_T(x) - log p_S(x), detached, clamped to [-clip, clip] (clip=None: unclipped): [B,T].

    Unclipped, E_{x~p_S}[A(x) grad log p_S(x)] = -grad KL(p_S||p_T); clipping bounds the variance from
    tokens the teacher finds very unlikely, at the price of a bias.
    """
    _check(student_logprobs, teacher_logprobs)
    dtype = _dtype(student_logprobs, teacher_logprobs)
    adv = teacher_logprobs.detach().to(dtype) - student_logprobs.detach().to(dtype)
    if clip is not None:
        assert clip > 0, f"clip must be positive, got {clip}"
        adv = adv.clamp(-clip, clip)
    return adv


def sampled_token_loss(student_logprobs, teacher_logprobs, mask, *, sampling_logprobs=None,
                       clip: float | None = 5.0, is_clip: float | None = 2.0, weights=None,
                       normalizer=None) -> torch.Tensor:
    """Policy-gradient surrogate whose gradient estimates grad KL(p_S||p_T):

        loss = -sum_{b,t} mask * w * A * log p_S(x) / N,   N = normalizer or mask.sum(),

    with A = `sampled_token_advantage` (detached) and w a detached, truncated importance weight:
        w = 1                                              if sampling_logprobs is None (on-policy),
        w = min(p_S(x) / p_sample(x), is_clip)             otherwise (is_clip=None: untruncated).
    Gradient wrt log p_S(x): -mask * w * A / N (score-function form, truncated IS as in TIS: tokens with
    a large ratio keep their gradient, with a capped weight, instead of being dropped as in PPO's
    clipped surrogate). Untruncated, E_{x~q}[(p_S/q)(x) A(x) grad log p_S(x)] = -grad KL(p_S||p_T).
    `weights` [B,T] (detached), when given, replace w: the prefix-and-token importance weights of rows
    not sampled by the current student (opd/objectives/offpolicy.py); the token-only ratio above is
    right for one position but not for a sequence whose prefix is off-policy too.
    The loss VALUE is a surrogate (only its gradient is meaningful); log `k1`/`k3` for the KL itself.
    """
    _check(student_logprobs, teacher_logprobs)
    assert mask.shape == student_logprobs.shape, f"mask {tuple(mask.shape)} vs {tuple(student_logprobs.shape)}"
    dtype = _dtype(student_logprobs, teacher_logprobs, sampling_logprobs)
    logp = student_logprobs.to(dtype)
    adv = sampled_token_advantage(logp, teacher_logprobs, clip=clip)
    if weights is not None:
        assert sampling_logprobs is None, "give weights or sampling_logprobs, not both"
        assert weights.shape == logp.shape, f"weights {tuple(weights.shape)} vs {tuple(logp.shape)}"
        weighted = weights.detach().to(dtype) * adv
    elif sampling_logprobs is None:
        weighted = adv
    else:
        assert sampling_logprobs.shape == logp.shape, \
            f"sampling_logprobs {tuple(sampling_logprobs.shape)} vs {tuple(logp.shape)}"
        ratio = torch.exp(logp.detach() - sampling_logprobs.detach().to(dtype))
        if is_clip is not None:
            ratio = ratio.clamp(max=is_clip)
        weighted = ratio * adv
    return masked_mean(-weighted * logp, mask, normalizer)


def k1(student_logprobs, teacher_logprobs) -> torch.Tensor:
    """k1 = log p_S(x) - log p_T(x): [B,T]. Unbiased for KL(p_S||p_T) when x ~ p_S (can be negative)."""
    _check(student_logprobs, teacher_logprobs)
    dtype = _dtype(student_logprobs, teacher_logprobs)
    return student_logprobs.to(dtype) - teacher_logprobs.to(dtype)


def k3(student_logprobs, teacher_logprobs) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = p_T(x) / p_S(x): [B,T]. Unbiased for KL(p_S||p_T) when x ~ p_S
    (E[r] = 1), and always >= 0 (Schulman, "Approximating KL divergence"). expm1 keeps small |log r| exact."""
    _check(student_logprobs, teacher_logprobs)
    dtype = _dtype(student_logprobs, teacher_logprobs)
    log_r = teacher_logprobs.to(dtype) - student_logprobs.to(dtype)
    return torch.expm1(log_r) - log_r
