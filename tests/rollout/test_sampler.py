"""The KV-cache decode: same distribution as a plain forward pass, and the masks it returns."""

from types import SimpleNamespace

import pytest
import torch

from opd.rollout.sampler import Batch, completion_logits, decode_completions, generate, left_pad


def _generate(loaded, prompts, **kw):
    tok = loaded.tokenizer
    ids = [tok(p).input_ids for p in prompts]
    kw.setdefault("max_new_tokens", 12)
    return generate(loaded.model, ids, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, **kw)


def test_sampled_logprobs_equal_a_plain_forward_pass(tiny):
    """The decode's returned log-probs (left-padded, ragged prompts) match one full forward pass."""
    batch = _generate(tiny, ["1+2=", "123+45=", "9="] * 4, generator=torch.Generator().manual_seed(0),
                      temperature=0.7)
    with torch.no_grad():
        logits = completion_logits(tiny.model, batch)
    logp = torch.log_softmax(logits.float() / 0.7, -1).gather(2, batch.completion_ids[..., None]).squeeze(2)
    mask = batch.completion_mask.bool()
    assert mask.sum() > 0
    torch.testing.assert_close(logp[mask], batch.sample_logprobs[mask], atol=1e-4, rtol=0)


def test_greedy_is_independent_of_batch_padding(tiny):
    alone = _generate(tiny, ["7+8="], greedy=True)
    padded = _generate(tiny, ["123+456=", "7+8="], greedy=True)
    n = int(alone.completion_mask.sum())
    assert alone.completion_ids[0, :n].tolist() == padded.completion_ids[1, :n].tolist()


class ScriptedLM(torch.nn.Module):
    """A fake causal LM whose next-token logits follow a script (position in the completion -> token)."""

    def __init__(self, vocab, script, prompt_len):
        super().__init__()
        self.vocab, self.script, self.prompt_len = vocab, script, prompt_len

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, logits_to_keep=0, cache=None):
        bsz, width = input_ids.shape
        logits = torch.full((bsz, width, self.vocab), -30.0)
        last_pos = position_ids[:, -1]  # position of the last input token
        for b in range(bsz):
            step = int(last_pos[b]) - self.prompt_len + 1  # index of the token being predicted
            logits[b, -1, self.script[min(max(step, 0), len(self.script) - 1)]] = 30.0
        return SimpleNamespace(logits=logits)


def test_every_token_up_to_first_eos_is_scored_including_sampled_pad():
    pad, eos, x = 0, 2, 5
    model = ScriptedLM(vocab=8, script=[pad, x, eos, x, x], prompt_len=3)
    batch = generate(model, [[1, 4, 4]], eos_id=eos, pad_id=pad, max_new_tokens=6,
                     generator=torch.Generator().manual_seed(0))
    assert batch.completion_ids[0].tolist()[:3] == [pad, x, eos]
    assert batch.completion_mask[0].tolist()[:3] == [1, 1, 1]  # the sampled PAD counts; EOS counts
    assert batch.completion_mask[0, 3:].sum() == 0
    assert not batch.truncated[0]
    assert batch.completion_ids.shape[1] == 3  # stopped as soon as every row hit EOS


def test_truncated_rows_are_flagged_and_fully_masked():
    model = ScriptedLM(vocab=8, script=[5], prompt_len=2)
    batch = generate(model, [[1, 4]], eos_id=2, pad_id=0, max_new_tokens=4)
    assert batch.truncated.tolist() == [True]
    assert batch.completion_mask.tolist() == [[1, 1, 1, 1]]


