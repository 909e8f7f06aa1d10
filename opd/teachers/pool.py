"""The teachers of a run: one, or several routed by task tag (multi-teacher OPD, as in MOPD / verl /
ROLL). Every rollout is scored by the teacher of its task tag; the pool merges their scores.

A teacher may render prompts with its own schema (e.g. a system prompt the student will not see in
deployment); otherwise the schema check makes sure teacher and student see the same tokens.
"""

from __future__ import annotations

import os

import torch

from opd.backends.hf import tokenizer_sha256
from opd.batch import Batch
from opd.errors import OpdError
from opd.objectives.divergences import teacher_topk
from opd.rollout.prompts import encode_prompts
from opd.scores import TeacherScores
from opd.tasks.loader import teacher_schema
from opd.tasks.schema import PromptSchema
from opd.teachers.cross import CrossTokenizerTeacher, check_cross_config, unreadable_penalty, with_alignment
from opd.teachers.local import LocalTeacher
from opd.teachers.served import ServedTeacher


def load_teachers(cfg, student_tok, student_schema) -> list:
    """The `teachers:` list (multi-teacher) or the single `teacher:` section, as Teacher objects."""
    specs = cfg.teachers or [cfg.teacher]
    teachers = []
    for i, spec in enumerate(specs):
        name = spec.name or ("teacher" if not cfg.teachers else f"teacher{i}")
        if spec.url:
            teachers.append(served_teacher(cfg, spec, name, student_tok, student_schema))
            continue
        teacher = LocalTeacher(name, spec.model, tasks=spec.tasks, dtype=spec.dtype, revision=spec.revision,
                               schema=teacher_schema(spec, cfg.task),
                               student_schema=student_schema, device=spec.device, device_map=spec.device_map,
                               vocab_size=len(student_tok))
        teacher.kv_cache_gib, teacher.max_tokens = cfg.rollout.kv_cache_gib, cfg.train.micro_batch_tokens
        teacher.logits_chunk = cfg.train.logits_chunk or teacher.logits_chunk
        if teacher.tokenizer.get_vocab() != student_tok.get_vocab():  # another tokenizer: aligned by text
            check_cross_config(cfg, name)
            teacher = CrossTokenizerTeacher(teacher, student_tok, student_schema, unreadable_penalty(cfg.objective))
        teachers.append(teacher)
    return teachers


