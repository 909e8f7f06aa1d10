"""Sampled-token estimators: exact gradient form, and Monte-Carlo unbiasedness against the exact reverse KL."""

from __future__ import annotations

import pytest
import torch

from opd.objectives.divergences import reverse_kl
from opd.objectives.sampled import k1, k3, sampled_token_advantage, sampled_token_loss

MASK = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
N_SAMPLES, V = 200_000, 8


def randn(seed, shape, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ----------------------------------------------------------------------------- exact, small-tensor checks

def test_advantage_is_detached_and_clipped():
    s = randn(0, (3, 5), 4.0).requires_grad_(True)
    t = randn(1, (3, 5), 4.0)
    adv = sampled_token_advantage(s, t, clip=None)
    assert not adv.requires_grad
    torch.testing.assert_close(adv, (t - s).detach())
    clipped = sampled_token_advantage(s, t, clip=1.5)
    assert clipped.abs().max() == 1.5 and (adv.abs() > 1.5).any()
    torch.testing.assert_close(clipped, adv.clamp(-1.5, 1.5))


def test_k1_k3_definitions():
    s, t = -randn(2, (3, 5)).abs(), -randn(3, (3, 5)).abs()
    torch.testing.assert_close(k1(s, t), s - t)
    r = (t - s).exp()
    torch.testing.assert_close(k3(s, t), (r - 1) - r.log())
    assert (k3(s, t) >= 0).all() and torch.all(k3(s, s) == 0)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_on_policy_loss_and_gradient(clip):
    s = randn(4, (3, 5)).requires_grad_(True)
    t = randn(5, (3, 5))
    loss = sampled_token_loss(s, t, MASK, clip=clip, normalizer=11)
    adv = (t - s).detach() if clip is None else (t - s).detach().clamp(-clip, clip)
    torch.testing.assert_close(loss, -(MASK * adv * s).sum() / 11)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(grad, -MASK.double() * adv / 11)  # A is a constant: no d A / d log p_S term
    assert torch.equal(grad[~MASK], torch.zeros_like(grad[~MASK]))


@pytest.mark.parametrize("is_clip", [None, 1.5])
def test_truncated_importance_weight_gradient(is_clip):
    s = randn(6, (3, 5)).requires_grad_(True)
    t, q = randn(7, (3, 5)), randn(8, (3, 5))
    loss = sampled_token_loss(s, t, MASK, sampling_logprobs=q, clip=None, is_clip=is_clip)
    (grad,) = torch.autograd.grad(loss, s)
    ratio = (s - q).detach().exp()
    assert (ratio > 1.5).any() and (ratio < 1.5).any()
    w = ratio if is_clip is None else ratio.clamp(max=is_clip)
    torch.testing.assert_close(grad, -MASK.double() * w * (t - s).detach() / MASK.sum())
    # with a fresh sampler (q = p_S) the weight is 1 and the loss is the on-policy one
    on_policy = sampled_token_loss(s, t, MASK, clip=None)
    torch.testing.assert_close(sampled_token_loss(s, t, MASK, sampling_logprobs=s, clip=None), on_policy)


def test_float32_and_bf16_inputs():
    s, t = randn(9, (3, 5)).float(), randn(10, (3, 5)).float()
    loss32 = sampled_token_loss(s, t, MASK)
    loss16 = sampled_token_loss(s.bfloat16(), t.bfloat16(), MASK)
    assert loss32.dtype == loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)


def test_shape_assertions():
    with pytest.raises(AssertionError):
        sampled_token_loss(torch.zeros(3, 5), torch.zeros(3, 4), MASK)
    with pytest.raises(AssertionError):
        sampled_token_loss(torch.zeros(3, 5), torch.zeros(3, 5), MASK[:, :4])


# ----------------------------------------------------------------------------- Monte-Carlo unbiasedness

