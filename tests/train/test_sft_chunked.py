"""SFT's loss in chunks of answer tokens: the loss and gradient of the full-logits cross-entropy,
with no head call over more than one chunk of logits."""

import pytest
import torch

from opd.batch import completion_logits
from opd.train.chunked import split_lm
from opd.train.sft import make_sft_batch, sft_backward

PROMPTS, ANSWERS = [[1, 5, 6, 7], [1, 8], [1, 9, 10]], [[9, 2], [10, 11, 12, 2], [4, 5, 6, 7, 8, 2]]


def full_logits_loss_and_grads(model, batch):
    """The definition: token cross-entropy over full [B, T, V] logits, mean over answer tokens."""
    model.zero_grad()
    logits = completion_logits(model, batch).float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.completion_ids, reduction="none")
    mask = batch.completion_mask.float()
    loss = (nll * mask).sum() / mask.sum()
    loss.backward()
    return loss.item(), grads(model)


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def chunked_loss_and_grads(model, batch, chunk_elements):
    model.zero_grad()
    return sft_backward(model, batch, chunk_elements), grads(model)


def assert_same(got, want):
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got[1].keys() == want[1].keys() and want[1]
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("tokens_per_chunk", [1, 3, 10_000])
def test_chunked_loss_and_gradient_equal_full_logits(tiny, tokens_per_chunk):
    model = tiny.model.requires_grad_(True)
    batch = make_sft_batch(PROMPTS, ANSWERS, tiny.tokenizer.pad_token_id)
    want = full_logits_loss_and_grads(model, batch)
    assert_same(chunked_loss_and_grads(model, batch, tokens_per_chunk * model.config.vocab_size), want)


def test_no_head_call_holds_more_than_one_chunk(tiny):
    model = tiny.model.requires_grad_(True)
    vocab = model.config.vocab_size
    body, head = split_lm(model)  # its probe is not part of the loss
    assert body is not None
    widths = []
    hook = head.register_forward_hook(lambda _m, _i, out: widths.append(out.numel()))
    try:
        sft_backward(model, make_sft_batch(PROMPTS, ANSWERS, tiny.tokenizer.pad_token_id), 2 * vocab)
    finally:
        hook.remove()
    assert widths == [2 * vocab] * 6  # 12 answer tokens, 2 per chunk


def test_without_a_head_split_the_loss_is_still_exact(tiny):
    """An architecture whose logits are not head(body(x)) (here: soft-capped) falls back to full logits."""
    model = tiny.model.requires_grad_(True)
    forward = model.forward

    def capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    model.forward = capped
    assert split_lm(model)[0] is None
    batch = make_sft_batch(PROMPTS, ANSWERS, tiny.tokenizer.pad_token_id)
    want = full_logits_loss_and_grads(model, batch)
    assert_same(chunked_loss_and_grads(model, batch, model.config.vocab_size), want)


def test_a_frozen_model_gets_the_loss_and_no_gradient(tiny):
    batch = make_sft_batch(PROMPTS, ANSWERS, tiny.tokenizer.pad_token_id)
    frozen = sft_backward(tiny.model, batch, tiny.model.config.vocab_size)
    assert not grads(tiny.model)
    assert frozen == pytest.approx(full_logits_loss_and_grads(tiny.model.requires_grad_(True), batch)[0], rel=1e-5)