def test_sampling_uses_the_full_distribution_no_top_k():
    """Empirical next-token frequencies match softmax(logits / T) over the whole vocabulary."""
    vocab = 80  # more than HF's default top_k=50: a truncation would zero the tail
    torch.manual_seed(0)
    fixed = torch.randn(vocab) * 1.5

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, position_ids=None, **kw):
            return SimpleNamespace(logits=fixed.expand(input_ids.shape[0], input_ids.shape[1], vocab).clone())

    n, temperature = 20000, 1.3
    batch = generate(Fixed(), [[1]] * n, eos_id=vocab + 1, pad_id=0, max_new_tokens=1, temperature=temperature,
                     generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(batch.completion_ids[:, 0], minlength=vocab).float() / n
    expected = torch.softmax(fixed / temperature, -1)
    tail = expected.argsort()[:30]  # the 30 least likely tokens
    assert freq[tail].sum() > 0.5 * expected[tail].sum()
    assert (freq - expected).abs().max() < 4 * torch.sqrt(expected * (1 - expected) / n).max()


def test_left_pad_masks_padding():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_decode_marks_special_tokens_and_truncation_ill_formed(tiny):
    tok = tiny.tokenizer
    one, two = tok("1", add_special_tokens=False).input_ids[0], tok("2", add_special_tokens=False).input_ids[0]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = torch.tensor([[one, two, eos], [one, pad, eos], [one, two, one]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    batch = Batch(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), ids, mask,
                  torch.zeros(3, 3), torch.tensor([False, False, True]))
    texts = decode_completions(tok, batch)
    assert texts[0] == ("12", True)
    assert texts[1][1] is False  # a PAD inside the answer is never a valid answer
    assert texts[2][1] is False  # no EOS: truncated


def _random_lm(arch, vocab=24, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    cls = {"qwen3": Qwen3Config, "llama": LlamaConfig}[arch]
    torch.manual_seed(seed)
    cfg = cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_lean_decode_matches_the_model_forward_path(arch, monkeypatch):
    """Same uniforms -> same tokens and log-probs through the lean step and the model's own forward,
    with ragged left-padded prompts and rows leaving the batch at their EOS (compaction)."""
    from opd.rollout import fast_decode, sampler

    model = _random_lm(arch)
    assert fast_decode.supports(model)
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13], [1, 3]] * 6
    uniforms = torch.rand(len(prompts), 40, generator=torch.Generator().manual_seed(3))
    kept = []
    real_keep = sampler._LeanSteps.keep
    monkeypatch.setattr(sampler._LeanSteps, "keep", lambda self, index: (kept.append(len(index)),
                                                                           real_keep(self, index)))
    fast = generate(model, prompts, eos_id=2, pad_id=0, max_new_tokens=40, uniforms=uniforms, fast=True)
    plain = generate(model, prompts, eos_id=2, pad_id=0, max_new_tokens=40, uniforms=uniforms, fast=False)
    assert kept, "no row finished early: the test does not exercise compaction"
    assert torch.equal(fast.completion_ids, plain.completion_ids)
    assert torch.equal(fast.completion_mask, plain.completion_mask)
    assert torch.equal(fast.truncated, plain.truncated)
    torch.testing.assert_close(fast.sample_logprobs, plain.sample_logprobs, atol=1e-5, rtol=0)
    with torch.no_grad():
        logp = torch.log_softmax(completion_logits(model, fast).float(), -1)
    logp = logp.gather(2, fast.completion_ids[..., None]).squeeze(2) * fast.completion_mask
    torch.testing.assert_close(logp, fast.sample_logprobs, atol=1e-4, rtol=0)


def test_lean_decode_samples_the_forward_pass_distribution():
    """Second-token frequencies (drawn by the lean step) match softmax of a plain forward pass."""
    model = _random_lm("qwen3", vocab=16, seed=1)
    n, prompt = 12000, [1, 5, 6]
    batch = generate(model, [prompt] * n, eos_id=99, pad_id=0, max_new_tokens=2,
                     generator=torch.Generator().manual_seed(0), fast=True)
    first = batch.completion_ids[:, 0]
    top = int(torch.bincount(first).argmax())
    rows = first == top
    freq = torch.bincount(batch.completion_ids[rows, 1], minlength=16).float() / rows.sum()
    with torch.no_grad():
        expected = torch.softmax(model(torch.tensor([prompt + [top]])).logits[0, -1].float(), -1)
    se = torch.sqrt(expected * (1 - expected) / rows.sum())
    assert (freq - expected).abs().max() < 4.5 * se.max()


def test_a_rows_sample_does_not_depend_on_its_batch(tiny):
    """One uniform per row and position: the rows of a batch come out the same when split in two
    (what lets rollout workers share a batch and match a single process)."""
    tok = tiny.tokenizer
    prompts = [tok(p).input_ids for p in ["1+2=", "123+45=", "9=", "77+1="]]
    uniforms = torch.rand(4, 10, generator=torch.Generator().manual_seed(5))
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=10)
    whole = generate(tiny.model, prompts, uniforms=uniforms, **kw)
    halves = [generate(tiny.model, prompts[i:i + 2], uniforms=uniforms[i:i + 2], **kw) for i in (0, 2)]
    for i, part in enumerate(halves):
        width = part.completion_ids.shape[1]
        assert torch.equal(whole.completion_ids[2 * i:2 * i + 2, :width], part.completion_ids)
        assert torch.equal(whole.completion_mask[2 * i:2 * i + 2, :width], part.completion_mask)


def test_lean_decode_in_bfloat16_returns_the_models_own_logprobs():
    """A bf16 model (the teacher's default precision where native) decodes through the lean step
    with log-probs that a plain bf16 forward pass gives for the same tokens."""
    model = _random_lm("qwen3", seed=2).to(torch.bfloat16)
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13]] * 4
    batch = generate(model, prompts, eos_id=2, pad_id=0, max_new_tokens=16,
                     generator=torch.Generator().manual_seed(0), fast=True)
    with torch.no_grad():
        logp = torch.log_softmax(completion_logits(model, batch).float(), -1)
    logp = logp.gather(2, batch.completion_ids[..., None]).squeeze(2) * batch.completion_mask
    assert batch.completion_mask.sum() > 20
    torch.testing.assert_close(logp, batch.sample_logprobs, atol=5e-2, rtol=0)
