"""FP8 (e4m3) indexer inputs: dsa_ext.fp8 quantisation and the float8_e4m3fn paths of
indexer_logits / indexer_topk (per-key scale k_scale, query scales folded into w), on CPU and,
in the tests marked cuda, on the GPU.

The kernels multiply e4m3 values exactly and accumulate in float32, so against the float64
reference evaluated on the same e4m3 values their error is float32 rounding of the sum of
|terms|; the rounding to e4m3 itself is dsa_ext.fp8's, tested separately.
"""
import pytest
import torch

import dsa_ext
from dsa_ext import fp8, reference
from helpers import IndexerShape, shape_id

# odd sizes, T = 1, S > T, Di not a multiple of 16, past one CPU key tile
SHAPES = [IndexerShape(1, 1, 1, 1, 8), IndexerShape(2, 7, 13, 3, 24), IndexerShape(2, 33, 300, 2, 32),
          IndexerShape(1, 9, 70, 20, 128)]


def fp8_case(B, T, S, Hi, Di, device="cpu", outliers=False):
    q = torch.randn(B, T, Hi, Di, device=device)
    k = torch.randn(B, S, Di, device=device)
    if outliers:  # a few large channels, as real activations have
        q[..., :2] *= 30
        k[..., :2] *= 30
    w = torch.randn(B, T, Hi, device=device) * Hi ** -0.5
    return (q, k, w), fp8.indexer_inputs(q, k, w)


def assert_fp8_logits_exact_products(got, q8, k8, ws, ks, scale, causal, rel=4e-6):
    """got against the float64 reference on the same e4m3 values and scales."""
    ref = reference.indexer_logits(q8.double(), k8.double(), ws.double(), scale, causal, k_scale=ks.double())
    masked = torch.isinf(ref)
    assert got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), masked)
    bound = abs(scale) * torch.einsum("bth,bthd,bsd->bts", ws.double().abs(), q8.double().abs(),
                                      k8.double().abs()) * ks.double().abs()[:, None, :]
    err = (got.double() - ref).abs()
    assert (err[~masked] <= rel * bound[~masked] + 1e-30).all(), err[~masked].max().item()


# ---------------------------------------------------------------------------------------------
# quantisation
# ---------------------------------------------------------------------------------------------


def test_quantize_rows_error_and_range(seed):
    x = torch.randn(4, 7, 96) * torch.rand(4, 7, 1) * 100
    x[1, 2] = 0  # an all-zero row
    x8, s = fp8.quantize_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (4, 7)
    back = x8.float() * s[..., None]
    assert torch.isfinite(back).all()
    assert x8.float().abs().amax(-1).le(fp8.E4M3_MAX).all()
    assert x8.float().abs().amax(-1)[s != 1].ge(fp8.E4M3_MAX * 0.9).all()  # the range is used
    # e4m3 rounds to 3 mantissa bits (half-ulp 2^-4 relative); below 2^-6 subnormals, 2^-10 absolute
    assert ((back - x).abs() <= x.abs() * 2 ** -4 + s[..., None] * 2 ** -10).all()
    assert s[1, 2] == 1 and back[1, 2].eq(0).all()


def test_indexer_inputs_fold_the_query_scale(seed):
    (q, k, w), (q8, k8, ws, ks) = fp8_case(2, 5, 9, 3, 16)
    q8_, qs = fp8.quantize_rows(q)
    assert torch.equal(q8.view(torch.uint8), q8_.view(torch.uint8))
    torch.testing.assert_close(ws, w * qs, rtol=0, atol=0)
    assert ks.shape == (2, 9) and k8.shape == k.shape


