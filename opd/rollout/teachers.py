"""The teachers: one, or several routed by task tag (multi-teacher OPD, as in MOPD / verl / ROLL).

Every rollout is scored by the teacher of its task tag. A teacher may render prompts with its own
schema (e.g. a system prompt the student will not see in deployment); otherwise the schema check
makes sure teacher and student see the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.backends.hf import check_same_vocab, load_model, native_bf16, weights_sha256
from opd.errors import OpdError
from opd.rollout.prompts import encode_answers, encode_prompts
from opd.rollout.sampler import Batch, left_pad
from opd.tasks.schema import PromptSchema
from opd.objectives.divergences import teacher_topk
from opd.train.chunked import TeacherScores
from opd.train.sft import make_sft_batch
from opd.train.step import score

BF16_MAX_ERROR = 0.05  # nats; MEASURED.md: bf16 teacher log-probs were within 0.015 of float32 on W


def auto_precision(model, probe: Batch, max_error: float = BF16_MAX_ERROR) -> dict:
    """Cast a float32 teacher to bfloat16 if this machine computes it natively and its log-probs of
    the probe's completion tokens stay within max_error nats of float32; returns what was decided."""
    if not native_bf16():
        return {"dtype": "float32", "reason": "no native bfloat16 on this machine"}
    _, fp32 = score(model, probe)
    model.to(torch.bfloat16)
    _, bf16 = score(model, probe)
    sel = probe.completion_mask.bool()
    diff = (bf16 - fp32)[sel].abs()
    keep = float(diff.max()) <= max_error
    if not keep:
        model.to(torch.float32)
    return {"dtype": "bfloat16" if keep else "float32", "bf16_max_logprob_error": round(float(diff.max()), 5),
            "bf16_mean_logprob_error": round(float(diff.mean()), 6), "probe_tokens": int(sel.sum()),
            "threshold": max_error,
            "reason": "native bfloat16, error within the threshold" if keep else "bfloat16 error above the threshold"}


@dataclass
class Teacher:
    name: str
    loaded: object  # LoadedModel, or None for a remote teacher
    tasks: tuple  # task tags it scores; ("*",) = every tag without a teacher of its own
    schema: PromptSchema | None  # None = the student's schema
    remote: object = None  # RemoteTeacher (scores token ids over HTTP; returns log-probs, not logits)
    dtype: str = "auto"  # requested precision (config); the one used is in `precision`
    precision: dict | None = None  # the dtype used and why, with the measured bf16 error (manifest)


def load_teachers(cfg, student_tok) -> list[Teacher]:
    """`teachers:` list (multi-teacher) or the single `teacher:` section."""
    single = {"name": "teacher", "tasks": ["*"], "dtype": cfg.teacher.dtype, "revision": cfg.teacher.revision}
    if cfg.teacher.url:
        single.update(url=cfg.teacher.url, api_key_env=cfg.teacher.api_key_env, top_k=cfg.teacher.top_k)
    else:
        single["model"] = cfg.teacher.model
    specs = cfg.teachers or [single]
    teachers = []
    for i, spec in enumerate(specs):
        unknown = set(spec) - {"name", "model", "url", "api_key_env", "top_k", "tasks", "dtype", "revision",
                               "prompt_schema"}
        if unknown or ("model" in spec) == ("url" in spec):
            raise OpdError(f"teachers[{i}]: needs 'model' or 'url' (and optional name, tasks, dtype, revision, "
                           f"prompt_schema, api_key_env, top_k); unknown keys: {sorted(unknown)}")
        if "url" in spec:
            teachers.append(Teacher(name=str(spec.get("name", f"teacher{i}")), loaded=None,
                                    tasks=tuple(spec.get("tasks", ["*"])), schema=None, remote=_remote(spec)))
            continue
        dtype = str(spec.get("dtype", "auto"))
        loaded = load_model(str(spec["model"]), dtype=dtype, revision=spec.get("revision"))
        check_same_vocab(loaded.tokenizer, student_tok)
        schema = PromptSchema.from_spec(spec["prompt_schema"]) if spec.get("prompt_schema") else None
        if schema is None and cfg.task.teacher_prompt_schema is not None:
            schema = PromptSchema.from_spec(cfg.task.teacher_prompt_schema)
        teachers.append(Teacher(name=str(spec.get("name", f"teacher{i}")), loaded=loaded,
                                tasks=tuple(spec.get("tasks", ["*"])), schema=schema, dtype=dtype))
    return teachers


