"""CUDA sparse_attention, forward and backward, against the float64 reference.

Skipped without a CUDA device. The error of a low-precision result against the float64
reference must stay within 2x the error of the same formula evaluated in that precision the way
plain PyTorch evaluates attention (reference.*(..., upcast=False): matmul outputs and
probabilities rounded to the dtype), the rule of flash-attention's tests (helpers.py), and within
a few percent of the values' scale. float32 and
float64 results must match to a small multiple of the float32 reference's own error.

DSA_EXT_TEST_DEVICE=cpu runs the same checks against the CPU kernels (used to test the tests on
machines without a GPU); the CUDA-only checks then skip.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import dsa_ext
from dsa_ext import reference
from helpers import assert_close_to_reference

DEVICE = os.environ.get("DSA_EXT_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"
pytestmark = [pytest.mark.usefixtures("seed")] + ([pytest.mark.cuda] if ON_CUDA else [])  # seed: conftest.py
if ON_CUDA and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

cuda_only = pytest.mark.skipif(not ON_CUDA, reason="checks a CUDA-only behaviour")
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if ON_CUDA else [torch.bfloat16, torch.float32]
A100_SMEM = 166912  # the opt-in shared memory per block of sm_80: one stage, fewer rows per block


# ------------------------------------------------------------------------------------------------
# inputs and references
# ------------------------------------------------------------------------------------------------


def rand(*shape, dtype, requires_grad=False):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(requires_grad)


def make_indices(B, T, S, K, Hkv=None, p_empty=0.25):
    """int32 [B,T,K] (or [B,T,Hkv,K]): positions in [0,S) with -1 holes, a run of duplicates, an
    empty row and a row whose valid entries all sit in its last tile."""
    shape = (B, T, K) if Hkv is None else (B, T, Hkv, K)
    idx = torch.randint(0, S, shape, device=DEVICE)
    idx = torch.where(torch.rand(shape, device=DEVICE) < p_empty, torch.full_like(idx, -1), idx)
    if K >= 3:
        idx[..., 1:3] = idx[..., :1].clamp(min=0)  # duplicates count once per occurrence
    idx[0, 0] = -1  # no valid index: out 0, lse -inf, zero gradients
    if T > 1 and K > 1:
        idx[-1, -1, ..., :-1] = -1  # only the last slot is valid
    return idx.to(torch.int32).contiguous()


def loss_grads(fn, inputs, grad_out, grad_lse):
    """Gradients of sum(out * grad_out) + sum(lse * grad_lse) (lse -inf entries left out), so
    that the backward sees both a grad_out and a grad_lse."""
    out, lse = fn(*inputs)
    lse = lse.masked_fill(torch.isinf(lse), 0)
    loss = (out.double() * grad_out).sum() + (lse.double() * grad_lse).sum()
    return torch.autograd.grad(loss, inputs)


def check_against_reference(q, k, v, idx, scale=None, kv=None):
    """Forward and backward of dsa_ext.sparse_attention on (q, k, v) against the float64
    reference. With kv given, k and v are views of kv and gradients are taken w.r.t. (q, kv)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    leaves = (q, kv) if kv is not None else (q, k, v)
    as64 = [x.detach().double().requires_grad_() for x in leaves]
    views64 = lambda l: (l[0], l[1], l[1][..., : v.shape[-1]]) if kv is not None else tuple(l)  # noqa: E731
    views = lambda l: (l[0], l[1], l[1][..., : v.shape[-1]]) if kv is not None else tuple(l)  # noqa: E731

    def ours(*l):
        return dsa_ext.sparse_attention(*views(l), idx, scale=scale, return_lse=True)

    def ref64(*l):
        return reference.sparse_attention(*views64(l), idx, scale=scale, return_lse=True)

    def ref_dtype(*l):
        return reference.sparse_attention(*views(l), idx, scale=scale, return_lse=True, upcast=False)

    out, lse = ours(*leaves)
    B, T, H = q.shape[:3]
    assert out.shape == (B, T, H, v.shape[-1]) and out.dtype == q.dtype
    assert lse.shape == (B, T, H) and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    r64, rdt = ref64(*as64), ref_dtype(*leaves)
    assert_close_to_reference(out, r64[0], rdt[0], "out")
    assert_close_to_reference(lse, r64[1], rdt[1], "lse")

    empty = (idx < 0).all(-1)  # [B, T] or [B, T, Hkv]: rows with no valid index
    if empty.dim() == 3:
        empty = empty.repeat_interleave(H // idx.shape[2], dim=2)
    else:
        empty = empty[:, :, None].expand(B, T, H)
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()

    go = torch.randn(out.shape, dtype=torch.float64, device=DEVICE)
    gl = torch.randn(lse.shape, dtype=torch.float64, device=DEVICE)
    got = loss_grads(ours, leaves, go, gl)
    want64 = loss_grads(ref64, as64, go, gl)
    want_dt = loss_grads(ref_dtype, leaves, go, gl)
    for g, r64_, rdt_, name in zip(got, want64, want_dt, ("q", "kv") if kv is not None else "qkv"):
        assert g.dtype == q.dtype and torch.isfinite(g).all(), f"grad {name}"
        assert_close_to_reference(g, r64_, rdt_, f"grad {name}")
    assert (got[0][empty] == 0).all(), "a query without valid keys gets no gradient"


# ------------------------------------------------------------------------------------------------
# against the reference
# ------------------------------------------------------------------------------------------------

# (B, T, S, K, H, Hkv, Dqk, Dv): every supported head dim, MHA / GQA / MQA, odd sizes, K > S (many
# duplicates, several key tiles), group sizes that leave padding rows in a block (5, 20, 40).
CASES = [
    (2, 7, 33, 19, 3, 3, 64, 64),
    (2, 5, 41, 70, 8, 2, 128, 128),
    (1, 6, 29, 33, 16, 1, 192, 192),
    (2, 3, 50, 45, 20, 4, 256, 256),
    (1, 9, 37, 40, 12, 3, 192, 128),
    (1, 4, 23, 17, 40, 1, 64, 64),
    (2, 5, 21, 9, 6, 3, 40, 72),  # head dims that are multiples of 8 but not of 32
    (1, 1, 1, 1, 1, 1, 64, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}S{}K{}H{}Hkv{}D{}-{}".format(*c))
def test_matches_reference(dtype, case):
    B, T, S, K, H, Hkv, Dqk, Dv = case
    q, k, v = rand(B, T, H, Dqk, dtype=dtype), rand(B, S, Hkv, Dqk, dtype=dtype), rand(B, S, Hkv, Dv, dtype=dtype)
    for x in (q, k, v):
        x.requires_grad_()
    check_against_reference(q, k, v, make_indices(B, T, S, K))


@pytest.mark.parametrize("dtype", DTYPES[:1], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=lambda c: "H{}Hkv{}".format(c[4], c[5]))
def test_per_kv_head_indices(dtype, case):
    B, T, S, K, H, Hkv, Dqk, Dv = case
    q, k, v = (rand(*s, dtype=dtype, requires_grad=True) for s in ((B, T, H, Dqk), (B, S, Hkv, Dqk), (B, S, Hkv, Dv)))
    idx = make_indices(B, T, S, K, Hkv=Hkv)
    idx[1 % B, 0, 0] = -1  # one kv head's row empty, the others not
    check_against_reference(q, k, v, idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("smem_limit", [None, A100_SMEM], ids=["device", "sm80-smem"])
def test_mla_shape(dtype, smem_limit, monkeypatch):
    """DeepSeek's MLA in MQA mode: 128 heads, one latent kv of 576 dims, v = kv[..., :512] (a view,
    read from the key tile). The sm80 limit makes the backward use one stage and 48-row blocks."""
    if smem_limit is not None:
        if not ON_CUDA:
            pytest.skip("the shared-memory limit only steers the CUDA kernels")
        monkeypatch.setenv("DSA_EXT_CUDA_SMEM_LIMIT", str(smem_limit))
    B, T, S, K, H = 1, 3, 40, 37, 128
    q = rand(B, T, H, 576, dtype=dtype, requires_grad=True)
    kv = rand(B, S, 1, 576, dtype=dtype, requires_grad=True)
    check_against_reference(q, kv, kv[..., :512], make_indices(B, T, S, K), kv=kv)


@pytest.mark.parametrize("dtype", DTYPES[:1], ids=str)
def test_mla_separate_v(dtype):
    """The same shape with v its own tensor (its own tile in shared memory)."""
    B, T, S, K, H = 1, 2, 30, 45, 128
    q, k, v = rand(B, T, H, 576, dtype=dtype), rand(B, S, 1, 576, dtype=dtype), rand(B, S, 1, 512, dtype=dtype)
    for x in (q, k, v):
        x.requires_grad_()
    check_against_reference(q, k, v, make_indices(B, T, S, K))


@pytest.mark.parametrize("max_splits", [None, "1"], ids=["split", "unsplit"])
@pytest.mark.parametrize("B,T,H,Hkv,Dqk,Dv", [
    (1, 1, 128, 1, 576, 512),   # MLA decoding at B = 1: 2 blocks, the index slots split many ways
    (3, 4, 128, 1, 576, 512),   # a few queries per sequence
    (1, 1, 32, 8, 128, 128),    # GQA decoding
    (64, 1, 32, 8, 128, 128),   # a batch whose blocks fill the GPU: no split
])
def test_decode_shapes(B, T, H, Hkv, Dqk, Dv, max_splits, monkeypatch):
    """T = 1 .. 4 queries per sequence over k = 2048 of 4096 keys: the tensor-core forward splits
    each row's index slots over blocks and merges them (DSA_EXT_CUDA_ATTN_MAX_SPLITS=1: the
    unsplit kernel). make_indices leaves a row empty (every split of it sees no key) and, for
    T > 1, a row whose only valid slot is its last (all splits but one empty)."""
    if max_splits is not None:
        if not ON_CUDA:
            pytest.skip("the split cap only steers the CUDA kernels")
        monkeypatch.setenv("DSA_EXT_CUDA_ATTN_MAX_SPLITS", max_splits)
    S, K = 4096, 2048
    q = rand(B, T, H, Dqk, dtype=torch.bfloat16, requires_grad=True)
    if Hkv == 1 and Dv == 512:  # MLA: v is a view of the latent
        kv = rand(B, S, 1, Dqk, dtype=torch.bfloat16, requires_grad=True)
        check_against_reference(q, kv, kv[..., :Dv], make_indices(B, T, S, K), kv=kv)
    else:
        k, v = rand(B, S, Hkv, Dqk, dtype=torch.bfloat16), rand(B, S, Hkv, Dv, dtype=torch.bfloat16)
        check_against_reference(q, k.requires_grad_(), v.requires_grad_(), make_indices(B, T, S, K))


@cuda_only
@pytest.mark.parametrize("smem_limit", [60000, 30000], ids=["one-stage", "small"])
def test_small_shared_memory(smem_limit, monkeypatch):
    """Block shapes chosen under tighter shared memory: one stage (60000 bytes), or the row-wise
    kernels (30000 bytes: no tensor-core tile of head dim 256 fits)."""
    monkeypatch.setenv("DSA_EXT_CUDA_SMEM_LIMIT", str(smem_limit))
    B, T, S, K, H, Hkv, Dqk, Dv = CASES[3]
    q, k, v = (rand(*s, dtype=torch.bfloat16, requires_grad=True)
               for s in ((B, T, H, Dqk), (B, S, Hkv, Dqk), (B, S, Hkv, Dv)))
    check_against_reference(q, k, v, make_indices(B, T, S, K))


def test_long_rows_with_empty_tiles():
    """Rows longer than a key tile where whole tiles are -1 (skipped) between valid ones."""
    B, T, S, K, H, Hkv, D = 1, 4, 300, 300, 8, 1, 64
    q, k, v = (rand(*s, dtype=torch.bfloat16, requires_grad=True) for s in ((B, T, H, D), (B, S, Hkv, D), (B, S, Hkv, D)))
    idx = make_indices(B, T, S, K, p_empty=0.0)
    idx[0, 1, 32:200] = -1  # tiles 1..5 empty
    idx[0, 2, :-5] = -1  # only the last tile
    check_against_reference(q, k, v, idx)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_strided_and_misaligned_inputs(dtype):
    """Views with a contiguous last dim: 16-byte aligned rows take the tensor-core kernels,
    rows offset by one element the row-wise ones; both match the reference."""
    B, T, S, K, H, Hkv, D = 2, 5, 30, 21, 8, 2, 64
    big_q = rand(B, T, H + 1, D + 8, dtype=dtype)
    big_kv = rand(B, S, Hkv, 2 * D + 16, dtype=dtype)
    idx = make_indices(B, T, S, K)
    aligned = (big_q[:, :, 1:, :D], big_kv[..., :D], big_kv[..., D + 8:2 * D + 8])
    misaligned = (big_q[:, :, 1:, 1:D + 1], big_kv[..., 1:D + 1], big_kv[..., D + 9:])
    for q, k, v in (aligned, misaligned):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))  # non-contiguous leaves
        assert not q.is_contiguous()
        check_against_reference(q, k, v, idx)


def test_head_dim_not_multiple_of_8():
    B, T, S, K, H, Hkv = 2, 4, 19, 11, 4, 2
    q, k, v = (rand(*s, dtype=torch.bfloat16, requires_grad=True) for s in ((B, T, H, 36), (B, S, Hkv, 36), (B, S, Hkv, 20)))
    check_against_reference(q, k, v, make_indices(B, T, S, K), scale=0.3)


@cuda_only
def test_float64_gradcheck():
    q, k, v = (torch.randn(*s, device=DEVICE, dtype=torch.float64, requires_grad=True)
               for s in ((1, 3, 2, 8), (1, 5, 1, 8), (1, 5, 1, 4)))
    idx = torch.tensor([[[0, 4, -1], [2, 2, 1], [-1, -1, -1]]], dtype=torch.int32, device=DEVICE)
    fn = lambda q, k, v: dsa_ext.sparse_attention(q, k, v, idx, return_lse=True)  # noqa: E731
    # dk / dv are float atomics: summation order varies in the last bits
    assert torch.autograd.gradcheck(lambda *x: fn(*x)[0], (q, k, v), nondet_tol=1e-12)
    assert torch.autograd.gradcheck(lambda *x: fn(*x)[1][:, :2], (q, k, v), nondet_tol=1e-12)


# ------------------------------------------------------------------------------------------------
# edge cases of the index tensor
# ------------------------------------------------------------------------------------------------


@cuda_only
def test_out_of_range_indices_are_empty_slots_unless_checked():
    B, T, S, K, H, D = 1, 3, 16, 8, 4, 64
    q, k, v = (rand(*s, dtype=torch.bfloat16) for s in ((B, T, H, D), (B, S, 1, D), (B, S, 1, D)))
    idx = make_indices(B, T, S, K, p_empty=0.0)
    bad = idx.clone()
    bad[0, 1, 0], bad[0, 1, 3], bad[0, 2, 5] = S, -7, 2**31 - 1
    clean = torch.where((bad < 0) | (bad >= S), torch.full_like(bad, -1), bad)
    was = dsa_ext.index_checks_enabled()
    try:
        dsa_ext.set_index_checks(False)
        out, lse = dsa_ext.sparse_attention(q, k, v, bad, return_lse=True)
        want, want_lse = dsa_ext.sparse_attention(q, k, v, clean, return_lse=True)
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
        dsa_ext.set_index_checks(True)
        with pytest.raises(IndexError, match="indices"):
            dsa_ext.sparse_attention(q, k, v, bad)
        with pytest.raises(IndexError, match="indices"):
            torch.ops.dsa.sparse_attention_backward(out, None, q, k, v, bad, out, lse, D ** -0.5)
    finally:
        dsa_ext.set_index_checks(was)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_rows_empty_and_empty_shapes(dtype):
    q, k, v = (rand(*s, dtype=dtype, requires_grad=True) for s in ((2, 3, 4, 64), (2, 5, 2, 64), (2, 5, 2, 64)))
    idx = torch.full((2, 3, 6), -1, dtype=torch.int32, device=DEVICE)
    out, lse = dsa_ext.sparse_attention(q, k, v, idx, return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all((g == 0).all() for g in grads)
    # T = 0
    out = dsa_ext.sparse_attention(q[:, :0], k, v, idx[:, :0])
    assert out.shape == (2, 0, 4, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2)])
