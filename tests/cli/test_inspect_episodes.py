"""`opd inspect` on multi-turn episodes: each row turn by turn, the environment's turns dimmed, the
most disagreeing tokens of the model's turns highlighted."""

from rich.console import Console

from opd.cli.inspect import episode_text
from opd.store.samples import SampleStore
from tests.cli.test_inspect import rollout, show
from tests.report.episode_rows import episode_answer, episode_row, tokenizer


def styled(text):
    """(characters, style) of each styled span of a rich Text."""
    return [(text.plain[s.start:s.end], str(s.style)) for s in text.spans]


def test_episode_rows_are_shown_turn_by_turn(tmp_path):
    store = SampleStore(tmp_path)
    store.add_rollouts([rollout(1, "1+1=", "2"), episode_row(1, tokenizer())])
    store.add_evals([episode_answer(1)])
    store.flush(1)
    out = show(str(tmp_path))  # no tokenizer in the run: the turns' text
    lines = [line for line in out.splitlines() if "assistant:" in line or "tool:" in line]
    assert [line.split("│")[4].strip() for line in lines] == [
        "assistant: CALL 12x3", "tool: bad <call>  [error: not digits]", "assistant: CALL 12*3", "tool: 36",
        "assistant: 36"]
    assert "1+1=" in out  # single-turn rows as before
    failures = show(str(tmp_path), "--failures")
    assert "assistant: 35" in failures and "tool: 36" in failures


def test_the_models_tokens_are_highlighted_and_the_environment_dimmed():
    tok = tokenizer()
    row = episode_row(1, tok, gap_turn=2, gap=-6.0)
    gaps = [t - s for s, t in zip(row["student_logprobs"], row["teacher_logprobs"])]
    text = episode_text(row, gaps, tok)
    spans = styled(text)
    assert ("bad <call>  [error: not digits]", "dim") in spans and ("36", "dim") in spans
    red = [chars for chars, style in spans if style == "bold red"]
    assert tok.eos_token in red  # the last turn's EOS: the largest gap
    assert "36" + tok.eos_token in text.plain.splitlines()[-1]
    console = Console(record=True, width=120, color_system=None)
    console.print(text)
    assert console.export_text().splitlines()[1].startswith("tool: bad <call>")
