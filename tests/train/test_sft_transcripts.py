"""`opd sft` on `messages` transcripts: the episode is rendered as opd's episodes are, only the
assistant turns are trained (tool results and turn markers are context), and a tiny model learns
the calculator task's tool use from teacher transcripts."""

import json

import pytest
import torch

from opd.backends.hf import init_model, load_model
from opd.batch import position_ids
from opd.cli.main import main
from opd.errors import OpdError
from opd.rollout.episodes import render
from opd.tasks.calculator import ALPHABET, transcript
from opd.tasks.data import Example, Transcript, load_sft_rows
from opd.tasks.schema import PromptSchema
from opd.train.sft import encode_sft_rows, encode_transcript, make_masked_sft_batch, sft_backward

EPISODE = transcript("What is 12*34?", "408")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-msg") / "m"
    init_model("qwen3", 2, 32, 2, [ALPHABET], out, seed=0)
    return load_model(str(out), trainable=True)


def test_only_assistant_turns_are_targets_and_the_rest_renders_the_episode(model):
    tok = model.tokenizer
    prompt, ids, trained = encode_transcript(EPISODE, tok)
    assert tok.decode(prompt + ids, skip_special_tokens=False) == render(tok, EPISODE, False)
    targets = [i for i, t in zip(ids, trained) if t]
    assert tok.decode(targets, skip_special_tokens=False) == f"CALL 12*34{tok.eos_token}408{tok.eos_token}"
    context = [i for i, t in zip(ids, trained) if not t]
    assert tok.decode(context, skip_special_tokens=False) == "$408@"  # the tool's result, the next turn's marker


def test_gradient_is_zero_at_positions_that_predict_non_assistant_tokens(model):
    tok = model.tokenizer
    rows = encode_sft_rows([Transcript(EPISODE), Example("What is 2*3?", "6")], PromptSchema(), tok)
    batch = make_masked_sft_batch(rows, tok.pad_token_id)
    assert batch.context_mask[0].sum() > 0 and batch.context_mask[1].sum() == 0
    captured = {}

    def keep(_module, _inputs, output):  # the body's final hidden states (not split_lm's no-grad probe's)
        if output.requires_grad:
            output.retain_grad()
            captured["hidden"] = output

    handle = model.model.model.norm.register_forward_hook(keep)
    try:
        model.model.zero_grad()
        loss = sft_backward(model.model, batch)
    finally:
        handle.remove()
    start = batch.prompt_ids.shape[1] - 1
    grad = captured["hidden"].grad.abs().sum(-1)[:, start:start + batch.completion_ids.shape[1]]
    assert (grad[batch.context_mask.bool()] == 0).all()
    assert (grad[batch.completion_mask.bool()] > 0).all()
    # the loss is the mean cross-entropy over the assistant tokens alone
    with torch.no_grad():
        mask = batch.attention_mask
        logits = model.model(input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        logp = torch.log_softmax(logits[:, start:start + batch.completion_ids.shape[1]].float(), -1)
        nll = -logp.gather(-1, batch.completion_ids[..., None])[..., 0]
    assert loss == pytest.approx(float(nll[batch.completion_mask.bool()].mean()), rel=1e-4)
    model.model.zero_grad()


def test_changing_the_tool_result_changes_the_context_not_the_targets(model):
    tok = model.tokenizer
    other = [dict(m) for m in EPISODE]
    other[2]["content"] = "999"
    (p1, ids1, t1), (p2, ids2, t2) = (encode_transcript(e, tok) for e in (EPISODE, other))
    assert p1 == p2 and t1 == t2 and ids1 != ids2
    assert [i for i, t in zip(ids1, t1) if t] == [i for i, t in zip(ids2, t2) if t]


def test_bad_messages_rows_are_one_line_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(OpdError, match=r"d.jsonl:1: the transcript has no assistant message"):
        load_sft_rows(path)
    path.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n" + json.dumps({"messages": [{"role": "user"}]}))
    with pytest.raises(OpdError, match=r"d.jsonl:2: field 'messages' must be a list"):
        load_sft_rows(path)


def test_messages_rows_need_a_chat_template(tmp_path, capsys):
    out = init_model("qwen3", 1, 16, 2, [ALPHABET], tmp_path / "m")
    (out / "chat_template.jinja").unlink()
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": EPISODE}) + "\n")
    assert main(["sft", "--model", str(out), "--data", str(data), "--steps", "1", "--out", str(tmp_path / "o")]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_a_tiny_model_learns_tool_use_from_transcripts(tmp_path, capsys, monkeypatch):
    """opd data -> opd init-model -> opd sft on the messages, evaluated in the calculator environment."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "calc"
    assert main(["data", "--builtin", "calculator", "--param", "digits=2", "--n-train", "2000", "--n-eval", "100",
                 "--out", str(data)]) == 0
    assert main(["init-model", "--layers", "2", "--hidden", "64", "--heads", "4",
                 "--tokenizer-data", str(data / "chars.txt"), "--out", str(tmp_path / "init")]) == 0
    assert main(["sft", "--model", str(tmp_path / "init"), "--data", str(data / "train_messages.jsonl"),
                 "--steps", "250", "--batch-size", "32", "--eval", str(data / "eval.jsonl"), "--env", "calculator",
                 "--eval-every", "250", "--out", str(tmp_path / "teacher"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("eval accuracy at step 250: ")[1].split()[0])
    assert accuracy >= 0.8, out
