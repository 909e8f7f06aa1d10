"""Logits in chunks of completion tokens: never [batch, length, vocab] float32 for both models at once.

A causal LM is a body (tokens -> final hidden states [B, L, H]) and a head (hidden -> logits).
Both models run their body once over the whole batch; the teacher keeps only its hidden states at
the completion positions (H numbers per token instead of V). The loss then walks the completion
tokens in chunks: student logits, teacher logits, the loss and its backward for one chunk, so the
peak holds one chunk's logits (TRL issue #3764, teacher OOM). Every loss here is a sum over tokens
divided by the batch's token count, so chunking changes neither the loss nor the gradient (tested).

`split_lm` checks once per model that head(body(x)) reproduces model(x).logits (an architecture
with e.g. logit soft-capping would not); otherwise the head is the identity and the "hidden
states" are the full logits: correct, just not memory-bounded.
"""

from __future__ import annotations

import torch

from opd.backends.lora import unwrap
from opd.batch import Batch, position_ids
from opd.sharded import gathered, head_bypassed, is_sharded
from opd.scores import FlatTeacher, TeacherScores  # noqa: F401  (re-exported)

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB of float32): whole batch at small vocabularies


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@torch.no_grad()
def split_lm(model):
    """(body, head) of a Hugging Face causal LM (or a peft PeftModel: its LoRA layers stay in place),
    verified on a probe; cached on the model."""
    cached = vars(model).get("_opd_split")  # not getattr: a PeftModel would find its base model's
    if cached is not None:
        return cached
    lm = unwrap(model)  # a PeftModel's `.model` is the whole causal LM, not its body
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    body = getattr(lm, "model", None)
    split = (None, _identity)
    if head is not None and body is not None:
        probe = torch.arange(4, device=next(lm.parameters()).device).remainder(lm.config.vocab_size)[None]
        was_training = model.training
        model.eval()
        try:
            with gathered(model):  # FSDP2: whole weights for the probe (every rank probes together)
                full = model(input_ids=probe, use_cache=False).logits.float()
                mine = head(body(input_ids=probe, use_cache=False).last_hidden_state).float()
            if torch.allclose(full, mine, rtol=1e-4, atol=1e-4 * float(full.abs().max()) + 1e-6):
                split = (body, head)
        finally:
            model.train(was_training)
    model._opd_split = split
    return split


def completion_hidden(model, batch: Batch) -> torch.Tensor:
    """Final hidden states [B, T, H] that predict each completion token (full logits if no split)."""
    body, _ = split_lm(model)
    mask = batch.attention_mask
    kwargs = dict(input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    start, width = batch.prompt_ids.shape[1] - 1, batch.completion_ids.shape[1]
    if body is None:
        return model(**kwargs).logits[:, start:start + width]
    if is_sharded(model):  # FSDP2: the root's own forward, so every unit's hooks run (opd/sharded.py)
        with head_bypassed(model):
            return model(**kwargs).logits[:, start:start + width]
    return body(**kwargs).last_hidden_state[:, start:start + width]


def chunk_ranges(n_tokens: int, vocab: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """[(lo, hi)] covering n_tokens, each with at most chunk_elements logits (at least one token)."""
    step = max(1, chunk_elements // max(vocab, 1))
    return [(lo, min(lo + step, n_tokens)) for lo in range(0, n_tokens, step)]


def token_logprobs_chunked(head, hidden: torch.Tensor, token_ids: torch.Tensor, vocab: int,
                           chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """log p(token) [N] from hidden [N, H] and ids [N], one chunk of logits at a time."""
    out = torch.empty(token_ids.shape[0], device=hidden.device)
    for lo, hi in chunk_ranges(token_ids.shape[0], vocab, chunk_elements):
        logp = torch.log_softmax(head(hidden[lo:hi]).float(), dim=-1)
        out[lo:hi] = logp.gather(-1, token_ids[lo:hi, None]).squeeze(-1)
    return out
