"""Numeric edge cases, as docs/DESIGN.md states them: a NaN or inf in one query row stays in that
row (every other row's outputs and input gradients are unchanged), very large score magnitudes
keep the lse accurate in float32 and bfloat16, and all-equal scores select the lowest positions."""
import pytest
import torch

import dsa_ext
from dsa_ext import reference
from helpers import assert_close_to_reference, random_indices

BAD = [float("nan"), float("inf"), float("-inf")]


def poison(x, t, value):
    """x [B, T, ...] with query row t of batch 0 set to value (one element), as a fresh leaf."""
    y = x.detach().clone()
    y[0, t].view(-1)[0] = value
    return y.requires_grad_()


def other_rows(x, t):
    keep = torch.ones(x.shape[:2], dtype=torch.bool)
    keep[0, t] = False
    return x[keep]


@pytest.mark.parametrize("value", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sparse_attention_keeps_a_bad_query_row_to_itself(value, dtype):
    B, T, S, H, Hkv, D = 2, 9, 13, 4, 2, 16
    q = torch.randn(B, T, H, D).to(dtype)
    k, v = torch.randn(B, S, Hkv, D).to(dtype), torch.randn(B, S, Hkv, D).to(dtype)
    idx = random_indices(B, T, S, 6)
    t = 4
    clean, bad = q.detach().clone().requires_grad_(), poison(q, t, value)
    outs = [dsa_ext.sparse_attention(x, k, v, idx, return_lse=True) for x in (clean, bad)]
    for a, b in zip(*outs):
        assert torch.equal(other_rows(a, t), other_rows(b, t))
    go = torch.randn(B, T, H, D).to(dtype)
    ga, gb = (torch.autograd.grad(o[0], x, go)[0] for o, x in zip(outs, (clean, bad)))
    assert torch.equal(other_rows(ga, t), other_rows(gb, t))


@pytest.mark.parametrize("value", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_indexer_keeps_a_bad_query_row_to_itself(value, dtype):
    B, T, S, Hi, Di = 2, 11, 11, 3, 16
    q, k, w = torch.randn(B, T, Hi, Di).to(dtype), torch.randn(B, S, Di).to(dtype), torch.randn(B, T, Hi)
    t = 5
    clean, bad = q.detach().clone().requires_grad_(), poison(q, t, value)
    la, lb = (dsa_ext.indexer_logits(x, k, w) for x in (clean, bad))
    assert torch.equal(other_rows(la, t), other_rows(lb, t))
    ga, gb = (torch.autograd.grad(l.nan_to_num(0, 0, 0).sum(), x)[0] for l, x in ((la, clean), (lb, bad)))
    assert torch.equal(other_rows(ga, t), other_rows(gb, t))
    ia, ib = (dsa_ext.indexer_topk(x.detach(), k, w, 4) for x in (clean, bad))
    assert torch.equal(other_rows(ia, t), other_rows(ib, t))
    if value != float("inf"):  # NaN (and -inf times a negative head weight) never wins a slot
        assert torch.equal(ib[0, t], reference.topk_indices(lb[:1, t:t + 1], 4)[0, 0])
    # the KL loss: other rows' losses and the gradients of their q_idx
    aq, ak = torch.randn(B, T, 4, 8).to(dtype), torch.randn(B, S, 2, 8).to(dtype)
    kl = [dsa_ext.indexer_kl_loss(x, k, w, aq, ak) for x in (clean, bad)]
    assert torch.equal(other_rows(kl[0], t), other_rows(kl[1], t))
    gka, gkb = (torch.autograd.grad(other_rows(l, t).sum(), x)[0] for l, x in zip(kl, (clean, bad)))
    assert torch.equal(other_rows(gka, t), other_rows(gkb, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_large_scores_keep_the_lse_accurate(dtype, magnitude):
    """scale * q.k around 1e4: the lse (float32) against the float64 reference, within the rule's
    bound around the low-precision baseline."""
    B, T, S, H, Hkv, D = 1, 7, 19, 4, 2, 32
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True) * magnitude ** 0.5
    k = torch.randn(B, S, Hkv, D, dtype=torch.float64)
    k = k / k.norm(dim=-1, keepdim=True) * magnitude ** 0.5
    v = torch.randn(B, S, Hkv, D, dtype=torch.float64)
    idx = random_indices(B, T, S, 9, p_empty=0.1)
    x = [t.to(dtype) for t in (q, k, v)]
    out, lse = dsa_ext.sparse_attention(*x, idx, scale=1.0, return_lse=True)
    ref_out, ref_lse = reference.sparse_attention(*(t.double() for t in x), idx, scale=1.0, return_lse=True)
    low_out, low_lse = reference.sparse_attention(*x, idx, scale=1.0, return_lse=True, upcast=False)
    assert ref_lse[torch.isfinite(ref_lse)].abs().max() > magnitude / 4  # the scores really are large
    assert_close_to_reference(lse, ref_lse, low_lse, "lse")
    assert_close_to_reference(out, ref_out, low_out, "out")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_all_equal_scores_pick_the_lowest_positions(dtype, causal):
    B, T, S, topk = 2, 6, 40, 7
    q = torch.zeros(B, T, 3, 8, dtype=dtype)  # every score 0 (relu of 0)
    k, w = torch.randn(B, S, 8).to(dtype), torch.randn(B, T, 3)
    got = dsa_ext.indexer_topk(q, k, w, topk, causal=causal)
    for t in range(T):
        visible = t + S - T + 1 if causal else S
        want = list(range(min(topk, visible))) + [-1] * max(0, topk - visible)
        assert got[:, t].tolist() == [want] * B
    logits = torch.full((B, T, S), 2.5, dtype=dtype)
    assert torch.equal(dsa_ext.topk_indices(logits, topk), torch.arange(topk, dtype=torch.int32).expand(B, T, topk))
