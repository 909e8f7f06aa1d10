"""A teacher loaded in this process (any Hugging Face causal LM), scoring with its hidden states.

It keeps final hidden states, not logits (opd/train/chunked.py applies the head chunk by chunk), and
scores in bfloat16 where that is native and accurate (`dtype: auto`, the decision in the manifest).
"""

from __future__ import annotations

import torch

from opd.backends.devices import model_device, native_bf16, resolve_device
from opd.backends.hf import load_model
from opd.batch import Batch, left_pad, make_sft_batch
from opd.rollout.prompts import encode_answers, encode_prompts
from opd.rollout.sampler import generate
from opd.scores import TeacherScores, limit_vocab
from opd.train.chunked import DEFAULT_CHUNK_ELEMENTS, completion_hidden, split_lm, token_logprobs_chunked
from opd.train.step import micro_batches

BF16_MAX_ERROR = 0.05  # nats; bench/NOTES.md: bf16 teacher log-probs were within 0.015 of float32 on W


@torch.inference_mode()
def teacher_hidden(model, batch: Batch, max_tokens: int = 0) -> torch.Tensor:
    """The teacher's final hidden states [B, T, H] at the completion positions (no gradient, no logits),
    on the teacher's device: the batch moves there once. The forward runs over row groups of at most
    `max_tokens` padded tokens (0 = the whole batch), so its activations stay bounded."""
    batch = batch.to(model_device(model))
    width = batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]
    # clone: the completion positions only, not a view that keeps the prompt's hidden states alive
    return torch.cat([completion_hidden(model, batch.rows(part)).clone()
                      for part in micro_batches(batch.prompt_ids.shape[0], width, 0, max_tokens)])


def score(model, batch: Batch, hidden: torch.Tensor | None = None, vocab_size: int | None = None,
          chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> TeacherScores:
    """One local model's scores of a batch: hidden states + head, and its log-prob of each sampled token
    (over the first `vocab_size` ids: the tokenizer's real ones), `chunk_elements` logits at a time.
    Log-probs come back on the CPU."""
    hidden = teacher_hidden(model, batch) if hidden is None else hidden
    _, head = split_lm(model)
    head = limit_vocab(head, vocab_size)
    vocab = vocab_size or model.config.vocab_size
    sel = batch.completion_mask.bool()
    logprobs = torch.zeros(batch.completion_ids.shape)
    with torch.no_grad():
        logprobs[sel] = token_logprobs_chunked(head, hidden[sel.to(hidden.device)],
                                               batch.completion_ids[sel].to(hidden.device), vocab,
                                               chunk_elements).cpu()
    return TeacherScores(logprobs, [hidden], [head], torch.zeros(hidden.shape[0], dtype=torch.long))


def auto_precision(model, probe: Batch, max_error: float = BF16_MAX_ERROR) -> dict:
    """Cast a float32 teacher to bfloat16 if its device computes it natively and its log-probs of
    the probe's completion tokens stay within max_error nats of float32; returns what was decided."""
    if not native_bf16(model_device(model)):
        return {"dtype": "float32", "reason": f"no native bfloat16 on {model_device(model)}"}
    fp32 = score(model, probe).logprobs
    model.to(torch.bfloat16)
    bf16 = score(model, probe).logprobs
    sel = probe.completion_mask.bool()
    diff = (bf16 - fp32)[sel].abs()
    keep = float(diff.max()) <= max_error
    if not keep:
        model.to(torch.float32)
    return {"dtype": "bfloat16" if keep else "float32", "bf16_max_logprob_error": round(float(diff.max()), 5),
            "bf16_mean_logprob_error": round(float(diff.mean()), 6), "probe_tokens": int(sel.sum()),
            "threshold": max_error,
            "reason": "native bfloat16, error within the threshold" if keep else "bfloat16 error above the threshold"}


class LocalTeacher:
    returns = "logits"

    def __init__(self, name: str, model_name: str, *, tasks=("*",), schema=None, student_schema=None,
                 dtype: str = "auto", revision: str | None = None, device: str = "auto",
                 device_map: str | None = None, vocab_size: int | None = None):
        """vocab_size: the shared tokenizer's real ids (the teacher's embedding may be padded past them)."""
        self.name, self.tasks, self.dtype, self.revision = name, tuple(tasks), dtype, revision
        self.vocab_size = vocab_size
        # loaded directly in its target dtype on its device: auto = bfloat16 when stored in 16 bits and
        # native there; a float32-stored teacher is probed in prepare()
        self.loaded = load_model(model_name, dtype=dtype, revision=revision, device=resolve_device(device),
                                 device_map=device_map)
        self.schema = schema  # None: the student's prompt schema
        self.student_schema = student_schema
        self.precision: dict | None = None  # the dtype it scores in and why (manifest)
        # memory budgets, set by the run from its config: KV cache of a decode batch (rollout.kv_cache_gib),
        # tokens per forward (train.micro_batch_tokens), logits per chunk (train.logits_chunk)
        self.kv_cache_gib: float | None = None
        self.max_tokens = 0
        self.logits_chunk = DEFAULT_CHUNK_ELEMENTS

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def prompts(self, examples) -> list[list[int]]:
        """The prompts as this teacher reads them (its own schema, if it has one)."""
        return encode_prompts(examples, self.schema or self.student_schema, self.tokenizer)

    def prepare(self, examples, n: int = 8) -> None:
        """dtype auto: bfloat16 where native and the measured error on n examples (prompt + reference
        answer) is small, else float32."""
        if self.dtype != "auto":
            self.precision = {"dtype": self.dtype, "reason": "set in the config"}
            return
        if self.model.dtype != torch.float32:  # stored in 16 bits and loaded so: casting up adds nothing
            self.precision = {"dtype": str(self.model.dtype).removeprefix("torch."),
                              "reason": f"stored in {self.loaded.stored_dtype}, native on {self.loaded.device}"}
            return
        mine = examples[:n]
        probe = make_sft_batch(self.prompts(mine), encode_answers(mine, self.tokenizer), self.tokenizer.pad_token_id)
        self.precision = auto_precision(self.model, probe)

    def hidden(self, batch: Batch) -> torch.Tensor:
        """Final hidden states at the completion positions (a Ray-hosted teacher computes them remotely)."""
        return teacher_hidden(self.model, batch, self.max_tokens)

    def score(self, batch: Batch, examples) -> TeacherScores:
        if self.schema is not None:  # the teacher reads its own rendering of the same prompt
            batch = Batch(*left_pad(self.prompts(examples), self.tokenizer.pad_token_id), batch.completion_ids,
                          batch.completion_mask, batch.sample_logprobs, batch.truncated)
        return score(self.model, batch, self.hidden(batch), self.vocab_size, self.logits_chunk)

    def generate(self, prompts, examples, *, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                 uniforms=None) -> Batch:
        """Completions by the teacher reading its own prompt; returned under the student's `prompts`."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = generate(self.model, self.prompts(examples) if self.schema is not None else prompts,
                           eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                           max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, uniforms=uniforms,
                           vocab_size=self.vocab_size, kv_cache_gib=self.kv_cache_gib)
        finally:
            self.model.train(was_training)
        if self.schema is not None:  # ... and the student trains on it under the shared prompt
            out.prompt_ids, out.prompt_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        return out

    def describe(self) -> dict:
        from opd.store.manifest import model_entry

        return {**model_entry(self.loaded, self.revision), "model": self.loaded.name, "precision": self.precision}