# ---------------------------------------------------------------------------------------------
# CPU operators
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("causal", [True, False])
def test_logits_fp8(seed, shape, causal):
    _, (q8, k8, ws, ks) = fp8_case(*shape)
    got = dsa_ext.indexer_logits(q8, k8, ws, scale=0.3, causal=causal, k_scale=ks)
    assert_fp8_logits_exact_products(got, q8, k8, ws, ks, 0.3, causal)
    # without k_scale: the scores of unscaled keys
    got = dsa_ext.indexer_logits(q8, k8, ws, scale=0.3, causal=causal)
    assert_fp8_logits_exact_products(got, q8, k8, ws, torch.ones_like(ks), 0.3, causal)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fused_topk_fp8_equals_unfused(seed, shape):
    _, (q8, k8, ws, ks) = fp8_case(*shape)
    for k in (1, 5, 64):
        fused = dsa_ext.indexer_topk(q8, k8, ws, k, k_scale=ks)
        assert torch.equal(fused, dsa_ext.topk_indices(dsa_ext.indexer_logits(q8, k8, ws, k_scale=ks), k))


def test_fp8_wrappers_match_the_operators(seed):
    (q, k, w), (q8, k8, ws, ks) = fp8_case(1, 20, 40, 4, 32)
    torch.testing.assert_close(fp8.indexer_logits(q, k, w), dsa_ext.indexer_logits(q8, k8, ws, k_scale=ks),
                               rtol=0, atol=0)
    assert torch.equal(fp8.indexer_topk(q, k, w, 8), dsa_ext.indexer_topk(q8, k8, ws, 8, k_scale=ks))


def test_fp8_scores_track_full_precision(seed):
    """Quantisation error of the scores: a few percent of the score range, not garbage."""
    (q, k, w), _ = fp8_case(1, 64, 64, 8, 64, outliers=True)
    exact = reference.indexer_logits(q.double(), k.double(), w.double())
    got = fp8.indexer_logits(q, k, w).double()
    visible = torch.isfinite(exact)
    err = (got - exact)[visible].abs().max() / exact[visible].abs().max()
    assert err < 0.08, err


def test_fp8_opcheck(seed):
    _, (q8, k8, ws, ks) = fp8_case(1, 6, 20, 4, 16)
    # opcheck's test_schema multiplies the inputs, which float8 tensors do not support in torch
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.dsa.indexer_logits.default, (q8, k8, ws, 0.25, True, ks), test_utils=utils)
    torch.library.opcheck(torch.ops.dsa.indexer_topk.default, (q8, k8, ws, 7, 0.25, True, ks), test_utils=utils)


def test_fp8_compiles(seed):
    _, (q8, k8, ws, ks) = fp8_case(1, 12, 30, 4, 16)
    fn = torch.compile(lambda a, b, c, d: dsa_ext.indexer_topk(a, b, c, 5, k_scale=d), fullgraph=True,
                       backend="aot_eager")
    assert torch.equal(fn(q8, k8, ws, ks), dsa_ext.indexer_topk(q8, k8, ws, 5, k_scale=ks))


def test_fp8_bad_inputs(seed):
    (q, k, w), (q8, k8, ws, ks) = fp8_case(1, 4, 6, 2, 16)
    with pytest.raises(RuntimeError, match="k_scale is only for float8_e4m3fn"):
        dsa_ext.indexer_logits(q, k, w, k_scale=ks)
    with pytest.raises(RuntimeError, match="expected w to be float32 with float8_e4m3fn"):
        dsa_ext.indexer_topk(q8, k8, ws.bfloat16(), 2, k_scale=ks)
    with pytest.raises(RuntimeError, match=r"expected k_scale.size\(1\) == 6"):
        dsa_ext.indexer_logits(q8, k8, ws, k_scale=ks[:, :5])
    with pytest.raises(RuntimeError, match="expected k_scale to be float32"):
        dsa_ext.indexer_logits(q8, k8, ws, k_scale=ks.double())
    with pytest.raises(RuntimeError, match="expected k_idx to have the dtype of q_idx"):
        dsa_ext.indexer_logits(q8, k, ws)
    with pytest.raises(RuntimeError, match="forward-only"):
        torch.ops.dsa.indexer_logits_backward(torch.zeros(1, 4, 6), q8, k8, ws, 0.1, True)
    with pytest.raises(RuntimeError, match="forward-only"):
        dsa_ext.indexer_kl_loss(q8, k8, ws, torch.randn(1, 4, 2, 8), torch.randn(1, 6, 1, 8))


