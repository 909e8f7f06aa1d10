"""Batched sampling with a KV cache: the student's on-policy rollouts and greedy evaluation.

Sampling is plain ancestral sampling from softmax(logits / temperature) over the whole
vocabulary: no top-k, no top-p (HF generate would silently apply top_k=50 from a generation
config). Every sampled token up to and including the first EOS is part of the completion, so a
sampled PAD or other special token is scored like any other token and cannot end a completion
for free (the PAD exploit).
"""

from __future__ import annotations

import inspect

import torch

from opd.batch import Batch, completion_logits, concat_batches, left_pad, position_ids  # noqa: F401  (re-exported)
from opd.rollout.fast_decode import LeanDecoder, supports, unwrap


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept either."""
    model = unwrap(model)  # a PeftModel's forward takes **kwargs and passes them on
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def choose_tokens(logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float,
                  greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [b] and their log-probs under softmax(logits / temperature).

    Sampling inverts the CDF with one given uniform per row, so a row's draw depends on its own
    uniform only, not on which other rows share the batch (rollouts split across workers match a
    single process). The CDF is summed in float64: in float32 the running sum over a 152k vocabulary
    loses the tail's mass (a token of probability 1e-8 after a cumulative 0.99 would vanish).
    `right=True` and u < 1 never select a zero-probability token.
    """
    logp = torch.log_softmax(logits.float() / (1.0 if greedy else temperature), dim=-1)
    if greedy:
        tok = logp.argmax(dim=-1)
    else:
        cdf = logp.double().exp().cumsum(dim=-1)
        target = uniforms.to(cdf).clamp(max=1 - 2 ** -40)[:, None] * cdf[:, -1:]
        tok = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=logp.shape[-1] - 1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


