"""The CUDA sparse_attention kernels (tensor-core forward/backward, row-wise forward/backward,
the backward's delta) run from their source on the CPU emulator, against the float64 reference.

The launch code mirrors sparse_attention.cu (driver.cpp), including its choice of kernels
(dtype, head dims, row alignment, and the block shape of choose_mma_shape, shared with the host
code); every case asserts the path it took. Errors of the bfloat16/float16 paths are bounded by
twice the error of the reference computed in that precision (flash-attention's rule); the
float32 row-wise path by float32 rounding.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulator  # noqa: E402

from dsa_ext import reference  # noqa: E402

pytestmark = emulator.MARKS


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_case(B, T, S, H, Hkv, Dqk, Dv, K, dtype, seed, v_in_k=False, per_head=False):
    """Inputs with -1 slots, duplicate positions and one row with no valid index."""
    g = gen(seed)
    q = torch.randn(B, T, H, Dqk, generator=g).to(dtype)
    if v_in_k:
        k = torch.randn(B, S, Hkv, Dqk, generator=g).to(dtype)
        v = k[..., :Dv]
    else:
        k = torch.randn(B, S, Hkv, Dqk, generator=g).to(dtype)
        v = torch.randn(B, S, Hkv, Dv, generator=g).to(dtype)
    shape = (B, T, Hkv, K) if per_head else (B, T, K)
    idx = torch.randint(0, S, shape, generator=g)
    idx[torch.rand(shape, generator=g) < 0.2] = -1
    idx[..., 1] = idx[..., 0]  # a duplicate in every row
    idx[0, T - 1] = -1  # a row (or kv head rows) without any valid key
    return q, k, v, idx.to(torch.int32)


def emulate_forward(q, k, v, idx, scale, smem_limit=227 * 1024, min_warps=4, sm_count=132, max_splits=64):
    meta, tensors = emulator.attention_case(q, k, v, idx, scale, smem_limit, min_warps, sm_count, max_splits)
    meta["op"] = "attn_fwd"
    B, T, H = q.shape[:3]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    got, log = emulator.run(meta, tensors, {"out": (q.dtype, (B, T, H, v.shape[-1])), "lse": (acc, (B, T, H))})
    return got["out"], got["lse"], log


def emulate_backward(q, k, v, idx, scale, out, lse, dout, glse, smem_limit=227 * 1024, min_warps=4):
    meta, tensors = emulator.attention_case(q, k, v, idx, scale, smem_limit, min_warps)
    meta.update(op="attn_bwd", grad_lse=glse is not None, do_batch_stride=dout.stride(0), do_row_stride=dout.stride(1),
                do_head_stride=dout.stride(2))
    tensors.update(out=out, lse=lse, dout=dout)
    if glse is not None:
        tensors["glse"] = glse
    acc = torch.float32
    B, T, H, Dqk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    got, log = emulator.run(meta, tensors, {"grad_q": (q.dtype, (B, T, H, Dqk)), "grad_k": (acc, (B, S, Hkv, Dqk)),
                                            "grad_v": (acc, (B, S, Hkv, Dv))})
    return got["grad_q"], got["grad_k"], got["grad_v"], log


def reference_grads(q, k, v, idx, scale, dout, glse, upcast):
    """Gradients of <out, dout> + <lse, glse> from the reference: float64, or in q's dtype."""
    dt = torch.float64 if upcast else q.dtype
    qq, kk = q.to(dt).requires_grad_(), k.to(dt).requires_grad_()
    vv = kk[..., :v.shape[-1]] if v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() else \
        v.to(dt).requires_grad_()
    out, lse = reference.sparse_attention(qq, kk, vv, idx, scale, return_lse=True, upcast=upcast)
    loss = (out.to(dt) * dout.to(dt)).sum()
    if glse is not None:
        loss = loss + (lse.to(dt) * glse.to(dt)).sum()
    leaves = (qq, kk) if vv.grad_fn is not None else (qq, kk, vv)
    grads = torch.autograd.grad(loss, leaves)
    gv = grads[2] if len(grads) == 3 else None
    return out, lse, grads[0], grads[1], gv


def assert_within(got, ref64, ref_low, name, factor=2.0, atol=1e-5):
    got, ref64, ref_low = (x.double() for x in (got, ref64, ref_low))
    err = (got - ref64).abs().max().item()
    ref_err = (ref_low - ref64).abs().max().item()
    assert err <= factor * ref_err + atol, f"{name}: error {err:.3e} > {factor} x reference error {ref_err:.3e}"


