"""The contract every rollout backend keeps (opd/rollout/backend.py), checked against a plain Hugging
Face forward pass of the same weights: layout and masks, log-probs of the sampling distribution,
the full-vocabulary distribution itself, greedy = argmax, weight pushes, seeds.

The HF backend always runs (CPU). The vLLM backend runs only where vllm imports and CUDA is
available; its tolerances allow for bfloat16 activations (its reference model has its weights
rounded to bfloat16, so only activation rounding is tolerated): log-probs within 5e-2 per token and
1.5e-2 on average, a greedy token within 5e-2 nats of the reference maximum. The HF backend is held
to 1e-4.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from opd.backends.hf import init_model, load_model
from opd.errors import OpdError
from opd.rollout.backend import HFBackend, RolloutBackend
from opd.rollout.sampler import Batch, completion_logits

# 94 printable characters + 4 specials = 98 tokens (> 64): a sampler with HF's default top_k=50 would
# never draw the tokens ranked 51..98, which here carry several percent of the mass.
CHARS = "".join(chr(c) for c in range(33, 127))
PROMPTS = ["1+2=", "123+45=", "9=", "hello", "abc", "x*y", "Q", "(7)"]


VLLM_SKIP = ("vllm is not installed (pip install 'opd[vllm]')" if importlib.util.find_spec("vllm") is None
             else None if torch.cuda.is_available() else "vllm needs a CUDA GPU; torch.cuda.is_available() is False")


@dataclass
class Case:
    """A backend under test, the precision its weights are held in, and its tolerances."""

    backend: RolloutBackend
    weight_dtype: torch.dtype
    atol: float  # max |log-prob − reference| over sampled tokens
    mean_atol: float  # mean of the same
    margin: float  # a greedy token's logit may sit this far below the reference maximum


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Qwen3 from `init_model`, its final norm scaled so next-token logits spread over ~1 nat."""
    out = tmp_path_factory.mktemp("contract") / "model"
    init_model("qwen3", layers=2, hidden=128, heads=2, tokenizer_texts=[CHARS], out=out, seed=0)
    loaded = load_model(str(out))
    with torch.no_grad():
        loaded.model.model.norm.weight.mul_(4.0)
    loaded.model.save_pretrained(out, safe_serialization=True)
    return out


def reference(model_dir, dtype: torch.dtype = torch.float32, state_dict: dict | None = None):
    """The plain HF model (float32 compute) with the given weights, rounded to the backend's precision."""
    model = load_model(str(model_dir)).model.eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.to(dtype).float()


@pytest.fixture(scope="module")
def ids(model_dir):
    """Token ids of the prompts, the pad id, and the backend's EOS: the token most rows of a seeded
    sample contain, so one batch has rows that stop at EOS and rows that run out of tokens."""
    tok = load_model(str(model_dir)).tokenizer
    prompts = [tok(p).input_ids for p in PROMPTS]
    free = HFBackend(reference(model_dir), eos_id=-1, pad_id=tok.pad_token_id).generate(
        prompts * 12, max_new_tokens=12, seed=0)
    seen = torch.stack([(free.completion_ids == v).any(1).float().mean() for v in range(len(tok))])
    seen[tok.pad_token_id] = -1
    return SimpleNamespace(prompts=prompts, pad=tok.pad_token_id, eos=int(seen.argmax()))


@pytest.fixture(scope="module", params=[
    "hf", pytest.param("vllm", marks=pytest.mark.skipif(VLLM_SKIP is not None, reason=VLLM_SKIP or ""))])
def case(request, model_dir, ids) -> Case:
    if request.param == "hf":
        return Case(HFBackend(reference(model_dir), ids.eos, ids.pad), torch.float32, 1e-4, 1e-5, 1e-4)
    from opd.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(model_dir), ids.eos, ids.pad, dtype="bfloat16", gpu_memory_utilization=0.2,
                          max_model_len=256, enforce_eager=True)
    return Case(backend, torch.bfloat16, 5e-2, 1.5e-2, 5e-2)


def check_layout(batch: Batch, prompts: list[list[int]], eos: int, pad: int, max_new_tokens: int) -> None:
    """Prompts left-padded; each completion masked up to and including its first EOS and nothing after;
    `truncated` exactly for the rows without EOS, which then used every token."""
    width = batch.prompt_ids.shape[1]
    for i, p in enumerate(prompts):
        assert batch.prompt_ids[i, width - len(p):].tolist() == p
        assert batch.prompt_mask[i].tolist() == [0] * (width - len(p)) + [1] * len(p)
        assert set(batch.prompt_ids[i, :width - len(p)].tolist()) <= {pad}
    lengths = batch.completion_mask.sum(1)
    assert batch.completion_ids.shape[1] == int(lengths.max()) <= max_new_tokens
    for i in range(len(prompts)):
        n, toks = int(lengths[i]), batch.completion_ids[i].tolist()
        assert n >= 1 and batch.completion_mask[i].tolist() == [1] * n + [0] * (len(toks) - n)
        assert eos not in toks[:n - 1] and set(toks[n:]) <= {pad}
        assert bool(batch.truncated[i]) == (toks[n - 1] != eos)
        assert not batch.truncated[i] or n == max_new_tokens
        assert torch.all(batch.sample_logprobs[i, n:] == 0) and torch.all(batch.sample_logprobs[i, :n] <= 0)


