"""kd: supervised knowledge distillation: the teacher samples, the student lowers the divergence to
the teacher on the teacher's sequences (GKD with λ = 0; the off-policy counterpart of opd)."""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import OpdError
from opd.methods.base import Chunk, Method, MethodOptions
from opd.methods.sft import _served


@dataclass
class KdOptions(MethodOptions):
    name: str = "kd"
    teacher_greedy: bool = False  # decode the teacher's sequences greedily instead of sampling

    def validate(self, cfg) -> None:
        if _served(cfg):
            raise OpdError("method kd needs the teacher to generate; a served teacher only scores")


class SupervisedDistillation(Method):
    name = "kd"
    Options = KdOptions
    uses_teacher = True
    samples = "teacher"

    def sampler(self, rng) -> str:
        return "teacher"

    def loss(self, chunk: Chunk, objective):
        return objective.loss(chunk)
