"""The deterministic sparse_attention backward of the CUDA backend (used under
torch.use_deterministic_algorithms): its host code (csrc/cuda/attention/sparse_attention_deterministic.h:
token slices, contribution rows, ordered sums) driving the emulated kernels, on CPU tensors.

Checks: gradients against the float64 reference (bfloat16/float16 within twice the reference's own
error in that precision, float32 tightly), and bit-identical results whatever the slice size
(one token per slice, across batches, or everything in one slice), which pins the slicing and
the contribution-row layout the kernels write."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulator  # noqa: E402
from test_emulated_attention import assert_within, make_case, reference_grads  # noqa: E402

from dsa_ext import reference  # noqa: E402

pytestmark = emulator.MARKS

@pytest.fixture(scope="module")
def ext():
    src_dir, digest = emulator.source_dir("deterministic")
    return emulator.load_binding(f"dsa_deterministic_{digest}", "deterministic_binding.cpp", ["host.cpp", "checks.cpp"],
                                 [src_dir, emulator.CUDA_INCLUDE], ["-pthread"])


def backward(ext, q, k, v, idx, use_mma, contrib_bytes, smem_limit=227 * 1024, seed=7):
    scale = q.shape[-1] ** -0.5
    out, lse = reference.sparse_attention(q.double(), k.double(), v.double(), idx, scale, return_lse=True)
    out, lse = out.to(q.dtype), lse.float() if q.dtype != torch.float64 else lse
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g).to(q.dtype)
    glse = torch.randn(lse.shape, generator=g).to(lse.dtype)
    got = ext.deterministic_backward(dout, glse, q, k, v, idx, out, lse, scale, use_mma, smem_limit, contrib_bytes)
    return got, dout, glse, scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tensor_core_path(ext, dtype):
    q, k, v, idx = make_case(2, 5, 40, 8, 2, 64, 64, 37, dtype, seed=11)
    (dq, dk, dv), dout, glse, scale = backward(ext, q, k, v, idx, True, contrib_bytes=1)  # a token per slice
    _, _, rq, rk, rv = reference_grads(q, k, v, idx, scale, dout, glse, upcast=True)
    _, _, lq, lk, lv = reference_grads(q, k, v, idx, scale, dout, glse, upcast=False)
    assert_within(dq, rq, lq, "grad_q")
    assert_within(dk, rk, lk, "grad_k")
    assert_within(dv, rv, lv, "grad_v")
    (dq1, dk1, dv1), *_ = backward(ext, q, k, v, idx, True, contrib_bytes=1 << 30)  # one slice per batch
    assert torch.equal(dq, dq1) and torch.equal(dk, dk1) and torch.equal(dv, dv1)


def test_tensor_core_mla_chunks_and_per_kv_head_indices(ext):
    # 128 heads on one latent (two chunks per token, v read from the K tile)
    q, k, v, idx = make_case(1, 3, 50, 128, 1, 576, 512, 40, torch.bfloat16, seed=12, v_in_k=True)
    (dq, dk, dv), dout, glse, scale = backward(ext, q, k, v, idx, True, contrib_bytes=1)
    _, _, rq, rk, _ = reference_grads(q, k, v, idx, scale, dout, glse, upcast=True)
    _, _, lq, lk, _ = reference_grads(q, k, v, idx, scale, dout, glse, upcast=False)
    assert_within(dq, rq, lq, "grad_q")
    dk = dk.clone()
    dk[..., :512] += dv
    assert_within(dk, rk, lk, "grad_k (+ grad_v)")
    # one index row per kv head, 16-row blocks in two chunks under a small shared-memory limit
    q, k, v, idx = make_case(1, 4, 30, 32, 2, 64, 32, 20, torch.bfloat16, seed=13, per_head=True)
    (dq, dk, dv), dout, glse, scale = backward(ext, q, k, v, idx, True, contrib_bytes=1, smem_limit=20 * 1024)
    _, _, rq, rk, rv = reference_grads(q, k, v, idx, scale, dout, glse, upcast=True)
    _, _, lq, lk, lv = reference_grads(q, k, v, idx, scale, dout, glse, upcast=False)
    assert_within(dk, rk, lk, "grad_k")
    assert_within(dv, rv, lv, "grad_v")


def test_rowwise_path_float32(ext):
    q, k, v, idx = make_case(2, 6, 19, 6, 2, 20, 12, 9, torch.float32, seed=14)
    (dq, dk, dv), dout, glse, scale = backward(ext, q, k, v, idx, False, contrib_bytes=4096)
    _, _, rq, rk, rv = reference_grads(q, k, v, idx, scale, dout, glse, upcast=True)
    for got, want, name in ((dq, rq, "grad_q"), (dk, rk, "grad_k"), (dv, rv, "grad_v")):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=name)
    (dq1, dk1, dv1), *_ = backward(ext, q, k, v, idx, False, contrib_bytes=1 << 30)
    assert torch.equal(dk, dk1) and torch.equal(dv, dv1) and torch.equal(dq, dq1)
