"""When a run evaluates and when it stops: a small policy object the loop asks, so that `opd compare`
can pass its own (a FLOP grid, a FLOP budget, a target accuracy) without knobs in `train:`.

`distill` builds the plain one from `train.steps` / `train.eval_every`; `opd compare` builds one per
run with every method on the same step grid and the same FLOP grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Schedule:
    steps: int  # optimizer steps at most
    eval_every: int  # evaluate every N steps (and always at the last step)
    eval_every_flops: float = 0.0  # also evaluate each time cumulative FLOPs pass a multiple of this (0 = off)
    max_flops: float = 0.0  # stop once cumulative FLOPs reach this (0 = no budget)
    stop_at_accuracy: float = 0.0  # stop after an evaluation at or above this accuracy (0 = off)

    @classmethod
    def from_train(cls, train) -> "Schedule":
        return cls(steps=train.steps, eval_every=train.eval_every)

    def eval_due(self, step: int, flops_before: float, flops: float) -> bool:
        """An evaluation after this step: on the step grid, when the step crossed a FLOP grid line, or
        at the last step."""
        crossed = bool(self.eval_every_flops) and \
            math.floor(flops / self.eval_every_flops) > math.floor(flops_before / self.eval_every_flops)
        return step % self.eval_every == 0 or crossed or self.last(step, flops)

    def last(self, step: int, flops: float) -> bool:
        """The step budget or the FLOP budget is spent."""
        return step >= self.steps or (bool(self.max_flops) and flops >= self.max_flops)

    def reached(self, accuracy: float) -> bool:
        """The target accuracy is reached (compare stops a run there)."""
        return bool(self.stop_at_accuracy) and accuracy >= self.stop_at_accuracy