def assert_path(log, path, expect=None):
    """The driver launched the `path` kernels ("mma" or "rowwise"), with `expect` in the line that
    says so (the block shape, for "mma")."""
    line = emulator.launched(log, "path=")
    assert line.split()[0] == f"path={path}", line
    assert expect is None or expect in line, line


def check_forward(q, k, v, idx, path, smem_limit=227 * 1024, expect=None, min_warps=4, sm_count=132, max_splits=64,
                  splits=None):
    """The emulated forward against the reference; splits: the index-slot splits the driver must
    have taken ("attn_splits=N" line of the tensor-core path). Returns out, lse, scale."""
    scale = q.shape[-1] ** -0.5
    out, lse, log = emulate_forward(q, k, v, idx, scale, smem_limit, min_warps, sm_count, max_splits)
    assert_path(log, path, expect)
    if splits is not None:
        assert emulator.launched(log, "attn_splits=").split()[0] == f"attn_splits={splits}", log
    ref_out, ref_lse = reference.sparse_attention(q.double(), k.double(), v.double(), idx, scale, return_lse=True)
    low_out, low_lse = reference.sparse_attention(q, k, v, idx, scale, return_lse=True, upcast=False)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows without keys must get lse -inf"
    assert out[empty.unsqueeze(-1).expand_as(out)].eq(0).all(), "rows without keys must get out 0"
    assert_within(out, ref_out, low_out, "out")
    assert_within(lse[~empty], ref_lse[~empty], low_lse[~empty], "lse")
    return out, lse, scale


def check(q, k, v, idx, path, smem_limit=227 * 1024, with_grad_lse=True, expect=None, min_warps=4):
    out, lse, scale = check_forward(q, k, v, idx, path, smem_limit, expect, min_warps)

    g = gen(99)
    dout = torch.randn(out.shape, generator=g).to(q.dtype)
    glse = torch.randn(lse.shape, generator=g).float() if with_grad_lse else None
    dq, dk, dv, blog = emulate_backward(q, k, v, idx, scale, out, lse, dout, glse, smem_limit, min_warps)
    assert_path(blog, path, expect)
    _, _, rq, rk, rv = reference_grads(q, k, v, idx, scale, dout, glse, upcast=True)
    _, _, lq, lk, lv = reference_grads(q, k, v, idx, scale, dout, glse, upcast=False)
    assert torch.isfinite(dq.double()).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert_within(dq, rq, lq, "grad_q")
    if rv is None:  # v is a view of k: its gradient is part of k's
        Dv = v.shape[-1]
        dk = dk.clone()
        dk[..., :Dv] += dv
        assert_within(dk, rk, lk, "grad_k (+ grad_v)")
    else:
        assert_within(dk, rk, lk, "grad_k")
        assert_within(dv, rv, lv, "grad_v")


# ---------------------------------------------------------------------------------------------
# tensor-core kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_gqa_two_tiles(dtype):
    # group 4 in 16 rows, K = 37: a full and a partial key tile, -1 slots, duplicates, an empty row;
    # one row warp, so the columns are split over 4 column warps (one pair each)
    check(*make_case(1, 3, 40, 8, 2, 64, 64, 37, dtype, seed=1), "mma", expect="col_warps=4 chunks=1 stages=2")


def test_mma_gqa_narrow_blocks():
    # DSA_EXT_CUDA_MIN_WARPS=1: the one-warp blocks (all columns in one warp)
    check(*make_case(1, 3, 40, 8, 2, 128, 128, 40, torch.bfloat16, seed=8), "mma", expect="col_warps=1",
          min_warps=1)


def test_mma_uneven_head_dims_and_per_kv_head_indices():
    # Dqk = 96 and Dv = 40 (padded to 64 in shared memory), one index row per kv head
    check(*make_case(2, 2, 33, 4, 2, 96, 40, 35, torch.bfloat16, seed=2, per_head=True), "mma")


def test_mma_mla_two_chunks_v_in_k():
    # DeepSeek's shape in small: 128 heads on one 576-wide latent, v = k[..., :512] read from the
    # K tile; 4 column warps x 4 row warps, two blocks (chunks) per token
    check(*make_case(1, 2, 50, 128, 1, 576, 512, 40, torch.bfloat16, seed=3, v_in_k=True), "mma",
          expect="chunks=2")


def test_mma_one_stage_when_shared_memory_is_small():
    # 32 heads per kv head, D = 128: under a 40 KiB limit the forward takes one stage, the
    # backward one stage and 16-row blocks (two chunks per token)
    check(*make_case(1, 2, 70, 32, 1, 128, 128, 64, torch.bfloat16, seed=4), "mma", smem_limit=40 * 1024,
          expect="stages=1")


