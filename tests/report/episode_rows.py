"""A stored episode row (as opd/rollout/records.py writes it) for the report and inspect tests."""

from __future__ import annotations

import json

from opd.backends.hf import build_char_tokenizer

MESSAGES = [{"role": "user", "content": "What is 12*3?"}, {"role": "assistant", "content": "CALL 12x3"},
            {"role": "tool", "content": "bad <call>", "error": "not digits"},
            {"role": "assistant", "content": "CALL 12*3"}, {"role": "tool", "content": "36"},
            {"role": "assistant", "content": "36"}]


def tokenizer():
    return build_char_tokenizer(["What is 0123456789*x? CALL bad <call>"])


def episode_row(step, tok, gap_turn=1, gap=-4.0):
    """A rollout row of MESSAGES: the model's three turns' tokens concatenated; the last token of turn
    `gap_turn` (0-based) has teacher - student log-prob `gap`, every other token 0."""
    turns = [m["content"] for m in MESSAGES if m["role"] == "assistant"]
    per_turn = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in turns]
    ids = [i for t in per_turn for i in t]
    teacher = [-0.5] * len(ids)
    teacher[sum(map(len, per_turn[:gap_turn + 1])) - 1] += gap
    return {"step": step, "policy_version": step - 1, "task_tag": "calculator", "prompt": "What is 12*3?",
            "completion": "36", "completion_ids": ids, "student_logprobs": [-0.5] * len(ids),
            "teacher_logprobs": teacher, "kept": True, "reject_rule": None, "correct": True, "teacher": "t",
            "truncated": False, "transcript": json.dumps(MESSAGES), "turn_tokens": [len(t) for t in per_turn]}


def episode_answer(step, correct=False):
    return {"step": step, "prompt": "What is 12*3?", "completion": "35", "expected": "36", "correct": correct,
            "well_formed": True, "task_tag": "calculator",
            "transcript": json.dumps(MESSAGES[:-1] + [{"role": "assistant", "content": "35"}])}
