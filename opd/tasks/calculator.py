"""The built-in tool-use task: arithmetic a tiny model cannot do in its head, with a calculator tool.

    user       What is 347*29?
    assistant  CALL 347*29          a call: the prefix, then digits and + - * only
    tool       10063                the result (a malformed call: content "bad call", "error" key)
    assistant  10063                anything not starting with the prefix is the final answer

`CalculatorEnv` is the environment (task.env, opd/rollout/episodes.py); `gen_calculator` draws the
(prompt, answer) rows and `transcript` writes the teacher's episode for a row, for `opd sft` on
`messages` (docs/multi_turn.md).
"""

from __future__ import annotations

import random
import re

CALL = "CALL "
BAD_CALL = "bad call"
EXPRESSION = re.compile(r"\d{1,12}(?:[+\-*]\d{1,12}){0,7}")  # at most 8 numbers of at most 12 digits
TOKEN = re.compile(r"\d+|[+\-*]")
ALPHABET = "What is 0123456789+-*?" + CALL + BAD_CALL  # every character of its episodes


def calculate(expression: str) -> int | None:
    """The value of `expression` (digits and + - *, * before + and -), or None when it is malformed.

    Parsed by hand: nothing is ever passed to eval, and the length bounds keep every value small."""
    if not isinstance(expression, str) or not EXPRESSION.fullmatch(expression):
        return None
    tokens = TOKEN.findall(expression)
    total, sign, term = 0, 1, int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            term *= int(number)
        else:
            total += sign * term
            sign, term = (1 if op == "+" else -1), int(number)
    return total + sign * term


def gen_calculator(rng: random.Random, digits: int) -> tuple[str, str]:
    """"What is a*b?" (sometimes "a*b+c" or "a*b-c"), a of up to `digits` digits, b of two, c of up to
    `digits`; the answer is never negative."""
    a, b = rng.randint(10, 10**digits - 1), rng.randint(10, 99)
    form = rng.randrange(3)
    if form == 0:
        expression = f"{a}*{b}"
    else:
        c = rng.randint(1, 10**digits - 1)
        expression = f"{a}*{b}+{c}" if form == 1 or c > a * b else f"{a}*{b}-{c}"
    return f"What is {expression}?", str(calculate(expression))


def calculator_space(digits: int) -> int:
    return 3 * (10**digits - 10) * 90 * (10**digits - 1)


def question_expression(prompt: str) -> str:
    """"What is 347*29?" -> "347*29"."""
    return prompt.removeprefix("What is ").removesuffix("?")


def transcript(prompt: str, answer: str) -> list[dict]:
    """The teacher's episode for a row: one call with the question's expression, then the answer."""
    expression = question_expression(prompt)
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": CALL + expression},
            {"role": "tool", "content": str(calculate(expression))},
            {"role": "assistant", "content": answer}]


class CalculatorEnv:
    """task.env "python:opd.tasks.calculator:CalculatorEnv" (the calculator family's default).

    reset: the question as the user message. step: an assistant message starting with `call` is a
    call, answered by a tool message with its value (or `bad call` with an "error" key when the
    expression is not digits and + - *); any other message is the final answer and ends the episode."""

    def __init__(self, call: str = CALL, bad_call: str = BAD_CALL):
        if not isinstance(call, str) or not call.strip():
            raise ValueError(f"call must be a non-empty prefix, got {call!r}")
        self.call, self.bad_call = call, bad_call

    def reset(self, example: dict) -> list[dict]:
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, messages: list[dict]) -> tuple[list[dict], bool]:
        last = messages[-1]["content"]
        if not last.startswith(self.call):
            return [], True
        value = calculate(last[len(self.call):].strip())
        if value is None:
            return [{"role": "tool", "content": self.bad_call, "error": "not digits and + - * only"}], False
        return [{"role": "tool", "content": str(value)}], False
