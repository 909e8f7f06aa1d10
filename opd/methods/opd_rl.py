"""opd+rl: the divergence to the teacher plus a weighted verifier-reward policy gradient."""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import OpdError
from opd.methods.base import Chunk, Method, MethodOptions
from opd.methods.rl import refuse_stale_reward
from opd.objectives.reward import policy_gradient_loss


@dataclass
class OpdRlOptions(MethodOptions):
    name: str = "opd+rl"
    reward_weight: float = 1.0  # weight of the verifier-reward policy gradient (>= 0)

    def validate(self, cfg) -> None:
        if self.reward_weight < 0:
            raise OpdError(f"method.reward_weight must be >= 0, got {self.reward_weight}")
        refuse_stale_reward(cfg)


class OpdPlusRl(Method):
    name = "opd+rl"
    Options = OpdRlOptions
    uses_teacher = True
    uses_reward = True

    def loss(self, chunk: Chunk, objective):
        reward = policy_gradient_loss(chunk.student_logprobs, chunk.advantages, chunk.mask,
                                      normalizer=chunk.normalizer)
        return objective.loss(chunk) + self.options.reward_weight * reward
