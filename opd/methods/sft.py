"""sft: cross-entropy on the teacher's own completions (fresh samples, greedy traces or a traces file).
The teacher-rollout baseline of the playbook: fresh teacher traces, filtered, trained on, refreshed."""

from __future__ import annotations

from dataclasses import dataclass

from opd.errors import OpdError
from opd.methods.base import Chunk, Method, MethodOptions


@dataclass
class SftOptions(MethodOptions):
    name: str = "sft"
    traces: str | None = None  # JSONL of prompt/answer traces instead of fresh teacher samples
    teacher_greedy: bool = False  # decode the teacher's traces greedily instead of sampling

    def validate(self, cfg) -> None:
        if not self.traces and _served(cfg):
            raise OpdError("method sft needs the teacher to generate; a served teacher only scores "
                           "(give method.traces, a JSONL of its traces)")


def _served(cfg) -> bool:
    return bool(cfg.teacher.url) or any(t.url for t in cfg.teachers or [])


class SupervisedFineTuning(Method):
    name = "sft"
    Options = SftOptions
    samples = "teacher"

    def sampler(self, rng) -> str:
        return "traces" if self.options.traces else "teacher"

    def loss(self, chunk: Chunk, objective):
        return -chunk.student_logprobs.sum() / chunk.normalizer