def test_k_at_least_s_equals_dense_sdpa(dtype, H, Hkv):
    """Every causal key selected (k >= S): the result is dense causal attention (SDPA with
    is_causal=True, T == S; flash backend for bfloat16)."""
    B, T, D = 2, 70, 128
    q, k, v = (rand(*s, dtype=dtype, requires_grad=True) for s in ((B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D)))
    logits = torch.zeros(B, T, T, device=DEVICE).masked_fill(~reference.causal_mask(T, T, DEVICE), float("-inf"))
    idx = reference.topk_indices(logits, T + 5)
    out = dsa_ext.sparse_attention(q, k, v, idx)

    def sdpa(q, k, v):
        rep = H // Hkv
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
                                              v.transpose(1, 2).repeat_interleave(rep, 1), is_causal=True).transpose(1, 2)

    dense = sdpa(q, k, v)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    dense64 = sdpa(q64, k64, v64)
    assert_close_to_reference(out, dense64, dense, "out vs dense")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(dense, (q, k, v), g)
    want64 = torch.autograd.grad(dense64, (q64, k64, v64), g.double())
    for a, b, c, name in zip(got, want, want64, "qkv"):
        assert_close_to_reference(a, c, b, f"grad {name} vs dense")


# ------------------------------------------------------------------------------------------------
# PyTorch integration: opcheck, CUDA graphs, torch.compile, determinism
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)  # float16 shares bfloat16's path
def test_opcheck(dtype):
    B, T, S, K, H, Hkv, D = 1, 4, 20, 9, 4, 2, 64
    q, k, v = (rand(*s, dtype=dtype, requires_grad=True) for s in ((B, T, H, D), (B, S, Hkv, D), (B, S, Hkv, D)))
    idx = make_indices(B, T, S, K)
    torch.library.opcheck(torch.ops.dsa.sparse_attention.default, (q, k, v, idx, D ** -0.5))
    out, lse = torch.ops.dsa.sparse_attention(q, k, v, idx, D ** -0.5)
    q, k, v, out, lse = (x.detach() for x in (q, k, v, out, lse))  # the backward op has no autograd
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.dsa.sparse_attention_backward.default, (go, gl, q, k, v, idx, out, lse, D ** -0.5))
    torch.library.opcheck(torch.ops.dsa.sparse_attention_backward.default, (go, None, q, k, v, idx, out, lse, D ** -0.5))


