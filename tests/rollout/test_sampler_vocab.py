"""Sampling at real vocabulary sizes: an exact inverse CDF at 152k tokens, padded embedding rows never
sampled, and decode batches bounded by a KV-cache budget without changing any row's sample."""

from types import SimpleNamespace

import pytest
import torch

from opd.rollout.sampler import choose_tokens, generate, kv_rows

V = 152_064  # Qwen2.5-7B's embedding rows


@pytest.mark.parametrize("tail_mass", [1e-3, 1e-6])
def test_the_inverse_cdf_is_exact_in_a_152k_vocabulary_tail(tail_mass):
    """One likely token and 152k tokens sharing `tail_mass` (6.6e-9 or 6.6e-12 each: below float32's
    resolution near 1; CUDA's float32 cumsum accumulates in float32, so the CDF is float64). Uniforms
    stratified over the tail's share of [0, 1) must land on tail tokens in proportion to their softmax
    mass, up to the last millionth of the mass (a clamp of u at 1 - 2^-20 would pile those on one token)."""
    n, bins = 200, 8
    logits = torch.zeros(V)
    logits[0] = torch.log(torch.tensor((1 - tail_mass) / tail_mass * (V - 1), dtype=torch.float64)).float()
    probs = torch.softmax(logits.double(), dim=-1)
    start = float(probs[0])  # the tail begins at this quantile
    u = start + (1 - start) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tok, logp = choose_tokens(logits.expand(n, V), u, temperature=1.0, greedy=False)
    assert (tok > 0).all(), "a tail quantile fell on the likely token"
    counts = torch.histc(tok.double(), bins=bins, min=1, max=V)
    edges = torch.linspace(1, V, bins + 1).round().long()
    expected = torch.tensor([float(probs[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]) / (1 - start) * n
    assert torch.allclose(counts, expected.to(counts), atol=2), (counts, expected)
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1)[tok])


class Fixed(torch.nn.Module):
    """Every position's logits are `logits` (no parameters, like a served model's head)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, **kw):
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], input_ids.shape[1], -1).clone())


def test_padded_embedding_rows_are_never_sampled():
    """A model whose embedding is padded past the tokenizer's ids, with the padding rows' logits high:
    with vocab_size (the tokenizer's ids) nothing past it is drawn; without, it would be."""
    real, padded = 10, 16
    logits = torch.zeros(padded)
    logits[real:] = 5.0
    gen = dict(eos_id=real + 100, pad_id=0, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    free = generate(Fixed(logits), [[1]] * 64, **gen)
    assert (free.completion_ids >= real).any()
    gen["generator"] = torch.Generator().manual_seed(0)
    bounded = generate(Fixed(logits), [[1]] * 64, vocab_size=real, **gen)
    assert (bounded.completion_ids < real).all()
    torch.testing.assert_close(bounded.sample_logprobs, torch.full((64, 4), -torch.log(torch.tensor(10.0)).item()))


def test_kv_budget_groups_rows_without_changing_their_samples(tiny):
    """A budget that fits two rows at a time decodes in groups; every row's tokens and log-probs equal
    the single-batch decode (one uniform per row and position)."""
    tok, model = tiny.tokenizer, tiny.model.eval()
    prompts = [tok(p).input_ids for p in ("1+2=", "12+3=", "3=", "45+6=", "7+8=")]
    uniforms = torch.rand(len(prompts), 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    width = max(map(len, prompts)) + 6
    cfg = model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    budget = 2.5 * per_token * width / 2 ** 30
    assert kv_rows(model, width, budget) == 2
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=6, uniforms=uniforms)
    whole = generate(model, prompts, **kw)
    grouped = generate(model, prompts, kv_cache_gib=budget, **kw)
    for w, g in zip(whole.completion_ids.tolist(), grouped.completion_ids.tolist()):
        assert w[:len(g)] == g[:len(w)]
    torch.testing.assert_close(whole.completion_mask.sum(1), grouped.completion_mask.sum(1))
    mask = grouped.completion_mask.bool()
    width_c = min(whole.completion_ids.shape[1], grouped.completion_ids.shape[1])
    torch.testing.assert_close(whole.sample_logprobs[:, :width_c], grouped.sample_logprobs[:, :width_c],
                               atol=1e-5, rtol=1e-5)
    assert mask.any()


def test_kv_rows_is_unbounded_without_a_budget(tiny):
    assert kv_rows(tiny.model, 100, None) is None
    assert kv_rows(tiny.model, 10 ** 9, 1e-9) == 1  # at least one row, however small the budget
