"""A teacher with another tokenizer than the student's (docs/cross_tokenizer.md).

The teacher reads its own rendering of the prompt (its tokenizer, its chat template or prompt schema)
followed by the student's completion as text, tokenized by its own tokenizer; opd/teachers/align.py
groups both sides' tokens into spans with the same text. Its scores are per-student-token log-probs
(`returns = "logprobs"`) built so that the sampled reverse-KL estimator (opd/objectives/sampled.py)
gives every student token of a span the span's advantage log p_T(span) - log p_S(span): the loss
code is unchanged, and with identical tokenizers every span is one token and the scores are the
teacher's own log-probs.

Rows that cannot be aligned are scored 0 and named in `scores.rejects` (the loop rejects them with
that reason before the update); `scores.alignment` holds the step's span counts for the metrics.
"""

from __future__ import annotations

import torch

from opd.backends.hf import tokenizer_sha256
from opd.batch import Batch, left_pad
from opd.errors import OpdError
from opd.rollout.prompts import turn_end_id
from opd.rollout.sampler import decode_completions
from opd.scores import TeacherScores
from opd.teachers.align import UNALIGNED, Aligned, align, span_scores
from opd.teachers.local import score as local_score

RULE = ("text spans: each side's token boundaries are the character positions of its decoded prefixes; "
        "tokens are grouped into the smallest spans whose boundaries coincide; the student's EOS is "
        "aligned with the teacher's end token")
# methods whose rows the teacher writes: its tokens are not the student's, and the sampled estimator
# would need the teacher's sampling log-probs in the student's tokens
TEACHER_SAMPLED = ("mixed", "kd")


def teacher_end(schema, tokenizer) -> tuple[int, str]:
    """The teacher token the student's EOS aligns with, and why: the end-of-turn token of a chat
    template (Llama 3's <|eot_id|>, ChatML's <|im_end|>), else the tokenizer's EOS. A chat turn that
    ends with ordinary text is an error: there is no token to map the student's EOS to."""
    if schema.kind == "chat":
        end = turn_end_id(schema, tokenizer)
        if end is not None and end != tokenizer.eos_token_id:
            name = tokenizer.convert_ids_to_tokens(end)
            if end not in tokenizer.all_special_ids:
                raise OpdError(f"the teacher's chat template ends an assistant turn with {name!r}, not a special "
                               f"token: the student's EOS has no teacher token to align with")
            return end, f"student EOS -> teacher end of turn {name!r} (id {end})"
    return tokenizer.eos_token_id, f"student EOS -> teacher EOS {tokenizer.eos_token!r} (id {tokenizer.eos_token_id})"


def check_cross_config(cfg, name: str) -> None:
    """What the span estimator assumes (docs/cross_tokenizer.md): rows the student sampled at temperature 1,
    scored at temperature 1."""
    if cfg.method.name in TEACHER_SAMPLED:
        raise OpdError(f"teacher {name!r} has another tokenizer than the student: method {cfg.method.name} trains on "
                       f"teacher-written rows, which cross-tokenizer distillation does not support; use method opd")
    if cfg.objective.name not in ("auto", "sampled_reverse_kl"):
        raise OpdError(f"teacher {name!r} has another tokenizer than the student: its scores are span log-probs, "
                       f"so objective {cfg.objective.name} is not available; use auto (sampled_reverse_kl)")
    for what, value in (("rollout.temperature", cfg.rollout.temperature), ("objective.temperature",
                                                                           cfg.objective.temperature)):
        if value != 1.0:
            raise OpdError(f"teacher {name!r} has another tokenizer than the student: {what} must be 1 "
                           f"(the span estimator uses the student's sampling log-probs as its on-policy ones)")


def with_alignment(scores: TeacherScores, rejects: list, alignment: dict) -> TeacherScores:
    """`scores` carrying per-row reject reasons (None = aligned) and the batch's alignment counts."""
    scores.rejects, scores.alignment = rejects, alignment
    return scores


def alignment_metrics(scores, world) -> dict:
    """The step's alignment metrics (every rank's rows): share of 1:1 spans, mean span length on each side,
    completions that could not be aligned. {} when no cross-tokenizer teacher scored."""
    counts = getattr(scores, "alignment", None)
    if not counts:
        return {}
    spans, one, s_tok, t_tok, bad = world.sum(*(counts[k] for k in
                                                ("spans", "one_to_one", "student_tokens", "teacher_tokens", "unaligned")))
    per = max(spans, 1)
    return {**{f"reject/{name}": 0 for name in UNALIGNED},  # the loop's counts of the rows rejected override these
            "align/one_to_one": one / per, "align/student_span_len": s_tok / per,
            "align/teacher_span_len": t_tok / per, "align/unaligned": int(bad)}


def completions(batch: Batch) -> list[tuple[list[int], bool]]:
    """Each row's completion tokens (masked) and whether it ended with EOS (not truncated)."""
    out = []
    for ids, mask, trunc in zip(batch.completion_ids.tolist(), batch.completion_mask.tolist(), batch.truncated.tolist()):
        out.append(([t for t, m in zip(ids, mask) if m], not trunc))
    return out


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


