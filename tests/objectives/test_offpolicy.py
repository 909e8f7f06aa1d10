"""Off-policy correction weights, checked on a toy autoregressive model where every expectation is exact.

Toy: vocabulary V = 3, length T = 3, no EOS, so there are 27 sequences. A "model" is a table of next-token
logits per prefix (1 + 3 + 9 = 13 prefixes). p = current student, q = the policy that sampled (an older
student, or the teacher), t = teacher. Expectations are sums over the 27 sequences, weighted by their
probability (the product of the per-token probabilities).
"""

from __future__ import annotations

import pytest
import torch

from opd.objectives.divergences import per_token_reverse_kl
from opd.objectives.offpolicy import prefix_weights
from opd.objectives.sampled import sampled_token_advantage

V = T = 3
SEQS = torch.cartesian_prod(*[torch.arange(V)] * T)  # [27, 3], all sequences
PREFIX = torch.stack([torch.zeros(len(SEQS), dtype=torch.long), 1 + SEQS[:, 0],
                      1 + V + V * SEQS[:, 0] + SEQS[:, 1]], 1)  # [27, 3]: row of the table for x_<t
ONES = torch.ones(len(SEQS), T, dtype=torch.bool)


def table(seed, scale=1.5):
    return torch.randn(1 + V + V * V, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


P, Q, TEACHER = table(0), table(1), table(2)


def logits(tab):
    """Next-token logits along every sequence: [27, 3, V]."""
    return tab[PREFIX]


def token_logprobs(tab, temperature=1.0):
    """log p(x_t | x_<t) along every sequence: [27, 3]."""
    return torch.log_softmax(logits(tab) / temperature, -1).gather(-1, SEQS[..., None])[..., 0]


def seq_prob(tab, temperature=1.0):
    """Probability of every whole sequence: [27]."""
    return token_logprobs(tab, temperature).sum(-1).exp()


def test_toy_is_a_distribution():
    for tab in (P, Q, TEACHER):
        torch.testing.assert_close(seq_prob(tab).sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- (a) exact per-position divergence

def test_prefix_weights_correct_exact_kl_and_old_token_weighting_does_not():
    kl = per_token_reverse_kl(logits(P), logits(TEACHER))  # [27, 3], KL_t depends on x_<t only
    lp, lq = token_logprobs(P), token_logprobs(Q)
    w = prefix_weights(lp, lq, ONES, clip=None)
    on_policy = (seq_prob(P) * kl.sum(-1)).sum()
    weighted = (seq_prob(Q) * (w * kl).sum(-1)).sum()
    old = (seq_prob(Q) * ((lp - lq).exp() * kl).sum(-1)).sum()  # the bug: the token's own ratio at t
    unweighted = (seq_prob(Q) * kl.sum(-1)).sum()
    torch.testing.assert_close(weighted, on_policy, rtol=0, atol=1e-10)
    # the old weight is 1 in expectation given the prefix: it reproduces the uncorrected off-policy value
    torch.testing.assert_close(old, unweighted, rtol=0, atol=1e-10)

    # Monte Carlo from q: the weighted estimate is within 4 standard errors of the on-policy value ...
    n = 10_000
    idx = torch.multinomial(seq_prob(Q), n, replacement=True, generator=torch.Generator().manual_seed(3))
    per_seq = (w * kl).sum(-1)[idx]
    mean, se = per_seq.mean(), per_seq.std() / n ** 0.5
    assert abs(mean - on_policy) < 4 * se, (mean.item(), on_policy.item(), se.item())
    # ... while the old weighting is off by far more than that error
    assert abs(old - on_policy) > 4 * se, (old.item(), on_policy.item(), se.item())
    print(f"\non-policy {on_policy.item():.6f}  weighted exact {weighted.item():.6f}  "
          f"weighted MC {mean.item():.6f} +- {se.item():.6f}  old {old.item():.6f}")


# ----------------------------------------------------------------------------- (b) sampled-token estimator

@pytest.mark.parametrize("sampler,t_sample,t_roll,t_loss", [
    ("old", 1.0, 1.0, 1.0),      # stale rollout, one temperature
    ("old", 0.7, 0.7, 1.0),      # stale rollout sampled at 0.7, loss at 1.0
    ("fresh", 0.7, 0.7, 1.0),    # current student at the rollout temperature only: the token ratio is the fix
    ("teacher", 1.0, 1.0, 1.0),  # teacher-sampled rows
    ("teacher", 1.0, 1.3, 0.8),
])
def test_token_inclusive_weights_give_the_on_policy_gradient(sampler, t_sample, t_roll, t_loss):
    """Reference: x_<t ~ p^{T_roll} (the rollout law), x_t ~ p^{T_loss} (the law the estimator needs).

    In a whole-sequence sum, term t of sequence x then has probability
        prod_{j<t} p^{T_roll}(x_j) * p^{T_loss}(x_t) * prod_{j>t} p^{T_roll}(x_j)
    (the positions after t sum out to 1 whatever law they follow).
    """
    theta = P.clone().requires_grad_(True)
    q_tab = {"old": Q, "fresh": P, "teacher": TEACHER}[sampler]
    lq = token_logprobs(q_tab, t_sample)
    lp_roll, lp_loss = token_logprobs(theta, t_roll), token_logprobs(theta, t_loss)
    adv = sampled_token_advantage(lp_loss, token_logprobs(TEACHER, t_loss), clip=None)
    surrogate = -adv * lp_loss  # [27, 3]

    def grad(weight):  # weight [27, 3]: probability mass of (sequence, term t); detached
        return torch.autograd.grad((weight.detach() * surrogate).sum(), theta, retain_graph=True)[0]

    roll = lp_roll.detach()
    before = torch.cat([torch.zeros(len(SEQS), 1, dtype=torch.float64), roll.cumsum(-1)[:, :-1]], -1)
    after = roll.sum(-1, keepdim=True) - before - roll
    reference = grad((before + lp_loss.detach() + after).exp())
    w = prefix_weights(lp_roll, lq, ONES, token_logprobs=lp_loss, clip=None)
    torch.testing.assert_close(grad(seq_prob(q_tab, t_sample)[:, None] * w), reference, rtol=0, atol=1e-8)

    # without the token's ratio (prefix only) the gradient is wrong; so is the token's ratio only, unless the
    # sampler is the current student at the rollout temperature (then every prefix ratio is 1)
    bads = [prefix_weights(lp_roll, lq, ONES, clip=None)]
    if sampler != "fresh":
        bads.append((lp_loss.detach() - lq).exp())
    for bad in bads:
        assert (grad(seq_prob(q_tab, t_sample)[:, None] * bad) - reference).abs().max() > 1e-3
    if t_roll == t_loss:  # one temperature: the reference is the gradient of sum_t E_{x_<t~p}[KL_t] (prefix fixed)
        kl = per_token_reverse_kl(logits(theta), logits(TEACHER), temperature=t_loss)
        exact = torch.autograd.grad((seq_prob(P, t_roll)[:, None] * kl).sum(), theta)[0]
        torch.testing.assert_close(reference, exact, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- truncation, masks, dtype

def logprob_rows(seed, shape=(4, 6), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return -(torch.randn(shape, generator=g, dtype=torch.float64) * scale).abs()


def test_truncation_caps_the_whole_product():
    lp, lq, lt = logprob_rows(10), logprob_rows(11), logprob_rows(12)
    mask = torch.ones(4, 6, dtype=torch.bool)
    for tok in (None, lt):
        full = prefix_weights(lp, lq, mask, token_logprobs=tok, clip=None)
        capped = prefix_weights(lp, lq, mask, token_logprobs=tok, clip=2.0)
        assert (full > 2).any() and (capped <= 2).all()
        torch.testing.assert_close(capped, full.clamp(max=2.0), rtol=1e-12, atol=0)
        # full is the product of the per-token ratios (prefix, then the token)
        r = (lp - lq).exp()
        prefix = torch.cat([torch.ones(4, 1, dtype=torch.float64), r.cumprod(-1)[:, :-1]], -1)
        expected = prefix if tok is None else prefix * (lt - lq).exp()
        torch.testing.assert_close(full, expected, rtol=1e-10, atol=0)


def test_fresh_rows_get_weight_exactly_one():
    lp = logprob_rows(13)
    mask = torch.ones(4, 6, dtype=torch.bool)
    for clip in (None, 2.0, 0.5):
        one = torch.ones(4, 6, dtype=torch.float64).clamp(max=clip if clip is not None else 1.0)
        assert torch.equal(prefix_weights(lp, lp.clone(), mask, clip=clip), one)
        assert torch.equal(prefix_weights(lp, lp.clone(), mask, token_logprobs=lp.clone(), clip=clip), one)


def test_masked_positions_get_zero_weight_and_do_not_enter_later_prefixes():
    lp, lq, lt = logprob_rows(14), logprob_rows(15), logprob_rows(16)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0],   # prompt, completion, padding
                         [1, 1, 0, 1, 1, 1],   # a masked token in the middle
                         [1] * 6, [0] * 6], dtype=torch.bool)
    lp_junk = torch.where(mask, lp, torch.tensor(50.0, dtype=torch.float64))  # huge ratios where masked
    lq_junk = torch.where(mask, lq, torch.tensor(float("-inf"), dtype=torch.float64))
    for tok in (None, lt):
        w = prefix_weights(lp_junk, lq_junk, mask, token_logprobs=tok, clip=None)
        assert torch.isfinite(w).all() and torch.all(w[~mask] == 0)
        # each row equals the weights of its masked-in tokens alone, as one contiguous row
        for b in range(4):
            keep = mask[b]
            alone = prefix_weights(lp[b, keep][None], lq[b, keep][None], torch.ones(1, int(keep.sum())),
                                   token_logprobs=None if tok is None else tok[b, keep][None], clip=None)
            torch.testing.assert_close(w[b, keep], alone[0], rtol=1e-12, atol=0)
    # the first completion token after a prompt has an empty prefix: weight 1 without the token ratio
    assert prefix_weights(lp_junk, lq_junk, mask, clip=None)[0, 2] == 1.0


def test_weights_are_detached_and_keep_the_dtype():
    lp = logprob_rows(17).requires_grad_(True)
    lq, lt = logprob_rows(18), logprob_rows(19).requires_grad_(True)
    mask = torch.ones(4, 6)
    w = prefix_weights(lp, lq, mask, token_logprobs=lt)
    assert not w.requires_grad and w.dtype == torch.float64
    w32 = prefix_weights(lp.detach().bfloat16(), lq.bfloat16(), mask, token_logprobs=lt.detach().bfloat16())
    assert w32.dtype == torch.float32


# ----------------------------------------------------------------------------- shapes

def test_shapes_are_asserted():
    lp, mask = logprob_rows(20), torch.ones(4, 6)
    with pytest.raises(AssertionError):
        prefix_weights(lp, lp[:, :5], mask)
    with pytest.raises(AssertionError):
        prefix_weights(lp, lp, mask[:3])
    with pytest.raises(AssertionError):
        prefix_weights(lp, lp, mask, token_logprobs=lp[:, :5])
    with pytest.raises(AssertionError):
        prefix_weights(lp[..., None], lp[..., None], mask[..., None])
    with pytest.raises(AssertionError):
        prefix_weights(lp, lp, mask, clip=0.0)
