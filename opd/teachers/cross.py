"""A teacher with another tokenizer than the student's (docs/cross_tokenizer.md).

The teacher reads its own rendering of the prompt (its tokenizer, its chat template or prompt schema)
followed by the student's completion as text, tokenized by its own tokenizer; opd/teachers/align.py
groups both sides' tokens into spans with the same text. Its scores are per-student-token log-probs
(`returns = "logprobs"`) built so that the sampled reverse-KL estimator (opd/objectives/sampled.py)
gives every student token of a span the span's advantage log p_T(span) - log p_S(span): the loss
code is unchanged, and with identical tokenizers every span is one token and the scores are the
teacher's own log-probs.

A row that cannot be aligned whole is scored up to its first unreadable token (align_readable), which
gets the advantage -clip, the estimator's most negative one; the tokens after it get 0. Rejecting such
rows instead gave them no gradient at all, and a student learnt to write special tokens to escape the
teacher (docs/cross_tokenizer.md). `scores.alignment` holds the step's span and cut counts for the metrics.
"""

from __future__ import annotations

import torch

from opd.backends.hf import tokenizer_sha256
from opd.batch import Batch, left_pad
from opd.errors import OpdError
from opd.objectives.select import sampled_clip
from opd.rollout.prompts import turn_end_id
from opd.rollout.sampler import decode_completions
from opd.scores import TeacherScores
from opd.config import ObjectiveConfig
from opd.teachers.align import UNALIGNED, Aligned, Extensions, align_readable, marginal_logprobs, row_scores

RULE = ("text spans: each side's token boundaries are the character positions of its decoded prefixes; "
        "tokens are grouped into the smallest spans whose boundaries coincide; the student's EOS is "
        "aligned with the teacher's end token")
# methods whose rows the teacher writes: its tokens are not the student's, and the sampled estimator
# would need the teacher's sampling log-probs in the student's tokens
TEACHER_SAMPLED = ("mixed", "kd")
# counts per step besides the spans: rows cut at an unreadable token, by reason, and rows truncated inside a
# character (their cut bytes are left unscored, not penalised)
CUTS = tuple(f"penalised_{name}" for name in UNALIGNED) + ("cut_char_at_end",)


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


def unreadable_penalty(objective) -> float:
    """The penalty of an unreadable token: the clip the sampled estimator will use, so that it reads as
    exactly -clip; the default clip when clipping is off, so that the penalty stays finite."""
    return sampled_clip(objective) or ObjectiveConfig.clip


def with_alignment(scores: TeacherScores, alignment: dict) -> TeacherScores:
    """`scores` carrying the batch's alignment counts."""
    scores.alignment = alignment
    return scores