class CrossTokenizerTeacher:
    """A LocalTeacher (`inner`, loaded with its own tokenizer) scoring a student of another tokenizer."""

    returns = "logprobs"
    top_k = 0  # no top-k over the student's vocabulary: the sampled estimator
    cross_tokenizer = True

    def __init__(self, inner, student_tokenizer, student_schema):
        self.inner, self.student_tokenizer, self.student_schema = inner, student_tokenizer, student_schema
        self.name, self.tasks = inner.name, inner.tasks
        inner.vocab_size = len(inner.tokenizer)  # its own real ids, not the student's
        inner.student_schema = inner.student_schema or student_schema
        self.end_id, self.end_rule = teacher_end(inner.schema or student_schema, inner.tokenizer)

    @property
    def tokenizer(self):
        return self.inner.tokenizer

    @property
    def model(self):
        return self.inner.model

    @property
    def schema(self):
        return self.inner.schema

    def prompts(self, examples) -> list[list[int]]:
        return self.inner.prompts(examples)

    def prepare(self, examples) -> None:
        self.inner.prepare(examples)

    def align(self, batch: Batch) -> list[Aligned | str]:
        eos = self.student_tokenizer.eos_token_id
        return [align(self.student_tokenizer, self.tokenizer, ids, ended=ended and bool(ids) and ids[-1] == eos,
                      teacher_end_id=self.end_id) for ids, ended in completions(batch)]

    def score(self, batch: Batch, examples) -> TeacherScores:
        rows = self.align(batch)
        good = [i for i, r in enumerate(rows) if isinstance(r, Aligned)]
        logprobs = torch.zeros(batch.completion_ids.shape)
        counts = {"spans": 0, "one_to_one": 0, "student_tokens": 0, "teacher_tokens": 0,
                  "unaligned": len(rows) - len(good)}
        if good:
            pad = self.tokenizer.pad_token_id
            prompt_ids, prompt_mask = left_pad(self.prompts([examples[i] for i in good]), pad)
            ids, mask = right_pad([rows[i].teacher_ids for i in good], pad)
            tbatch = Batch(prompt_ids, prompt_mask, ids, mask, torch.zeros(ids.shape),
                           torch.zeros(len(good), dtype=torch.bool))
            teacher_lp = local_score(self.model, tbatch, self.inner.hidden(tbatch), self.inner.vocab_size,
                                     self.inner.logits_chunk).logprobs.double().tolist()
            sample_lp = batch.sample_logprobs.double().tolist()
            for k, i in enumerate(good):
                r = rows[i]
                n = r.spans[-1][0][1] if r.spans else 0
                logprobs[i, :n] = torch.tensor(span_scores(sample_lp[i][:n], teacher_lp[k], r.spans))
                for key, v in r.stats().items():
                    counts[key] += v
        rejects = [None if isinstance(r, Aligned) else r for r in rows]
        return with_alignment(TeacherScores(logprobs), rejects, counts)

    def generate(self, prompts, examples, *, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
                 uniforms=None) -> Batch:
        """The teacher's completions of its own prompts, as text re-tokenized for the student (evaluation,
        preflight). A completion the teacher did not end cleanly stays marked truncated (counted wrong)."""
        out = self.inner.generate(self.prompts(examples), examples, max_new_tokens=max_new_tokens,
                                  temperature=temperature, greedy=greedy, uniforms=uniforms)
        s_tok = self.student_tokenizer
        rows, truncated = [], []
        for text, well_formed in decode_completions(self.tokenizer, out):
            rows.append(s_tok(text, add_special_tokens=False).input_ids + ([s_tok.eos_token_id] if well_formed else []))
            truncated.append(not well_formed)
        ids, mask = right_pad(rows, s_tok.pad_token_id)
        prompt_ids, prompt_mask = left_pad(prompts, s_tok.pad_token_id)
        return Batch(prompt_ids, prompt_mask, ids, mask, torch.full(ids.shape, float("nan")),
                     torch.tensor(truncated, dtype=torch.bool))

    def describe(self) -> dict:
        return {**self.inner.describe(), "cross_tokenizer": {
            "student_tokenizer_sha256": tokenizer_sha256(self.student_tokenizer),
            "teacher_tokenizer_sha256": tokenizer_sha256(self.tokenizer),
            "student_vocab_size": len(self.student_tokenizer), "teacher_vocab_size": len(self.tokenizer),
            "alignment": RULE, "end": self.end_rule, "estimator": "span-level sampled reverse KL",
            "rejects": list(UNALIGNED)}}

    def show(self, batch: Batch, row: int = 0) -> str | None:
        """One row's alignment for the preflight: the student's spans | the teacher's, or its reject reason."""
        r = self.align(batch.rows(slice(row, row + 1)))[0]
        if not isinstance(r, Aligned):
            return f"not aligned: {r}"
        ids = completions(batch.rows(slice(row, row + 1)))[0][0]
        s_tok, t_tok = self.student_tokenizer, self.tokenizer
        student = " ".join("|".join(s_tok.convert_ids_to_tokens(ids[a:b])) for (a, b), _ in r.spans)
        teacher = " ".join("|".join(t_tok.convert_ids_to_tokens(r.teacher_ids[a:b])) for _, (a, b) in r.spans)
        return f"student {student}  <->  teacher {teacher}"
