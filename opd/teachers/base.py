"""What a teacher is: something that scores every token of a batch, and (when it can) writes
completions. Local, served and Ray-hosted teachers each implement this; routing by task tag
(opd/teachers/pool.py) sits on top.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from opd.batch import Batch
from opd.scores import TeacherScores


@runtime_checkable
class Teacher(Protocol):
    name: str
    tasks: tuple  # task tags it scores; ("*",) = every tag without a teacher of its own
    returns: str  # what its scores hold: "logits" (local), "topk" or "logprobs" (served)

    def prepare(self, examples: list) -> None:
        """Before step 1: settle precision / check the server, on a few held-in examples."""

    def score(self, batch: Batch, examples: list) -> TeacherScores:
        """Scores of every completion token of `batch` (rows = `examples`), no gradient."""

    def generate(self, batch_prompts: list[list[int]], examples: list, *, max_new_tokens: int,
                 temperature: float = 1.0, greedy: bool = False, uniforms=None) -> Batch:
        """The teacher's own completions (sft/mixed/kd traces, greedy evaluation)."""

    def describe(self) -> dict:
        """The manifest's entry for this teacher."""
