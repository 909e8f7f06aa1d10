"""The calculator tool task (opd/tasks/calculator.py): safe arithmetic, the environment's protocol,
the generated rows and teacher transcripts, and `opd data --builtin calculator`."""

import json
import random

import pytest

from opd.cli.main import main
from opd.rollout.episodes import episode_stats, final_answer, load_env
from opd.tasks.builtin import BUILTIN_ENVS, builtin_split, make_builtin
from opd.tasks.calculator import ALPHABET, CalculatorEnv, calculate, gen_calculator, transcript
from opd.tasks.data import Transcript, load_jsonl, load_sft_rows


@pytest.mark.parametrize("expression, value", [("347*29", 10063), ("2+3*4", 14), ("2*3-10", -4), ("7", 7),
                                               ("10-2-3", 5), ("2*3*4+1-5*2", 15), ("007+1", 8)])
def test_calculate_follows_precedence(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", ["", "2+", "+2", "2**3", "2/3", "(2+3)", "2 + 3", "__import__('os')",
                                        "1" * 13, "+".join(["1"] * 9), "3.5*2", None])
def test_calculate_rejects_anything_but_digits_and_plus_minus_times(expression):
    assert calculate(expression) is None


def test_generated_questions_need_the_tool_and_answers_are_right():
    rng = random.Random(0)
    rows = [gen_calculator(rng, 3) for _ in range(300)]
    for prompt, answer in rows:
        assert prompt.startswith("What is ") and prompt.endswith("?")
        assert answer == str(calculate(prompt[8:-1])) and int(answer) >= 0
        assert "*" in prompt and set(prompt + answer) <= set(ALPHABET)
    assert {p.count("+") + p.count("-") for p, _ in rows} == {0, 1}  # a*b, a*b+c and a*b-c all occur


def test_env_answers_calls_flags_malformed_ones_and_ends_on_an_answer():
    env = load_env(BUILTIN_ENVS["calculator"], {})  # how opd distill loads it
    opening = env.reset({"prompt": "What is 12*3?", "answer": "36", "tag": "calculator"})
    assert opening == [{"role": "user", "content": "What is 12*3?"}]
    call = opening + [{"role": "assistant", "content": "CALL 12*3"}]
    assert env.step(call) == ([{"role": "tool", "content": "36"}], False)
    bad, done = env.step(opening + [{"role": "assistant", "content": "CALL 12x3"}])
    assert not done and bad[0]["role"] == "tool" and bad[0]["content"] == "bad call" and bad[0]["error"]
    assert env.step(call + [{"role": "tool", "content": "36"}, {"role": "assistant", "content": "36"}]) == ([], True)
    assert env.step(opening + [{"role": "assistant", "content": "call 12*3"}]) == ([], True)  # not the prefix


def test_an_episode_of_repeated_and_bad_calls_is_counted_by_the_core():
    env = CalculatorEnv()
    messages = env.reset({"prompt": "What is 12*3?", "answer": "36"})
    for reply in ("CALL 12*3", "CALL 12*3", "CALL 12x", "36"):
        messages.append({"role": "assistant", "content": reply})
        new, done = env.step(messages)
        messages += new
    assert done and final_answer(messages) == "36"
    assert episode_stats(messages) == {"turns": 4, "tool_calls": 3, "redundant_calls": 1, "malformed_calls": 1}


def test_env_params_are_checked():
    assert CalculatorEnv(call="TOOL:").step([{"role": "assistant", "content": "TOOL: 2*2"}])[0][0]["content"] == "4"
    with pytest.raises(ValueError):
        CalculatorEnv(call=" ")


def test_the_teacher_transcript_solves_its_row_with_one_call():
    for ex in make_builtin("calculator", 50, seed=3):
        messages = transcript(ex.prompt, ex.answer)
        env = CalculatorEnv()
        assert messages[:1] == env.reset({"prompt": ex.prompt, "answer": ex.answer})
        assert env.step(messages[:2]) == (messages[2:3], False)  # the tool says what the transcript says
        assert env.step(messages) == ([], True) and final_answer(messages) == ex.answer


def test_split_is_disjoint_and_tagged():
    train, held_out = builtin_split("calculator", 200, 50, seed=1)
    assert not {e.prompt for e in train} & {e.prompt for e in held_out}
    assert all(e.tag == "calculator" for e in train + held_out)


def test_opd_data_writes_rows_transcripts_and_the_characters(tmp_path, capsys):
    assert main(["data", "--builtin", "calculator", "--n-train", "30", "--n-eval", "10", "--out", str(tmp_path)]) == 0
    assert "train_messages.jsonl" in capsys.readouterr().out
    train = load_jsonl(tmp_path / "train.jsonl")
    rows = load_sft_rows(tmp_path / "train_messages.jsonl")
    assert len(rows) == 30 and all(isinstance(r, Transcript) for r in rows)
    assert [r.messages for r in rows] == [transcript(e.prompt, e.answer) for e in train]
    chars = set((tmp_path / "chars.txt").read_text())
    assert chars >= set("".join(m["content"] for r in rows for m in r.messages)) | set("bad call")
    first = json.loads((tmp_path / "train_messages.jsonl").read_text().splitlines()[0])
    assert list(first) == ["messages"]
