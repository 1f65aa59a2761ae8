"""The CUDA kernels of csrc/cuda, run on the CPU emulator (no GPU needed), against the
float64 reference. Slow (the emulator runs every GPU thread as an OS thread, under
AddressSanitizer); run with `pytest tests/cuda_emulation -m emulation`.

What this checks: indexing, masking, fragment layouts (from the PTX spec), tie handling,
out-of-bounds accesses (ASan), reads of never-written shared memory (filled with NaN bytes), and
that each case takes the kernel path the host code would (the driver mirrors its choice and
prints it; emulator.launched).
What it cannot check: races the barriers do not order, cp.async timing, performance.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulator  # noqa: E402

from dsa_ext import fp8 as dsa_fp8  # noqa: E402
from dsa_ext import reference  # noqa: E402

pytestmark = emulator.MARKS


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# topk_indices
# ---------------------------------------------------------------------------------------------


def emulated_topk(logits, k, cand_cap=8192):
    B, T, S = logits.shape
    flat, off = emulator.storage_of(logits)
    assert off == 0
    meta = dict(op="topk", dtype=emulator.dtype_name(logits.dtype), B=B, T=T, S=S, k=k,
                logits_batch_stride=logits.stride(0), logits_row_stride=logits.stride(1), cand_cap=cand_cap)
    out, log = emulator.run(meta, {"logits": flat}, {"out": (torch.int32, (B, T, k))})
    # shared-memory candidates: as many as the row has, at most cand_cap (0: every pass reads the row)
    assert emulator.launched(log, "select ") == f"select cand_cap={min(S, cand_cap)}", log
    return out["out"]


def tie_heavy_logits(B, T, S, seed):
    g = gen(seed)
    x = torch.randint(-3, 4, (B, T, S), generator=g).float() * 0.5  # many exact ties and zeros
    x[torch.rand(B, T, S, generator=g) < 0.1] = -0.0
    x[torch.rand(B, T, S, generator=g) < 0.05] = float("-inf")
    x[torch.rand(B, T, S, generator=g) < 0.05] = float("nan")
    x[torch.rand(B, T, S, generator=g) < 0.02] = float("inf")
    x[..., -1] = 1e-42  # a denormal, distinct from 0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,k", [(37, 1), (37, 5), (300, 64), (50, 80), (1, 3)])
def test_topk_ties_and_specials(dtype, S, k):
    logits = tie_heavy_logits(2, 3, S, seed=S * 7 + k).to(dtype)
    got = emulated_topk(logits, k)
    assert torch.equal(got, reference.topk_indices(logits, k))


@pytest.mark.parametrize("cand_cap", [0, 16, 8192])
def test_topk_candidate_paths_and_strided_rows(cand_cap):
    # cand_cap 0: every radix pass over the row; 16: gathering only once the group is small
    big = torch.randn(2, 4, 700, generator=gen(1))
    big[:, :, 100:300] = 0.25  # a block of equal scores straddling the threshold
    logits = big[:, :, :613]   # strided rows (row stride 700 > S)
    for k in (1, 150, 613, 700):
        got = emulated_topk(logits, k, cand_cap)
        assert torch.equal(got, reference.topk_indices(logits, k)), (k, cand_cap)


# ---------------------------------------------------------------------------------------------
# indexer_logits forward
# ---------------------------------------------------------------------------------------------


def indexer_inputs(B, T, S, Hi, Di, dtype, seed, strided=False, quantized=False):
    g = gen(seed)
    if quantized:  # integer-valued: every product and sum is exact, scores tie exactly
        q = torch.randint(-2, 3, (B, T, Hi, Di + 3 if strided else Di), generator=g).to(dtype)
        k = torch.randint(-2, 3, (B, S, Di + 8 if strided else Di), generator=g).to(dtype)
        w = torch.randint(-1, 3, (B, T, Hi), generator=g).float()
    else:
        q = torch.randn(B, T, Hi, Di + 3 if strided else Di, generator=g).to(dtype)
        k = torch.randn(B, S, Di + 8 if strided else Di, generator=g).to(dtype)
        w = torch.randn(B, T, Hi, generator=g).float()
    if strided:
        q, k = q[..., 1:Di + 1], k[..., :Di]
    return q, k, w


def emulated_logits(q, k, w, scale, causal, smem_limit=227 * 1024, k_scale=None, key_start=None, key_end=None):
    meta, tensors = emulator.indexer_case(q, k, w, scale, causal, smem_limit, k_scale, key_start, key_end)
    meta["op"] = "logits"
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    out, log = emulator.run(meta, tensors, {"out": (torch.float32, (B, T, S))})
    return out["out"], log


def engine(dtype, mma, vec16=False, converted=False):
    """The driver's line for the score engine it ran (with_score_engine's choice)."""
    return (f"engine={'mma' if mma else 'simt'} dtype={emulator.dtype_name(dtype)} vec16={int(vec16)} "
            f"converted={int(converted)}")


def clamped(r, S):
    """Key-range values as the kernels read them: clamped to [0, S]."""
    return None if r is None else r.clamp(0, S)


def check_logits(q, k, w, causal, expect_engine, smem_limit=227 * 1024, k_scale=None, key_start=None, key_end=None):
    scale = (q.shape[2] * q.shape[3]) ** -0.5
    got, log = emulated_logits(q, k, w, scale, causal, smem_limit, k_scale, key_start, key_end)
    assert emulator.launched(log, "engine=") == expect_engine, log
    ks = None if k_scale is None else k_scale.double()
    S = k.shape[1]
    ref = reference.indexer_logits(q.double(), k.double(), w.double(), scale, causal, k_scale=ks,
                                   key_start=clamped(key_start, S), key_end=clamped(key_end, S))
    masked = torch.isinf(ref)
    assert torch.equal(torch.isinf(got) & (got < 0), masked)
    # fp32 accumulation of exact products: error ~ eps32 * sum of |terms|
    bound = scale * torch.einsum("bth,bthd,bsd->bts", w.double().abs(), q.double().abs(), k.double().abs())
    if ks is not None:
        bound = bound * ks.abs()[:, None, :]
    err = (got.double() - ref).abs()[~masked]
    assert (err <= 1e-5 * bound[~masked] + 1e-30).all(), err.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hi,Di", [(8, 64), (20, 24), (72, 32), (1, 16)])
def test_logits_mma(dtype, Hi, Di):
    q, k, w = indexer_inputs(2, 5, 77, Hi, Di, dtype, seed=Hi + Di)
    check_logits(q, k, w, causal=True, expect_engine=engine(dtype, mma=True, vec16=True))


def test_logits_mma_unaligned_rows():
    q, k, w = indexer_inputs(1, 3, 130, 16, 17, torch.bfloat16, seed=3, strided=True)
    check_logits(q, k, w, causal=False, expect_engine=engine(torch.bfloat16, mma=True, vec16=False))
    q, k, w = indexer_inputs(1, 4, 70, 16, 32, torch.float16, seed=4, strided=True)  # offset rows
    check_logits(q, k, w, causal=True, expect_engine=engine(torch.float16, mma=True, vec16=False))


def test_logits_simt_float32():
    q, k, w = indexer_inputs(2, 3, 70, 20, 70, torch.float32, seed=5)
    check_logits(q, k, w, causal=True, expect_engine=engine(torch.float32, mma=False))
    q, k, w = indexer_inputs(1, 4, 9, 3, 5, torch.float32, seed=6, strided=True)
    check_logits(q, k, w, causal=False, expect_engine=engine(torch.float32, mma=False))


def test_logits_fallback_when_smem_too_small():
    # under DSA_EXT_CUDA_SMEM_LIMIT=8192 the tiles do not fit: float32 copies on the CUDA cores
    q, k, w = indexer_inputs(1, 3, 40, 16, 32, torch.bfloat16, seed=7)
    check_logits(q, k, w, causal=True, smem_limit=8192,
                 expect_engine=engine(torch.bfloat16, mma=False, converted=True))


def fp8_indexer_inputs(B, T, S, Hi, Di, seed, strided=False):
    """e4m3 q/k with float32 folded weights and key scales, as dsa_ext.fp8.indexer_inputs makes them."""
    q, k, w = indexer_inputs(B, T, S, Hi, Di, torch.float32, seed)
    q8, k8, ws, ks = dsa_fp8.indexer_inputs(q, k, w)
    if strided:  # rows 16-byte aligned or not, inside wider storage
        q8 = torch.cat([q8, q8[..., :16]], dim=-1)[..., :Di]
        k8 = torch.cat([k8[..., :1], k8], dim=-1)[..., 1:]
    return q8, k8, ws, ks


@pytest.mark.parametrize("Hi,Di", [(8, 64), (20, 32), (3, 128), (16, 24)])
def test_logits_mma_e4m3(Hi, Di):
    q8, k8, ws, ks = fp8_indexer_inputs(2, 5, 77, Hi, Di, seed=Hi * Di)
    expect = engine(torch.float8_e4m3fn, mma=True, vec16=Di % 16 == 0)
    check_logits(q8, k8, ws, causal=True, expect_engine=expect, k_scale=ks)


def test_logits_mma_e4m3_strided():
    q8, k8, ws, ks = fp8_indexer_inputs(1, 4, 70, 16, 32, seed=12, strided=True)
    check_logits(q8, k8, ws, causal=False, expect_engine=engine(torch.float8_e4m3fn, mma=True, vec16=False),
                 k_scale=ks)


def test_logits_long_prefix_chunks():
    # S > 512 keys: several key chunks per query tile, the masked part filled with -inf
    q, k, w = indexer_inputs(1, 7, 1100, 16, 16, torch.bfloat16, seed=8)
    check_logits(q, k, w, causal=True, expect_engine=engine(torch.bfloat16, mma=True, vec16=True))


# ---------------------------------------------------------------------------------------------
# fused indexer_topk
# ---------------------------------------------------------------------------------------------


def emulated_indexer_topk(q, k, w, topk, scale, causal, sm_count=132, budget=256 << 20, max_splits=1024,
                          min_split_keys=1024, key_start=None, key_end=None):
    """The fused top-k as indexer_topk.cu launches it on a device with sm_count SMs; max_splits and
    min_split_keys (1024 on a GPU) bound the splits of a row's keys (TopkLimits)."""
    meta, tensors = emulator.indexer_case(q, k, w, scale, causal, key_start=key_start, key_end=key_end)
    meta.update(op="indexer_topk", k=topk, sm_count=sm_count, budget=budget, max_splits=max_splits,
                min_split_keys=min_split_keys)
    B, T = q.shape[:2]
    out, log = emulator.run(meta, tensors, {"out": (torch.int32, (B, T, topk))})
    return out["out"], log


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("topk,sm_count,budget", [
    (1, 1, 256 << 20),       # one split, k = 1
    (40, 1, 256 << 20),      # compactions inside a split (capacity 104 < 300 keys)
    (40, 64, 256 << 20),     # splits (few query rows) merged by the selection kernel
    (40, 1, 3000),           # tiny budget: several launches over chunks of query rows
    (500, 1, 256 << 20),     # k > S: exactly dense rows, -1 padding
])
def test_indexer_topk_equals_unfused_with_ties(dtype, topk, sm_count, budget):
    q, k, w = indexer_inputs(1, 6, 300, 8, 16, dtype, seed=topk + sm_count, quantized=True)
    scale = 0.125
    for causal in (True, False):
        got, log = emulated_indexer_topk(q, k, w, topk, scale, causal, sm_count, budget)
        mma = dtype != torch.float32  # float32: the CUDA-core engine
        assert emulator.launched(log, "engine=") == engine(dtype, mma=mma, vec16=mma), log
        logits, _ = emulated_logits(q, k, w, scale, causal)
        assert torch.equal(got, reference.topk_indices(logits, topk)), (causal, log)
        # and the set is right for the exact scores (integer inputs: fp32 is exact)
        ref = reference.indexer_topk(q.double(), k.double(), w.double(), topk, scale, causal)
        assert torch.equal(got, ref), (causal, log)


