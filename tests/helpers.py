"""Input builders, named test shapes and error bounds shared by the operator tests."""
from typing import NamedTuple

import torch

from dsa_ext import reference

LOW_PRECISION = (torch.bfloat16, torch.float16)


class IndexerShape(NamedTuple):
    B: int
    T: int
    S: int
    Hi: int
    Di: int


class AttentionShape(NamedTuple):
    B: int
    T: int
    S: int
    H: int
    Hkv: int
    Dqk: int
    Dv: int
    topk: int


class KlShape(NamedTuple):
    B: int
    T: int
    S: int
    Hi: int
    Di: int
    H: int
    Hkv: int
    Dqk: int


def shape_id(shape) -> str:
    """A test id that names every size: B2-T7-S13-Hi3-Di24."""
    return "-".join(f"{k}{v}" for k, v in shape._asdict().items())


def randn(*shape, dtype=torch.float64, device="cpu", requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def random_indices(B, T, S, K, *, Hkv=None, p_empty=0.2, causal=False, device="cpu"):
    """int32 [B,T,K] (or [B,T,Hkv,K]) in [0,S) with -1 holes, duplicates allowed; with causal,
    only positions <= t + S - T."""
    shape = (B, T, K) if Hkv is None else (B, T, Hkv, K)
    idx = torch.randint(0, S, shape, device=device)
    if causal:
        limit = torch.arange(T, device=device) + (S - T) + 1
        limit = limit.view(1, T, *([1] * (len(shape) - 2)))
        idx = idx % limit
    idx = torch.where(torch.rand(shape, device=device) < p_empty, torch.full_like(idx, -1), idx)
    return idx.to(torch.int32)


def max_err(x, ref):
    """Largest |x - ref| over the finite entries of ref; x must be finite exactly where ref is."""
    x, ref = x.detach().double(), ref.detach().double()
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(x)), "non-finite entries differ from the reference"
    return (x - ref)[finite].abs().max().item() if finite.any() else 0.0


def assert_close_to_reference(x, ref64, ref_lowp, what="", factor=2.0, atol=None):
    """flash-attention's rule, for every operator on CPU and CUDA: the error of x against the
    float64 reference is within ``factor`` times the error of the low-precision baseline
    (``dsa_ext.reference.*(..., upcast=False)``: products rounded to the input dtype, softmax,
    lse and losses in float32) plus atol, and small against the values' scale. atol defaults to
    1e-3 (16-bit inputs) or 1e-5 (float32) of that scale."""
    finite = ref64.detach()[torch.isfinite(ref64)]
    scale = max(finite.abs().max().item(), 1.0) if finite.numel() else 1.0
    err, ref_err = max_err(x, ref64), max_err(ref_lowp, ref64)
    low = x.dtype in LOW_PRECISION
    atol = (1e-3 if low else 1e-5) * scale if atol is None else atol
    assert err <= factor * ref_err + atol, (f"{what}: error {err:.3e} > {factor} x reference error "
                                            f"{ref_err:.3e} + {atol:.1e}")
    assert err <= (3e-2 if low else 1e-4) * scale, f"{what}: error {err:.3e} too large for values of scale {scale:.2e}"


def dense_causal_indices(B, T, S, K):
    """[B,T,K] rows that select every causal key (K >= S), -1 padded: sparse == dense."""
    logits = torch.zeros(B, T, S).masked_fill(~reference.causal_mask(T, S), float("-inf"))
    return reference.topk_indices(logits, K)