def kv_rows(model, width: int, budget_gib: float | None) -> int | None:
    """How many rows of `width` tokens (prompt + new) fit a KV-cache budget, None = no bound."""
    first = next(model.parameters(), None)
    if not budget_gib or first is None or not hasattr(model, "config"):
        return None
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    elem = first.element_size()
    per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * elem
    return max(1, int(budget_gib * 2 ** 30 // (per_token * width)))


class _HFSteps:
    """Decode through the model's own forward with a DynamicCache (any architecture)."""

    def __init__(self, model, prompt_ids, prompt_mask, max_new_tokens):
        from transformers import DynamicCache

        self.model, self.mask = model, prompt_mask.clone()
        self.cache = {_cache_kwarg(model): DynamicCache()}
        self.pos = prompt_mask.sum(dim=1, keepdim=True)  # position of the first completion token

    def prefill(self, prompt_ids) -> torch.Tensor:
        out = self.model(input_ids=prompt_ids, attention_mask=self.mask, position_ids=position_ids(self.mask),
                         use_cache=True, logits_to_keep=1, **self.cache)
        return out.logits[:, -1, :]

    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model(input_ids=tok[:, None], attention_mask=self.mask, position_ids=self.pos + t,
                         use_cache=True, **self.cache)
        return out.logits[:, -1, :]

    def keep(self, index: torch.Tensor):
        next(iter(self.cache.values())).batch_select_indices(index)
        self.mask, self.pos = self.mask[index], self.pos[index]


class _LeanSteps(_HFSteps):
    """The model's forward for the prompt, then the lean step (opd/rollout/fast_decode.py) on a
    KV cache allocated once at its final length."""

    def __init__(self, model, prompt_ids, prompt_mask, max_new_tokens):
        super().__init__(model, prompt_ids, prompt_mask, max_new_tokens)
        self.decoder = LeanDecoder(model)
        self.width, self.total = prompt_ids.shape[1], prompt_ids.shape[1] + max_new_tokens
        self.cos, self.sin = self.decoder.rope_tables(int(self.pos.max()) + max_new_tokens)
        self.valid = torch.cat([prompt_mask.bool(), torch.ones(prompt_mask.shape[0], max_new_tokens, dtype=torch.bool,
                                                                device=prompt_mask.device)], dim=1)

    def prefill(self, prompt_ids) -> torch.Tensor:
        logits = super().prefill(prompt_ids)
        self.kv = []
        for layer in next(iter(self.cache.values())).layers:
            k, v = layer.keys, layer.values
            shape = (*k.shape[:2], self.total, k.shape[-1])
            k_all, v_all = k.new_zeros(shape), v.new_zeros(shape)
            k_all[:, :, :self.width], v_all[:, :, :self.width] = k, v
            self.kv.append((k_all, v_all))
        self.cache = None
        return logits

    def step(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        where = (self.pos[:, 0] + t).clamp(max=self.cos.shape[0] - 1)
        return self.decoder.step(tok, self.cos[where], self.sin[where], self.kv, self.valid, self.width + t)

    def keep(self, index: torch.Tensor):
        self.kv = [(k[index], v[index]) for k, v in self.kv]
        self.valid, self.pos = self.valid[index], self.pos[index]


def generate(model, prompts: list[list[int]], *, eos_id: int, pad_id: int, max_new_tokens: int,
             temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
             uniforms: torch.Tensor | None = None, fast: bool = True, vocab_size: int | None = None,
             kv_cache_gib: float | None = None) -> Batch:
    """Sample (or greedily decode) completions for token-id prompts, with a KV cache.

    Randomness: `uniforms` [B, max_new_tokens] (one per row and position), else drawn from
    `generator`, on the CPU in float64 whatever the model's device, so a row's sample is the same on
    any device and any split. `fast` uses the lean decode step for Llama-family models (else the
    model's own forward). `vocab_size`: only ids below it are sampled (the tokenizer's real ids; a
    model's embedding may be padded past them). Rows are decoded in groups whose KV cache fits
    `kv_cache_gib`. Returns a CPU Batch with the log-prob of each chosen token under
    softmax(logits / temperature) (the sampling policy), so the loss never has to recompute it.
    """
    if uniforms is None and not greedy:
        uniforms = torch.rand(len(prompts), max_new_tokens, generator=generator, dtype=torch.float64)
    width = max(len(p) for p in prompts) + max_new_tokens
    group = kv_rows(model, width, kv_cache_gib) or len(prompts)
    parts = [_generate(model, prompts[lo:lo + group], None if greedy else uniforms[lo:lo + group], eos_id=eos_id,
                       pad_id=pad_id, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                       fast=fast, vocab_size=vocab_size)
             for lo in range(0, len(prompts), group)]
    return concat_batches(parts, pad_id)


@torch.no_grad()  # not inference_mode: the returned ids feed autograd (gather) in the update
def _generate(model, prompts, uniforms, *, eos_id, pad_id, max_new_tokens, temperature, greedy, fast,
              vocab_size) -> Batch:
    """One decode batch on the model's device. A row stops at its EOS; finished rows leave the batch
    once they are half of it, and decoding ends when every row has finished."""
    first = next(model.parameters(), None)  # a scripted test model may have none: the CPU
    device = first.device if first is not None else torch.device("cpu")
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    bsz = prompt_ids.shape[0]
    steps = (_LeanSteps if fast and supports(model) else _HFSteps)(model, prompt_ids.to(device),
                                                                   prompt_mask.to(device), max_new_tokens)
    uniforms = uniforms.to(device) if uniforms is not None else None
    tokens = torch.full((bsz, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(bsz, max_new_tokens, device=device)
    written = torch.zeros(bsz, max_new_tokens, dtype=torch.long, device=device)
    rows = torch.arange(bsz, device=device)  # the original row of each row still in the decode batch
    live = torch.ones(bsz, dtype=torch.bool, device=device)  # not yet past its EOS
    logits = steps.prefill(prompt_ids.to(device))
    used = 0
    for t in range(max_new_tokens):
        tok, lp = choose_tokens(logits[:, :vocab_size] if vocab_size else logits,
                                None if greedy else uniforms[rows, t], temperature, greedy)
        tok = torch.where(live, tok, pad_id)
        tokens[rows, t], logprobs[rows, t], written[rows, t] = tok, lp * live, live.long()
        used = t + 1
        live = live & (tok != eos_id)
        n_live = int(live.sum())
        if n_live == 0 or used == max_new_tokens:
            break
        if n_live <= len(rows) // 2:  # drop finished rows: their decode work is wasted
            index = live.nonzero().squeeze(1)
            rows, tok, live = rows[index], tok[index], live[index]
            steps.keep(index)
        logits = steps.step(tok, t)
    truncated = torch.zeros(bsz, dtype=torch.bool, device=device)
    truncated[rows[live]] = True
    return Batch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        completion_ids=tokens[:, :used].cpu(), completion_mask=written[:, :used].cpu(),
        sample_logprobs=logprobs[:, :used].cpu(), truncated=truncated.cpu(),
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
