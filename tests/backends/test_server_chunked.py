"""The server's scoring in chunks of positions: the log-probs, ranks and top-k of a full forward pass,
with no head call over more than one chunk of logits; and on a GPU, scoring and greedy generation
on the model's device."""

import pytest
import torch

from opd.backends.server import greedy_choices, lm_split, score_tokens

SEQS = [[1, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 6, 5, 4], [3], [1, 9, 9, 9, 3, 11]]  # padded, one too short to score
K = 4


def reference(model, seq):
    """From one unpadded forward pass over full logits: (log-probs, ranks, top-k log-probs, top-k ids)."""
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, :-1].float(), dim=-1)
    lp = logp.gather(1, torch.tensor(seq[1:])[:, None])
    best = logp.topk(K, dim=1)
    return lp[:, 0], (logp > lp).sum(dim=1) + 1, best.values, best.indices


def assert_scores_equal(got, want):
    lps, ranks, top_lp, top_id = got
    torch.testing.assert_close(lps, want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(top_lp, want[2], rtol=0, atol=1e-5)
    assert torch.equal(ranks, want[1]) and torch.equal(top_id, want[3])


@pytest.mark.parametrize("positions_per_chunk", [1, 3, 10_000])
def test_chunked_scores_equal_a_full_forward(tiny, positions_per_chunk):
    model, pad = tiny.model, tiny.tokenizer.pad_token_id
    vocab = model.get_input_embeddings().num_embeddings
    scores = score_tokens(model, lm_split(model), SEQS, pad, K, positions_per_chunk * vocab)
    assert [len(s[0]) for s in scores] == [len(s) - 1 for s in SEQS]
    for got, seq in zip(scores, SEQS):
        assert_scores_equal(got, reference(model, seq))


def test_no_head_call_holds_more_than_one_chunk(tiny):
    model = tiny.model
    vocab = model.get_input_embeddings().num_embeddings
    split = lm_split(model)
    widths = []
    hook = split[1].register_forward_hook(lambda _m, _i, out: widths.append(out.numel()))
    try:
        score_tokens(model, split, SEQS, tiny.tokenizer.pad_token_id, K, 4 * vocab)
    finally:
        hook.remove()
    assert widths == [4 * vocab] * 4 + [vocab]  # 17 scored positions, 4 per chunk


def test_without_a_head_split_scores_are_the_models_own(tiny):
    """An architecture whose logits are not head(body(x)) (here: soft-capped) is scored from its full logits."""
    model = tiny.model
    forward = model.forward

    def capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    model.forward = capped
    split = lm_split(model)
    assert split[0] is None
    scores = score_tokens(model, split, SEQS, tiny.tokenizer.pad_token_id, K, 1)
    for got, seq in zip(scores, SEQS):
        assert_scores_equal(got, reference(model, seq))


def test_k_beyond_the_vocabulary_lists_every_token(tiny):
    vocab = tiny.model.get_input_embeddings().num_embeddings
    (_, _, top_lp, top_id), = score_tokens(tiny.model, lm_split(tiny.model), SEQS[:1], 0, vocab + 5)
    assert top_id.shape == (len(SEQS[0]) - 1, vocab) and torch.equal(top_id.sort(dim=1).values,
                                                                     torch.arange(vocab).expand_as(top_id))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_teacher_on_the_gpu_scores_and_generates_there(tiny):
    from opd.backends.hf import load_model

    tok = tiny.tokenizer
    gpu = load_model(tiny.name).model.to("cuda")
    cpu_scores = score_tokens(tiny.model, lm_split(tiny.model), SEQS, tok.pad_token_id, K)
    gpu_scores = score_tokens(gpu, lm_split(gpu), SEQS, tok.pad_token_id, K)
    for got, want in zip(gpu_scores, cpu_scores):
        assert all(t.device.type == "cpu" for t in got)  # ready for JSON
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4)
        assert torch.equal(got[3][:, 0], want[3][:, 0])  # the best token; near-ties below it may swap
    prompts = [s for s in SEQS if len(s) > 1]
    assert greedy_choices(gpu, tok, prompts, 5) == greedy_choices(tiny.model, tok, prompts, 5)
