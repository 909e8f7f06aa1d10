"""Full-vocabulary and top-k divergences against float64 references written from the definitions."""

from __future__ import annotations

import pytest
import torch

from opd.objectives import divergences as D
from opd.objectives import reference as R

B, T, V = 4, 7, 13
# ragged: leading zeros (prompt), trailing zeros (padding), one row with a single token
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                     [0, 0, 1, 1, 1, 0, 0],
                     [0, 1, 1, 1, 1, 1, 0],
                     [0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)

CASES = [
    ("reverse_kl", {}), ("reverse_kl", {"temperature": 0.7}),
    ("forward_kl", {}), ("forward_kl", {"temperature": 1.5}),
    ("jsd", {"beta": 0.0}), ("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.9}),
    ("jsd", {"beta": 1.0}), ("jsd", {"beta": 0.3, "temperature": 2.0}),
    ("skew_kl", {"alpha": 0.0}), ("skew_kl", {"alpha": 0.1}), ("skew_kl", {"alpha": 0.5, "temperature": 0.5}),
    ("skew_reverse_kl", {"alpha": 0.0}), ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.9, "temperature": 1.3}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES]


def rand_logits(seed, shape=(B, T, V), scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def ref_loss(name, s, t, mask, kw, normalizer=None):
    kw = dict(kw)
    temperature = kw.pop("temperature", 1.0)
    return R.masked_mean(R.REFERENCES[name](s, t, temperature=temperature, **kw), mask, normalizer)


def loss_and_grad(fn, s, *args, **kw):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, *args, **kw)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def test_registry():
    assert set(D.DIVERGENCES) == {"reverse_kl", "forward_kl", "jsd", "skew_kl", "skew_reverse_kl"}


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
@pytest.mark.parametrize("normalizer", [None, 37])
def test_matches_float64_reference(name, kw, normalizer):
    s, t = rand_logits(0), rand_logits(1)
    loss, grad = loss_and_grad(D.DIVERGENCES[name], s, t, MASK, normalizer=normalizer, **kw)
    ref, ref_grad = loss_and_grad(lambda x: ref_loss(name, x, t.double(), MASK, kw, normalizer), s.double())
    assert loss.dtype == torch.float32 and ref > 1e-2  # the reference is not trivially 0
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_large_logits_stay_finite_and_exact(name, kw):
    """Logit gaps of ~300 underflow float32 softmax; log_softmax keeps the float32 result exact."""
    s, t = rand_logits(2, scale=50.0), rand_logits(3, scale=50.0)
    loss, grad = loss_and_grad(D.DIVERGENCES[name], s, t, MASK, **kw)
    ref = ref_loss(name, s.double(), t.double(), MASK, kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)