@cuda_only
def test_cuda_graph_capture():
    B, T, S, K, H, Hkv, D = 2, 6, 40, 33, 16, 2, 128
    scale = D ** -0.5
    q, k, v = (rand(*s, dtype=torch.bfloat16) for s in ((B, T, H, D), (B, S, Hkv, D), (B, S, Hkv, D)))
    go = rand(B, T, H, D, dtype=torch.bfloat16)
    idx = make_indices(B, T, S, K)

    def step():
        out, lse = torch.ops.dsa.sparse_attention(q, k, v, idx, scale)
        return (out, lse, *torch.ops.dsa.sparse_attention_backward(go, None, q, k, v, idx, out, lse, scale))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for x in (q, k, v, go):  # new inputs in the captured buffers
        x.copy_(torch.randn_like(x))
    idx.copy_(make_indices(B, T, S, K))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])  # forward: deterministic
    for a, b in zip(captured[2:], eager[2:]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@cuda_only
def test_compile_reduce_overhead():
    B, T, S, K, H, Hkv, D = 1, 5, 30, 17, 8, 1, 64
    idx = make_indices(B, T, S, K)
    compiled = torch.compile(lambda q, k, v: dsa_ext.sparse_attention(q, k, v, idx, return_lse=True),
                             mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, recording, replay
        q, k, v = (rand(*s, dtype=torch.bfloat16, requires_grad=True) for s in ((B, T, H, D), (B, S, Hkv, D), (B, S, Hkv, D)))
        g = torch.randn(B, T, H, D, device=DEVICE, dtype=torch.bfloat16)
        out, lse = compiled(q, k, v)
        out, lse = out.clone(), lse.clone()
        got = torch.autograd.grad(out, (q, k, v), g)
        want_out, want_lse = dsa_ext.sparse_attention(q, k, v, idx, return_lse=True)
        want = torch.autograd.grad(want_out, (q, k, v), g)
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@cuda_only
@pytest.mark.parametrize("dtype,H,Hkv,Dqk,Dv,v_in_k", [
    (torch.bfloat16, 8, 2, 64, 64, False),      # tensor-core kernels
    (torch.bfloat16, 128, 1, 576, 512, True),   # MLA: two chunks per token, v read from the K tile
    (torch.float32, 6, 2, 40, 24, False),       # row-wise kernels
])
def test_deterministic_mode(dtype, H, Hkv, Dqk, Dv, v_in_k):
    """Under torch.use_deterministic_algorithms the backward sums dk/dv in a fixed order (contribution
    rows, sliced over tokens, summed by index_put_): bit-identical on repeat, the same gradients as
    the atomic path up to summation order, and autograd does not raise."""
    B, T, S, K = 2, 37, 300, 70
    q = rand(B, T, H, Dqk, dtype=dtype, requires_grad=True)
    k = rand(B, S, Hkv, Dqk, dtype=dtype, requires_grad=True)
    v = k[..., :Dv] if v_in_k else rand(B, S, Hkv, Dv, dtype=dtype, requires_grad=True)
    idx = make_indices(B, T, S, K)
    scale = Dqk ** -0.5
    out, lse = torch.ops.dsa.sparse_attention(q.detach(), k.detach(), v.detach(), idx, scale)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    args = (go, gl, q.detach(), k.detach(), v.detach(), idx, out, lse, scale)
    atomic = torch.ops.dsa.sparse_attention_backward(*args)
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = torch.ops.dsa.sparse_attention_backward(*args)
        second = torch.ops.dsa.sparse_attention_backward(*args)
        o1, l1 = dsa_ext.sparse_attention(q, k, v, idx, scale, return_lse=True)
        (o1.float().sum() + l1[torch.isfinite(l1)].sum()).backward()  # no error in deterministic mode
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for a, b, c, name in zip(first, second, atomic, ("grad_q", "grad_k", "grad_v")):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
        torch.testing.assert_close(a.float(), c.float(), **tol, msg=name)
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()
