"""CUDA indexer_logits (forward, backward), topk_indices and the fused indexer_topk against the
float64 reference and the CPU operators. Skipped without a GPU.

Error bounds: the forward multiplies exact low-precision products in fp32, so its error is
bounded by a multiple of fp32 rounding of the sum of |terms|; gradients are compared by norm
with a small multiple of the error the reference itself makes in the input dtype.
"""
import pytest
import torch

import dsa_ext
from dsa_ext import ranges, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not dsa_ext.built_with_cuda,
                       reason="needs a CUDA device and a CUDA build of dsa_ext"),
]

DEV = "cuda"
LOW = [torch.bfloat16, torch.float16]
ALL = [torch.float32, torch.bfloat16, torch.float16]


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def inputs(B, T, S, Hi, Di, dtype, seed, strided=False, quantized=False):
    g = gen(seed)
    if quantized:  # small integers: exact products and sums, many exactly tied scores and zeros
        q = torch.randint(-2, 3, (B, T, Hi, Di + 3), generator=g).float()
        k = torch.randint(-2, 3, (B, S, Di + 5), generator=g).float()
        w = torch.randint(-1, 3, (B, T, Hi), generator=g).float()
    else:
        q = torch.randn(B, T, Hi, Di + 3, generator=g)
        k = torch.randn(B, S, Di + 5, generator=g)
        w = torch.randn(B, T, Hi, generator=g) * Hi ** -0.5
    q, k, w = q.to(DEV, dtype), k.to(DEV, dtype), w.to(DEV)
    if strided:  # last dim contiguous, other strides arbitrary, rows not 16-byte aligned
        return q[..., 1:Di + 1], k[..., 2:Di + 2], w
    return q[..., :Di].contiguous(), k[..., :Di].contiguous(), w


def ref_logits(q, k, w, scale, causal):
    return reference.indexer_logits(q.double(), k.double(), w.double(), scale, causal)


def assert_logits_close(got, q, k, w, scale, causal):
    ref = ref_logits(q, k, w, scale, causal)
    masked = torch.isinf(ref)
    assert got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), masked)
    bound = abs(scale) * torch.einsum("bth,bthd,bsd->bts", w.double().abs(), q.double().abs(), k.double().abs())
    err = (got.double() - ref).abs()
    assert (err[~masked] <= 4e-6 * bound[~masked] + 1e-30).all(), err[~masked].max().item()


# ---------------------------------------------------------------------------------------------
# indexer_logits forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("B,T,S,Hi,Di", [
    (2, 37, 37, 8, 64),      # T = S, nothing a multiple of the tiles
    (1, 5, 1000, 64, 128),   # KV prefix, the V3.2 head shape
    (1, 16, 130, 1, 16),     # one head
    (2, 9, 77, 20, 24),      # heads and dims padded inside the tiles
    (1, 3, 70, 72, 32),      # more than 64 heads: two head chunks
])
@pytest.mark.parametrize("causal", [True, False])
def test_logits_forward(seed, dtype, B, T, S, Hi, Di, causal):
    q, k, w = inputs(B, T, S, Hi, Di, dtype, seed=seed + 2)
    scale = (Hi * Di) ** -0.5
    assert_logits_close(dsa_ext.indexer_logits(q, k, w, causal=causal), q, k, w, scale, causal)


@pytest.mark.parametrize("dtype", ALL)
def test_logits_forward_strided_and_odd_dims(seed, dtype):
    q, k, w = inputs(2, 6, 50, 16, 17, dtype, seed=seed + 3, strided=True)
    assert_logits_close(dsa_ext.indexer_logits(q, k, w, scale=0.3), q, k, w, 0.3, True)
    q, k, w = inputs(1, 4, 40, 8, 32, dtype, seed=seed + 4, strided=True)
    assert_logits_close(dsa_ext.indexer_logits(q, k, w, scale=-0.7, causal=False), q, k, w, -0.7, False)


