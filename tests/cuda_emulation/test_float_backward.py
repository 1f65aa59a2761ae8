"""The float32 path of the CUDA indexer_logits_backward (csrc/aten/indexer_backward_float.h,
plain ATen code) run on CPU tensors against the float64 reference, in one chunk of queries and
in chunks of one query (tiny budget)."""
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
    return emulator.load_binding("dsa_float_backward_test", "float_backward_binding.cpp", ["host.cpp", "checks.cpp"])


@pytest.mark.parametrize("budget", [256 << 20, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,S,Hi,Di,causal", [(2, 5, 9, 3, 7, True), (1, 4, 4, 2, 5, False), (1, 6, 30, 4, 8, True)])
def test_float_backward(ext, budget, dtype, B, T, S, Hi, Di, causal):
    g = torch.Generator().manual_seed(B * T * S)
    q = torch.randn(B, T, Hi, Di + 2, generator=g).to(dtype)[..., 1:-1]  # strided
    k = torch.randn(B, S, Di, generator=g).to(dtype)
    w = torch.randn(B, T, Hi, generator=g)
    grad = torch.randn(B, T, S, generator=g)
    if causal:
        grad.masked_fill_(~reference.causal_mask(T, S), float("nan"))
    scale = 0.3
    gq, gk, gw = ext.indexer_backward_float32(grad, q, k, w, scale, causal, budget)
    qd, kd, wd = (x.double().requires_grad_() for x in (q, k, w))
    ref = reference.indexer_logits(qd, kd, wd, scale, causal)
    ref.backward(torch.where(torch.isinf(ref), 0.0, grad.double()))
    assert gq.dtype == dtype and gk.dtype == dtype and gw.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in ((gq, qd.grad), (gk, kd.grad), (gw, wd.grad)):
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("budget", [256 << 20, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_float_backward_key_ranges(ext, budget, causal):
    """Packed documents and random ranges with empty rows: each chunk of queries meets only the
    keys its rows see (plan_query_chunks); gradients outside the ranges (NaN here) are ignored."""
    B, T, S, Hi, Di = 2, 40, 50, 3, 8
    g = torch.Generator().manual_seed(7)
    q, k, w = torch.randn(B, T, Hi, Di, generator=g), torch.randn(B, S, Di, generator=g), torch.randn(B, T, Hi, generator=g)
    packed = ranges.from_cu_seqlens(torch.tensor([0, 9, 10, 31, S]))
    packed = tuple(r[:, S - T:].expand(B, T).contiguous() for r in packed)
    start = torch.randint(0, S + 1, (B, T), generator=g).int()
    for key_start, key_end in (packed, (start, torch.randint(0, S + 1, (B, T), generator=g).int())):
        r = dict(key_start=key_start, key_end=key_end)
        qd, kd, wd = (x.double().requires_grad_() for x in (q, k, w))
        ref = reference.indexer_logits(qd, kd, wd, 0.3, causal, **r)
        grad = torch.randn(B, T, S, generator=g).masked_fill(torch.isinf(ref), float("nan"))
        gq, gk, gw = ext.indexer_backward_float32(grad, q, k, w, 0.3, causal, budget, key_start, key_end)
        ref.backward(torch.nan_to_num(grad.double(), nan=0.0))
        for got, want in ((gq, qd.grad), (gk, kd.grad), (gw, wd.grad)):
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
