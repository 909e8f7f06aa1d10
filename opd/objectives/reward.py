"""Verifier-reward policy gradient (the RL baseline, and the reward term of opd+rl).

REINFORCE with a group baseline (GRPO-style, without std normalisation): each prompt is sampled
G times; a completion's advantage is its 0/1 reward minus the mean reward of its group, so a
group that is all right or all wrong contributes no gradient. The loss
    L = −Σ_t mask_t · A_row · log p_S(x_t) / normalizer
has E[∇L] = −∇E[reward] (score-function estimator; the baseline keeps it unbiased).
"""

from __future__ import annotations

import torch

from opd.objectives.divergences import masked_mean


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] rewards (rows of one prompt are consecutive) -> [B] reward minus its group's mean."""
    assert rewards.dim() == 1 and rewards.numel() % group_size == 0, (rewards.shape, group_size)
    groups = rewards.float().view(-1, group_size)
    if group_size == 1:  # one sample per prompt: fall back to the batch mean as the baseline
        return (groups - groups.mean()).view(-1)
    return (groups - groups.mean(dim=1, keepdim=True)).view(-1)


def policy_gradient_loss(student_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         normalizer: float | None = None) -> torch.Tensor:
    """student_logprobs [B,T] (with grad) of the sampled tokens; advantages [B] (detached)."""
    assert student_logprobs.shape == mask.shape and advantages.shape == student_logprobs.shape[:1]
    per_token = -advantages.detach()[:, None] * student_logprobs
    return masked_mean(per_token, mask, normalizer)
