"""Per-rollout records: what filters judge, what rewards use, and what the sample store keeps."""

from __future__ import annotations

import json

from opd.rollout.episodes import episode_stats, final_answer, transcript_json
from opd.rollout.filters import RolloutView
from opd.rollout.sampler import Batch, decode_completions

def rollout_views(batch: Batch, tokenizer, examples, verifier, teacher_logprobs=None,
                  transcripts=None) -> list[RolloutView]:
    """Decode, verify and attach the teacher's per-token log-probs [B,T] to every rollout of a batch.
    Episodes (`transcripts`): the completion is the final assistant message, and the verifier judges it."""
    masks = batch.completion_mask.bool()
    t_lp = teacher_logprobs
    decoded = decode_completions(tokenizer, batch) if transcripts is None else \
        [(final_answer(m), not bool(t)) for m, t in zip(transcripts, batch.truncated)]
    views = []
    for b, ((text, well_formed), ex) in enumerate(zip(decoded, examples)):
        views.append(RolloutView(
            prompt=ex.prompt, completion=text, token_ids=batch.completion_ids[b][masks[b]].tolist(),
            truncated=bool(batch.truncated[b]), correct=bool(well_formed and verifier(text, ex.answer)),
            teacher_logprobs=t_lp[b][masks[b]].tolist() if t_lp is not None else None,
            transcript=transcripts[b] if transcripts is not None else None))
    return views

def store_rows(step: int, policy_version: int, batch: Batch, examples, views, reasons, teachers, sources,
               turn_tokens=None) -> list[dict]:
    """One sample-store row per rollout, kept or rejected (with the rule that rejected it). Episodes also
    keep their messages (`transcript`, JSON) and the model's tokens per assistant turn (`turn_tokens`)."""
    masks = batch.completion_mask.bool()
    return [{"step": step, "policy_version": policy_version, "task_tag": ex.tag, "prompt": v.prompt,
             "completion": v.completion, "completion_ids": v.token_ids,
             # the sampler's log-probs: the student's own only on rows it wrote (teacher/anchor rows: empty)
             "student_logprobs": batch.sample_logprobs[b][masks[b]].tolist() if sources[b] == "student" else [],
             "teacher_logprobs": v.teacher_logprobs or [], "kept": r is None, "reject_rule": r,
             "correct": v.correct, "teacher": teachers[b], "truncated": v.truncated, "source": sources[b],
             "transcript": transcript_json(v.transcript) if v.transcript is not None else None,
             "turn_tokens": turn_tokens[b] if turn_tokens is not None else []}
            for b, (ex, v, r) in enumerate(zip(examples, views, reasons))]


def episode_means(transcripts: list) -> dict[str, float]:
    """Per-episode means of turns, tool calls, redundant and malformed calls ({} without episodes)."""
    stats = [episode_stats(json.loads(t) if isinstance(t, str) else t) for t in transcripts if t is not None]
    if not stats:
        return {}
    return {f"episode/{k}": sum(s[k] for s in stats) / len(stats) for k in stats[0]}

def per_teacher_logprob(rows: list[dict]) -> dict[str, float]:
    """Mean teacher log-prob per completion token, for each teacher, over sample-store rows."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        if row["teacher_logprobs"]:
            acc = sums.setdefault(row["teacher"], [0.0, 0])
            acc[0] += sum(row["teacher_logprobs"])
            acc[1] += len(row["teacher_logprobs"])
    return {f"teacher_logprob/{n}": s / max(c, 1) for n, (s, c) in sums.items()}