def ref_logprobs(model, batch: Batch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference logits [B, T, V] of the completion tokens and the tokens' log-probs at `temperature`."""
    with torch.no_grad():
        logits = completion_logits(model, batch).float()
    logp = torch.log_softmax(logits / temperature, -1).gather(2, batch.completion_ids[..., None]).squeeze(2)
    return logits, logp


def check_logprobs(case: Case, batch: Batch, ref_logp: torch.Tensor) -> None:
    mask = batch.completion_mask.bool()
    err = (ref_logp[mask] - batch.sample_logprobs[mask]).abs()
    assert err.max() <= case.atol and err.mean() <= case.mean_atol, (err.max(), err.mean())


def check_greedy(case: Case, batch: Batch, model) -> None:
    """Every greedy token is the reference argmax (within the backend's margin), log-probs at T=1."""
    logits, logp = ref_logprobs(model, batch, 1.0)
    mask = batch.completion_mask.bool()
    chosen = logits.gather(2, batch.completion_ids[..., None]).squeeze(2)
    assert (logits.max(-1).values - chosen)[mask].max() <= case.margin
    check_logprobs(case, batch, logp)


def test_layout_and_masks(case, ids):
    assert isinstance(case.backend, RolloutBackend)
    prompts = ids.prompts * 12
    batch = case.backend.generate(prompts, max_new_tokens=12, temperature=1.0, seed=1)
    check_layout(batch, prompts, ids.eos, ids.pad, 12)
    assert batch.truncated.any() and not batch.truncated.all()  # both kinds of row were checked
    assert batch.completion_ids.dtype == torch.long and batch.truncated.dtype == torch.bool


def test_sample_logprobs_equal_a_plain_forward_pass(case, ids, model_dir):
    batch = case.backend.generate(ids.prompts * 4, max_new_tokens=10, temperature=0.7, seed=2)
    check_logprobs(case, batch, ref_logprobs(reference(model_dir, case.weight_dtype), batch, 0.7)[1])


def test_samples_follow_the_full_vocabulary_distribution(case, ids, model_dir):
    """4000 one-token draws match softmax(logits / T) within 4.5 standard errors: each token expected
    10+ times, the rarer ones pooled (too few draws each for a normal approximation), and the mass
    beyond the 50 likeliest tokens, which a top-k=50 sampler would never draw."""
    n, temperature, prompt = 4000, 0.7, ids.prompts[3]
    batch = case.backend.generate([prompt] * n, max_new_tokens=1, temperature=temperature, seed=3)
    with torch.no_grad():
        logits = reference(model_dir, case.weight_dtype)(input_ids=torch.tensor([prompt])).logits[0, -1]
    p = torch.softmax(logits.double() / temperature, -1)
    freq = torch.bincount(batch.completion_ids[:, 0], minlength=len(p)).double() / n
    assert len(freq) == len(p) > 64
    common, tail = n * p >= 10, p.argsort(descending=True)[50:]
    assert p[tail].sum() > 0.03  # the test can see a top-50 truncation
    bins = [(freq[i], p[i]) for i in common.nonzero()[:, 0]]
    bins += [(freq[~common].sum(), p[~common].sum()), (freq[tail].sum(), p[tail].sum())]
    z = [float((f - q).abs() / (q * (1 - q) / n).sqrt()) for f, q in bins]
    assert max(z) <= 4.5, z


def test_greedy_is_deterministic_and_the_argmax(case, ids, model_dir):
    first = case.backend.generate(ids.prompts * 2, max_new_tokens=8, greedy=True, seed=0)
    again = case.backend.generate(ids.prompts * 2, max_new_tokens=8, greedy=True, seed=99)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.completion_mask, again.completion_mask)
    check_greedy(case, first, reference(model_dir, case.weight_dtype))