def test_endpoints_and_limits():
    s, t = rand_logits(4), rand_logits(5)
    rkl, fkl = D.reverse_kl(s, t, MASK), D.forward_kl(s, t, MASK)
    assert not torch.allclose(rkl, fkl)
    torch.testing.assert_close(D.jsd(s, t, MASK, beta=0.0), fkl)
    torch.testing.assert_close(D.jsd(s, t, MASK, beta=1.0), rkl)
    torch.testing.assert_close(D.skew_kl(s, t, MASK, alpha=0.0), fkl)
    torch.testing.assert_close(D.skew_reverse_kl(s, t, MASK, alpha=0.0), rkl)
    assert D.skew_kl(s, t, MASK, alpha=1.0) == 0 and D.skew_reverse_kl(s, t, MASK, alpha=1.0) == 0
    # the endpoint conventions are the limits of JSD_beta / beta and JSD_beta / (1 - beta)
    eps = 1e-5
    sd, td = s.double(), t.double()
    torch.testing.assert_close(D.jsd(sd, td, MASK, beta=eps) / eps, D.forward_kl(sd, td, MASK), rtol=1e-3, atol=0)
    torch.testing.assert_close(D.jsd(sd, td, MASK, beta=1 - eps) / eps, D.reverse_kl(sd, td, MASK),
                               rtol=1e-3, atol=0)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_gradcheck(name, kw):
    mask = MASK[:2, 2:5]
    s = rand_logits(6, (2, 3, 5), dtype=torch.float64).requires_grad_(True)
    t = rand_logits(7, (2, 3, 5), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: D.DIVERGENCES[name](x, t, mask, **kw), (s,))


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_bf16_inputs(name, kw):
    s, t = rand_logits(8, scale=20.0).bfloat16(), rand_logits(9, scale=20.0).bfloat16()
    loss, grad = loss_and_grad(D.DIVERGENCES[name], s, t, MASK, **kw)
    loss32, grad32 = loss_and_grad(D.DIVERGENCES[name], s.float(), t.float(), MASK, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.isfinite(loss) and torch.isfinite(grad.float()).all()
    torch.testing.assert_close(loss, loss32, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad.float(), grad32, rtol=1e-2, atol=1e-2 * grad32.abs().max().item())


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_masked_positions_do_not_matter(name, kw):
    s, t = rand_logits(10), rand_logits(11)
    off = ~MASK[..., None]
    s2 = torch.where(off, rand_logits(12, scale=30.0), s)
    t2 = torch.where(off, rand_logits(13, scale=30.0), t)
    loss, grad = loss_and_grad(D.DIVERGENCES[name], s, t, MASK, **kw)
    loss2, grad2 = loss_and_grad(D.DIVERGENCES[name], s2, t2, MASK, **kw)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad2, grad, rtol=1e-6, atol=0)
    assert torch.equal(grad[~MASK], torch.zeros_like(grad[~MASK]))
    assert (grad[MASK].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_teacher_gets_no_gradient(name, kw):
    s = rand_logits(14).requires_grad_(True)
    t = rand_logits(15).requires_grad_(True)
    D.DIVERGENCES[name](s, t, MASK, **kw).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None or torch.all(t.grad == 0)


def test_boundary_assertions():
    s, t = rand_logits(16), rand_logits(17)
    with pytest.raises(AssertionError):
        D.reverse_kl(s, t[..., :-1], MASK)
    with pytest.raises(AssertionError):
        D.reverse_kl(s, t, MASK[:, :-1])
    with pytest.raises(AssertionError):
        D.jsd(s, t, MASK, beta=1.5)


def test_per_token_reverse_kl_matches_reference():
    s, t = rand_logits(18), rand_logits(19)
    values = D.per_token_reverse_kl(s, t)
    assert values.shape == (B, T) and (values >= 0).all()
    torch.testing.assert_close(values.double(), R.reverse_kl(s, t), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- top-k variants

TOPK = [(D.topk_forward_kl, R.topk_forward_kl, D.forward_kl), (D.topk_reverse_kl, R.topk_reverse_kl, D.reverse_kl)]
TOPK_IDS = ["forward", "reverse"]


@pytest.mark.parametrize("topk_fn,_ref,full_fn", TOPK, ids=TOPK_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_topk_with_k_equal_v_is_the_full_divergence(topk_fn, _ref, full_fn, temperature):
    s, t = rand_logits(20), rand_logits(21)
    lp, ids = D.teacher_topk(t, V, temperature=temperature)
    loss, grad = loss_and_grad(topk_fn, s, lp, ids, MASK, temperature=temperature)
    full, full_grad = loss_and_grad(full_fn, s, t, MASK, temperature=temperature)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("topk_fn,ref_fn,full_fn", TOPK, ids=TOPK_IDS)
@pytest.mark.parametrize("k,temperature", [(1, 1.0), (3, 1.0), (5, 0.8), (12, 1.0)])
def test_topk_matches_bucket_reference(topk_fn, ref_fn, full_fn, k, temperature):
    s, t = rand_logits(22), rand_logits(23)
    lp, ids = D.teacher_topk(t, k, temperature=temperature)
    assert lp.shape == ids.shape == (B, T, k) and ids.dtype == torch.long
    loss, grad = loss_and_grad(topk_fn, s, lp, ids, MASK, temperature=temperature)
    ref, ref_grad = loss_and_grad(lambda x: R.masked_mean(ref_fn(x, lp, ids, temperature), MASK), s.double())
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())
    # merging tokens into buckets can only lose information: bucket KL <= full KL at every position
    # (checked in float64: a float32 teacher tail 1 - sum(top-k) is only known to ~1e-7)
    per_token = {D.topk_forward_kl: D.per_token_topk_forward_kl, D.topk_reverse_kl: D.per_token_topk_reverse_kl}
    full_per_token = {D.forward_kl: D.per_token_forward_kl, D.reverse_kl: D.per_token_reverse_kl}
    lp64, ids64 = D.teacher_topk(t.double(), k, temperature=temperature)
    coarse = per_token[topk_fn](s.double(), lp64, ids64, temperature=temperature)
    full = full_per_token[full_fn](s.double(), t.double(), temperature=temperature)
    assert (coarse <= full + 1e-9).all()
    assert (coarse < full - 1e-3).any() if k < V - 1 else torch.allclose(coarse, full)  # 1-token tail: exact


@pytest.mark.parametrize("topk_fn", [D.topk_forward_kl, D.topk_reverse_kl], ids=TOPK_IDS)
def test_topk_gradcheck_no_teacher_grad_and_masking(topk_fn):
    s = rand_logits(24, (2, 3, 5), dtype=torch.float64).requires_grad_(True)
    lp, ids = D.teacher_topk(rand_logits(25, (2, 3, 5), dtype=torch.float64), 3)
    mask = MASK[:2, 2:5]
    assert torch.autograd.gradcheck(lambda x: topk_fn(x, lp, ids, mask), (s,))
    lp = lp.clone().requires_grad_(True)
    topk_fn(s, lp, ids, mask).backward()
    assert lp.grad is None or torch.all(lp.grad == 0)
    assert torch.equal(s.grad[~mask], torch.zeros_like(s.grad[~mask]))


@pytest.mark.parametrize("topk_fn", [D.topk_forward_kl, D.topk_reverse_kl], ids=TOPK_IDS)
def test_topk_survives_minus_inf_teacher_logprobs_and_bf16(topk_fn):
    s, t = rand_logits(26, scale=20.0).bfloat16(), rand_logits(27)
    lp, ids = D.teacher_topk(t, 4)
    lp[..., -1] = float("-inf")  # a server reporting an impossible token
    loss, grad = loss_and_grad(topk_fn, s, lp, ids, MASK)
    assert torch.isfinite(loss) and torch.isfinite(grad.float()).all()
