"""Built-in task families: deterministic, correct answers, disjoint train/eval."""

from __future__ import annotations

import re

import pytest

from opd.errors import OpdError
from opd.tasks import BUILTIN_TASKS, builtin_split, make_builtin, make_verifier
from opd.tasks.builtin import BUILTIN_ENVS

ALLOWED = set("0123456789+=,:")


def operands(prompt: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    assert m, prompt
    return int(m[1]), int(m[2])


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_deterministic_and_seed_sensitive(name):
    first = make_builtin(name, 50, seed=7)
    assert first == make_builtin(name, 50, seed=7)
    assert first != make_builtin(name, 50, seed=8)


@pytest.mark.parametrize("name", sorted(set(BUILTIN_TASKS) - set(BUILTIN_ENVS)))  # multi-turn: tests/tasks/test_calculator.py
def test_charset_and_shape(name):
    family = BUILTIN_TASKS[name]
    assert family.verifier == "exact"
    for ex in make_builtin(name, 200, seed=1):
        assert ex.prompt.endswith("=") and ex.answer and ex.tag == name
        assert set(ex.prompt + ex.answer) <= ALLOWED


def test_addition_answers_and_digit_counts():
    examples = make_builtin("addition", 600, seed=3, digits=3)
    for ex in examples:
        a, b = operands(ex.prompt)
        assert int(ex.answer) == a + b and a < 1000 and b < 1000
    lengths = {len(str(operands(ex.prompt)[0])) for ex in examples}
    assert lengths == {1, 2, 3}  # uniform over digit counts, so short operands do occur


def test_reverse_addition_answers():
    for ex in make_builtin("reverse_addition", 300, seed=4, digits=4):
        a, b = operands(ex.prompt)
        assert ex.answer[::-1] == str(a + b)


def test_reverse_addition_example():
    from opd.tasks.builtin import gen_reverse_addition

    class Fixed:  # rng that yields digit count 2, then 57; digit count 2, then 68
        values = iter([2, 57, 2, 68])

        def randint(self, lo, hi):
            return next(self.values)

    assert gen_reverse_addition(Fixed(), digits=2) == ("57+68=", "521")


def test_running_sum_answers():
    for ex in make_builtin("running_sum", 300, seed=5, length=6):
        digits = [int(c) for c in ex.prompt[:-1]]
        assert len(digits) == 6 and len(ex.answer) == 6
        expected = "".join(str(sum(digits[: i + 1]) % 10) for i in range(len(digits)))
        assert ex.answer == expected
    assert len(make_builtin("running_sum", 1, seed=0)[0].prompt) == 11  # default length 10


def test_scratchpad_answers():
    for ex in make_builtin("scratchpad_addition", 300, seed=6):
        a, b = operands(ex.prompt)
        steps, result = ex.answer.split(":")
        assert int(result) == a + b
        carry, total = 0, 0
        for i, step in enumerate(steps.split(",")):
            x, y, c, s = map(int, re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d+)", step).groups())
            assert (x, c) == ((a // 10**i) % 10, carry) and y == (b // 10**i) % 10
            assert s == x + y + c
            carry = s // 10
            total += (s % 10) * 10**i
        assert total + carry * 10 ** (i + 1) == a + b
    from opd.tasks.builtin import scratchpad

    assert scratchpad(57, 68) == "7+8+0=15,5+6+1=12:125"


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_split_disjoint(name):
    train, held_out = builtin_split(name, 300, 100, seed=11)
    assert train == make_builtin(name, 300, seed=11)
    eval_prompts = [ex.prompt for ex in held_out]
    assert len(held_out) == 100 and len(set(eval_prompts)) == 100
    assert not set(eval_prompts) & {ex.prompt for ex in train}
    assert builtin_split(name, 300, 100, seed=11) == (train, held_out)


def test_split_fills_a_small_space_exactly():
    """running_sum with length 1 has 10 prompts: eval may take every one train left over."""
    distinct = {ex.prompt for ex in make_builtin("running_sum", 6, seed=0, length=1)}
    left = 10 - len(distinct)
    _, held_out = builtin_split("running_sum", 6, left, seed=0, length=1)
    assert {ex.prompt for ex in held_out} == {f"{d}=" for d in range(10)} - distinct
    with pytest.raises(OpdError, match="only 10 distinct prompts"):
        builtin_split("running_sum", 6, left + 1, seed=0, length=1)


def test_split_too_small_space():
    with pytest.raises(OpdError, match="only 10 distinct prompts"):
        builtin_split("running_sum", 50, 5, seed=0, length=1)


def test_builtin_answers_pass_their_verifier():
    for name, family in BUILTIN_TASKS.items():
        verify = make_verifier(family.verifier)
        assert all(verify(ex.answer, ex.answer) for ex in make_builtin(name, 20, seed=2))


@pytest.mark.parametrize("call, message", [
    (lambda: make_builtin("multiplication", 5, 0), "unknown built-in task 'multiplication'; available: addition"),
    (lambda: builtin_split("nope", 5, 5, 0), "available: .*reverse_addition.*running_sum"),
    (lambda: make_builtin("addition", 5, 0, length=3), r"unknown parameter\(s\) length \(accepted: digits\)"),
    (lambda: make_builtin("addition", 5, 0, digits=0), "digits must be a positive integer"),
    (lambda: make_builtin("running_sum", 5, 0, length="4"), "length must be a positive integer"),
    (lambda: make_builtin("addition", -1, 0), "number of examples must be an integer >= 0"),
    (lambda: builtin_split("addition", 5, 0, 0), "n_eval must be an integer >= 1"),
])
def test_errors(call, message):
    with pytest.raises(OpdError, match=message):
        call()
