"""A teacher behind HTTP (`opd serve-teacher`, or vLLM's OpenAI server): it scores token ids it is
sent, returning the sampled tokens' log-probs and, when asked for `top_k`, its top-k per position.

The student's token ids are sent as they are, so the prompt the teacher scores is the student's by
construction. A teacher with another tokenizer (`teacher.tokenizer`) is wrapped in
opd/teachers/cross.py's CrossTokenizerTeacher, which sends the teacher's own token ids instead: its
rendering of the prompt (`prompts`) and the completion's text tokenized by `tokenizer`. The server can
also decode greedily (opd's server), which is how its held-out accuracy is measured.
"""

from __future__ import annotations

import torch

from opd.batch import Batch, left_pad
from opd.errors import OpdError
from opd.rollout.prompts import encode_prompts
from opd.scores import TeacherScores


class ServedTeacher:
    def __init__(self, name: str, remote, *, tasks=("*",), pad_id: int, eos_id: int, tokenizer_hash: str | None = None,
                 vocab_size: int | None = None, tokenizer=None, schema=None, student_schema=None,
                 hash_of: str = "the student"):
        """tokenizer, schema, student_schema: how it renders its own prompts (a cross-tokenizer teacher);
        hash_of: whose tokenizer `tokenizer_hash` is (named when the server's differs)."""
        self.name, self.tasks, self.remote = name, tuple(tasks), remote
        self.pad_id, self.eos_id, self.tokenizer_hash, self.hash_of = pad_id, eos_id, tokenizer_hash, hash_of
        self.tokenizer, self.schema, self.student_schema = tokenizer, schema, student_schema
        if vocab_size and remote.top_k > vocab_size:  # cannot return more alternatives than there are tokens
            remote.top_k = vocab_size
        self.top_k = remote.top_k  # what is asked for; prepare() finds out what the server answers
        self.info: dict = {}

    @property
    def returns(self) -> str:
        return "topk" if self.top_k else "logprobs"

    def prompts(self, examples) -> list[list[int]]:
        """The prompts as this teacher reads them: its schema (else the student's), its tokenizer."""
        return encode_prompts(examples, self.schema or self.student_schema, self.tokenizer)

    def prepare(self, examples) -> None:
        """Check the server's tokenizer against ours (when it says), and whether it answers top-k."""
        try:
            self.info = self.remote.info() if hasattr(self.remote, "info") else self.remote.health()
        except OpdError:
            raise
        except Exception as exc:  # noqa: BLE001 - a server without the endpoint: nothing to compare
            self.info = {"error": str(exc)}
        if self.top_k:  # asked for top-k: does the server answer it (opd, vLLM) or only sampled tokens?
            try:
                self.remote.score_tokens([[self.eos_id, self.eos_id]], [1])
            except OpdError as exc:
                if "prompt_logprobs" not in str(exc):
                    raise
                self.top_k = self.remote.top_k = 0  # the sampled-token estimator, then (objective auto)
        served = self.info.get("tokenizer_sha256")
        if served and self.tokenizer_hash and served != self.tokenizer_hash:
            raise OpdError(f"teacher at {self.remote.url} has another tokenizer (sha256 {served[:12]}…) than "
                           f"{self.hash_of} ({self.tokenizer_hash[:12]}…); opd sends token ids, so both must match"
                           + ("" if self.hash_of != "the student" else
                              " (a teacher with another tokenizer: name it in teacher.tokenizer)"))

    def score(self, batch: Batch, examples) -> TeacherScores:
        """Send prompt + completion token ids (no padding); log-probs [b, T] and, with top_k, the top-k."""
        seqs, starts = [], []
        for p_ids, p_mask, c_ids, c_mask in zip(batch.prompt_ids.tolist(), batch.prompt_mask.tolist(),
                                                batch.completion_ids.tolist(), batch.completion_mask.tolist()):
            prompt = [t for t, m in zip(p_ids, p_mask) if m]
            seqs.append(prompt + [t for t, m in zip(c_ids, c_mask) if m])
            starts.append(len(prompt))
        lps, tops = self.remote.score_tokens(seqs, starts)
        shape, k = batch.completion_ids.shape, self.top_k
        out = torch.zeros(shape)
        top_lp = torch.full((*shape, k), float("-inf"))
        top_ids = torch.arange(k).expand(*shape, -1).clone()
        for i, lp in enumerate(lps):
            out[i, :len(lp)] = torch.tensor(lp)
            for j, entries in enumerate(tops[i] if k else []):
                best = sorted(entries.items(), key=lambda kv: -kv[1])[:k]
                ids = [t for t, _ in best]
                ids += [t for t in range(k + len(ids)) if t not in entries][:k - len(ids)]  # distinct fillers
                top_ids[i, j] = torch.tensor(ids)
                top_lp[i, j, :len(best)] = torch.tensor([v for _, v in best])
        topk = (top_lp, top_ids) if k else (None, None)
        return TeacherScores(out * batch.completion_mask, owner=torch.zeros(shape[0], dtype=torch.long),
                             topk_logprobs=topk[0], topk_ids=topk[1])

    def generate(self, prompts, examples, *, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                 uniforms=None) -> Batch:
        """Greedy completions from the server (evaluation); a served teacher does not sample traces."""
        if not greedy:
            raise OpdError(f"teacher at {self.remote.url} is served: it scores and decodes greedily, but does not "
                           "sample traces (use a local teacher for sft, mixed or kd)")
        completions = self.remote.generate_greedy(prompts, max_new_tokens)
        ids = torch.full((len(prompts), max(1, max(map(len, completions)))), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        truncated = torch.zeros(len(prompts), dtype=torch.bool)
        for i, seq in enumerate(completions):
            ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq, dtype=torch.long), 1
            truncated[i] = not seq or seq[-1] != self.eos_id
        p_ids, p_mask = left_pad(prompts, self.pad_id)
        return Batch(p_ids, p_mask, ids, mask, torch.zeros(ids.shape), truncated)

    def describe(self) -> dict:
        return {"name": self.remote.url, "url": self.remote.url, "top_k": self.top_k, "weights_sha256": None,
                "health": self.info}