def load_tokenizer(name: str):
    """A served teacher's tokenizer (`teacher.tokenizer`), with a pad token as load_model gives one."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise OpdError(f"cannot load teacher.tokenizer {name}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def served_teacher(cfg, spec, name: str, student_tok, student_schema):
    """A ServedTeacher; with a `tokenizer` of another vocabulary than the student's, wrapped like a local
    teacher of another tokenizer (it is sent its own token ids of the prompt and the completion's text)."""
    from opd.backends.remote import RemoteTeacher

    if spec.api_key_env and spec.api_key_env not in os.environ:
        raise OpdError(f"teacher api_key_env {spec.api_key_env!r} is not set in the environment")
    remote = RemoteTeacher(spec.url, api_key=os.environ.get(spec.api_key_env) if spec.api_key_env else None,
                           top_k=spec.top_k, request_timeout=spec.request_timeout, max_failures=spec.max_failures)
    tok = load_tokenizer(spec.tokenizer) if spec.tokenizer else student_tok
    teacher = ServedTeacher(name, remote, tasks=spec.tasks, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                            tokenizer_hash=tokenizer_sha256(tok), vocab_size=len(tok), tokenizer=tok,
                            schema=teacher_schema(spec, cfg.task), student_schema=student_schema,
                            hash_of=f"teacher.tokenizer {spec.tokenizer}" if spec.tokenizer else "the student")
    if tok.get_vocab() == student_tok.get_vocab():
        return teacher
    check_cross_config(cfg, name)
    return CrossTokenizerTeacher(teacher, student_tok, student_schema, unreadable_penalty(cfg.objective))


class TeacherPool:
    """Routes task tags to teachers and scores a batch, each row by its own teacher."""

    def __init__(self, teachers: list, student_schema: PromptSchema, tokenizer):
        self.teachers, self.student_schema, self.tokenizer = teachers, student_schema, tokenizer
        self.by_tag = {tag: t for t in teachers for tag in t.tasks}

    @property
    def has_logits(self) -> bool:
        return all(t.returns == "logits" for t in self.teachers)

    @property
    def top_k(self) -> int:
        """The served teachers' top-k (feeds the topk_* objectives); 0 when any of them sends none."""
        served = [t.top_k for t in self.teachers if t.returns != "logits"]
        return min(served) if served else 0

    def route(self, tag: str):
        teacher = self.by_tag.get(tag) or self.by_tag.get("*")
        if teacher is None:
            raise OpdError(f"no teacher for task tag {tag!r} (teachers cover: {', '.join(sorted(self.by_tag))})")
        return teacher

    def split(self, examples) -> list[tuple[object, list[int]]]:
        """(teacher, its row numbers) for every teacher with rows."""
        names = [self.route(ex.tag).name for ex in examples]
        return [(t, [i for i, n in enumerate(names) if n == t.name]) for t in self.teachers
                if t.name in names]

    def prepare(self, examples) -> None:
        for t in self.teachers:
            t.prepare([ex for ex in examples if self.route(ex.tag) is t] or examples)

    def check_schemas(self, examples, allow_mismatch: bool, n: int = 8) -> dict:
        """Render a few prompts for student and each teacher; identical token ids, or an explicit opt-in."""
        sample = examples[:n]
        student_ids = encode_prompts(sample, self.student_schema, self.tokenizer)
        report = {}
        for t in self.teachers:
            if getattr(t, "cross_tokenizer", False):  # other token ids by design: the same schema = the same prompt
                schema = t.schema or self.student_schema
                same = schema.schema_hash() == self.student_schema.schema_hash()
                report[t.name] = {"identical": same, "hash": schema.schema_hash(), "cross_tokenizer": True}
                if not same and not allow_mismatch:
                    raise OpdError(f"prompt schema mismatch: teacher {t.name!r} reads its own prompt schema; set "
                                   f"task.allow_schema_mismatch: true if the difference is on purpose")
                continue
            if not isinstance(t, LocalTeacher):  # a served teacher is sent the student's token ids: identical
                report[t.name] = {"identical": True, "hash": self.student_schema.schema_hash(), "remote": t.remote.url}
                continue
            ids = t.prompts(sample)
            same = ids == student_ids
            report[t.name] = {"identical": same, "hash": (t.schema or self.student_schema).schema_hash()}
            if not same and not allow_mismatch:
                bad = next(i for i, (a, b) in enumerate(zip(ids, student_ids)) if a != b)
                raise OpdError(f"prompt schema mismatch: teacher {t.name!r} sees "
                               f"{t.tokenizer.decode(ids[bad])!r} but the student sees "
                               f"{self.tokenizer.decode(student_ids[bad])!r}; set task.allow_schema_mismatch: true "
                               f"if the difference is on purpose")
        return report

    def score(self, batch: Batch, examples) -> tuple[TeacherScores, list[str]]:
        """Each row scored by its tag's teacher, merged into one TeacherScores; and the teacher per row.

        Local teachers keep hidden states + heads (one group each); next to a served teacher, a local
        one also gives its own top-k at the served k, so every row has the same kind of scores."""
        rows_all = len(examples)
        logprobs = torch.zeros(batch.completion_ids.shape)
        hidden, heads, owner = [], [], torch.zeros(rows_all, dtype=torch.long)
        k = 0 if self.has_logits else self.top_k
        topk = (torch.full((*batch.completion_ids.shape, k), float("-inf")),
                torch.arange(k).expand(*batch.completion_ids.shape, -1).clone()) if k else None
        names = [""] * rows_all
        alignment = {}  # cross-tokenizer teachers: span and cut counts
        for t, rows in self.split(examples):
            idx = torch.tensor(rows)
            part = t.score(batch.rows(idx), [examples[i] for i in rows])
            logprobs[idx] = part.logprobs
            for key, n in (getattr(part, "alignment", None) or {}).items():
                alignment[key] = alignment.get(key, 0) + n
            for i in rows:
                names[i] = t.name
            if topk is not None:
                top = (part.topk_logprobs, part.topk_ids) if part.topk_ids is not None else teacher_topk(part.logits(), k)
                topk[0][idx], topk[1][idx] = top
            if self.has_logits:
                full = part.hidden[0]
                if len(rows) < rows_all:  # several teachers: each keeps its rows in a full-size tensor
                    full = full.new_zeros((rows_all, *full.shape[1:]))
                    full[idx] = part.hidden[0]
                owner[idx] = len(hidden)
                hidden.append(full)
                heads.append(part.heads[0])
        logprobs = logprobs * batch.completion_mask
        if self.has_logits:
            return TeacherScores(logprobs, hidden, heads, owner), names
        merged = TeacherScores(logprobs, owner=owner, topk_logprobs=topk[0] if topk else None,
                               topk_ids=topk[1] if topk else None)
        return (with_alignment(merged, alignment) if alignment else merged), names

    def describe(self) -> list[dict]:
        return [{**t.describe(), "name": t.name, "tasks": list(t.tasks)} for t in self.teachers]
