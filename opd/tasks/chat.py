"""The chat template `opd init-model` gives its tokenizers: one marker character per role.

    <bos>#system>user question@assistant reply<eos>$tool result@next reply<eos>

Each message is its role's marker followed by its content; an assistant turn ends with the tokenizer's
EOS (opd stops generation there: opd/rollout/prompts.py `check_turn_end`), and the generation prompt
is the assistant marker alone. The rendering only grows as messages are added (render(messages[:k],
add_generation_prompt=True) + reply + EOS is a prefix of render(messages)), which multi-turn episodes
need (opd/rollout/episodes.py `template_delta`). Few tokens per turn: tiny models learn it fast.
"""

from __future__ import annotations

MARKERS = {"system": "#", "user": ">", "assistant": "@", "tool": "$"}
CHAT_CHARS = "".join(MARKERS.values())  # what a char tokenizer must hold for the template

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}#{% elif m['role'] == 'user' %}>"
    "{% elif m['role'] == 'assistant' %}@{% elif m['role'] == 'tool' %}$"
    "{% else %}{{ raise_exception('the chat template knows the roles system, user, assistant and tool, not '"
    " + m['role']) }}{% endif %}"
    "{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}@{% endif %}"
)


def add_chat_template(tokenizer) -> None:
    """Give `tokenizer` opd's template (saved with it by save_pretrained)."""
    tokenizer.chat_template = CHAT_TEMPLATE
