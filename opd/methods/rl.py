"""rl: REINFORCE with a group-mean baseline on the 0/1 verifier reward (no teacher): the other
baseline OPD must beat. The student samples rollout.samples_per_prompt completions per prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.errors import OpdError
from opd.methods.base import Chunk, Method, MethodOptions
from opd.objectives.reward import policy_gradient_loss


@dataclass
class RlOptions(MethodOptions):
    name: str = "rl"

    def validate(self, cfg) -> None:
        refuse_stale_reward(cfg)


def refuse_stale_reward(cfg) -> None:
    # The reward term's off-policy correction would need whole-sequence ratios (the reward depends on
    # every token); opd does not estimate that, so stale rollouts are refused rather than trained wrongly.
    if cfg.rollout.max_staleness:
        raise OpdError(f"method {cfg.method.name} trains on a verifier reward, which opd does not correct "
                       "for stale rollouts: set rollout.max_staleness: 0")


class Reinforce(Method):
    name = "rl"
    Options = RlOptions
    uses_reward = True

    def trainable(self, keep: torch.Tensor, advantages: torch.Tensor | None) -> torch.Tensor:
        # every group all right or all wrong: no signal, and an Adam step on zeros would still move weights
        return keep if advantages[keep].any() else torch.zeros_like(keep)

    def loss(self, chunk: Chunk, objective):
        return policy_gradient_loss(chunk.student_logprobs, chunk.advantages, chunk.mask, normalizer=chunk.normalizer)
