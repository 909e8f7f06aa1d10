"""Prompt schemas: format strings, chat templates and the manifest hash."""

from __future__ import annotations

import pytest

from opd.errors import OpdError
from opd.tasks.data import Example
from opd.tasks.schema import PromptSchema

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(chat_template: str | None):
    """A tiny character-level tokenizer (no downloads), optionally with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "<eos>", *"0123456789+=abcdefghijklmnopqrstuvwxyz"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def test_format_with_extra_fields():
    schema = PromptSchema.from_spec("Q ({level}): {prompt}\nA:")
    ex = Example("2+2=", "4", extra={"level": "easy"})
    assert schema.render(ex) == "Q (easy): 2+2=\nA:"
    assert schema.kind == "format"


def test_default_schema_is_identity():
    assert PromptSchema.from_spec("{prompt}").render(Example("12+3=", "15")) == "12+3="


def test_missing_field_names_it():
    schema = PromptSchema.from_spec("{prompt} [{difficulty}]")
    with pytest.raises(OpdError, match="field 'difficulty'"):
        schema.render(Example("p", "a", extra={"level": 1}))


@pytest.mark.parametrize("template, message", [
    ("Question: {question}", "must contain {prompt}"),
    ("{prompt} {}", "positional field"),
    ("{prompt", "not a valid format string"),
])
def test_bad_templates(template, message):
    with pytest.raises(OpdError, match=message):
        PromptSchema.from_spec(template)


def test_chat_render():
    tok = char_tokenizer(CHAT_TEMPLATE)
    ex = Example("1+2=", "3", extra={"ignored": 1})
    plain = PromptSchema.from_spec("chat")
    assert plain.render(ex, tok) == "<|user|>1+2=\n<|assistant|>"
    with_system = PromptSchema.from_spec({"kind": "chat", "system": "add"})
    assert with_system.render(ex, tok) == "<|system|>add\n<|user|>1+2=\n<|assistant|>"


def test_chat_without_template_is_an_error():
    schema = PromptSchema.from_spec("chat")
    with pytest.raises(OpdError, match="chat template"):
        schema.render(Example("p", "a"), char_tokenizer(None))
    with pytest.raises(OpdError, match="chat template"):
        schema.render(Example("p", "a"), None)


def test_broken_chat_template_is_an_error():
    tok = char_tokenizer("{{ raise_exception('no system role') }}")
    with pytest.raises(OpdError, match="no system role"):
        PromptSchema.from_spec("chat").render(Example("p", "a"), tok)


def test_hash_stable_and_sensitive():
    a = PromptSchema.from_spec("{prompt}=")
    assert a.schema_hash() == PromptSchema.from_spec("{prompt}=").schema_hash() == a.schema_hash()
    assert len(a.schema_hash()) == 16 and int(a.schema_hash(), 16) >= 0
    others = [PromptSchema.from_spec(s) for s in ("{prompt}", "chat", {"kind": "chat", "system": "x"})]
    assert len({a.schema_hash(), *(o.schema_hash() for o in others)}) == 4


def test_describe_and_from_spec_round_trip():
    schema = PromptSchema.from_spec({"kind": "chat", "system": "be brief"})
    assert schema.describe() == {"kind": "chat", "template": "{prompt}", "system": "be brief"}
    assert PromptSchema.from_spec(schema.describe()) == schema
    assert PromptSchema.from_spec(schema) is schema


@pytest.mark.parametrize("spec, message", [
    ({"kind": "jinja"}, "kind must be one of format, chat"),
    ({"kind": "format", "system": "x"}, "only used with kind 'chat'"),
    ({"kind": "chat", "template": "Q: {prompt}"}, "only used with kind 'format'"),
    ({"template": "{prompt}", "colour": "red"}, "unknown keys colour"),
    (42, "must be a string or a mapping"),
])
def test_bad_specs(spec, message):
    with pytest.raises(OpdError, match=message):
        PromptSchema.from_spec(spec)