def test_logits_forward_head_dim_beyond_tensor_cores(seed):
    # Di = 300 > 256: bfloat16 inputs take the float32 engine on converted copies
    q, k, w = inputs(1, 3, 20, 2, 300, torch.bfloat16, seed=seed + 5)
    assert_logits_close(dsa_ext.indexer_logits(q, k, w), q, k, w, (2 * 300) ** -0.5, True)


def test_logits_matches_cpu_operator(seed):
    q, k, w = inputs(1, 20, 90, 8, 64, torch.bfloat16, seed=seed + 6)
    got = dsa_ext.indexer_logits(q, k, w)
    cpu = dsa_ext.indexer_logits(q.cpu(), k.cpu(), w.cpu())
    assert torch.allclose(got.cpu(), cpu, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# indexer_logits backward
# ---------------------------------------------------------------------------------------------


def ref_grads(q, k, w, g, scale, causal):
    q, k, w = (x.detach().clone().requires_grad_() for x in (q, k, w))
    out = reference.indexer_logits(q, k, w, scale, causal)
    out.backward(torch.where(torch.isinf(out), torch.zeros_like(g), g))
    return q.grad, k.grad, w.grad


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("B,T,S,Hi,Di,causal", [
    (2, 33, 33, 8, 64, True),
    (1, 7, 300, 64, 128, True),
    (1, 9, 70, 20, 24, False),
    (1, 4, 66, 16, 17, True),
    (1, 3, 40, 4, 160, True),   # head dim beyond the tensor-core backward: float32 path
])
def test_logits_backward(seed, dtype, B, T, S, Hi, Di, causal):
    q, k, w = inputs(B, T, S, Hi, Di, dtype, seed=seed + 7)
    scale = (Hi * Di) ** -0.5
    g = torch.randn(B, T, S, generator=gen(seed + 106)).to(DEV)
    if causal:  # the masked positions' incoming gradient must be ignored, whatever it holds
        g = g.masked_fill(~reference.causal_mask(T, S, DEV), float("nan"))
    ours = torch.ops.dsa.indexer_logits_backward(g, q, k, w, scale, causal)
    g_clean = torch.nan_to_num(g, nan=0.0)
    ref64 = ref_grads(q.double(), k.double(), w.double(), g_clean.double(), scale, causal)
    ref_lp = ref_grads(q, k, w, g_clean, scale, causal)  # the reference's own error in this dtype
    for name, o, r, lp in zip(("q_idx", "k_idx", "w"), ours, ref64, ref_lp):
        assert o.dtype == lp.dtype and o.shape == r.shape, name
        assert torch.isfinite(o).all(), name
        err = (o.double() - r).norm().item()
        own = (lp.double() - r).norm().item()
        assert err <= 5 * own + 1e-6 * r.norm().item(), (name, err, own)


def test_logits_autograd_matches_backward_op(seed):
    q, k, w = inputs(1, 5, 30, 4, 16, torch.bfloat16, seed=seed + 8)
    q, k, w = (x.requires_grad_() for x in (q, k, w))
    out = dsa_ext.indexer_logits(q, k, w, 0.5)
    g = torch.randn_like(out)
    out.backward(torch.where(torch.isinf(out), 0.0, g))
    direct = torch.ops.dsa.indexer_logits_backward(g, q.detach(), k.detach(), w.detach(), 0.5, True)
    for a, b in zip((q.grad, k.grad, w.grad), direct):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# topk_indices
# ---------------------------------------------------------------------------------------------


def tie_heavy(B, T, S, seed):
    g = gen(seed)
    x = torch.randint(-3, 4, (B, T, S), generator=g).float() * 0.5
    x[torch.rand(B, T, S, generator=g) < 0.3] = 0.0     # ReLU zeros
    x[torch.rand(B, T, S, generator=g) < 0.1] = -0.0
    x[torch.rand(B, T, S, generator=g) < 0.05] = float("-inf")
    x[torch.rand(B, T, S, generator=g) < 0.05] = float("nan")
    x[torch.rand(B, T, S, generator=g) < 0.02] = float("inf")
    return x


@pytest.mark.parametrize("S,k", [(1, 1), (37, 1), (37, 5), (300, 64), (50, 80), (1000, 999), (4099, 2048)])
def test_topk_bit_identical_to_cpu(seed, S, k):
    logits = tie_heavy(2, 5, S, seed=seed + 9)
    got = dsa_ext.topk_indices(logits.to(DEV), k).cpu()
    assert torch.equal(got, dsa_ext.topk_indices(logits, k))
    assert torch.equal(got, reference.topk_indices(logits, k))


@pytest.mark.parametrize("dtype", LOW)
def test_topk_low_precision_logits(seed, dtype):
    logits = tie_heavy(1, 4, 513, seed=seed + 10).to(dtype)
    got = dsa_ext.topk_indices(logits.to(DEV), 100).cpu()
    assert torch.equal(got, dsa_ext.topk_indices(logits, 100))


def test_topk_long_rows_and_strides(seed):
    base = torch.randn(2, 3, 140000, generator=gen(seed + 110))
    base[:, :, 5000:60000] = 0.0  # a huge block of exact ties around the threshold
    logits = base[:, :, :131072 + 7]  # strided rows
    for k in (1, 2048, 70000):
        got = dsa_ext.topk_indices(logits.to(DEV), k).cpu()
        assert torch.equal(got, reference.topk_indices(logits, k)), k


def test_topk_causal_rows_are_dense(seed):
    q, k, w = inputs(1, 40, 40, 4, 16, torch.bfloat16, seed=seed + 11)
    logits = dsa_ext.indexer_logits(q, k, w)
    idx = dsa_ext.topk_indices(logits, 16).cpu()
    for t in range(16):  # fewer than k visible keys: all of them, then -1
        assert idx[0, t, :t + 1].tolist() == list(range(t + 1))
        assert (idx[0, t, t + 1:] == -1).all()


# ---------------------------------------------------------------------------------------------
# fused indexer_topk
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("B,T,S,Hi,Di,k", [
    (2, 37, 37, 8, 64, 16),       # dense rows at the start, -1 padding
    (1, 9, 3000, 64, 128, 1),     # k = 1
    (1, 6, 5000, 16, 32, 2048),   # compactions, k larger than most tiles
    (1, 2, 20000, 8, 64, 300),    # few rows: the keys are split across blocks, then merged
    (1, 1, 131072, 64, 128, 2048),  # decoding, V3.2's indexer: splits merged by a tree of blocks
    (8, 1, 32768, 64, 128, 2048),   # a decoding batch
    (1, 5, 77, 20, 24, 500),      # k > S
])
@pytest.mark.parametrize("causal", [True, False])
def test_fused_equals_unfused(seed, dtype, B, T, S, Hi, Di, k, causal):
    # Same score tiles on both paths: equal even where scores tie
    for quantized in (False, True):
        q, kk, w = inputs(B, T, S, Hi, Di, dtype, seed=seed + 12, quantized=quantized)
        fused = dsa_ext.indexer_topk(q, kk, w, k, causal=causal)
        unfused = dsa_ext.topk_indices(dsa_ext.indexer_logits(q, kk, w, causal=causal), k)
        assert torch.equal(fused, unfused), quantized


@pytest.mark.parametrize("dtype", ALL)
def test_fused_same_set_as_float64_reference(seed, dtype):
    # Against exact scores the selected set may differ only between near-ties at the k-th score.
    B, T, S, Hi, Di, k = 1, 8, 600, 4, 32, 50
    q, kk, w = inputs(B, T, S, Hi, Di, dtype, seed=seed + 13)
    scale = (Hi * Di) ** -0.5
    exact = ref_logits(q, kk, w, scale, True)[0].cpu()
    got = dsa_ext.indexer_topk(q, kk, w, k).cpu()[0]
    want = reference.topk_indices(exact[None], k)[0]
    bound = scale * torch.einsum("th,thd,sd->ts", w.double().abs(), q.double().abs(), kk.double().abs())[0].cpu()
    for t in range(T):
        a, b = set(got[t].tolist()) - {-1}, set(want[t].tolist()) - {-1}
        assert len(a) == len(b)
        kth = exact[t, sorted(b, key=lambda s: -exact[t, s].item())[-1]]
        for s in a ^ b:  # only near-ties may swap
            assert abs(exact[t, s] - kth) <= 1e-5 * bound[t, s], (t, s)


@pytest.mark.parametrize("B,T,S", [
    (1, 1, 131072),   # one decoding query over 128K keys: a row's keys split over many blocks, a merge tree
    (64, 1, 32768),   # a decoding batch: fewer splits, no tree
    (3, 4, 50000),    # a few queries per sequence (speculative decoding), causal bottom-right
    (1, 2, 3000),     # k = 2048 of 3000 keys: splits of fewer keys than k
])
def test_decode_split_equals_one_block_per_row_and_reference(seed, B, T, S, monkeypatch):
    """Decoding shapes take the split-and-merge path; DSA_EXT_CUDA_TOPK_MAX_SPLITS=1 forces one
    block per row. Integer inputs make the scores exact (the float64 reference is then the exact
    answer) and tie massively across split boundaries: both paths must equal it, ties included."""
    q, kk, w = inputs(B, T, S, 64, 128, torch.bfloat16, seed=seed + 30, quantized=True)
    split = dsa_ext.indexer_topk(q, kk, w, 2048, scale=0.125)
    monkeypatch.setenv("DSA_EXT_CUDA_TOPK_MAX_SPLITS", "1")
    single = dsa_ext.indexer_topk(q, kk, w, 2048, scale=0.125)
    ref = reference.indexer_topk(q.double(), kk.double(), w.double(), 2048, 0.125, True)
    assert torch.equal(single, ref)
    assert torch.equal(split, ref)


def test_fused_peak_memory_is_not_quadratic(seed):
    B, T, S, Hi, Di, k = 1, 1024, 131072, 8, 64, 2048
    q, kk, w = inputs(B, T, S, Hi, Di, torch.bfloat16, seed=seed + 14)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = dsa_ext.indexer_topk(q, kk, w, k)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    logits_bytes = B * T * S * 4
    assert peak < logits_bytes / 2, (peak, logits_bytes)
    assert out.shape == (B, T, k)


# ---------------------------------------------------------------------------------------------
# registration, errors, graphs
# ---------------------------------------------------------------------------------------------


def test_opcheck(seed):
    q, k, w = inputs(1, 6, 20, 4, 16, torch.bfloat16, seed=seed + 15)
    q32, k32, w32 = inputs(1, 6, 20, 4, 16, torch.float32, seed=seed + 16)
    ops = torch.ops.dsa
    for a, b, c in ((q, k, w), (q32, k32, w32)):
        torch.library.opcheck(ops.indexer_logits.default, (a.requires_grad_(), b.requires_grad_(), c.requires_grad_(),
                                                            0.25, True))
        logits = ops.indexer_logits(a.detach(), b.detach(), c.detach(), 0.25, True)
        torch.library.opcheck(ops.indexer_logits_backward.default,
                              (torch.randn_like(logits), a.detach(), b.detach(), c.detach(), 0.25, True))
        torch.library.opcheck(ops.topk_indices.default, (logits, 7))
        torch.library.opcheck(ops.indexer_topk.default, (a.detach(), b.detach(), c.detach(), 7, 0.25, True))


def test_float64_is_refused_with_a_clear_error(seed):
    q, k, w = inputs(1, 2, 4, 2, 8, torch.float32, seed=seed + 17)
    with pytest.raises(RuntimeError, match="float64"):
        dsa_ext.indexer_logits(q.double(), k.double(), w)
    with pytest.raises(RuntimeError, match="float64"):
        dsa_ext.topk_indices(torch.zeros(1, 2, 3, dtype=torch.float64, device=DEV), 1)


def test_empty_shapes(seed):
    q, k, w = inputs(1, 0, 5, 2, 8, torch.bfloat16, seed=seed + 18)
    assert dsa_ext.indexer_logits(q, k, w).shape == (1, 0, 5)
    assert dsa_ext.indexer_topk(q, k, w, 3).shape == (1, 0, 3)
    q, k, w = inputs(1, 3, 0, 2, 8, torch.bfloat16, seed=seed + 19)
    assert (dsa_ext.indexer_topk(q, k, w, 3, causal=False) == -1).all()
    assert dsa_ext.topk_indices(torch.zeros(2, 3, 0, device=DEV), 4).eq(-1).all()


def test_cuda_graph_capture(seed):
    q, k, w = inputs(1, 64, 2048, 8, 64, torch.bfloat16, seed=seed + 20)
    g_in = torch.randn(1, 64, 2048, device=DEV)
    run = lambda: (dsa_ext.indexer_topk(q, k, w, 128),  # noqa: E731
                   dsa_ext.topk_indices(dsa_ext.indexer_logits(q, k, w), 128),
                   torch.ops.dsa.indexer_logits_backward(g_in, q, k, w, 0.1, True))
    eager = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0])
    assert torch.equal(captured[1], eager[1])
    for a, b in zip(captured[2], eager[2]):
        assert torch.equal(a, b)  # deterministic: bit-identical gradients