@pytest.fixture(scope="module")
def dists():
    """One position: student and teacher logits over V tokens, and their exact reverse-KL gradient."""
    s_logits, t_logits = randn(11, (V,)), randn(12, (V,), 1.5)
    leaf = s_logits.clone().requires_grad_(True)
    kl = reverse_kl(leaf.view(1, 1, V), t_logits.view(1, 1, V), torch.ones(1, 1))
    (grad,) = torch.autograd.grad(kl, leaf)
    return s_logits, t_logits, kl.detach(), grad


def draw(probs, seed):
    return torch.multinomial(probs, N_SAMPLES, replacement=True, generator=torch.Generator().manual_seed(seed))


def mc_gradient(s_logits, t_logits, x, **loss_kw):
    """d/d(student logits) of sampled_token_loss over N samples at one position (= mean of per-sample grads)."""
    leaf = s_logits.clone().requires_grad_(True)
    student_lp = torch.log_softmax(leaf, -1)[x].view(1, -1)
    teacher_lp = torch.log_softmax(t_logits, -1)[x].view(1, -1)
    loss = sampled_token_loss(student_lp, teacher_lp, torch.ones_like(student_lp), **loss_kw)
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def per_sample_grads(s_logits, t_logits, x, weight=1.0):
    """Vectorised per-sample gradient of -w A log p_S(x) wrt the logits: -w A (onehot(x) - p_S): [N,V]."""
    log_ps, log_pt = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    adv = (log_pt - log_ps)[x]
    return -(weight * adv)[:, None] * (torch.nn.functional.one_hot(x, V).double() - log_ps.exp())


def z_scores(mc, g):
    """|mc - exact| in units of the per-component Monte-Carlo standard error."""
    return lambda exact: (mc - exact).abs() / (g.std(0) / N_SAMPLES ** 0.5)


def test_k1_and_k3_are_unbiased_for_reverse_kl(dists):
    s_logits, t_logits, kl, _ = dists
    x = draw(torch.softmax(s_logits, -1), seed=13)
    s_lp, t_lp = torch.log_softmax(s_logits, -1)[x], torch.log_softmax(t_logits, -1)[x]
    for estimator in (k1, k3):
        values = estimator(s_lp.view(1, -1), t_lp.view(1, -1))
        stderr = values.std() / N_SAMPLES ** 0.5
        assert abs(values.mean() - kl) < 4 * stderr, estimator.__name__
    assert kl > 0.1


def test_sampled_gradient_is_unbiased_and_clipping_biases_it(dists):
    s_logits, t_logits, _, exact = dists
    x = draw(torch.softmax(s_logits, -1), seed=14)
    g = per_sample_grads(s_logits, t_logits, x)
    mc = mc_gradient(s_logits, t_logits, x, clip=None)
    torch.testing.assert_close(mc, g.mean(0))  # autograd through the loss == the vectorised formula
    z = z_scores(mc, g)
    assert (z(exact) < 4.5).all(), z(exact)
    assert (z(torch.zeros(V)) > 20).any()  # the test has power: the gradient is far from 0 in SE units
    clipped = mc_gradient(s_logits, t_logits, x, clip=0.05)
    assert (z_scores(clipped, g)(exact) > 20).any()


def test_importance_weights_correct_a_stale_sampler(dists):
    s_logits, t_logits, _, exact = dists
    q_logits = s_logits + randn(15, (V,), 0.7)
    x = draw(torch.softmax(q_logits, -1), seed=16)
    ratio = (torch.log_softmax(s_logits, -1) - torch.log_softmax(q_logits, -1)).exp()[x]
    sampling_lp = torch.log_softmax(q_logits, -1)[x].view(1, -1)
    g = per_sample_grads(s_logits, t_logits, x, weight=ratio)
    for is_clip in (None, 1e9):
        mc = mc_gradient(s_logits, t_logits, x, sampling_logprobs=sampling_lp, clip=None, is_clip=is_clip)
        torch.testing.assert_close(mc, g.mean(0))
        assert (z_scores(mc, g)(exact) < 4.5).all()
    # ignoring that the samples came from q (no importance weight) is biased
    naive = mc_gradient(s_logits, t_logits, x, clip=None)
    assert (z_scores(naive, g)(exact) > 10).any()