def test_load_weights_switches_the_policy_and_its_version(case, ids, model_dir):
    """After a push, greedy decoding and its log-probs follow the new weights (no stale weights, no
    stale prefix cache), and `version` says which weights those are; pushing back restores them."""
    original = reference(model_dir).state_dict()
    g = torch.Generator().manual_seed(0)
    perturbed = {k: v + torch.randn(v.shape, generator=g) * v.std() if v.dim() > 1 else v.clone()
                 for k, v in original.items()}
    prompts = ids.prompts * 2
    before = case.backend.generate(prompts, max_new_tokens=8, greedy=True)
    try:
        case.backend.load_weights(perturbed, version=7)
        assert case.backend.version == 7
        after = case.backend.generate(prompts, max_new_tokens=8, greedy=True)
        assert not torch.equal(before.completion_ids, after.completion_ids)  # the push is visible
        check_greedy(case, after, reference(model_dir, case.weight_dtype, perturbed))
    finally:
        case.backend.load_weights(original, version=8)
    assert case.backend.version == 8
    check_greedy(case, case.backend.generate(prompts, max_new_tokens=8, greedy=True),
                 reference(model_dir, case.weight_dtype))


def test_same_seed_same_samples(case, ids):
    prompts = ids.prompts * 4
    a, b, c = (case.backend.generate(prompts, max_new_tokens=8, temperature=1.0, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.truncated, b.truncated)
    torch.testing.assert_close(a.sample_logprobs, b.sample_logprobs, atol=1e-6, rtol=0)
    assert not torch.equal(a.completion_ids, c.completion_ids)  # ... and the seed is used


# vLLM-specific pieces that need no GPU: the install hint, and the conversion of vLLM's outputs.

def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch):
    from opd.backends.vllm import VLLMBackend  # importing the module never needs vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(OpdError, match=r"pip install 'opd\[vllm\]'"):
        VLLMBackend("some/model", eos_id=2, pad_id=0)


def _completion(tokens: list[int], finish_reason: str):
    logprobs = [{t: SimpleNamespace(logprob=-0.5 - i)} for i, t in enumerate(tokens)]
    return SimpleNamespace(token_ids=tokens, logprobs=logprobs, finish_reason=finish_reason)


def test_vllm_outputs_convert_to_the_batch_layout():
    from opd.backends.vllm import row_seed, to_batch

    eos, pad, prompts = 2, 0, [[1, 5, 6], [1, 7]]
    batch = to_batch(prompts, [_completion([9, 8, eos], "stop"), _completion([9, 9, 9, 9], "length")],
                     eos_id=eos, pad_id=pad)
    check_layout(batch, prompts, eos, pad, max_new_tokens=4)
    assert batch.truncated.tolist() == [False, True]
    assert batch.sample_logprobs[0].tolist() == [-0.5, -1.5, -2.5, 0.0]
    with pytest.raises(OpdError, match="without returning its EOS"):  # a vLLM that strips the stop token
        to_batch(prompts[:1], [_completion([9, 8], "stop")], eos_id=eos, pad_id=pad)
    assert len({row_seed(s, r) for s in range(3) for r in range(1000)}) == 3000


def test_vllm_backend_gives_vllm_the_documented_settings(monkeypatch):
    """On a stand-in `vllm` module (no GPU needed): engine and sampling settings, one seed per row,
    and a weight push that reaches the model and resets the prefix cache."""
    from opd.backends.vllm import VLLMBackend

    seen = SimpleNamespace(loaded=[], resets=[])

    class LLM:
        def __init__(self, **kwargs):
            seen.engine = kwargs

        def generate(self, prompts, sampling_params, use_tqdm):
            seen.params = sampling_params
            return [SimpleNamespace(outputs=[_completion([4, 2], "stop")]) for _ in prompts]

        apply_model = staticmethod(lambda func: [func(SimpleNamespace(load_weights=seen.loaded.append))])
        reset_prefix_cache = staticmethod(lambda: seen.resets.append(1) is None)

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(__version__="0.30.0", LLM=LLM, SamplingParams=dict))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    backend = VLLMBackend("some/model", eos_id=2, pad_id=0)
    assert seen.engine["logprobs_mode"] == "processed_logprobs"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    batch = backend.generate([[1, 3], [1]], max_new_tokens=5, temperature=0.7, seed=4)
    assert batch.completion_ids.tolist() == [[4, 2]] * 2
    keys = ("temperature", "top_k", "top_p", "min_p", "logprobs", "max_tokens", "ignore_eos", "stop_token_ids")
    assert [[p[k] for k in keys] for p in seen.params] == [[0.7, 0, 1.0, 0.0, 0, 5, True, [2]]] * 2
    assert len({p["seed"] for p in seen.params}) == 2
    backend.load_weights({"lm_head.weight": torch.ones(2)}, version=3)
    assert backend.version == 3 and seen.resets == [1] and seen.loaded[0][0][0] == "lm_head.weight"
