"""A teacher loaded in this process (any Hugging Face causal LM), scoring with its hidden states.

It keeps final hidden states, not logits (opd/train/chunked.py applies the head chunk by chunk), and
scores in bfloat16 where that is native and accurate (`dtype: auto`, the decision in the manifest).
"""

from __future__ import annotations

import torch

from opd.backends.hf import load_model, native_bf16, weights_sha256
from opd.batch import Batch, left_pad, make_sft_batch
from opd.rollout.prompts import encode_answers, encode_prompts
from opd.rollout.sampler import generate
from opd.scores import TeacherScores
from opd.train.chunked import completion_hidden, split_lm, token_logprobs_chunked

BF16_MAX_ERROR = 0.05  # nats; bench/NOTES.md: bf16 teacher log-probs were within 0.015 of float32 on W


@torch.inference_mode()
def teacher_hidden(model, batch: Batch) -> torch.Tensor:
    """The teacher's final hidden states [B, T, H] at the completion positions (no gradient, no logits)."""
    return completion_hidden(model, batch)


def score(model, batch: Batch, hidden: torch.Tensor | None = None) -> TeacherScores:
    """One local model's scores of a batch: hidden states + head, and its log-prob of each sampled token."""
    hidden = teacher_hidden(model, batch) if hidden is None else hidden
    _, head = split_lm(model)
    sel = batch.completion_mask.bool()
    logprobs = torch.zeros(batch.completion_ids.shape)
    with torch.no_grad():
        logprobs[sel] = token_logprobs_chunked(head, hidden[sel], batch.completion_ids[sel], model.config.vocab_size)
    return TeacherScores(logprobs, [hidden], [head], torch.zeros(hidden.shape[0], dtype=torch.long))


def auto_precision(model, probe: Batch, max_error: float = BF16_MAX_ERROR) -> dict:
    """Cast a float32 teacher to bfloat16 if this machine computes it natively and its log-probs of
    the probe's completion tokens stay within max_error nats of float32; returns what was decided."""
    if not native_bf16():
        return {"dtype": "float32", "reason": "no native bfloat16 on this machine"}
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
                 dtype: str = "auto", revision: str | None = None):
        self.name, self.tasks, self.dtype, self.revision = name, tuple(tasks), dtype, revision
        self.loaded = load_model(model_name, dtype=dtype, revision=revision)
        self.schema = schema  # None: the student's prompt schema
        self.student_schema = student_schema
        self.precision: dict | None = None  # the dtype it scores in and why (manifest)

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
        mine = examples[:n]
        self.loaded.weights_hash = weights_sha256(self.model)  # the weights as stored, not as cast
        probe = make_sft_batch(self.prompts(mine), encode_answers(mine, self.tokenizer), self.tokenizer.pad_token_id)
        self.precision = auto_precision(self.model, probe)

    def hidden(self, batch: Batch) -> torch.Tensor:
        """Final hidden states at the completion positions (a Ray-hosted teacher computes them remotely)."""
        return teacher_hidden(self.model, batch)

    def score(self, batch: Batch, examples) -> TeacherScores:
        if self.schema is not None:  # the teacher reads its own rendering of the same prompt
            batch = Batch(*left_pad(self.prompts(examples), self.tokenizer.pad_token_id), batch.completion_ids,
                          batch.completion_mask, batch.sample_logprobs, batch.truncated)
        return score(self.model, batch, self.hidden(batch))

    def generate(self, prompts, examples, *, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                 generator=None) -> Batch:
        """Completions by the teacher reading its own prompt; returned under the student's `prompts`."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = generate(self.model, self.prompts(examples) if self.schema is not None else prompts,
                           eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                           max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy, generator=generator)
        finally:
            self.model.train(was_training)
        if self.schema is not None:  # ... and the student trains on it under the shared prompt
            out.prompt_ids, out.prompt_mask = left_pad(prompts, self.tokenizer.pad_token_id)
        return out

    def describe(self) -> dict:
        from opd.store.manifest import model_entry

        return {**model_entry(self.loaded, self.revision), "model": self.loaded.name, "precision": self.precision}
