"""Per-rollout records: what filters judge, what rewards use, and what the sample store keeps."""

from __future__ import annotations

from opd.rollout.filters import RolloutView
from opd.rollout.sampler import Batch, decode_completions

def rollout_views(batch: Batch, tokenizer, examples, verifier, teacher_logprobs=None) -> list[RolloutView]:
    """Decode, verify and attach the teacher's per-token log-probs [B,T] to every rollout of a batch."""
    masks = batch.completion_mask.bool()
    t_lp = teacher_logprobs
    views = []
    for b, ((text, well_formed), ex) in enumerate(zip(decode_completions(tokenizer, batch), examples)):
        views.append(RolloutView(
            prompt=ex.prompt, completion=text, token_ids=batch.completion_ids[b][masks[b]].tolist(),
            truncated=bool(batch.truncated[b]), correct=bool(well_formed and verifier(text, ex.answer)),
            teacher_logprobs=t_lp[b][masks[b]].tolist() if t_lp is not None else None))
    return views

def store_rows(step: int, policy_version: int, batch: Batch, examples, views, reasons, teachers, sources) -> list[dict]:
    """One sample-store row per rollout, kept or rejected (with the rule that rejected it)."""
    masks = batch.completion_mask.bool()
    return [{"step": step, "policy_version": policy_version, "task_tag": ex.tag, "prompt": v.prompt,
             "completion": v.completion, "completion_ids": v.token_ids,
             # the sampler's log-probs: the student's own only on rows it wrote (teacher/anchor rows: empty)
             "student_logprobs": batch.sample_logprobs[b][masks[b]].tolist() if sources[b] == "student" else [],
             "teacher_logprobs": v.teacher_logprobs or [], "kept": r is None, "reject_rule": r,
             "correct": v.correct, "teacher": teachers[b], "truncated": v.truncated, "source": sources[b]}
            for b, (ex, v, r) in enumerate(zip(examples, views, reasons))]

def per_teacher_logprob(rows: list[dict]) -> dict[str, float]:
    """Mean teacher log-prob per completion token, for each teacher, over sample-store rows."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        if row["teacher_logprobs"]:
            acc = sums.setdefault(row["teacher"], [0.0, 0])
            acc[0] += sum(row["teacher_logprobs"])
            acc[1] += len(row["teacher_logprobs"])
    return {f"teacher_logprob/{n}": s / max(c, 1) for n, (s, c) in sums.items()}
