"""The chat template `opd init-model` writes (opd/tasks/chat.py): roles, EOS-ended assistant turns,
prefix-stable renderings, and opd's own start check."""

import pytest

from opd.backends.hf import init_model, load_model
from opd.errors import OpdError
from opd.rollout.episodes import render, template_delta
from opd.rollout.prompts import check_turn_end, turn_end_id
from opd.tasks.chat import CHAT_CHARS, MARKERS
from opd.tasks.schema import PromptSchema

EPISODE = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 12*3?"},
           {"role": "assistant", "content": "CALL 12*3"}, {"role": "tool", "content": "36"},
           {"role": "user", "content": "sure?"}, {"role": "assistant", "content": "36"}]


@pytest.fixture(scope="module", params=["char", "bpe"])
def tok(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"chat-{request.param}") / "m"
    init_model("qwen3", 1, 16, 2, ["What is 0123456789*? CALL be brief sure"], out, tokenizer=request.param)
    return load_model(str(out)).tokenizer  # the template comes back from the saved folder


def test_every_role_has_one_marker_and_assistant_turns_end_with_eos(tok):
    text = render(tok, EPISODE, False)
    eos = tok.eos_token
    assert text == (f"{tok.bos_token}#be brief>What is 12*3?@CALL 12*3{eos}$36>sure?@36{eos}")
    assert render(tok, EPISODE[:2], True).endswith(">What is 12*3?" + MARKERS["assistant"])
    check_turn_end(PromptSchema.from_spec("chat"), tok)  # what opd distill checks at start
    assert turn_end_id(PromptSchema.from_spec("chat"), tok) == tok.eos_token_id


def test_the_markers_are_single_tokens_of_the_char_vocabulary(tok):
    for marker in CHAT_CHARS:
        ids = tok(marker, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tok.unk_token_id


@pytest.mark.parametrize("k", [k for k, m in enumerate(EPISODE) if m["role"] == "assistant"])
def test_rendering_is_prefix_stable(tok, k):
    """render(messages[:k], generation prompt) + the reply + EOS is a prefix of render(messages), and
    the core's text difference is exactly the messages added after the reply."""
    head = render(tok, EPISODE[:k], True) + EPISODE[k]["content"] + tok.eos_token
    full = render(tok, EPISODE, False)
    assert full.startswith(head)
    if k + 1 < len(EPISODE):
        after = render(tok, EPISODE[:5], True) if k == 2 else full
        assert template_delta(render(tok, EPISODE[:k + 1], False), after, tok.eos_token) == "$36>sure?@"


def test_an_unknown_role_is_an_error(tok):
    with pytest.raises(OpdError, match="roles system, user, assistant and tool, not robot"):
        render(tok, [{"role": "robot", "content": "hi"}], True)
