"""Render examples through the prompt schema and tokenize them, identically for teacher and student."""

from __future__ import annotations

from opd.errors import OpdError


def encode_prompts(examples, schema, tokenizer) -> list[list[int]]:
    """Token ids of each rendered prompt.

    A chat template already writes its own special tokens, so only the plain format string gets
    the tokenizer's usual ones (e.g. BOS).
    """
    add_special = schema.kind != "chat"
    ids = [tokenizer(schema.render(ex, tokenizer), add_special_tokens=add_special).input_ids for ex in examples]
    unk = tokenizer.unk_token_id
    if unk is not None:
        for ex, seq in zip(examples, ids):
            if unk in seq:
                raise OpdError(f"prompt {ex.prompt!r} has characters the tokenizer does not know "
                               f"(it maps them to {tokenizer.unk_token}); rebuild the tokenizer with this data")
    return ids


def encode_answers(examples, tokenizer) -> list[list[int]]:
    """Token ids of each answer followed by EOS: the SFT target (no BOS inside the sequence)."""
    eos = tokenizer.eos_token_id
    return [tokenizer(ex.answer, add_special_tokens=False).input_ids + [eos] for ex in examples]


TURN_PROBE = "opd-turn-end-probe"  # a reply no template rewrites, so the text after it is the turn's end


def turn_end_id(schema, tokenizer) -> int | None:
    """The token a chat schema's template writes right after an assistant reply (None: nothing found).

    Generation stops at the tokenizer's EOS, so a chat model whose turns end with another token
    (Llama 3's <|eot_id|> next to EOS <|end_of_text|>) would run past the end of its answer."""
    try:
        text = tokenizer.apply_chat_template(schema.messages("1+1", TURN_PROBE), tokenize=False,
                                             **schema.chat_template_kwargs)
    except Exception:  # noqa: BLE001 - a template that cannot render a reply says nothing about its end
        return None
    if not isinstance(text, str) or TURN_PROBE not in text:
        return None
    tail = text[text.rindex(TURN_PROBE) + len(TURN_PROBE):].lstrip()
    ids = tokenizer(tail, add_special_tokens=False).input_ids
    return ids[0] if ids else None


def check_turn_end(schema, tokenizer) -> None:
    """A chat schema's assistant turn must end with EOS, or generation would not stop at the answer's end."""
    if schema.kind != "chat":
        return
    end = turn_end_id(schema, tokenizer)
    if end is not None and end != tokenizer.eos_token_id:
        raise OpdError(f"the chat template ends an assistant turn with {tokenizer.convert_ids_to_tokens(end)!r} "
                       f"but the tokenizer's EOS is {tokenizer.eos_token!r}: generation would run past the end of "
                       f"the answer; set tokenizer.eos_token = {tokenizer.convert_ids_to_tokens(end)!r} and save the tokenizer "
                       "with the model (tokenizer.save_pretrained(folder))")
