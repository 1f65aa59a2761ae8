"""The CUDA backend's streamed indexer_kl_loss (csrc/aten/indexer_kl_loss_streamed.h, plain
ATen code) run on CPU tensors, against the CPU kernel of the same op and the float64
reference: dense (causal or not) and sparse forms, duplicates and -1 holes, a given attn_lse,
empty rows, several query chunks and key blocks."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulator  # noqa: E402

from dsa_ext import ranges, reference  # noqa: E402

pytestmark = [pytest.mark.emulation, pytest.mark.slow]


@pytest.fixture(scope="module")
def ext():
    return emulator.load_binding("dsa_kl_streamed_test", "kl_streamed_binding.cpp",
                                 ["host.cpp", "checks.cpp", "host_kl_loss.cpp"])


def make(B, T, S, Hi, Di, H, Hkv, Dqk, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(B, T, Hi, Di).to(dtype), r(B, S, Di).to(dtype), r(B, T, Hi), r(B, T, H, Dqk).to(dtype), \
        r(B, S, Hkv, Dqk).to(dtype)


def sparse_indices(B, T, S, K, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, S, (B, T, K), generator=g)
    idx[torch.rand(B, T, K, generator=g) < 0.25] = -1
    idx[:, 0, :] = -1        # an empty row
    idx[:, -1, 1] = idx[:, -1, 0] = min(2, S - 1)  # a duplicate
    return idx.to(torch.int32)


SHAPES = [  # B, T, S, Hi, Di, H, Hkv, Dqk
    (2, 7, 13, 3, 24, 4, 2, 12),
    (1, 13, 13, 4, 16, 3, 1, 20),
    (1, 40, 700, 5, 40, 8, 2, 64),  # more than one key block (512)
]


# (temporaries budget in bytes, keys per block): the defaults, and many tiny chunks and blocks
SIZES = [(256 << 20, 512), (1, 7)]


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("form", ["causal", "full", "sparse", "given_lse"])
def test_streamed_kl_matches_cpu_kernel(ext, sizes, dtype, shape, form):
    B, T, S, Hi, Di, H, Hkv, Dqk = shape
    q_idx, k_idx, w, q, k = make(*shape, dtype, seed=sum(shape))
    idx_scale, attn_scale = (Hi * Di) ** -0.5, Dqk ** -0.5
    indices = sparse_indices(B, T, S, 37, seed=5) if form == "sparse" else None
    causal = form != "full"
    attn_lse = None
    if form == "given_lse":
        attn_lse = torch.ops.dsa.indexer_kl_loss(q_idx, k_idx, w, q, k, None, idx_scale, attn_scale, True, None)[2]
    got = ext.kl_forward(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, attn_lse, *sizes)
    cpu = torch.ops.dsa.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, attn_lse)
    for a, b, name in zip(got, cpu, ("loss", "idx_lse", "attn_lse")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name)
    # and the float64 reference on the same (rounded) inputs
    ref = reference.indexer_kl_loss(q_idx.double(), k_idx.double(), w.double(), q.double(), k.double(), indices,
                                    idx_scale, attn_scale, causal, None if attn_lse is None else attn_lse.double())
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-4, atol=1e-5)

    grad = torch.randn(B, T)
    gb = ext.kl_backward(grad, q_idx, k_idx, w, q, k, indices, got[1], got[2], idx_scale, attn_scale, causal,
                         *sizes)
    cb = torch.ops.dsa.indexer_kl_loss_backward(grad, q_idx, k_idx, w, q, k, indices, cpu[1], cpu[2], idx_scale,
                                                attn_scale, causal)
    for a, b, name in zip(gb, cb, ("q_idx", "k_idx", "w")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.float().abs().max().item(), msg=name)


def test_streamed_kl_gradient_against_float64_reference(ext):
    shape = (1, 9, 30, 3, 8, 4, 2, 8)
    B, T, S, Hi, Di, H, Hkv, Dqk = shape
    q_idx, k_idx, w, q, k = make(*shape, torch.float32, seed=3)
    indices = sparse_indices(B, T, S, 12, seed=4)
    for ind, causal in ((None, True), (indices, True)):
        loss, idx_lse, attn_lse = ext.kl_forward(q_idx, k_idx, w, q, k, ind, 0.3, 0.4, causal, None, 1, 5)
        grad = torch.randn(B, T)
        got = ext.kl_backward(grad, q_idx, k_idx, w, q, k, ind, idx_lse, attn_lse, 0.3, 0.4, causal, 1, 5)
        leaves = [x.double().requires_grad_() for x in (q_idx, k_idx, w)]
        ref = reference.indexer_kl_loss(*leaves, q.double(), k.double(), ind, 0.3, 0.4, causal)
        want = torch.autograd.grad(ref, leaves, grad.double())
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("form", ["dense", "sparse"])
@pytest.mark.parametrize("kind", ["packed", "random"])
def test_streamed_kl_key_ranges(ext, sizes, form, kind):
    """Packed documents (the dense form's chunks stop at document boundaries) and random ranges
    with empty rows, against the CPU kernel and the float64 reference."""
    B, T, S, Hi, Di, H, Hkv, Dqk = shape = (2, 40, 700, 5, 40, 8, 2, 64)
    q_idx, k_idx, w, q, k = make(*shape, torch.float32, seed=11)
    g = torch.Generator().manual_seed(12)
    if kind == "packed":
        key_start, key_end = (r[:, S - T:].expand(B, T).contiguous()
                              for r in ranges.from_cu_seqlens(torch.tensor([0, 600, 671, 672, 690, S])))
    else:
        key_start = torch.randint(0, S + 1, (B, T), generator=g).int()
        key_end = torch.randint(0, S + 1, (B, T), generator=g).int()
    indices = sparse_indices(B, T, S, 37, seed=13) if form == "sparse" else None
    args = (q_idx, k_idx, w, q, k, indices, 0.2, 0.3, True)
    got = ext.kl_forward(*args, None, *sizes, key_start, key_end)
    cpu = torch.ops.dsa.indexer_kl_loss(*args, None, key_start, key_end)
    for a, b, name in zip(got, cpu, ("loss", "idx_lse", "attn_lse")):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name)
    ref = reference.indexer_kl_loss(*(x.double() for x in (q_idx, k_idx, w, q, k)), indices, 0.2, 0.3, True,
                                    key_start=key_start, key_end=key_end)
    torch.testing.assert_close(got[0].double(), ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn(B, T, generator=g)
    gb = ext.kl_backward(grad, *args[:6], got[1], got[2], 0.2, 0.3, True, *sizes, key_start, key_end)
    cb = torch.ops.dsa.indexer_kl_loss_backward(grad, *args[:6], cpu[1], cpu[2], 0.2, 0.3, True, key_start, key_end)
    for a, b, name in zip(gb, cb, ("q_idx", "k_idx", "w")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)
