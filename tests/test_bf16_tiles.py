"""bfloat16 sparse attention and indexer on the AVX512-BF16 micro-kernels (csrc/cpu/bf16_tiles.*)
against the float64 reference, with the widening path (the switch off) as the control: head dims
that are not multiples of the 32-wide and 64-wide blocks, head groups that are not multiples of
the 4-head tile, odd numbers of gathered rows, duplicates and empty slots."""
import functools

import pytest
import torch

import dsa_ext
from dsa_ext import _C, reference
from helpers import assert_close_to_reference, random_indices

pytestmark = pytest.mark.skipif(not _C.cpu_bf16_tiles_available(), reason="this CPU has no AVX512-BF16")

# (B, T, S, H, Hkv, Dqk, Dv, K)
SHAPES = [
    (1, 5, 9, 1, 1, 7, 5, 3),        # D under one block, G = 1, odd K
    (2, 7, 40, 6, 2, 33, 31, 17),    # D = 32 + 1 and 31, G = 3
    (1, 9, 64, 8, 1, 72, 64, 23),    # D = 64 + 8: a second pass, G = 8: two head tiles
    (1, 6, 300, 16, 2, 128, 128, 64),  # GQA 8 heads per kv head, D = 128
]


@pytest.fixture(params=[True, False], ids=["bf16_tiles", "widening"])
def tiles(request):
    before = dsa_ext.cpu_bf16_tiles_enabled()
    dsa_ext.set_cpu_bf16_tiles(request.param)
    yield request.param
    dsa_ext.set_cpu_bf16_tiles(before)


def run(fn, q, k, v, idx, go, gl):
    """out, lse and the gradients of q, k, v under a random linear loss."""
    out, lse = fn(q, k, v, idx, return_lse=True)
    loss = (out.double() * go).sum() + (lse.masked_fill(lse.isinf(), 0).double() * gl).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_against_reference(seed, tiles, shape):
    B, T, S, H, Hkv, Dqk, Dv, K = shape
    q = torch.randn(B, T, H, Dqk, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, S, Hkv, Dqk, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, S, Hkv, Dv, dtype=torch.bfloat16, requires_grad=True)
    idx = random_indices(B, T, S, K)
    idx[0, 0, : K // 2] = idx[0, 0, K // 2: 2 * (K // 2)]  # duplicates
    go = torch.randn(B, T, H, Dv, dtype=torch.float64)
    gl = torch.randn(B, T, H, dtype=torch.float64)
    got = run(dsa_ext.sparse_attention, q, k, v, idx, go, gl)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want64 = run(reference.sparse_attention, q64, k64, v64, idx, go, gl)
    want_lp = run(functools.partial(reference.sparse_attention, upcast=False), q, k, v, idx, go, gl)
    for name, g, r64, rlp in zip(("out", "lse", "dq", "dk", "dv"), got, want64, want_lp):
        assert_close_to_reference(g, r64, rlp, what=name)


# (B, T, S, Hi, Di): Di under one block, 32 + 8, 64; key blocks (256) crossed
INDEXER_SHAPES = [(2, 7, 13, 3, 24), (2, 33, 300, 2, 40), (1, 40, 70, 5, 64)]


@pytest.mark.parametrize("shape", INDEXER_SHAPES)
def test_indexer_against_reference(seed, tiles, shape):
    B, T, S, Hi, Di = shape
    q, k = (torch.randn(*s, dtype=torch.bfloat16, requires_grad=True) for s in ((B, T, Hi, Di), (B, S, Di)))
    w = torch.randn(B, T, Hi, requires_grad=True)
    logits = dsa_ext.indexer_logits(q, k, w)
    q64, k64, w64 = (x.detach().double().requires_grad_() for x in (q, k, w))
    ref64 = reference.indexer_logits(q64, k64, w64)
    ref_lp = reference.indexer_logits(q, k, w, upcast=False)
    assert_close_to_reference(logits, ref64, ref_lp, what="logits")
    assert torch.equal(dsa_ext.indexer_topk(q, k, w, 16), dsa_ext.topk_indices(logits, 16))
    grad = torch.randn_like(logits).masked_fill(logits.isinf(), 0)
    got = torch.autograd.grad(logits, (q, k, w), grad)
    want64 = torch.autograd.grad(ref64.nan_to_num(0, 0, 0), (q64, k64, w64), grad.double())
    want_lp = torch.autograd.grad(ref_lp.nan_to_num(0, 0, 0), (q, k, w), grad)
    for name, g, r64, rlp in zip(("dq_idx", "dk_idx", "dw"), got, want64, want_lp):
        assert_close_to_reference(g, r64, rlp, what=name)


def test_the_switch_changes_the_path(seed):
    """On and off round differently (the tiles sum in another order and round probabilities to
    bfloat16), so the tests above really ran both paths."""
    B, T, S, H, Hkv, Dqk, Dv, K = SHAPES[-1]
    q, k, v = (torch.randn(B, n, h, d, dtype=torch.bfloat16) for n, h, d in ((T, H, Dqk), (S, Hkv, Dqk), (S, Hkv, Dv)))
    idx = random_indices(B, T, S, K)
    q_idx, k_idx, w = torch.randn(B, T, 4, 64, dtype=torch.bfloat16), torch.randn(B, S, 64, dtype=torch.bfloat16), \
        torch.randn(B, T, 4)
    before = dsa_ext.cpu_bf16_tiles_enabled()
    try:
        outs = []
        for on in (True, False):
            dsa_ext.set_cpu_bf16_tiles(on)
            outs.append((dsa_ext.sparse_attention(q, k, v, idx), dsa_ext.indexer_logits(q_idx, k_idx, w)))
    finally:
        dsa_ext.set_cpu_bf16_tiles(before)
    assert not torch.equal(outs[0][0], outs[1][0])
    assert not torch.equal(outs[0][1], outs[1][1])