def test_indexer_topk_e4m3_equals_unfused():
    q8, k8, ws, ks = fp8_indexer_inputs(1, 6, 300, 8, 32, seed=13)
    meta, tensors = emulator.indexer_case(q8, k8, ws, 0.125, True, k_scale=ks)
    meta.update(op="indexer_topk", k=40, sm_count=1, budget=256 << 20, max_splits=1024, min_split_keys=1024)
    got, log = emulator.run(meta, tensors, {"out": (torch.int32, (1, 6, 40))})
    assert emulator.launched(log, "engine=") == engine(torch.float8_e4m3fn, mma=True, vec16=True), log
    logits, _ = emulated_logits(q8, k8, ws, 0.125, True, k_scale=ks)
    assert torch.equal(got["out"], reference.topk_indices(logits, 40)), log


def test_indexer_topk_splits_need_many_keys():
    # kMinSplitKeys = 1024: S = 2100 allows 2 splits with sm_count large
    q, k, w = indexer_inputs(1, 2, 2100, 1, 16, torch.bfloat16, seed=11, quantized=True)
    got, log = emulated_indexer_topk(q, k, w, 100, 0.5, True, sm_count=64)
    assert "splits=2 " in log and "merge_levels=0" in log, log
    assert emulator.launched(log, "engine=") == engine(torch.bfloat16, mma=True, vec16=True), log
    ref = reference.indexer_topk(q.double(), k.double(), w.double(), 100, 0.5, True)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("B,T,S,topk,min_split_keys,sm_count,max_splits,plan", [
    # 66 splits of one key tile, k above a split's 64 keys: merge tree 66 -> 9 -> 2, final select
    (1, 1, 4200, 100, 1, 17, 1024, "capacity=64 splits=66 split_len=64 t_chunk=1 merge_levels=2"),
    # 2 x 3 rows (causal: the last 3 positions), 24 splits of 128 keys: each level-1 group keeps
    # its best 700 of up to 8 x 128 candidates
    (2, 3, 3000, 700, 64, 132, 1024, "capacity=128 splits=24 split_len=128 t_chunk=3 merge_levels=1"),
    # topk > S: every visible key, ascending, then -1 padding, through the tree
    (1, 4, 2500, 3000, 64, 132, 1024, "k=2500 capacity=128 splits=20 split_len=128 t_chunk=4 merge_levels=1"),
    # 8 splits (no tree): compactions inside a split (capacity 104 < 192 keys) and after its last tile
    (3, 1, 1500, 40, 128, 132, 1024, "capacity=104 splits=8 split_len=192 t_chunk=1 merge_levels=0"),
    # DSA_EXT_CUDA_TOPK_MAX_SPLITS=1: one block per row, as for many rows
    (1, 1, 1500, 40, 1, 132, 1, "capacity=104 splits=1 split_len=1536 t_chunk=1 merge_levels=0"),
])
def test_indexer_topk_decode_splits_equal_reference(B, T, S, topk, min_split_keys, sm_count, max_splits, plan):
    """Decoding shapes (few query rows over many keys, scaled down): a row's keys split over many
    blocks, candidates merged by the tree and the final selection. Integer inputs make every score
    exact and tie massively, so equal scores straddle split boundaries: the lower position must win
    exactly as in one selection over the row."""
    q, k, w = indexer_inputs(B, T, S, 8, 16, torch.bfloat16, seed=S + topk, quantized=True)
    scale = 0.125
    got, log = emulated_indexer_topk(q, k, w, topk, scale, True, sm_count, max_splits=max_splits,
                                     min_split_keys=min_split_keys)
    assert plan in emulator.launched(log, "plan "), log
    ref = reference.indexer_topk(q.double(), k.double(), w.double(), topk, scale, True)
    assert torch.equal(got, ref), log
    visible = torch.arange(T) + S - T + 1  # keys each query sees
    assert torch.equal((got >= 0).sum(-1), visible.clamp(max=topk).expand(B, T)), "padding: -1 after min(topk, visible)"