# ---------------------------------------------------------------------------------------------
# CUDA (e4m3 tensor cores on sm_89+, bfloat16 tensor cores on the exact bfloat16 copies before)
# ---------------------------------------------------------------------------------------------

cuda = pytest.mark.cuda


# Hopper's FP8 tensor cores add their products with about 14 bits of precision (DeepSeek-V3
# report, section 3.3.2), not float32's 24: the e4m3 path gets 2^-10 of the |term| sum.
FP8_MMA_REL = 2 ** -10


@cuda
@pytest.mark.parametrize("shape", SHAPES + [IndexerShape(1, 5, 1000, 64, 128), IndexerShape(1, 3, 70, 72, 32)],
                         ids=shape_id)
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_logits_fp8(seed, shape, causal):
    _, (q8, k8, ws, ks) = fp8_case(*shape, device="cuda")
    got = dsa_ext.indexer_logits(q8, k8, ws, scale=0.3, causal=causal, k_scale=ks)
    assert_fp8_logits_exact_products(got.cpu(), q8.cpu(), k8.cpu(), ws.cpu(), ks.cpu(), 0.3, causal,
                                     rel=FP8_MMA_REL)


@cuda
def test_cuda_fp8_strided_rows(seed):
    _, (q8, k8, ws, ks) = fp8_case(1, 9, 77, 8, 48, device="cuda")
    qs = torch.cat([q8.view(torch.uint8), q8.view(torch.uint8)[..., :3]], -1).view(torch.float8_e4m3fn)[..., :48]
    kb = torch.cat([k8.view(torch.uint8)[..., :5], k8.view(torch.uint8)], -1).view(torch.float8_e4m3fn)[..., 5:]
    got = dsa_ext.indexer_logits(qs, kb, ws, k_scale=ks)
    torch.testing.assert_close(got, dsa_ext.indexer_logits(q8, k8, ws, k_scale=ks), rtol=0, atol=0)


@cuda
def test_cuda_quantisation_matches_cpu(seed):
    x = torch.randn(3, 50, 128) * 7
    x8, s = fp8.quantize_rows(x)
    y8, t = fp8.quantize_rows(x.cuda())
    assert torch.equal(x8.view(torch.uint8), y8.cpu().view(torch.uint8))
    assert torch.equal(s, t.cpu())


@cuda
@pytest.mark.parametrize("k", [1, 64, 2048])
def test_cuda_fused_fp8_equals_unfused_and_cpu_set(seed, k):
    _, (q8, k8, ws, ks) = fp8_case(1, 40, 4099, 64, 128, device="cuda")
    fused = dsa_ext.indexer_topk(q8, k8, ws, k, k_scale=ks)
    assert torch.equal(fused, dsa_ext.topk_indices(dsa_ext.indexer_logits(q8, k8, ws, k_scale=ks), k))
    # the CPU operator on the same e4m3 values picks the same sets up to near-ties of the rounding
    cpu = dsa_ext.indexer_topk(q8.cpu(), k8.cpu(), ws.cpu(), k, k_scale=ks.cpu())
    got = fused.cpu().long()
    S = k8.shape[1]
    chosen = torch.zeros(got.shape[1], S + 1, dtype=torch.bool).scatter_(1, cpu[0].long().clamp_min(-1) % (S + 1), True)
    shared = chosen.gather(1, got[0] % (S + 1)) & (got[0] >= 0)
    overlap = shared.sum().item() / (got[0] >= 0).sum().item()
    assert overlap > 0.99, overlap


@cuda
def test_cuda_fp8_graph_capture(seed):
    _, (q8, k8, ws, ks) = fp8_case(1, 64, 2048, 8, 64, device="cuda")
    eager = dsa_ext.indexer_topk(q8, k8, ws, 128, k_scale=ks)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        dsa_ext.indexer_topk(q8, k8, ws, 128, k_scale=ks)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = dsa_ext.indexer_topk(q8, k8, ws, 128, k_scale=ks)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
