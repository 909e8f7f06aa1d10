"""The verifier-reward policy gradient used by the RL baseline and opd+rl."""

import torch

from opd.objectives.reward import group_advantages, policy_gradient_loss


def test_group_advantages_subtract_the_group_mean():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, group_size=4)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 0.0]), 1), torch.tensor([0.5, -0.5]))


def test_policy_gradient_matches_the_gradient_of_expected_reward():
    """Monte-Carlo: the mean PG gradient ≈ ∇ E_{x~softmax(θ)}[r(x)] for a one-token policy."""
    torch.manual_seed(0)
    theta = torch.randn(5, requires_grad=True)
    reward = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    n, group = 40000, 8
    x = torch.multinomial(torch.softmax(theta.detach(), -1), n, replacement=True)
    logp = torch.log_softmax(theta, -1)[x][:, None]  # [B, T=1]
    adv = group_advantages(reward[x], group)
    loss = policy_gradient_loss(logp, adv, torch.ones(n, 1))
    (mc,) = torch.autograd.grad(loss, theta)
    exact_theta = theta.detach().clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(-(torch.softmax(exact_theta, -1) * reward).sum(), exact_theta)
    # the group-mean baseline scales the estimate by (G-1)/G; otherwise unbiased
    torch.testing.assert_close(mc, exact * (group - 1) / group, atol=0.01, rtol=0.1)


def test_padding_never_enters_the_policy_gradient():
    logp = torch.randn(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    (g,) = torch.autograd.grad(policy_gradient_loss(logp, torch.tensor([1.0, -1.0]), mask), logp)
    assert (g[mask == 0] == 0).all() and (g[mask == 1] != 0).all()