def test_indexer_topk_decode_tree_random_scores_and_float32():
    # random scores on the bfloat16 tensor cores and on the float32 CUDA-core engine, through a
    # two-level tree (66 splits), against topk_indices of the same emulated logits
    for dtype in (torch.bfloat16, torch.float32):
        q, k, w = indexer_inputs(2, 2, 4200, 4, 32, dtype, seed=21)
        for causal in (True, False):
            got, log = emulated_indexer_topk(q, k, w, 150, 0.2, causal, sm_count=132, min_split_keys=1)
            assert "merge_levels=2" in log, log
            logits, _ = emulated_logits(q, k, w, 0.2, causal)
            assert torch.equal(got, reference.topk_indices(logits, 150)), (dtype, causal, log)


# ---------------------------------------------------------------------------------------------
# indexer_logits backward
# ---------------------------------------------------------------------------------------------


def emulated_backward(grad, q, k, w, scale, causal, key_start=None, key_end=None):
    meta, tensors = emulator.indexer_case(q, k, w, scale, causal, key_start=key_start, key_end=key_end)
    gs, g_off = emulator.storage_of(grad)
    assert g_off == 0
    meta.update(op="backward", grad_batch_stride=grad.stride(0), grad_row_stride=grad.stride(1))
    tensors["g"] = gs
    B, T, Hi, Di = q.shape
    S = k.shape[1]
    out, log = emulator.run(meta, tensors, {"grad_q": (q.dtype, (B, T, Hi, Di)), "grad_k": (q.dtype, (B, S, Di)),
                                            "grad_w": (torch.float32, (B, T, Hi))})
    return out["grad_q"], out["grad_k"], out["grad_w"], log


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,S,Hi,Di,causal", [
    (2, 5, 77, 8, 32, True),
    (1, 9, 70, 20, 24, False),
    (1, 3, 130, 40, 128, True),
    (1, 4, 66, 16, 17, True),   # unaligned rows: plain copies
])
def test_backward(dtype, B, T, S, Hi, Di, causal):
    q, k, w = indexer_inputs(B, T, S, Hi, Di, dtype, seed=T * S + Hi)
    scale = (Hi * Di) ** -0.5
    grad = torch.randn(B, T, S, generator=gen(99))
    if causal:  # masked positions hold garbage that must be ignored
        grad.masked_fill_(~reference.causal_mask(T, S), float("nan"))
    gq, gk, gw, log = emulated_backward(grad, q, k, w, scale, causal)
    assert emulator.launched(log, "engine=") == engine(dtype, mma=True, vec16=Di * 2 % 16 == 0), log
    qd, kd, wd = (x.double().requires_grad_() for x in (q, k, w))
    ref = reference.indexer_logits(qd, kd, wd, scale, causal)
    ref.backward(torch.where(torch.isinf(ref), 0.0, grad.double()))
    # The second GEMM of each gradient multiplies by g rounded to the input dtype: relative
    # error of the sums ~ the dtype's epsilon (2^-8 bf16, 2^-11 f16), as in any low-precision
    # backward; the check is on the norm of the error relative to the norm of the gradient.
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for name, got, want in (("dq", gq, qd.grad), ("dk", gk, kd.grad), ("dw", gw, wd.grad)):
        err = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
        assert err < tol, (name, err.item(), log)
    # dw is computed in fp32 from exact products: much tighter
    assert ((gw.double() - wd.grad).norm() / wd.grad.norm()) < 1e-4


