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