def test_backward_is_deterministic(seed):
    q, k, w = inputs(1, 50, 400, 64, 128, torch.bfloat16, seed=seed + 21)
    g = torch.randn(1, 50, 400, device=DEV)
    a = torch.ops.dsa.indexer_logits_backward(g, q, k, w, 0.1, True)
    b = torch.ops.dsa.indexer_logits_backward(g, q, k, w, 0.1, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# per-query key ranges
# ---------------------------------------------------------------------------------------------


def range_cases(B, T, S, seed):
    """(name, key_start, key_end) on the device: packed documents (B = 1 layout repeated), random
    ranges with empty rows, a start alone."""
    g = gen(seed)
    cuts = torch.randint(0, S + 1, (5,), generator=g).sort().values
    ks, ke = ranges.from_cu_seqlens(torch.cat([torch.tensor([0]), cuts, torch.tensor([S])]))
    packed = (ks[:, S - T:].expand(B, T).contiguous(), ke[:, S - T:].expand(B, T).contiguous())
    start = torch.randint(0, S + 1, (B, T), generator=g)
    end = torch.randint(0, S + 1, (B, T), generator=g)
    rand = (start.int(), end.int())
    return [("packed", *(x.to(DEV) for x in packed)), ("random", *(x.to(DEV) for x in rand)),
            ("start_only", rand[0].to(DEV), None)]


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("B,T,S,Hi,Di,k", [
    (2, 37, 37, 8, 64, 16),
    (1, 40, 3000, 64, 128, 100),  # long prefix: key splits, most tiles outside the ranges
    (1, 9, 77, 20, 24, 500),      # k > S
])
def test_ranges_forward_backward(seed, dtype, B, T, S, Hi, Di, k):
    q, kk, w = inputs(B, T, S, Hi, Di, dtype, seed=seed + 30)
    scale = (Hi * Di) ** -0.5
    for name, ks, ke in range_cases(B, T, S, seed + 31):
        r = dict(key_start=ks, key_end=ke)
        logits = dsa_ext.indexer_logits(q, kk, w, **r)
        ref = reference.indexer_logits(q.double(), kk.double(), w.double(), scale, True, **r)
        assert torch.equal(torch.isneginf(logits), torch.isinf(ref)), name
        bound = scale * torch.einsum("bth,bthd,bsd->bts", w.double().abs(), q.double().abs(), kk.double().abs())
        finite = ~torch.isinf(ref)
        assert ((logits.double() - ref).abs()[finite] <= 4e-6 * bound[finite] + 1e-30).all(), name
        fused = dsa_ext.indexer_topk(q, kk, w, k, **r)
        assert torch.equal(fused, dsa_ext.topk_indices(logits, k)), name
        g = torch.randn(B, T, S, generator=gen(seed + 32)).to(DEV).masked_fill(torch.isinf(ref), float("nan"))
        ours = torch.ops.dsa.indexer_logits_backward(g, q, kk, w, scale, True, ks, ke)
        gq, gk, gw = (x.detach().double().requires_grad_() for x in (q, kk, w))
        out = reference.indexer_logits(gq, gk, gw, scale, True, **r)
        out.backward(torch.nan_to_num(g, nan=0.0).double())
        for what, o, want in zip(("q_idx", "k_idx", "w"), ours, (gq.grad, gk.grad, gw.grad)):
            assert torch.isfinite(o).all(), (name, what)
            tol = 2e-2 if dtype in LOW else 1e-4
            assert (o.double() - want).norm() <= tol * want.norm() + 1e-6, (name, what)


def test_ranges_are_clamped_unless_checked(seed):
    """CUDA follows the index-check policy: out-of-range values are clamped to [0, S] (never read
    out of bounds); with set_index_checks(True) they raise as on the CPU."""
    B, T, S = 1, 6, 40
    q, kk, w = inputs(B, T, S, 8, 32, torch.bfloat16, seed=seed + 33)
    ks = torch.tensor([[-5, 0, 3, 50, 10, -1]], dtype=torch.int32, device=DEV)
    ke = torch.tensor([[100, 20, 41, 60, -3, 40]], dtype=torch.int32, device=DEV)
    clamped = dict(key_start=ks.clamp(0, S), key_end=ke.clamp(0, S))
    assert torch.equal(dsa_ext.indexer_topk(q, kk, w, 8, key_start=ks, key_end=ke),
                       dsa_ext.indexer_topk(q, kk, w, 8, **clamped))
    assert torch.equal(dsa_ext.indexer_logits(q, kk, w, key_start=ks, key_end=ke),
                       dsa_ext.indexer_logits(q, kk, w, **clamped))
    dsa_ext.set_index_checks(True)
    try:
        with pytest.raises(IndexError, match=r"expected every key_start to be in \[0, S=40\], got -5 at key_start\[0, 0\]"):
            dsa_ext.indexer_topk(q, kk, w, 8, key_start=ks, key_end=ke)
    finally:
        dsa_ext.set_index_checks(False)
    with pytest.raises(RuntimeError, match=r"expected key_start on the device of q_idx"):
        dsa_ext.indexer_logits(q, kk, w, key_start=ks.cpu())


def test_ranges_packed_equals_batch(seed):
    """A packed sequence of 8 documents of 300 tokens selects what the batch of 8 selects."""
    docs, L, k = 8, 300, 64
    q, kk, w = inputs(docs, L, L, 8, 64, torch.bfloat16, seed=seed + 34)
    ks, ke = ranges.from_cu_seqlens(torch.arange(docs + 1) * L)
    packed = dsa_ext.indexer_topk(q.reshape(1, docs * L, 8, 64), kk.reshape(1, docs * L, 64), w.reshape(1, docs * L, 8),
                                  k, key_start=ks.to(DEV), key_end=ke.to(DEV))
    batch = dsa_ext.indexer_topk(q, kk, w, k)
    offsets = (torch.arange(docs, device=DEV) * L).view(docs, 1, 1)
    assert torch.equal(packed, torch.where(batch >= 0, batch + offsets, batch).reshape(1, docs * L, k))