@pytest.mark.parametrize("Hi,Di,H,Hkv,expected", [
    (4, 64, 16, 1, "fits mma=1 e4m3=1 bwd=1 attn_mma=1"),           # control: small shapes take the tensor cores
    (1, 2**32 + 8, 16, 16, "fits mma=0 e4m3=0 bwd=0 attn_mma=1"),   # Di once narrowed to 8: wrong scores
    (1, 2**32 + 128, 16, 16, "fits mma=0 e4m3=0 bwd=0 attn_mma=1"),
    (1, 2**31 + 8, 16, 16, "fits mma=0 e4m3=0 bwd=0 attn_mma=1"),   # negative once narrowed: UBSan aborted
    (4, 64, 2**32 + 16, 1, "fits mma=1 e4m3=1 bwd=1 attn_mma=0"),   # the group once narrowed to 16 heads
])
def test_engine_choice_compares_64bit_dims(Hi, Di, H, Hkv, expected):
    """The host's engine choice for dims beyond int32 (too large to allocate here, not on an H200):
    the tensor-core tiles hold them in int, so such shapes must take the int64 paths."""
    _, log = emulator.run(dict(op="fits", Hi=Hi, Di=Di, H=H, Hkv=Hkv, Dqk=64, smem_limit=227 * 1024), {}, {})
    assert emulator.launched(log, "fits ") == expected


