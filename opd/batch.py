"""The token layout every part passes around: prompts left-padded, completions right-padded.

This is the ground floor: rollout, teachers, methods and training all import it, and it imports
none of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Prompts (left-padded) + completions (right-padded) as one token matrix.

    Shapes: prompt_ids/prompt_mask [B, P]; completion_ids/completion_mask/sample_logprobs [B, T].
    completion_mask is 1 on every sampled token up to and including the first EOS: the tokens that
    are trained on. context_mask [B, T] (episodes only, else None) is 1 on tokens inside the
    completion that the environment and the chat template wrote (tool results, turn markers): both
    models attend to them, no loss touches them (opd/rollout/episodes.py).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sample_logprobs: torch.Tensor  # log-prob of each sampled token under the sampling policy
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens (episodes: or max_turns reached)
    context_mask: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        seen = self.completion_mask if self.context_mask is None else self.completion_mask | self.context_mask
        return torch.cat([self.prompt_mask, seen], dim=1)

    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    def to(self, device) -> "Batch":
        """The batch on `device`: a batch lives on the CPU between phases and moves once into each model."""
        return Batch(*(_map(getattr(self, f.name), lambda t: t.to(device)) for f in dataclasses.fields(self)))

    def rows(self, index) -> "Batch":
        """The rows selected by `index` (a slice, a bool mask [B] or a tensor of row numbers)."""
        return Batch(*(_map(getattr(self, f.name), lambda t: t[index]) for f in dataclasses.fields(self)))


def _map(tensor, fn):
    return None if tensor is None else fn(tensor)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to [B, P] ids and a 0/1 mask (generation appends on the right)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq):] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row sees the same positions as unpadded."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def completion_logits(model, batch: Batch) -> torch.Tensor:
    """Logits [B, T, V] that predict each completion token, from one forward pass over prompt+completion."""
    mask = batch.attention_mask
    out = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    start = batch.prompt_ids.shape[1] - 1
    return out.logits[:, start:start + batch.completion_ids.shape[1], :]


def make_sft_batch(prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int) -> Batch:
    """Left-padded prompts + right-padded targets, in the same layout as sampled rollouts."""
    p_ids, p_mask = left_pad(prompt_ids, pad_id)
    width = max(len(a) for a in answer_ids)
    c_ids = torch.full((len(answer_ids), width), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(answer_ids), width), dtype=torch.long)
    for i, ans in enumerate(answer_ids):
        c_ids[i, :len(ans)] = torch.tensor(ans, dtype=torch.long)
        c_mask[i, :len(ans)] = 1
    return Batch(prompt_ids=p_ids, prompt_mask=p_mask, completion_ids=c_ids, completion_mask=c_mask,
                 sample_logprobs=torch.full(c_ids.shape, float("nan")),  # no sampling policy
                 truncated=torch.zeros(len(answer_ids), dtype=torch.bool))


def concat_batches(batches: list[Batch], pad_id: int) -> Batch:
    """Stack batches row-wise, re-padding prompts on the left and completions on the right."""
    if len(batches) == 1:
        return batches[0]
    width_p = max(b.prompt_ids.shape[1] for b in batches)
    width_c = max(b.completion_ids.shape[1] for b in batches)

    def pad(t, width, value, left):
        extra = width - t.shape[1]
        if extra == 0:
            return t
        filler = torch.full((t.shape[0], extra), value, dtype=t.dtype)
        return torch.cat([filler, t] if left else [t, filler], dim=1)

    return Batch(
        prompt_ids=torch.cat([pad(b.prompt_ids, width_p, pad_id, True) for b in batches]),
        prompt_mask=torch.cat([pad(b.prompt_mask, width_p, 0, True) for b in batches]),
        completion_ids=torch.cat([pad(b.completion_ids, width_c, pad_id, False) for b in batches]),
        completion_mask=torch.cat([pad(b.completion_mask, width_c, 0, False) for b in batches]),
        sample_logprobs=torch.cat([pad(b.sample_logprobs, width_c, 0.0, False) for b in batches]),
        truncated=torch.cat([b.truncated for b in batches]),
        context_mask=None if all(b.context_mask is None for b in batches) else torch.cat(
            [pad(b.context_mask if b.context_mask is not None else torch.zeros_like(b.completion_mask), width_c, 0,
                 False) for b in batches]),
    )


@dataclass
class Rollouts:
    """One step's rollouts: the batch, the example behind each row, and who wrote each completion."""

    batch: Batch
    examples: list  # the Example of each row
    sources: list[str]  # student | teacher | anchor, per row
    policy_version: int  # training step of the weights that sampled the batch (step − 1 when fresh)
    sampled_by: str  # student | teacher | traces: who wrote the (non-anchor) completions
    transcripts: list | None = None  # episodes: each row's messages (opd/rollout/episodes.py)
    turn_tokens: list | None = None  # episodes: each row's model tokens per assistant turn
