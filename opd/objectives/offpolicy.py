"""Importance weights for rows NOT sampled from the current student (stale, teacher-sampled, other temperature).

Shapes: every input is [B,T] (the log-prob of the sampled token x_j at each position); `mask` is 1 on
completion tokens. Compute is float32 (float64 inputs stay float64). Weights are detached.

With r_j = p(x_j | x_<j) / q(x_j | x_<j) (p: current student, q: the policy that sampled the row):
- an exact per-position divergence D_t(x_<t) already sums over x_t, so only the prefix is off-policy:
      w_t = prod_{j<t} r_j,     E_{x~q}[sum_t w_t D_t(x_<t)] = E_{x~p}[sum_t D_t(x_<t)];
  weighting D_t by the token's own ratio r_t instead (the old code) is 1 in expectation given x_<t and
  corrects nothing;
- a sampled-token term f(x_<t, x_t) (e.g. -A_t log p_S(x_t)) also needs the token itself:
      w_t = prod_{j<t} r_j * p'(x_t | x_<t) / q(x_t | x_<t),
  where p' (`token_logprobs`) is the student at the LOSS temperature while the prefix p (`prefix_logprobs`)
  is the student at the ROLLOUT temperature. Then E_{x~q}[sum_t w_t f_t] = sum_t E_{x_<t~p, x_t~p'}[f_t].
"""

from __future__ import annotations

import math

import torch


def _dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def prefix_weights(prefix_logprobs, sampler_logprobs, mask, *, token_logprobs=None,
                   clip: float | None = 2.0) -> torch.Tensor:
    """Detached importance weights [B,T] that make off-policy rows estimate on-policy expectations:

        log w_t = sum_{j<t, mask_j} (prefix_logprobs_j - sampler_logprobs_j)
                  [+ token_logprobs_t - sampler_logprobs_t   if token_logprobs is given],
        w_t = min(exp(log w_t), clip) on mask_t = 1,  w_t = 0 on mask_t = 0   (clip=None: untruncated).

    prefix_logprobs: log p(x_j|x_<j), current student at the rollout temperature (on-policy prefix law);
    sampler_logprobs: log q(x_j|x_<j), the policy that sampled the row (as recorded by the sampler);
    token_logprobs: log p'(x_t|x_<t), current student at the loss temperature, for sampled-token
        estimators; None for exact per-position divergences (prefix ratio only).
    Masked positions (prompt, padding) contribute log-ratio 0 to later prefixes and get weight 0.
    Truncation (TIS-style) caps the whole product, not each factor. Fresh rows (p = p' = q) get exactly 1.
    """
    assert prefix_logprobs.dim() == 2, f"per-token log-probs must be [B,T], got {tuple(prefix_logprobs.shape)}"
    shape = prefix_logprobs.shape
    for name, x in (("sampler_logprobs", sampler_logprobs), ("mask", mask), ("token_logprobs", token_logprobs)):
        assert x is None or x.shape == shape, f"{name} {tuple(x.shape)} vs prefix_logprobs {tuple(shape)}"
    assert clip is None or clip > 0, f"clip must be positive, got {clip}"
    dtype = _dtype(prefix_logprobs, sampler_logprobs, token_logprobs)
    keep = mask.detach().bool()
    q = sampler_logprobs.detach().to(dtype)
    log_r = torch.where(keep, prefix_logprobs.detach().to(dtype) - q, torch.zeros((), dtype=dtype))
    log_w = torch.cat([torch.zeros_like(log_r[:, :1]), log_r.cumsum(-1)[:, :-1]], -1)  # sum over j < t
    if token_logprobs is not None:
        log_w = log_w + (token_logprobs.detach().to(dtype) - q)
    if clip is not None:
        log_w = log_w.clamp(max=math.log(clip))
    return torch.where(keep, log_w.exp(), torch.zeros((), dtype=dtype))
