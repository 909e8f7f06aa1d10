"""opd (the default): the student samples; it lowers a per-token divergence to the teacher on its own
samples (objective: reverse KL by default, see opd/objectives/select.py)."""

from __future__ import annotations

from opd.methods.base import Chunk, Method


class OnPolicyDistillation(Method):
    name = "opd"
    uses_teacher = True

    def loss(self, chunk: Chunk, objective):
        return objective.loss(chunk)
