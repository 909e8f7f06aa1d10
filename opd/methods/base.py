"""What a training method is: who samples a step's rollouts, what the update needs, and its loss.

A method is one small class (one file each in this package) with a typed `Options` dataclass: its
own section of the config (`method: {name: mixed, lmbda: 0.5}`), validated next to its fields. The
loop and the update ask the method; nothing outside opd/methods/ compares a method's name.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch


@dataclass
class MethodOptions:
    """The options every method has; a method's own Options subclass adds its fields."""

    name: str = "opd"  # opd | sft | mixed | kd | rl | opd+rl (see opd/methods/)

    def validate(self, cfg) -> None:
        """Refuse combinations this method cannot train correctly (cfg: the whole DistillConfig)."""


@dataclass
class Chunk:
    """One chunk of completion tokens as a loss sees it: each token is a row of length 1.

    Shapes: student_logits [c, 1, V] (float32, carries the gradient); ids, weights, teacher_logprobs
    [c, 1]; advantages [c]. `normalizer` is the completion-token count of the whole batch, so chunk
    losses sum to the batch loss. `weights` are detached importance weights for rows not sampled by
    the current student (opd/objectives/offpolicy.py); None = on-policy.
    """

    student_logits: torch.Tensor
    ids: torch.Tensor
    normalizer: int
    teacher_logits: torch.Tensor | None = None  # [c, 1, V] (local teacher)
    teacher_topk: tuple | None = None  # ([c, 1, K] log-probs, [c, 1, K] ids) (served top-k)
    teacher_logprobs: torch.Tensor | None = None  # [c, 1] sampled tokens, temperature 1
    advantages: torch.Tensor | None = None  # [c] the row's verifier-reward advantage, per token
    weights: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return torch.ones(self.ids.shape, dtype=torch.long)

    @cached_property
    def student_logprobs(self) -> torch.Tensor:
        """log p_S(token) at temperature 1 [c, 1] (with gradient); computed once, only if a loss asks."""
        logp = torch.log_softmax(self.student_logits.float(), dim=-1)
        return logp.gather(-1, self.ids.unsqueeze(-1)).squeeze(-1)


class Method:
    """Defaults shared by the methods (one level, no deeper)."""

    name: ClassVar[str]
    Options: ClassVar[type] = MethodOptions
    uses_teacher: ClassVar[bool] = False  # the update needs the teacher's scores of the rollouts
    uses_reward: ClassVar[bool] = False  # the update needs verifier-reward advantages (group baseline)

    def __init__(self, options: MethodOptions):
        self.options = options

    def sampler(self, rng: random.Random) -> str:
        """Who writes this step's completions: "student", "teacher" or "traces" (a file)."""
        return "student"

    def trainable(self, keep: torch.Tensor, advantages: torch.Tensor | None) -> torch.Tensor:
        """The kept rows that carry a learning signal [B] bool (a method may drop rows with none)."""
        return keep

    def loss(self, chunk: Chunk, objective) -> torch.Tensor:
        """This chunk's share of the batch loss (a sum over its tokens / chunk.normalizer)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The manifest's entry: the options, and who samples."""
        from dataclasses import asdict

        return {**asdict(self.options), "samples": self.samples}

    samples: ClassVar[str] = "student (on-policy)"