def _remote(spec: dict):
    import os

    from opd.backends.remote import RemoteTeacher

    key_env = spec.get("api_key_env")
    if key_env and key_env not in os.environ:
        raise OpdError(f"teacher api_key_env {key_env!r} is not set in the environment")
    return RemoteTeacher(spec["url"], api_key=os.environ.get(key_env) if key_env else None,
                         top_k=int(spec.get("top_k") or 0))


class TeacherPool:
    """Routes task tags to teachers and scores a batch, each row by its own teacher."""

    def __init__(self, teachers: list[Teacher], student_schema: PromptSchema, tokenizer):
        self.teachers, self.student_schema, self.tokenizer = teachers, student_schema, tokenizer
        self.by_tag = {tag: t for t in teachers for tag in t.tasks}
        self.has_logits = all(t.remote is None for t in teachers)  # remote teachers return log-probs only
        remote = [t.remote for t in teachers if t.remote is not None]
        # a served teacher's top-k (teacher.top_k) feeds the topk_* objectives; 0 when any server sends none
        self.top_k = min(r.top_k for r in remote) if remote else 0
        self.workers = None  # RayWorkers when scale.teacher_workers run the teachers' forward passes

    def route(self, tag: str) -> Teacher:
        teacher = self.by_tag.get(tag) or self.by_tag.get("*")
        if teacher is None:
            raise OpdError(f"no teacher for task tag {tag!r} (teachers cover: {', '.join(sorted(self.by_tag))})")
        return teacher

    def check_schemas(self, examples, allow_mismatch: bool, n: int = 8) -> dict:
        """Render a few prompts for student and each teacher; identical token ids, or an explicit opt-in."""
        sample = examples[:n]
        student_ids = encode_prompts(sample, self.student_schema, self.tokenizer)
        report = {}
        for t in self.teachers:
            if t.remote is not None:  # it is sent the student's token ids: identical by construction
                report[t.name] = {"identical": True, "hash": self.student_schema.schema_hash(), "remote": t.remote.url}
                continue
            ids = encode_prompts(sample, t.schema or self.student_schema, t.loaded.tokenizer)
            same = ids == student_ids
            report[t.name] = {"identical": same, "hash": (t.schema or self.student_schema).schema_hash()}
            if not same and not allow_mismatch:
                bad = next(i for i, (a, b) in enumerate(zip(ids, student_ids)) if a != b)
                raise OpdError(f"prompt schema mismatch: teacher {t.name!r} sees "
                               f"{t.loaded.tokenizer.decode(ids[bad])!r} but the student sees "
                               f"{self.tokenizer.decode(student_ids[bad])!r}; set task.allow_schema_mismatch: true "
                               f"if the difference is on purpose")
        return report

    def settle_precision(self, examples, n: int = 8) -> None:
        """Teachers with dtype auto score in bfloat16 where this machine computes it natively and the
        measured error is small, else in float32. The error is measured on n held-in examples
        (prompt + reference answer): max |log p_bf16 - log p_fp32| over the answer tokens. The decision
        is kept on each teacher (`precision`, written to the manifest)."""
        for t in self.teachers:
            if t.remote is not None:
                continue
            model = t.loaded.model
            if t.dtype != "auto":
                t.precision = {"dtype": t.dtype, "reason": "set in the config"}
            else:
                mine = [ex for ex in examples if self.route(ex.tag) is t][:n] or examples[:n]
                prompts = encode_prompts(mine, t.schema or self.student_schema, t.loaded.tokenizer)
                t.loaded.weights_hash = weights_sha256(model)  # the weights as stored, not as cast
                t.precision = auto_precision(model, make_sft_batch(
                    prompts, encode_answers(mine, t.loaded.tokenizer), self.tokenizer.pad_token_id))

    def score(self, batch: Batch, examples) -> tuple[TeacherScores | None, torch.Tensor, list[str]]:
        """Each row scored by its tag's teacher: TeacherScores (hidden states + heads; None if any
        teacher is remote), log-probs of the sampled tokens [B,T], and the teacher name per row."""
        names = [self.route(ex.tag).name for ex in examples]
        logprobs = torch.zeros(batch.completion_ids.shape)
        hidden, heads, owner = [], [], torch.zeros(len(names), dtype=torch.long)
        topk = None
        if self.top_k and not self.has_logits:  # log-probs floored later; ids of absent entries are distinct
            topk = (torch.full((*batch.completion_ids.shape, self.top_k), float("-inf")),
                    torch.arange(self.top_k).expand(*batch.completion_ids.shape, -1).clone())
        for t in self.teachers:
            rows = [i for i, n in enumerate(names) if n == t.name]
            if not rows:
                continue
            idx = torch.tensor(rows)
            sub = batch.rows(idx)
            if t.remote is not None:
                logprobs[idx], top = self._score_remote(t.remote, sub, self.top_k)
                if topk is not None:
                    topk[0][idx], topk[1][idx] = top
                continue
            if t.schema is not None:  # the teacher reads its own rendering of the same prompt
                ids = encode_prompts([examples[i] for i in rows], t.schema, t.loaded.tokenizer)
                sub.prompt_ids, sub.prompt_mask = left_pad(ids, self.tokenizer.pad_token_id)
            hidden_states = self.workers.teacher_hidden(t.name, sub) if self.workers and self.workers.has_teacher(t.name) \
                else None
            part, part_lp = score(t.loaded.model, sub, hidden_states)
            logprobs[idx] = part_lp
            if topk is not None:  # a local teacher next to a served one: its own top-k, at the same k
                topk[0][idx], topk[1][idx] = teacher_topk(part.logits(), self.top_k)
            if self.has_logits:
                full = part.hidden[0]
                if len(rows) < len(names):  # several teachers: each keeps its rows in a full-size tensor
                    full = full.new_zeros((len(names), *full.shape[1:]))
                    full[idx] = part.hidden[0]
                owner[idx] = len(hidden)
                hidden.append(full)
                heads.append(part.heads[0])
        scores = TeacherScores(hidden, heads, owner) if self.has_logits else \
            TeacherScores([], [], owner, *topk) if topk is not None else None
        return scores, logprobs * batch.completion_mask, names

    @staticmethod
    def _score_remote(remote, sub: Batch, k: int = 0):
        """Send prompt + completion token ids (no padding); the answer as [b, T] log-probs and, when
        k > 0, the top-k as ([b, T, k] log-probs, [b, T, k] ids)."""
        seqs, starts = [], []
        for p_ids, p_mask, c_ids, c_mask in zip(sub.prompt_ids.tolist(), sub.prompt_mask.tolist(),
                                                sub.completion_ids.tolist(), sub.completion_mask.tolist()):
            prompt = [t for t, m in zip(p_ids, p_mask) if m]
            seqs.append(prompt + [t for t, m in zip(c_ids, c_mask) if m])
            starts.append(len(prompt))
        lps, tops = remote.score_tokens(seqs, starts)
        out = torch.zeros(sub.completion_ids.shape)
        top_lp = torch.full((*sub.completion_ids.shape, k), float("-inf"))
        top_ids = torch.arange(k).expand(*sub.completion_ids.shape, -1).clone()
        for i, lp in enumerate(lps):
            out[i, :len(lp)] = torch.tensor(lp)
            for j, entries in enumerate(tops[i] if k else []):
                best = sorted(entries.items(), key=lambda kv: -kv[1])[:k]
                ids = [t for t, _ in best]
                ids += [t for t in range(k + len(ids)) if t not in entries][:k - len(ids)]  # distinct fillers
                top_ids[i, j] = torch.tensor(ids)
                top_lp[i, j, :len(best)] = torch.tensor([v for _, v in best])
        return out, (top_lp, top_ids)