# ---------------------------------------------------------------------------------------------
# per-query key ranges (the kernels clamp unchecked values to [0, S])
# ---------------------------------------------------------------------------------------------


def emu_ranges(B, T, S, seed, kind):
    """key_start, key_end [B, T] int32: packed documents over the S positions (the queries are the
    last T), or random ranges with empty rows and values outside [0, S] (clamped by the kernels)."""
    g = gen(seed)
    if kind == "packed":
        bounds = [0, S // 5, S // 5 + 1, S // 2, S - 3, S]  # a document of length 1, long ones
        start = torch.tensor([max(b for b in bounds if b <= p) for p in range(S)])
        end = torch.tensor([min(b for b in bounds if b > p) for p in range(S)])
        return start[S - T:].expand(B, T).int().contiguous(), end[S - T:].expand(B, T).int().contiguous()
    start = torch.randint(-3, S + 4, (B, T), generator=g)
    end = torch.randint(-3, S + 4, (B, T), generator=g)
    return start.int(), end.int()


@pytest.mark.parametrize("kind", ["packed", "random"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_logits_key_ranges(kind, dtype):
    # S > 512: several key chunks per query tile; most of them outside the ranges
    B, T, S = 2, 9, 1100
    q, k, w = indexer_inputs(B, T, S, 16, 32, dtype, seed=21)
    ks, ke = emu_ranges(B, T, S, seed=22, kind=kind)
    mma = dtype != torch.float32
    check_logits(q, k, w, causal=True, key_start=ks, key_end=ke, expect_engine=engine(dtype, mma=mma, vec16=mma))
    check_logits(q, k, w, causal=False, key_start=ks, key_end=None, expect_engine=engine(dtype, mma=mma, vec16=mma))


@pytest.mark.parametrize("kind", ["packed", "random"])
@pytest.mark.parametrize("topk,sm_count,budget,min_split_keys", [
    (40, 1, 256 << 20, 1024), (40, 64, 256 << 20, 1024), (20, 1, 3000, 1024),
    (40, 64, 256 << 20, 256),  # decoding's split path: splits of 256 keys, a merge tree, splits wholly outside a range
])
def test_indexer_topk_key_ranges(kind, topk, sm_count, budget, min_split_keys):
    # S = 8300 allows several key splits with many SMs; quantized inputs: exact scores, many ties
    B, T, S = 1, 6, 8300
    q, k, w = indexer_inputs(B, T, S, 8, 16, torch.bfloat16, seed=23, quantized=True)
    ks, ke = emu_ranges(B, T, S, seed=24, kind=kind)
    got, log = emulated_indexer_topk(q, k, w, topk, 0.125, True, sm_count, budget, min_split_keys=min_split_keys,
                                     key_start=ks, key_end=ke)
    assert emulator.launched(log, "engine=") == engine(torch.bfloat16, mma=True, vec16=True), log
    if min_split_keys < 1024:
        assert "merge_levels=0" not in emulator.launched(log, "plan "), log
    ref = reference.indexer_topk(q.double(), k.double(), w.double(), topk, 0.125, True,
                                 key_start=clamped(ks, S), key_end=clamped(ke, S))
    assert torch.equal(got, ref), log


@pytest.mark.parametrize("kind", ["packed", "random"])
@pytest.mark.parametrize("Hi", [8, 40])  # 4 queries per dq block; one query over 3 m-tiles
def test_backward_key_ranges(kind, Hi):
    B, T, S, Di = 1, 9, 300, 32
    q, k, w = indexer_inputs(B, T, S, Hi, Di, torch.bfloat16, seed=25 + Hi)
    ks, ke = emu_ranges(B, T, S, seed=26, kind=kind)
    scale = (Hi * Di) ** -0.5
    r = dict(key_start=clamped(ks, S), key_end=clamped(ke, S))
    visible = reference.indexer_logits(q.double(), k.double(), w.double(), scale, True, **r).isfinite()
    grad = torch.randn(B, T, S, generator=gen(27)).masked_fill(~visible, float("nan"))  # ignored there
    gq, gk, gw, log = emulated_backward(grad, q, k, w, scale, True, key_start=ks, key_end=ke)
    assert emulator.launched(log, "engine=") == engine(torch.bfloat16, mma=True, vec16=True), log
    qd, kd, wd = (x.double().requires_grad_() for x in (q, k, w))
    reference.indexer_logits(qd, kd, wd, scale, True, **r).backward(torch.nan_to_num(grad.double(), nan=0.0))
    for name, got, want in (("dq", gq, qd.grad), ("dk", gk, kd.grad), ("dw", gw, wd.grad)):
        assert torch.isfinite(got).all(), name
        err = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
        assert err < 2e-2, (name, err.item(), log)