# ---------------------------------------------------------------------------------------------
# decoding: one query per sequence, the forward split over index slots
# ---------------------------------------------------------------------------------------------


def decode_case(B, S, H, Hkv, Dqk, Dv, K, seed, v_in_k=False):
    """T = 1 inputs as make_case for B >= 3 sequences: the first without any valid index, the
    second with valid indices in its first 40 slots only (its later splits see nothing), the
    others with valid indices throughout."""
    q, k, v, idx = make_case(B, 1, S, H, Hkv, Dqk, Dv, K, torch.bfloat16, seed, v_in_k=v_in_k)
    idx[1, 0, 40:] = -1
    return q, k, v, idx


def test_decode_mla_split_over_index_slots():
    # MLA (128 heads on one 576-wide latent, v in k) at T = 1: 2 blocks per sequence, so on 132 SMs
    # the 13 key tiles of K = 400 split 3 ways (5, 5, 3 tiles: tiles / kMinSplitTiles caps it);
    # one row with no valid key (every split empty), one whose later splits are empty
    case = decode_case(3, 600, 128, 1, 576, 512, 400, seed=31, v_in_k=True)
    check_forward(*case, "mma", expect="chunks=2", splits=3)


@pytest.mark.parametrize("sm_count,max_splits,splits", [
    (132, 64, 4),   # 8 kv heads x B = 3: 24 blocks, K = 512 (16 tiles) split 4 ways
    (132, 3, 3),    # DSA_EXT_CUDA_ATTN_MAX_SPLITS=3: 3 splits of 6, 6 and 4 tiles
    (132, 1, 1),    # DSA_EXT_CUDA_ATTN_MAX_SPLITS=1: the unsplit kernel
    (8, 64, 1),     # 24 blocks already fill 8 SMs: no split
])
def test_decode_gqa_split_over_index_slots(sm_count, max_splits, splits):
    # GQA (32 heads on 8 kv heads, D = 128) at T = 1, B = 3
    case = decode_case(3, 700, 32, 8, 128, 128, 512, seed=32)
    check_forward(*case, "mma", expect="chunks=1", sm_count=sm_count, max_splits=max_splits, splits=splits)


# ---------------------------------------------------------------------------------------------
# row-wise kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Dqk,Dv", [(20, 12), (32, 16)])
def test_rowwise_float32(Dqk, Dv):
    # float32 takes the row-wise kernels whatever the head dims: odd ones (lanes past the row's
    # end) and multiples of 8, which 16-bit inputs would take to the tensor cores
    q, k, v, idx = make_case(2, 3, 17, 4, 2, Dqk, Dv, 7, torch.float32, seed=5)
    scale = Dqk ** -0.5
    out, lse, log = emulate_forward(q, k, v, idx, scale)
    assert_path(log, "rowwise")
    ref_out, ref_lse = reference.sparse_attention(q.double(), k.double(), v.double(), idx, scale, return_lse=True)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], rtol=1e-5, atol=1e-6)
    dout, glse = torch.randn_like(out), torch.randn_like(lse)
    dq, dk, dv, blog = emulate_backward(q, k, v, idx, scale, out, lse, dout, glse)
    assert_path(blog, "rowwise")
    _, _, rq, rk, rv = reference_grads(q, k, v, idx, scale, dout, glse, upcast=True)
    for got, want, name in ((dq, rq, "grad_q"), (dk, rk, "grad_k"), (dv, rv, "grad_v")):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=name)


def test_rowwise_bfloat16_odd_head_dims():
    # head dims that are not multiples of 8: no 16-byte row pieces for the tensor cores
    check(*make_case(1, 3, 21, 4, 1, 20, 12, 9, torch.bfloat16, seed=6), "rowwise")


def test_rowwise_bfloat16_misaligned_rows():
    # q a view one element into its storage: its rows are not 16-byte aligned
    q, k, v, idx = make_case(1, 3, 21, 4, 1, 24, 16, 9, torch.bfloat16, seed=7)
    wide = torch.zeros(*q.shape[:3], q.shape[3] + 1, dtype=q.dtype)
    wide[..., 1:] = q
    check(wide[..., 1:], k, v, idx, "rowwise")


def test_rowwise_float16_when_no_tile_fits():
    # D = 128 under an 8 KiB limit: no tensor-core block fits, the row-wise rows do
    check(*make_case(1, 2, 30, 4, 1, 128, 128, 16, torch.float16, seed=9), "rowwise", smem_limit=8 * 1024)
