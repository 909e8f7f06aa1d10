"""Who samples the student's rollouts: one small interface, so the trainer need not care whether it
is opd's own Hugging Face sampler (always available, CPU or GPU) or vLLM (opd/backends/vllm.py,
optional, GPU only).

Every backend returns the sampler's `Batch` with the same meaning (opd/rollout/sampler.py):
prompts left-padded; the completion mask is 1 on every sampled token up to and including the first
EOS; `sample_logprobs` are log-probs under softmax(logits / temperature) over the full vocabulary
(no top-k, no top-p), because the losses and the importance weights use them as the sampling
policy's; `truncated` marks rows with no EOS. tests/rollout/test_backend_contract.py holds every
backend to this against a plain Hugging Face forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from opd.batch import Batch
from opd.rollout.sampler import generate
from opd.sharded import gathered


@runtime_checkable
class RolloutBackend(Protocol):
    """Samples completions with the weights it was last given, and says which version those are."""

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False, seed: int = 0, uniforms: torch.Tensor | None = None) -> Batch:
        """Completions for token-id prompts; the same seed gives the same samples. `uniforms`
        [B, max_new_tokens] (one per row and position), when the backend can use them, make each row's
        sample independent of how rows are split across workers (opd's sampler and Ray workers do)."""
        ...

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Take the trainer's new weights (Hugging Face parameter names); `version` tags the policy."""
        ...

    @property
    def version(self) -> int:
        """Policy version of the weights now sampling (so a stale sample is never passed off as fresh)."""
        ...


class HFBackend:
    """opd's KV-cache sampler (`opd.rollout.sampler.generate`) on a Hugging Face causal LM."""

    def __init__(self, model, eos_id: int, pad_id: int, *, fast: bool = True, version: int = 0,
                 vocab_size: int | None = None, kv_cache_gib: float | None = None):
        """vocab_size: the tokenizer's real ids (a padded embedding's extra rows are never sampled);
        kv_cache_gib: the KV-cache budget per decode batch (rows are decoded in groups that fit)."""
        self.model, self.eos_id, self.pad_id, self.fast = model, eos_id, pad_id, fast
        self.vocab_size, self.kv_cache_gib = vocab_size, kv_cache_gib
        self._version = version

    @property
    def version(self) -> int:
        return self._version

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 greedy: bool = False, seed: int = 0, uniforms: torch.Tensor | None = None) -> Batch:
        """Sample from the deployed policy (eval mode: no dropout), randomness from `uniforms` or `seed`."""
        was_training = self.model.training
        self.model.eval()
        try:
            with gathered(self.model):  # FSDP2: whole weights, no collective per token (opd/sharded.py)
                return generate(self.model, prompts, eos_id=self.eos_id, pad_id=self.pad_id,
                                max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy,
                                generator=torch.Generator().manual_seed(seed), uniforms=uniforms, fast=self.fast,
                                vocab_size=self.vocab_size, kv_cache_gib=self.kv_cache_gib)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy the weights in place; strict, so a missing or misnamed tensor fails loudly instead of
        leaving a stale weight behind. The trainer's own model (same storage) needs no copy."""
        own = self.model.state_dict()
        if not (own.keys() == state_dict.keys() and all(_storage(own[k]) == _storage(v) for k, v in state_dict.items())):
            self.model.load_state_dict(dict(state_dict), strict=True)
        self._version = version


def _storage(tensor) -> int:
    """Where a tensor's data lives (an FSDP2 shard: its local part)."""
    return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).data_ptr()
