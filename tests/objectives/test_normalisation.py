"""Normalisation: micro-batches normalised by the whole batch's token count add up to the full-batch step."""

from __future__ import annotations

import pytest
import torch

from opd.objectives.divergences import jsd, masked_mean, reverse_kl
from opd.objectives.sampled import sampled_token_loss

B, T, V = 7, 9, 11
# very different completion lengths per row (prompt zeros in front, padding zeros behind)
LENGTHS, STARTS = [9, 1, 5, 2, 8, 3, 0], [0, 4, 2, 7, 1, 0, 3]
MASK = torch.zeros(B, T, dtype=torch.bool)
for row, (start, n) in enumerate(zip(STARTS, LENGTHS)):
    MASK[row, start:start + n] = True
SPLITS = {"2-micro": [2, 5], "4-micro": [1, 2, 3, 1]}


def randn(seed, shape, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def make_case(name):
    """(loss(student, rows, normalizer), student leaf values): the other inputs are fixed per row."""
    if name == "sampled_token_loss":
        student = -randn(0, (B, T)).abs() - 0.1
        teacher, sampling = -randn(1, (B, T)).abs(), -randn(2, (B, T)).abs()
        return (lambda s, rows, norm: sampled_token_loss(s, teacher[rows], MASK[rows], sampling_logprobs=sampling[rows],
                                                         clip=1.0, normalizer=norm)), student
    teacher = randn(3, (B, T, V)) * torch.linspace(0.5, 5.0, B)[:, None, None]  # rows differ in KL scale
    fn = {"reverse_kl": reverse_kl, "jsd": lambda s, t, m, **kw: jsd(s, t, m, beta=0.3, **kw)}[name]
    return (lambda s, rows, norm: fn(s, teacher[rows], MASK[rows], normalizer=norm)), randn(4, (B, T, V), 2.0)


def accumulate(loss_fn, student, sizes, per_micro_mean=False):
    """Loss and gradient summed over micro-batches, like a trainer with gradient accumulation."""
    leaf = student.clone().requires_grad_(True)
    total, lo = 0.0, 0
    for n in sizes:
        rows = slice(lo, lo + n)
        if per_micro_mean:  # naive: each micro-batch averages its own tokens, then average the micro-batches
            loss = loss_fn(leaf[rows], rows, None) / len(sizes)
        else:
            loss = loss_fn(leaf[rows], rows, int(MASK.sum()))
        loss.backward()
        total, lo = total + loss.detach(), lo + n
    assert lo == B
    return total, leaf.grad


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "sampled_token_loss"])
@pytest.mark.parametrize("split", SPLITS, ids=list(SPLITS))
def test_micro_batches_sum_to_the_full_batch(name, split):
    loss_fn, student = make_case(name)
    full_loss, full_grad = accumulate(loss_fn, student, [B])
    # the full batch with normalizer = its own token count is the plain masked mean
    torch.testing.assert_close(full_loss, loss_fn(student, slice(0, B), None))
    loss, grad = accumulate(loss_fn, student, SPLITS[split])
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-8)
    # averaging per-micro-batch means weights tokens by 1/len(micro-batch): wrong on ragged masks
    naive_loss, naive_grad = accumulate(loss_fn, student, SPLITS[split], per_micro_mean=True)
    assert not torch.allclose(naive_loss, full_loss, rtol=1e-2)
    assert not torch.allclose(naive_grad, full_grad, rtol=1e-2, atol=1e-4)


def test_masked_mean():
    values = randn(5, (B, T)).requires_grad_(True)
    expected = values[MASK].sum() / MASK.sum()
    torch.testing.assert_close(masked_mean(values, MASK), expected)
    torch.testing.assert_close(masked_mean(values, MASK.long()), expected)  # 0/1 masks work like bool
    torch.testing.assert_close(masked_mean(values, MASK.float(), normalizer=100), values[MASK].sum() / 100)
    (grad,) = torch.autograd.grad(masked_mean(values, MASK, normalizer=100), values)
    torch.testing.assert_close(grad, MASK.float() / 100)
    with pytest.raises(AssertionError):
        masked_mean(values, MASK[:, :-1])


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    empty = torch.zeros(B, T, dtype=torch.bool)
    student = randn(6, (B, T, V)).requires_grad_(True)
    loss = reverse_kl(student, randn(7, (B, T, V)), empty)
    loss.backward()
    assert loss == 0 and torch.all(student.grad == 0)
    lp = -randn(8, (B, T)).abs()
    assert sampled_token_loss(lp, lp - 1, empty) == 0
