"""The float32 path of the CUDA indexer_logits_backward (csrc/aten/indexer_backward_float.h,
plain ATen code) run on CPU tensors against the float64 reference, in one chunk of queries and
in chunks of one query (tiny budget)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emulator  # noqa: E402

from dsa_ext import reference  # noqa: E402

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
