"""What teachers return (ground floor): per-token scores of a batch, logits kept as hidden states.

Every teacher kind (local, served, Ray-hosted; opd/teachers/) fills the same TeacherScores, so the
loss never asks which kind scored a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def at(tensor: torch.Tensor, index):
    """tensor[index] with a tensor index moved to the tensor's device (hidden states live on their
    teacher's device, log-probs and masks on the CPU)."""
    return tensor[index.to(tensor.device) if isinstance(index, torch.Tensor) else index]


def limit_vocab(head, n: int | None):
    """head(x)[..., :n]: logits over the tokenizer's n real ids. A model's embedding may be padded past
    them (Qwen2.5 0.5B-3B: 151,936 rows, 7B+: 152,064, one tokenizer), so two models of one family are
    compared over the ids both can emit."""
    if n is None:
        return head

    def real(hidden: torch.Tensor) -> torch.Tensor:
        return head(hidden)[..., :n]

    return real


@dataclass
class TeacherScores:
    """The teachers' view of a batch, whatever kind of teacher produced it.

    logprobs [B, T]: every teacher's log-prob (temperature 1) of each sampled token, 0 off the mask;
    filters, the store and the sampled-token estimator read these.
    A local teacher also keeps hidden states, not logits: hidden[g] [B, T, H_g] are teacher g's final
    hidden states at the completion positions (zero on rows of other teachers), heads[g] turns them
    into logits, owner [B] is each row's teacher index. A served teacher sends no hidden states,
    only its top-k: topk_logprobs / topk_ids [B, T, K] (temperature 1).
    """

    logprobs: torch.Tensor
    hidden: list = field(default_factory=list)
    heads: list = field(default_factory=list)
    owner: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None

    @property
    def has_logits(self) -> bool:
        return bool(self.heads)

    def rows(self, index) -> "TeacherScores":
        topk = (None, None) if self.topk_ids is None else (at(self.topk_logprobs, index), at(self.topk_ids, index))
        owner = None if self.owner is None else at(self.owner, index)
        return TeacherScores(at(self.logprobs, index), [at(h, index) for h in self.hidden], self.heads, owner, *topk)

    def flat(self, token_mask: torch.Tensor) -> "FlatTeacher":
        """The completion tokens selected by token_mask [B, T] (row-major), as a flat sequence."""
        sel = token_mask.bool()
        owner = None if self.owner is None else at(self.owner[:, None].expand(sel.shape), sel)
        topk = (None, None) if self.topk_ids is None else (at(self.topk_logprobs, sel), at(self.topk_ids, sel))
        return FlatTeacher(at(self.logprobs, sel), [at(h, sel) for h in self.hidden], self.heads, owner, *topk)

    def logits(self) -> torch.Tensor:
        """Dense float32 logits [B, T, V] (tests and small batches only: this is what chunking avoids)."""
        full = torch.ones(self.logprobs.shape, dtype=torch.bool)
        flat = self.flat(full)
        return flat.logits(0, full.numel()).view(*full.shape, -1)


@dataclass
class FlatTeacher:
    """TeacherScores of the selected completion tokens, flattened to N tokens in row-major order."""

    logprobs: torch.Tensor  # [N] the sampled tokens' log-probs
    hidden: list  # [N, H_g] per teacher
    heads: list
    owner: torch.Tensor | None  # [N]
    topk_logprobs: torch.Tensor | None = None  # [N, K]
    topk_ids: torch.Tensor | None = None

    def topk(self, lo: int, hi: int):
        """(log-probs, ids) [hi - lo, 1, K] of the teacher's top-k at flat tokens lo..hi, or None."""
        if self.topk_ids is None:
            return None
        return self.topk_logprobs[lo:hi, None], self.topk_ids[lo:hi, None]

    @torch.no_grad()
    def logits(self, lo: int, hi: int, device=None) -> torch.Tensor:
        """float32 teacher logits [hi - lo, V] of flat tokens lo..hi, on `device` (default: the teacher's)."""
        if len(self.heads) == 1:
            return self.heads[0](self.hidden[0][lo:hi]).float().to(device or self.hidden[0].device)
        owner = self.owner[lo:hi]
        out = None
        for g, head in enumerate(self.heads):
            rows = (owner == g).nonzero().squeeze(1)
            if rows.numel():
                part = head(at(self.hidden[g][lo:hi], rows)).float()
                if out is None:
                    out = part.new_zeros(hi - lo, part.shape[-1], device=device or part.device)
                out[rows.to(out.device)] = part.to(out.device)
        return out
