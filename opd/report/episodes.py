"""A stored episode (a sample-store row with a `transcript`) turn by turn, for `opd inspect` and report.html.

The row's `completion_ids`, `student_logprobs` and `teacher_logprobs` are the model's tokens of all
assistant turns concatenated, `turn_tokens` how many belong to each turn (opd/rollout/records.py), so
the k-th assistant message gets the k-th slice; every other message (tool results, follow-ups) was
written by the environment and carries no score. The opening messages (before the first assistant
turn) are the row's prompt and are left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class Turn:
    role: str
    content: str
    error: str | None = None  # a tool message's "error" (a malformed call)
    ids: list[int] = field(default_factory=list)  # assistant turns: the model's tokens (empty: not known)
    student: list[float] = field(default_factory=list)  # their log-probs (empty when not stored)
    teacher: list[float] = field(default_factory=list)

    @property
    def gaps(self) -> list[float]:
        return [t - s for s, t in zip(self.student, self.teacher)]

    @property
    def from_model(self) -> bool:
        return self.role == "assistant"


def episode_turns(row: dict) -> list[Turn] | None:
    """The turns of `row`'s episode after its opening messages; None for a single-turn row (or an
    unreadable transcript). Token slices are attached only when `turn_tokens` matches the messages."""
    raw = row.get("transcript")
    if not raw:
        return None
    try:
        messages = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return None
    if not isinstance(messages, list):
        return None
    first = next((k for k, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                 len(messages))
    turns = [Turn(str(m.get("role", "?")), str(m.get("content", "")), m.get("error") or None)
             for m in messages[first:] if isinstance(m, dict)]
    ids, counts = list(row.get("completion_ids") or []), list(row.get("turn_tokens") or [])
    assistant = [t for t in turns if t.from_model]
    if len(counts) != len(assistant) or sum(counts) != len(ids):
        return turns
    s_lp, t_lp = list(row.get("student_logprobs") or []), list(row.get("teacher_logprobs") or [])
    scored = len(s_lp) == len(ids) and len(t_lp) == len(ids)
    start = 0
    for turn, n in zip(assistant, counts):
        turn.ids = ids[start:start + n]
        if scored:
            turn.student, turn.teacher = s_lp[start:start + n], t_lp[start:start + n]
        start += n
    return turns
