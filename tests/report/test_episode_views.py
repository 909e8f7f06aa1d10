"""Episodes in report.html: turn by turn, the model's tokens coloured by teacher - student log-prob,
the environment's turns greyed (opd/report/episodes.py, opd/report/html.py)."""

import re

from opd.report.episodes import episode_turns
from opd.report.html import token_colour, write_report
from tests.report.episode_rows import MESSAGES, episode_answer, episode_row, tokenizer
from tests.report.runs import good_run, rollout


def test_turns_get_their_own_token_slices():
    tok = tokenizer()
    row = episode_row(2, tok)
    turns = episode_turns(row)
    assert [t.role for t in turns] == ["assistant", "tool", "assistant", "tool", "assistant"]  # the question is the prompt
    assert [tok.decode(t.ids, skip_special_tokens=True) for t in turns if t.from_model] == ["CALL 12x3", "CALL 12*3", "36"]
    assert turns[1].error == "not digits" and not turns[1].ids
    assert [min(t.gaps) for t in turns if t.from_model] == [0.0, -4.0, 0.0]
    assert episode_turns({**row, "transcript": None}) is None
    # stored counts that do not match the messages: the text only, never misplaced tokens
    assert all(not t.ids for t in episode_turns({**row, "turn_tokens": [3]}))


def test_report_shows_episodes_turn_by_turn(tmp_path):
    tok = tokenizer()
    run = good_run(tmp_path / "run", rollouts=[rollout(1), episode_row(2, tok)], answers=[episode_answer(2)])
    tok.save_pretrained(run / "student")  # the run's tokenizer: tokens decoded as text
    page = write_report(run).read_text()
    cell = re.search(r"<td>(<span class=\"turn\">.*?)</td>", page).group(1)
    turns = re.findall(r"<span class=\"turn( env)?\"><span class=\"role\">(\w+)</span>", cell)
    assert turns == [("", "assistant"), (" env", "tool"), ("", "assistant"), (" env", "tool"), ("", "assistant")]
    red = token_colour(-4.0)
    second = cell.split("<span class=\"turn\">")[2]  # the second assistant turn: its EOS is where they disagree
    assert f"background:{red}" in second and second.count("background:rgba") == 1
    assert "teacher−student -4.00" in second
    assert f"background:{red}" not in cell.split("<span class=\"turn\">")[1]
    assert "bad &lt;call&gt;</span> <i>(error: not digits)</i>" in cell  # escaped, greyed, with its error
    # the eval failure's episode, in the failures table (no log-probs there)
    failures = page.split("id=\"failures\"")[1]
    assert "<span class=\"role\">tool</span><span class=\"tok\">36</span>" in failures and ">35<" in failures
