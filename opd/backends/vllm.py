"""vLLM rollouts behind the `RolloutBackend` interface (opd/rollout/backend.py): optional, GPU only.

`vllm` is imported when a `VLLMBackend` is built, never when this module is imported, so opd
imports (and its CPU tests run) on machines without it. The settings it relies on, and why
(docs/vllm.md has the sources):

- `logprobs_mode="processed_logprobs"` (vLLM >= 0.10.2): the returned log-prob of a sampled token
  is under the distribution it was sampled from, softmax(logits / T); vLLM's default
  (`raw_logprobs`) is before temperature, which would bias every importance weight and loss.
- `top_k=0, top_p=1, min_p=0`, no penalties: full-vocabulary sampling, as in opd's own sampler.
- `ignore_eos=True, stop_token_ids=[eos_id]`: stop at exactly the EOS opd was given, not also at
  the extra EOS ids a model's generation_config.json may list; vLLM keeps the stop token as the
  last of `token_ids`, so it is in the completion and its mask.
- one seed per row, derived from (seed, row): rows are independent draws, a call is reproducible.
- the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`; TRL's colocate mode too), so
  `load_weights` hands the tensors to vLLM's model by reference through `LLM.apply_model`, then
  resets the prefix cache, whose KV blocks were computed with the old weights.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch

from opd.errors import OpdError
from opd.batch import Batch, left_pad

INSTALL_HINT = "pip install 'opd[vllm]'"
MIN_VLLM = "0.10.2"  # first release with logprobs_mode="processed_logprobs" (vllm-project/vllm#22387)
MIN_TEMPERATURE = 0.01  # vLLM raises smaller temperatures to this, with only a log warning


def _import_vllm():
    """The vllm module, or a one-line OpdError saying how to get it."""
    try:
        import vllm
    except ImportError:
        raise OpdError(f"the vLLM rollout backend needs vllm >= {MIN_VLLM} and a CUDA GPU: {INSTALL_HINT}") from None
    from packaging.version import Version

    if Version(Version(vllm.__version__).base_version) < Version(MIN_VLLM):
        raise OpdError(f"vllm {vllm.__version__} is too old for the vLLM rollout backend (needs >= {MIN_VLLM} "
                       f"for processed log-probs): {INSTALL_HINT}")
    return vllm


@contextmanager
def _user_rng_kept() -> Iterator[None]:
    """An in-process engine seeds the global RNGs of the process that builds it (vLLM's
    reproducibility docs); put the trainer's back, so its own randomness does not depend on the backend."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


def row_seed(seed: int, row: int) -> int:
    """The seed of one row: distinct rows draw independently, the same (seed, row) draws the same."""
    return (seed * 1_000_003 + row) % 2**63


def _load_into(weights: list[tuple[str, torch.Tensor]], model) -> None:
    """Runs on vLLM's model: its own loader maps Hugging Face names onto its fused layers (q/k/v,
    gate/up) and skips a tied lm_head, copying in place (CUDA graphs stay valid)."""
    model.load_weights(weights)


def to_batch(prompts: list[list[int]], completions, *, eos_id: int, pad_id: int) -> Batch:
    """vLLM completions (`RequestOutput.outputs[0]`: token_ids, per-token logprob dicts) in the
    sampler's Batch layout: EOS included and masked, rows without EOS `truncated`."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    rows = []
    for c in completions:
        ids = [int(t) for t in c.token_ids]
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise OpdError("vLLM returned no log-prob per sampled token (SamplingParams.logprobs=0 is required)")
        lps = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs)]
        stopped = eos_id in ids
        if getattr(c, "finish_reason", None) == "stop" and not stopped:
            raise OpdError(f"vLLM stopped a completion without returning its EOS token {eos_id}; "
                           "this vLLM version is not supported by the vLLM rollout backend")
        end = ids.index(eos_id) + 1 if stopped else len(ids)  # nothing after the first EOS
        rows.append((ids[:end], lps[:end], not stopped))
    width = max((len(ids) for ids, _, _ in rows), default=0)
    completion_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    sample_logprobs = torch.zeros((len(rows), width))
    for i, (ids, lps, _) in enumerate(rows):
        completion_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[i, :len(ids)] = 1
        sample_logprobs[i, :len(ids)] = torch.tensor(lps)
    return Batch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, sample_logprobs=sample_logprobs,
                 truncated=torch.tensor([t for _, _, t in rows], dtype=torch.bool))


class VLLMBackend:
    """Samples with vLLM's offline `LLM` on a local model folder (hub layout, e.g. from `init_model`
    or `save_pretrained`); weights pushed with `load_weights` replace the folder's."""

    def __init__(self, model_path: str, eos_id: int, pad_id: int, *, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.3, version: int = 0, **llm_kwargs):
        vllm = _import_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: weights pass by reference
        llm_kwargs.setdefault("skip_tokenizer_init", True)  # token ids in, token ids out
        self.eos_id, self.pad_id, self._version = eos_id, pad_id, version
        self._sampling_params = vllm.SamplingParams
        try:
            with _user_rng_kept():
                self.llm = vllm.LLM(model=str(model_path), dtype=dtype, logprobs_mode="processed_logprobs",
                                    gpu_memory_utilization=gpu_memory_utilization, **llm_kwargs)
        except TypeError as exc:  # an engine argument this vLLM does not take
            raise OpdError(f"vllm {vllm.__version__} rejected the engine settings ({exc}): {INSTALL_HINT}") from None
        if getattr(getattr(vllm, "envs", None), "VLLM_ENABLE_V1_MULTIPROCESSING", False):
            raise OpdError("the vLLM engine runs in a separate process (an earlier engine in this process fixed "
                           "VLLM_ENABLE_V1_MULTIPROCESSING=1); the vLLM rollout backend needs it in-process")

    @property
    def version(self) -> int:
        return self._version

    def _params(self, max_new_tokens: int, temperature: float, greedy: bool, seed: int):
        return self._sampling_params(
            n=1, temperature=0.0 if greedy else temperature, top_k=0, top_p=1.0, min_p=0.0,
            presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
            max_tokens=max_new_tokens, min_tokens=0, logprobs=0, seed=None if greedy else seed,
            ignore_eos=True, stop_token_ids=[self.eos_id], skip_special_tokens=False, detokenize=False)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False, seed: int = 0, uniforms: torch.Tensor | None = None) -> Batch:
        """Sample (greedy: temperature 0) one completion per prompt, in prompt order. vLLM draws its own
        randomness: `uniforms` are not used, each row is seeded from (seed, row) instead."""
        if not greedy and temperature < MIN_TEMPERATURE:
            raise OpdError(f"vLLM samples at temperature >= {MIN_TEMPERATURE} (got {temperature}); use greedy")
        params = [self._params(max_new_tokens, temperature, greedy, row_seed(seed, i)) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling_params=params,
                                    use_tqdm=False)
        return to_batch(prompts, [o.outputs[0] for o in outputs], eos_id=self.eos_id, pad_id=self.pad_id)

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy the trainer's weights into vLLM's model, then drop the prefix cache built with the old ones."""
        weights = [(name, t.detach()) for name, t in state_dict.items()]
        self.llm.apply_model(partial(_load_into, weights))
        if self.llm.reset_prefix_cache() is False:
            raise OpdError("vLLM could not reset its prefix cache after a weight update")
        self._version = version
