"""Distillation objectives: full-vocabulary divergences, top-k variants, and sampled-token estimators."""

from opd.objectives.divergences import (
    DIVERGENCES,
    TOPK_DIVERGENCES,
    forward_kl,
    jsd,
    masked_mean,
    per_token_forward_kl,
    per_token_jsd,
    per_token_reverse_kl,
    per_token_skew_kl,
    per_token_skew_reverse_kl,
    per_token_topk_forward_kl,
    per_token_topk_reverse_kl,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    teacher_topk,
    topk_forward_kl,
    topk_reverse_kl,
)
from opd.objectives.sampled import k1, k3, sampled_token_advantage, sampled_token_loss

__all__ = [
    "DIVERGENCES", "TOPK_DIVERGENCES", "masked_mean",
    "reverse_kl", "forward_kl", "jsd", "skew_kl", "skew_reverse_kl", "topk_forward_kl", "topk_reverse_kl",
    "per_token_reverse_kl", "per_token_forward_kl", "per_token_jsd", "per_token_skew_kl",
    "per_token_skew_reverse_kl", "per_token_topk_forward_kl", "per_token_topk_reverse_kl", "teacher_topk",
    "sampled_token_advantage", "sampled_token_loss", "k1", "k3",
]