def alignment_metrics(scores, world) -> dict:
    """The step's alignment metrics (every rank's rows): share of 1:1 spans, mean span length on each side,
    completions cut at an unreadable token (by reason). {} when no cross-tokenizer teacher scored."""
    counts = getattr(scores, "alignment", None)
    if not counts:
        return {}
    keys = ("spans", "one_to_one", "student_tokens", "teacher_tokens", "unaligned") + CUTS
    spans, one, s_tok, t_tok, bad, *cuts = world.sum(*(counts.get(k, 0) for k in keys))
    per = max(spans, 1)
    return {"align/one_to_one": one / per, "align/student_span_len": s_tok / per,
            "align/teacher_span_len": t_tok / per, "align/unaligned": int(bad),
            **{f"align/{k}": int(n) for k, n in zip(CUTS, cuts)}}


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
    """A teacher of another tokenizer than the student's, scoring the student's rows: `inner` is a
    LocalTeacher (loaded with its own tokenizer) or a ServedTeacher (`teacher.tokenizer`), and is asked for
    the log-probs of its own token ids (its prompt, the completion's text in its tokens)."""

    returns = "logprobs"
    top_k = 0  # no top-k over the student's vocabulary: the sampled estimator
    cross_tokenizer = True

    def __init__(self, inner, student_tokenizer, student_schema, penalty: float = 1.0):
        self.inner, self.student_tokenizer, self.student_schema = inner, student_tokenizer, student_schema
        self.penalty = penalty  # an unreadable token's advantage is -penalty (unreadable_penalty: -clip)
        self.extensions = Extensions(inner.tokenizer)
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

    def align(self, batch: Batch) -> list[Aligned]:
        eos = self.student_tokenizer.eos_token_id
        return [align_readable(self.student_tokenizer, self.tokenizer, ids,
                               ended=ended and bool(ids) and ids[-1] == eos, teacher_end_id=self.end_id)
                for ids, ended in completions(batch)]

    def score(self, batch: Batch, examples) -> TeacherScores:
        rows = self.align(batch)
        logprobs = torch.zeros(batch.completion_ids.shape)
        counts = dict.fromkeys(("spans", "one_to_one", "student_tokens", "teacher_tokens", "unaligned") + CUTS, 0)
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = left_pad(self.prompts(examples), pad)
        ids, mask = right_pad([r.teacher_ids for r in rows], pad)
        tbatch = Batch(prompt_ids, prompt_mask, ids, mask, torch.zeros(ids.shape),
                       torch.zeros(len(rows), dtype=torch.bool))
        scored = self.inner.score(tbatch, examples)
        teacher_lp = scored.logprobs.double().tolist()
        extension_lp = self.extension_logprobs(scored, ids, mask)
        sample_lp = batch.sample_logprobs.double().tolist()
        lengths = batch.completion_mask.sum(-1).tolist()
        for i, r in enumerate(rows):
            n = int(lengths[i])
            teacher = marginal_logprobs(teacher_lp[i], extension_lp[i], r.spans)
            logprobs[i, :n] = torch.tensor(row_scores(sample_lp[i][:n], teacher, r, self.penalty))
            for key, v in r.stats().items():
                counts[key] += v
            if r.cut is not None:
                counts["unaligned"] += 1
                counts[f"penalised_{r.reason}" if r.penalised else "cut_char_at_end"] += 1
        return with_alignment(TeacherScores(logprobs), counts)

    @property
    def extension_rule(self) -> str:
        """How a span's last token's extensions are summed (`marginal_logprobs`): which distribution it has."""
        if self.inner.returns == "logits":
            return "exact: the teacher's full distribution"
        if self.inner.top_k:
            return (f"the extensions among the served top-{self.inner.top_k} (and the token itself): each sum is a "
                    f"lower bound, exact when the top-k holds every extension with probability mass")
        return ("none: the server returns no top-k, so spans are scored by the teacher's token log-probs "
                "(its tokenization bias is not corrected)")

    def extension_logprobs(self, scored: TeacherScores, ids: torch.Tensor, mask: torch.Tensor,
                           chunk: int = 256) -> list[list[float]]:
        """Per teacher token, log sum_{v in Extensions(token)} p_T(v) (float64); the token's own log-prob
        where it has no extension. Local: logits only at the positions with extensions, `chunk` at a time.
        Served: the extensions found in the top-k (`extension_rule`), else the token's own log-prob."""
        out = scored.logprobs.double().tolist()
        where = [(i, j, self.extensions(t)) for i, row in enumerate(ids.tolist()) for j, t in enumerate(row)
                 if mask[i, j] and len(self.extensions(t)) > 1]
        if not scored.hidden:  # served: what its top-k holds, if anything
            for i, j, ext in where if scored.topk_ids is not None else []:
                mine, found = set(ext) - {int(ids[i, j])}, [out[i][j]]
                found += [lp for t, lp in zip(scored.topk_ids[i, j].tolist(), scored.topk_logprobs[i, j].tolist())
                          if t in mine and lp > float("-inf")]
                out[i][j] = float(torch.logsumexp(torch.tensor(found, dtype=torch.float64), 0))
            return out
        for lo in range(0, len(where), chunk):
            part = where[lo:lo + chunk]
            rows, cols = torch.tensor([w[0] for w in part]), torch.tensor([w[1] for w in part])
            hidden = scored.hidden[0][rows.to(scored.hidden[0].device), cols.to(scored.hidden[0].device)]
            with torch.no_grad():
                logp = torch.log_softmax(scored.heads[0](hidden).double(), -1).cpu()
            for k, (i, j, ext) in enumerate(part):
                out[i][j] = float(torch.logsumexp(logp[k, ext], 0))
        return out

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
            "span_score": "log-prob of the span's text (its last teacher token's extensions summed)",
            "extensions": self.extension_rule,
            "unreadable": {"reasons": list(UNALIGNED), "penalty": -self.penalty,
                           "rule": "scored up to the first unreadable token, which gets the penalty; 0 after it"}}}

    def show(self, batch: Batch, row: int = 0) -> str | None:
        """One row's alignment for the preflight: the student's spans <-> the teacher's, then for a cut row its
        first unreadable token and why."""
        r = self.align(batch.rows(slice(row, row + 1)))[0]
        ids = completions(batch.rows(slice(row, row + 1)))[0][0]
        s_tok, t_tok = self.student_tokenizer, self.tokenizer
        student = " ".join("|".join(s_tok.convert_ids_to_tokens(ids[a:b])) for (a, b), _ in r.spans)
        teacher = " ".join("|".join(t_tok.convert_ids_to_tokens(r.teacher_ids[a:b])) for _, (a, b) in r.spans)
        cut = "" if r.cut is None else f"  (then {s_tok.convert_ids_to_tokens(ids[r.cut])!r} unreadable: {r.reason}, " \
            f"{'penalised' if r.penalised else 'not scored'})"
        return f"student {student}  <->  teacher {teacher}{cut}"
