"""indexer_logits (forward, backward) and the fused indexer_topk against dsa_ext.reference."""
import pytest
import torch

import dsa_ext
from dsa_ext import reference
from helpers import IndexerShape, assert_close_to_reference, randn, shape_id

# odd sizes, T = 1, S > T (KV prefix), D = 24, sizes past one key tile (256)
SHAPES = [IndexerShape(1, 1, 1, 1, 8), IndexerShape(2, 7, 13, 3, 24), IndexerShape(1, 13, 13, 4, 16),
          IndexerShape(2, 33, 300, 2, 24), IndexerShape(1, 70, 70, 5, 40)]


def indexer_inputs(B, T, S, Hi, Di, dtype=torch.float64, requires_grad=False, w_dtype=None):
    q = randn(B, T, Hi, Di, dtype=dtype, requires_grad=requires_grad)
    k = randn(B, S, Di, dtype=dtype, requires_grad=requires_grad)
    w = randn(B, T, Hi, dtype=w_dtype or dtype, requires_grad=requires_grad)
    return q, k, w


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("causal", [True, False])
def test_logits_float64(seed, shape, causal):
    q, k, w = indexer_inputs(*shape)
    out = dsa_ext.indexer_logits(q, k, w, causal=causal)
    ref = reference.indexer_logits(q, k, w, causal=causal)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=shape_id)
def test_logits_low_precision(seed, dtype, shape):
    q, k, w = indexer_inputs(*shape, dtype=dtype, w_dtype=torch.float32)
    out = dsa_ext.indexer_logits(q, k, w, scale=0.3)
    assert out.dtype == torch.float32
    ref64 = reference.indexer_logits(q.double(), k.double(), w.double(), scale=0.3)
    assert_close_to_reference(out, ref64, reference.indexer_logits(q, k, w, scale=0.3, upcast=False))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("causal", [True, False])
def test_logits_backward_float64(seed, shape, causal):
    q, k, w = indexer_inputs(*shape, requires_grad=True)
    out = dsa_ext.indexer_logits(q, k, w, causal=causal)
    ref = reference.indexer_logits(q, k, w, causal=causal)
    grad = torch.randn_like(out)
    finite = torch.isfinite(ref)
    got = torch.autograd.grad(out[finite].mul(grad[finite]).sum(), (q, k, w))
    want = torch.autograd.grad(ref[finite].mul(grad[finite]).sum(), (q, k, w))
    for g, r, name in zip(got, want, ("q_idx", "k_idx", "w")):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_backward_ignores_masked_gradients(seed):
    """A gradient arriving at a masked (-inf) logit moves nothing: those logits are constants."""
    q, k, w = indexer_inputs(1, 9, 12, 2, 8, requires_grad=True)
    out = dsa_ext.indexer_logits(q, k, w)
    grad = torch.randn_like(out)
    g_all = torch.autograd.grad(out, (q, k, w), grad)
    g_visible = torch.autograd.grad(dsa_ext.indexer_logits(q, k, w), (q, k, w), grad.masked_fill(out.isinf(), 0))
    for a, b in zip(g_all, g_visible):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradcheck(seed):
    q, k, w = indexer_inputs(1, 4, 6, 2, 5, requires_grad=True)
    # only visible entries: masked logits are -inf constants
    fn = lambda q, k, w: dsa_ext.indexer_logits(q, k, w).masked_fill(~reference.causal_mask(4, 6), 0)
    assert torch.autograd.gradcheck(fn, (q, k, w))
    assert torch.autograd.gradcheck(lambda q, k, w: dsa_ext.indexer_logits(q, k, w, causal=False), (q, k, w))


def test_bfloat16_gradients(seed):
    q, k, w = indexer_inputs(2, 11, 17, 3, 24, dtype=torch.bfloat16, requires_grad=True, w_dtype=torch.float32)
    out = dsa_ext.indexer_logits(q, k, w)
    grad = torch.randn_like(out).masked_fill(out.isinf(), 0)
    got = torch.autograd.grad(out, (q, k, w), grad)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    q64, k64, w64 = (x.detach().double().requires_grad_() for x in (q, k, w))
    ref64 = torch.autograd.grad(reference.indexer_logits(q64, k64, w64).nan_to_num(0, 0, 0), (q64, k64, w64),
                                grad.double())
    ref_lp = torch.autograd.grad(reference.indexer_logits(q, k, w, upcast=False).nan_to_num(0, 0, 0), (q, k, w), grad)
    for g, r64, rlp in zip(got, ref64, ref_lp):
        assert_close_to_reference(g, r64, rlp)


def test_strided_inputs(seed):
    """Inputs whose inner dimensions are views (last dim contiguous) need no copy and agree."""
    base_q = randn(2, 9, 6, 16)
    base_k = randn(2, 11, 2, 16)
    q, k = base_q[:, :, ::2], base_k[:, :, 1]  # [2,9,3,16], [2,11,16]
    w = randn(2, 3, 9).transpose(1, 2)
    torch.testing.assert_close(dsa_ext.indexer_logits(q, k, w), reference.indexer_logits(q, k, w))


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("k", [1, 5, 64, 400])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_topk_matches_unfused(seed, shape, k, causal):
    q, k_idx, w = indexer_inputs(*shape, dtype=torch.float32)
    fused = dsa_ext.indexer_topk(q, k_idx, w, k, causal=causal)
    unfused = dsa_ext.topk_indices(dsa_ext.indexer_logits(q, k_idx, w, causal=causal), k)
    assert fused.dtype == torch.int32 and fused.shape == (shape[0], shape[1], k)
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fused_topk_float64_reference(seed, shape):
    q, k_idx, w = indexer_inputs(*shape)
    assert torch.equal(dsa_ext.indexer_topk(q, k_idx, w, 6), reference.indexer_topk(q, k_idx, w, 6))


def test_fused_topk_bfloat16_and_ties(seed):
    """ReLU makes many scores exactly 0: the fused selection still breaks ties by position."""
    q, k_idx, w = indexer_inputs(2, 40, 300, 4, 16, dtype=torch.bfloat16)
    q = -q.abs()  # mostly negative dots -> many exact zeros after ReLU
    k_idx = k_idx.abs()
    out = dsa_ext.indexer_topk(q, k_idx, w, 32)
    assert torch.equal(out, dsa_ext.topk_indices(dsa_ext.indexer_logits(q, k_idx, w), 32))
    assert torch.equal(out, reference.indexer_topk(q, k_idx, w, 32))


def test_fused_topk_rows_shorter_than_k_are_dense(seed):
    T = S = 20
    q, k_idx, w = indexer_inputs(1, T, S, 2, 8)
    out = dsa_ext.indexer_topk(q, k_idx, w, 8)
    for t in range(8):  # query t sees t + 1 keys, all selected, then -1
        assert out[0, t, : t + 1].tolist() == list(range(t + 1))
        assert (out[0, t, t + 1:] == -1).all()
