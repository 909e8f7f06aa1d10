"""mixed: GKD's λ. Each step's batch is student-sampled with probability λ, else teacher-sampled;
either way the student lowers the divergence to the teacher on it."""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import OpdError
from opd.methods.base import Chunk, Method, MethodOptions
from opd.methods.sft import _served


@dataclass
class MixedOptions(MethodOptions):
    name: str = "mixed"
    lmbda: float = 0.5  # probability that a batch is student-sampled (GKD's lambda), in [0, 1]
    teacher_greedy: bool = False  # decode the teacher's batches greedily instead of sampling

    def validate(self, cfg) -> None:
        if not 0.0 <= self.lmbda <= 1.0:
            raise OpdError(f"method.lmbda must be in [0, 1], got {self.lmbda}")
        if _served(cfg):
            raise OpdError("method mixed needs the teacher to generate; a served teacher only scores")


class Mixed(Method):
    name = "mixed"
    Options = MixedOptions
    uses_teacher = True

    @property
    def samples(self) -> str:
        return f"student with p={self.options.lmbda}, else teacher"

    def sampler(self, rng) -> str:
        return "student" if rng.random() < self.options.lmbda else "teacher"

    def loss(self, chunk: Chunk, objective):
        return objective.loss(chunk)
