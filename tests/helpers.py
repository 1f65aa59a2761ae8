"""Input builders and error bounds shared by the operator tests."""
import torch

from dsa_ext import reference

LOW_PRECISION = (torch.bfloat16, torch.float16)


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


def assert_close_to_reference(out, ref64, ref_lowp, factor=2.0, atol=1e-6):
    """flash-attention's rule: the operator's error against the float64 reference is within
    `factor` times the reference's own error when run in the operator's precision (+ atol)."""
    out, ref64, ref_lowp = (x.detach().double() for x in (out, ref64, ref_lowp))
    finite = torch.isfinite(ref64)
    assert torch.equal(finite, torch.isfinite(out)), "non-finite entries differ from the reference"
    err = (out - ref64)[finite].abs().max().item() if finite.any() else 0.0
    ref_err = (ref_lowp - ref64)[finite].abs().max().item() if finite.any() else 0.0
    assert err <= factor * ref_err + atol, f"error {err:.3e} > {factor} x reference error {ref_err:.3e} + {atol}"


def dense_causal_indices(B, T, S, K):
    """[B,T,K] rows that select every causal key (K >= S), -1 padded: sparse == dense."""
    logits = torch.zeros(B, T, S).masked_fill(~reference.causal_mask(T, S), float("-inf"))
    return reference.topk_indices(logits, K)
