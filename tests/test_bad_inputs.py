"""Bad input raises an error that names the argument, what was expected and what came."""
import pytest
import torch

import dsa_ext
from helpers import randn


def attn(B=1, T=4, S=6, H=4, Hkv=2, D=8, Dv=8, K=3):
    idx = torch.randint(0, S, (B, T, K), dtype=torch.int32)
    return randn(B, T, H, D), randn(B, S, Hkv, D), randn(B, S, Hkv, Dv), idx


def idx_inputs(B=1, T=4, S=6, Hi=2, Di=8):
    return randn(B, T, Hi, Di), randn(B, S, Di), randn(B, T, Hi)


@pytest.mark.parametrize("mutate,pattern", [
    (lambda q, k, v, i: (q[0], k, v, i), r"expected q to be a 4-D tensor \[B, T, H, Dqk\], got shape \[4, 4, 8\]"),
    (lambda q, k, v, i: (q, k.float(), v, i), r"expected k to have the dtype of q \(Double\), got Float"),
    (lambda q, k, v, i: (q.int(), k, v, i), r"expected q to be float64, float32, bfloat16 or float16, got Int"),
    (lambda q, k, v, i: (q, k, v, i.long()), r"expected indices to be int32, got Long"),
    (lambda q, k, v, i: (q[..., :3, :], k, v, i), r"query heads of q to be a positive multiple"),
    (lambda q, k, v, i: (q, k[..., :4], v, i), r"expected k.size\(3\) == 8 \(head dim Dqk of q\)"),
    (lambda q, k, v, i: (q, k, v[:, :5], i), r"expected v.size\(1\) == 6 \(length S of k\)"),
    (lambda q, k, v, i: (q, k, v, i[:, :3]), r"expected indices.size\(1\) == 4 \(length T of q\)"),
    (lambda q, k, v, i: (q, k, v, i[..., :0]), r"expected indices to hold topk >= 1 entries"),
    (lambda q, k, v, i: (q, k, v, i.unsqueeze(2).expand(1, 4, 3, 3).contiguous()),
     r"expected indices.size\(2\) == 2 \(kv heads Hkv of k\)"),
])
def test_sparse_attention_bad_inputs(mutate, pattern):
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        dsa_ext.sparse_attention(*mutate(*attn()))


@pytest.mark.parametrize("bad", [-2, 6, 1000])
def test_out_of_range_index_raises(bad):
    q, k, v, idx = attn()
    idx[0, 2, 1] = bad
    with pytest.raises(IndexError, match=rf"-1 or in \[0, S=6\), got {bad} at indices\[0, 2, 1\]"):
        dsa_ext.sparse_attention(q, k, v, idx)


@pytest.mark.parametrize("mutate,pattern", [
    (lambda q, k, w: (q, k[:, :3], w), r"causal attention needs S >= T"),
    (lambda q, k, w: (q, k.float(), w), r"expected k_idx to have the dtype of q_idx"),
    (lambda q, k, w: (q, k, w.half()), r"expected w to be float32 or the dtype of q_idx"),
    (lambda q, k, w: (q, k[..., :5], w), r"expected k_idx.size\(2\) == 8 \(head dim Di of q_idx\)"),
    (lambda q, k, w: (q, k, w[:, :, :1]), r"expected w.size\(2\) == 2 \(heads Hi of q_idx\)"),
    (lambda q, k, w: (q[0], k, w), r"expected q_idx to be a 4-D tensor"),
])
def test_indexer_bad_inputs(mutate, pattern):
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        dsa_ext.indexer_logits(*mutate(*idx_inputs()))
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        dsa_ext.indexer_topk(*mutate(*idx_inputs()), 2)


@pytest.mark.parametrize("topk", [0, -1, 2**31])
def test_topk_must_be_positive_int32(topk):
    with pytest.raises(ValueError, match=rf"expected 1 <= topk < 2\^31, got topk={topk}"):
        dsa_ext.topk_indices(torch.randn(1, 2, 3), topk)
    with pytest.raises(ValueError, match=rf"expected 1 <= topk < 2\^31, got topk={topk}"):
        dsa_ext.indexer_topk(*idx_inputs(), topk)


def test_topk_bad_logits():
    with pytest.raises(RuntimeError, match=r"expected logits to be a 3-D tensor \[B, T, S\]"):
        dsa_ext.topk_indices(torch.randn(2, 3), 1)


def test_backward_shape_mismatch():
    q, k, v, idx = attn()
    out, lse = torch.ops.dsa.sparse_attention(q, k, v, idx, 0.5)
    with pytest.raises(RuntimeError, match=r"expected grad_out of shape \[1, 4, 4, 8\]"):
        torch.ops.dsa.sparse_attention_backward(out[:, :2], None, q, k, v, idx, out, lse, 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_device_mix():
    q, k, v, idx = attn()
    with pytest.raises(RuntimeError, match=r"expected k on the device of q"):
        dsa_ext.sparse_attention(q.cuda(), k, v, idx)


def test_topk_row_length_fits_int32_positions():
    """Selected positions are int32: rows longer than INT32_MAX - 2^16 raise before any work
    (expanded views cost no memory)."""
    n = 2**31 - 2**16 + 1
    with pytest.raises(RuntimeError, match=r"dsa.topk_indices: expected logits to have at most 2147418111 positions"):
        dsa_ext.topk_indices(torch.zeros(1, 1, 1).expand(1, 1, n), 1)
    with pytest.raises(RuntimeError, match=r"dsa.indexer_topk: expected k_idx to have at most 2147418111 positions"):
        dsa_ext.indexer_topk(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 8).expand(1, n, 8), torch.ones(1, 1, 1), 1,
                             causal=False)
