"""Batched sampling with a KV cache: the student's on-policy rollouts and greedy evaluation.

Sampling is plain ancestral sampling from softmax(logits / temperature) over the whole
vocabulary: no top-k, no top-p (HF generate would silently apply top_k=50 from a generation
config). Every sampled token up to and including the first EOS is part of the completion, so a
sampled PAD or other special token is scored like any other token and cannot end a completion
for free (the PAD exploit).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Prompts (left-padded) + completions (right-padded) as one token matrix.

    Shapes: prompt_ids/prompt_mask [B, P]; completion_ids/completion_mask/sample_logprobs [B, T].
    completion_mask is 1 on every sampled token up to and including the first EOS.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sample_logprobs: torch.Tensor  # log-prob of each sampled token under the sampling policy
    truncated: torch.Tensor  # [B] bool: no EOS within max_new_tokens

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    def rows(self, index) -> "Batch":
        """The rows selected by `index` (a slice, a bool mask [B] or a tensor of row numbers)."""
        return Batch(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


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


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept either."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()  # not inference_mode: the returned ids feed autograd (gather) in the update
def generate(model, prompts: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
             temperature: float = 1.0, greedy: bool = False,
             generator: torch.Generator | None = None) -> Batch:
    """Sample (or greedily decode) completions for token-id prompts, with a KV cache.

    Stops as soon as every row has produced EOS. Returns the log-prob of each chosen token under
    softmax(logits / temperature) (the sampling policy), so the loss never has to recompute it.
    """
    from transformers import DynamicCache

    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    bsz = prompt_ids.shape[0]
    mask = prompt_mask.clone()
    cache = {_cache_kwarg(model): DynamicCache()}
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=position_ids(mask),
                use_cache=True, logits_to_keep=1, **cache)
    next_logits = out.logits[:, -1, :].float()
    next_pos = mask.sum(dim=1, keepdim=True)  # position of the first completion token
    tokens, logprobs, alive_steps = [], [], []
    alive = torch.ones(bsz, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logp = torch.log_softmax(next_logits / (1.0 if greedy else temperature), dim=-1)
        if greedy:
            tok = logp.argmax(dim=-1)
        else:
            tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        tokens.append(tok)
        logprobs.append(logp.gather(1, tok[:, None]).squeeze(1))
        alive_steps.append(alive.clone())
        alive = alive & (tok != eos_id)
        if not alive.any():
            break
        mask = torch.cat([mask, torch.ones(bsz, 1, dtype=mask.dtype)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                    use_cache=True, **cache)
        next_logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1
    completion_mask = torch.stack(alive_steps, dim=1).long()
    return Batch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        completion_ids=torch.stack(tokens, dim=1), completion_mask=completion_mask,
        sample_logprobs=torch.stack(logprobs, dim=1) * completion_mask, truncated=alive,
    )


def decode_completions(tokenizer, batch: Batch) -> list[tuple[str, bool]]:
    """Each completion's text up to (not including) EOS, and whether it is well-formed.

    Ill-formed = truncated (no EOS) or containing a special token other than the final EOS; such
    completions count as wrong at evaluation so the student cannot profit from special tokens.
    """
    special = set(tokenizer.all_special_ids)
    eos = tokenizer.eos_token_id
    results = []
    for ids, mask, trunc in zip(batch.completion_ids.tolist(), batch.completion_mask.tolist(),
                                batch.truncated.tolist()):
        toks = [t for t, m in zip(ids, mask) if m]
        if toks and toks[-1] == eos and not trunc:
            toks = toks[:-1]
        ok = not trunc and not any(t in special for t in toks)
        results.append((tokenizer.decode(toks, skip_special_tokens=False), ok))
    return results


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
    )
