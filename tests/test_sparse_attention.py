"""sparse_attention forward and backward against dsa_ext.reference and dense SDPA."""
import pytest
import torch
import torch.nn.functional as F

import dsa_ext
from dsa_ext import reference
from helpers import AttentionShape, assert_close_to_reference, dense_causal_indices, randn, random_indices, shape_id

# MHA, GQA, MQA, Dqk != Dv, odd sizes, T = 1, K > S, K = 1
SHAPES = [
    AttentionShape(1, 1, 1, 1, 1, 8, 8, 1),
    AttentionShape(2, 7, 13, 4, 4, 24, 24, 5),
    AttentionShape(2, 9, 13, 6, 2, 24, 20, 17),
    AttentionShape(1, 11, 40, 5, 1, 40, 32, 9),
    AttentionShape(2, 5, 30, 8, 2, 64, 48, 1),
    AttentionShape(1, 3, 300, 3, 3, 16, 16, 64),
]


def attention_inputs(B, T, S, H, Hkv, Dqk, Dv, dtype=torch.float64, requires_grad=False):
    q = randn(B, T, H, Dqk, dtype=dtype, requires_grad=requires_grad)
    k = randn(B, S, Hkv, Dqk, dtype=dtype, requires_grad=requires_grad)
    v = randn(B, S, Hkv, Dv, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def grads(fn, inputs, grad_out, grad_lse):
    out, lse = fn(*inputs)
    loss = (out.double() * grad_out).sum() + (lse.masked_fill(lse.isinf(), 0).double() * grad_lse).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("per_head", [False, True])
def test_float64_forward_backward(seed, shape, per_head):
    B, T, S, H, Hkv, Dqk, Dv, K = shape
    q, k, v = attention_inputs(B, T, S, H, Hkv, Dqk, Dv, requires_grad=True)
    idx = random_indices(B, T, S, K, Hkv=Hkv if per_head else None)
    idx[0, 0] = -1  # a row with no valid index
    out, lse = dsa_ext.sparse_attention(q, k, v, idx, return_lse=True)
    ref_out, ref_lse = reference.sparse_attention(q, k, v, idx, return_lse=True)
    assert out.shape == (B, T, H, Dv) and out.dtype == torch.float64 and lse.shape == (B, T, H)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    assert (out[0, 0] == 0).all() and (lse[0, 0] == float("-inf")).all()
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    got = grads(lambda *x: dsa_ext.sparse_attention(*x, idx, return_lse=True), (q, k, v), go, gl)
    want = grads(lambda *x: reference.sparse_attention(*x, idx, return_lse=True), (q, k, v), go, gl)
    for g, r, name in zip(got, want, "qkv"):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")
    assert (got[0][0, 0] == 0).all()  # the empty row's query gets no gradient


def test_duplicate_indices_count_per_occurrence(seed):
    q, k, v = attention_inputs(1, 1, 4, 1, 1, 8, 8)
    once = dsa_ext.sparse_attention(q, k, v, torch.tensor([[[0, 1]]], dtype=torch.int32))
    twice = dsa_ext.sparse_attention(q, k, v, torch.tensor([[[0, 1, 1]]], dtype=torch.int32))
    assert not torch.allclose(once, twice)
    torch.testing.assert_close(twice, reference.sparse_attention(q, k, v, torch.tensor([[[0, 1, 1]]],
                                                                                        dtype=torch.int32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:5], ids=shape_id)
def test_low_precision(seed, dtype, shape):
    B, T, S, H, Hkv, Dqk, Dv, K = shape
    q, k, v = attention_inputs(B, T, S, H, Hkv, Dqk, Dv, dtype=dtype, requires_grad=True)
    idx = random_indices(B, T, S, K)
    out, lse = dsa_ext.sparse_attention(q, k, v, idx, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref64, ref64_lse = reference.sparse_attention(q64, k64, v64, idx, return_lse=True)
    ref_lp, ref_lp_lse = reference.sparse_attention(q, k, v, idx, return_lse=True, upcast=False)
    assert_close_to_reference(out, ref64, ref_lp)
    assert_close_to_reference(lse, ref64_lse, ref_lp_lse)
    go = torch.randn(out.shape, dtype=torch.float64)
    gl = torch.randn(lse.shape, dtype=torch.float64)
    got = grads(lambda *x: dsa_ext.sparse_attention(*x, idx, return_lse=True), (q, k, v), go, gl)
    want64 = grads(lambda *x: reference.sparse_attention(*x, idx, return_lse=True), (q64, k64, v64), go, gl)
    want_lp = grads(lambda *x: reference.sparse_attention(*x, idx, return_lse=True, upcast=False), (q, k, v), go, gl)
    for g, r64, rlp in zip(got, want64, want_lp):
        assert g.dtype == dtype
        assert_close_to_reference(g, r64, rlp)


def test_v_as_strided_view_of_k(seed):
    """MLA layout: v = kv[..., :Dv] shares k's storage; no copy needed, gradients add up."""
    kv = randn(2, 20, 1, 40, requires_grad=True)
    q = randn(2, 6, 4, 40, requires_grad=True)
    idx = random_indices(2, 6, 20, 7)
    out = dsa_ext.sparse_attention(q, kv, kv[..., :32], idx)
    ref = reference.sparse_attention(q, kv, kv[..., :32], idx)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, kv), g), torch.autograd.grad(ref, (q, kv), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,T,S,H,Hkv", [(2, 17, 17, 4, 2), (1, 9, 23, 3, 1), (1, 31, 31, 2, 2)])
def test_k_at_least_s_equals_dense_causal_sdpa(seed, dtype, B, T, S, H, Hkv):
    q, k, v = attention_inputs(B, T, S, H, Hkv, 32, 32, dtype=dtype, requires_grad=True)
    idx = dense_causal_indices(B, T, S, S + 3)
    out = dsa_ext.sparse_attention(q, k, v, idx)
    # SDPA's is_causal is top-left aligned; an explicit bottom-right mask covers S > T.
    mask = reference.causal_mask(T, S)
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(H // Hkv, 1),
                                           v.transpose(1, 2).repeat_interleave(H // Hkv, 1),
                                           attn_mask=mask).transpose(1, 2)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out, dense, **tol)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(dense, (q, k, v), g)):
        torch.testing.assert_close(a, b, **tol)


def test_k_at_least_s_equals_sdpa_is_causal(seed):
    """T == S: the same with SDPA's own is_causal=True and enable_gqa."""
    q, k, v = attention_inputs(1, 24, 24, 4, 2, 16, 16, requires_grad=True)
    out = dsa_ext.sparse_attention(q, k, v, dense_causal_indices(1, 24, 24, 32))
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, dense)


def test_gradcheck(seed):
    q, k, v = attention_inputs(1, 3, 5, 2, 1, 4, 3, requires_grad=True)
    idx = torch.tensor([[[0, 4, -1], [2, 2, 1], [-1, -1, -1]]], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda q, k, v: dsa_ext.sparse_attention(q, k, v, idx, return_lse=True)[0],
                                    (q, k, v))
    # through lse (masking the empty row's -inf)
    assert torch.autograd.gradcheck(
        lambda q, k, v: dsa_ext.sparse_attention(q, k, v, idx, return_lse=True)[1][:, :2], (q, k, v))


def test_scale_argument(seed):
    q, k, v = attention_inputs(1, 4, 9, 2, 2, 8, 8)
    idx = random_indices(1, 4, 9, 5)
    torch.testing.assert_close(dsa_ext.sparse_attention(q, k, v, idx, scale=0.7),
                               reference.sparse_attention(q, k, v, idx, scale=0.7))
