"""Property-based tests (hypothesis): every operator and its gradients against dsa_ext.reference
in float64 on drawn shapes (B, T, S >= T, H with Hkv dividing it, Dqk != Dv, topk from 1 to beyond
S), strided and sliced inputs (v a view of k, transposed heads, every other row), index tensors
with -1, duplicates and empty rows, per-query key ranges (random, empty rows, one bound alone,
packed documents), and logits with exact ties, +-0, -inf and NaN.

CI runs a bounded, derandomized number of examples per operator (the "ci" profile);
HYPOTHESIS_PROFILE=thorough runs many more with fresh randomness. A failure prints the drawn
example and a @reproduce_failure blob; keep a found bug as a plain test next to its operator's.
"""
import os

import pytest
import torch

import dsa_ext
from dsa_ext import ranges, reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=1000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

F64 = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def seeds(draw):
    return draw(st.integers(0, 2**31 - 1))


def layout(draw, t: torch.Tensor, head_dim: int = 2) -> torch.Tensor:
    """The same values as t in a drawn memory layout whose last dimension stays contiguous:
    contiguous, heads transposed in storage, or every other row of a twice-longer tensor."""
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if kind == "transposed" and t.dim() == 4:
        return t.transpose(1, head_dim).contiguous().transpose(1, head_dim)
    if kind == "sliced":
        wide = torch.empty((t.shape[0], 2 * t.shape[1], *t.shape[2:]), dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t.contiguous()


# Mostly small sizes, sometimes ones that cross the CPU kernels' tiles (16 queries, 256 keys).
def lengths(small, large):
    return st.one_of(st.integers(*small), st.integers(*small), st.integers(*small), st.integers(*large))


@st.composite
def key_ranges(draw, g, B, T, S):
    """key_start, key_end [B, T] int32 with values in [0, S], or None: none at all, random ranges
    (start >= end: an empty row; one forced), a start or an end alone, or packed documents over
    the S positions (the queries are the last T; random ranges when S < T)."""
    kind = draw(st.sampled_from(["none", "random", "random", "start", "end", "documents"]))
    if kind == "none":
        return None, None
    if kind == "documents" and S >= T:
        cuts = torch.randint(0, S + 1, (draw(st.integers(0, 4)),), generator=g).sort().values
        ks, ke = ranges.from_cu_seqlens(torch.cat([torch.tensor([0]), cuts, torch.tensor([S])]))
        return ks[:, S - T:].expand(B, T).contiguous(), ke[:, S - T:].expand(B, T).contiguous()
    start = torch.randint(0, S + 1, (B, T), generator=g)
    end = start + torch.randint(0, S + 1, (B, T), generator=g).clamp(max=S - start)
    end = torch.where(torch.rand(B, T, generator=g) < 0.2, torch.randint(0, S + 1, (B, T), generator=g), end)
    start[0, T // 2], end[0, T // 2] = S // 2, S // 2  # an empty row
    start, end = start.to(torch.int32), end.to(torch.int32)
    return (start, None) if kind == "start" else (None, end) if kind == "end" else (start, end)


@st.composite
def indexer_case(draw, causal=None):
    g = torch.Generator().manual_seed(draw(seeds()))
    B, T = draw(st.integers(1, 2)), draw(lengths((1, 9), (15, 40)))
    causal = draw(st.booleans()) if causal is None else causal
    S = T + draw(lengths((0, 9), (200, 560))) if causal else draw(lengths((1, 14), (250, 600)))
    Hi, Di = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    q = torch.randn(B, T, Hi, Di, generator=g, dtype=F64)
    k = torch.randn(B, S, Di, generator=g, dtype=F64)
    w = torch.randn(B, T, Hi, generator=g, dtype=F64)
    if draw(st.booleans()):  # ReLU sums tie exactly: duplicated keys and zero queries
        k[:, S // 2:] = k[:, : S - S // 2].clone()
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    topk = draw(st.integers(1, S + 3))
    key_start, key_end = draw(key_ranges(g, B, T, S))
    return dict(q=layout(draw, q), k=layout(draw, k), w=layout(draw, w), causal=causal, scale=scale, topk=topk,
                key_start=key_start, key_end=key_end)


@st.composite
def index_rows(draw, g, B, T, S, topk, Hkv=None, causal_limit=False):
    """int32 [B,T,topk] (or [B,T,Hkv,topk]) in [0,S) with -1 holes, duplicates and an empty row."""
    shape = (B, T, topk) if Hkv is None else (B, T, Hkv, topk)
    idx = torch.randint(0, S, shape, generator=g)
    if causal_limit:
        limit = (torch.arange(T) + (S - T) + 1).view(1, T, *([1] * (len(shape) - 2)))
        idx = idx % limit
    p_empty = draw(st.sampled_from([0.0, 0.3, 0.9]))
    idx = torch.where(torch.rand(shape, generator=g) < p_empty, torch.full_like(idx, -1), idx)
    if draw(st.booleans()) and topk > 1:
        idx[..., 1] = idx[..., 0]  # a duplicate
    if draw(st.booleans()):
        idx[0, T // 2] = -1  # an empty row
    return idx.to(torch.int32)


@st.composite
def attention_case(draw):
    g = torch.Generator().manual_seed(draw(seeds()))
    B, T, S = draw(st.integers(1, 2)), draw(st.integers(1, 7)), draw(lengths((1, 12), (100, 300)))
    Hkv, G = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    Dqk = draw(st.integers(1, 9))
    Dv = draw(st.integers(1, 9).filter(lambda d: d != Dqk))
    q = torch.randn(B, T, Hkv * G, Dqk, generator=g, dtype=F64)
    if draw(st.booleans()) and Dv <= Dqk:  # v a column prefix of k's storage (MLA)
        k = torch.randn(B, S, Hkv, Dqk, generator=g, dtype=F64)
        k = layout(draw, k)
        v = k[..., :Dv]
    else:
        k = layout(draw, torch.randn(B, S, Hkv, Dqk, generator=g, dtype=F64))
        v = layout(draw, torch.randn(B, S, Hkv, Dv, generator=g, dtype=F64))
    topk = draw(st.integers(1, S + 3))
    per_head = draw(st.booleans())
    idx = draw(index_rows(g, B, T, S, topk, Hkv if per_head else None))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    return dict(q=layout(draw, q), k=k, v=v, idx=idx, scale=scale)


@st.composite
def tied_logits(draw):
    g = torch.Generator().manual_seed(draw(seeds()))
    B, T, S = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 40))
    values = torch.tensor([0.0, -0.0, 0.5, 1.0, -1.0, float("inf"), float("-inf"), float("nan")])
    weights = torch.tensor([4.0, 2.0, 2.0, 2.0, 1.0, 0.5, 1.0, 0.5])
    pick = torch.multinomial(weights, B * T * S, replacement=True, generator=g)
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    logits = values[pick].view(B, T, S).to(dtype)
    return logits, draw(st.integers(1, S + 3))


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


def grads(fn, inputs, seed=0):
    """Gradients of a fixed random projection of fn's output (finite entries only)."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.masked_fill(~torch.isfinite(o), 0) * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
               for o in outs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def indexer_args(case):
    return {n: case[n] for n in ("scale", "causal", "key_start", "key_end")}


@given(indexer_case())
def test_indexer_logits(case):
    q, k, w = (case[n].detach().requires_grad_() for n in ("q", "k", "w"))
    args = indexer_args(case)
    got = dsa_ext.indexer_logits(q, k, w, **args)
    want = reference.indexer_logits(q, k, w, **args)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(grads(lambda *x: dsa_ext.indexer_logits(*x, **args), (q, k, w)),
                    grads(lambda *x: reference.indexer_logits(*x, **args), (q, k, w))):
        torch.testing.assert_close(a, b, **TOL)


@given(indexer_case())
def test_indexer_topk(case):
    args = indexer_args(case)
    got = dsa_ext.indexer_topk(case["q"], case["k"], case["w"], case["topk"], **args)
    logits = dsa_ext.indexer_logits(case["q"], case["k"], case["w"], **args)
    assert torch.equal(got, dsa_ext.topk_indices(logits, case["topk"]))
    # the reference's selection over the same scores, masked as the reference masks them
    visible = reference.indexer_logits(case["q"], case["k"], case["w"], **args).isfinite()
    assert torch.equal(got, reference.topk_indices(logits.masked_fill(~visible, float("-inf")), case["topk"]))


@given(tied_logits())
def test_topk_indices(case):
    logits, topk = case
    got = dsa_ext.topk_indices(logits, topk)
    assert torch.equal(got, reference.topk_indices(logits, topk))
    # +inf is a score like any other (the largest); -inf and NaN are never chosen
    chosen = logits.gather(-1, got.clamp(min=0).long())[got >= 0]
    assert not torch.isnan(chosen).any() and not (chosen == float("-inf")).any()


@given(attention_case())
def test_sparse_attention(case):
    q, k, v = case["q"].detach().requires_grad_(), case["k"].detach(), case["v"].detach()
    shares_storage = v.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    k = k.requires_grad_()
    v = k[..., : v.shape[-1]] if shares_storage else v.requires_grad_()
    leaves = (q, k) if shares_storage else (q, k, v)

    def run(impl):
        def fn(*x):
            vv = x[1][..., : v.shape[-1]] if shares_storage else x[2]
            return impl.sparse_attention(x[0], x[1], vv, case["idx"], case["scale"], return_lse=True)
        return fn

    got, want = run(dsa_ext)(*leaves), run(reference)(*leaves)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    for a, b in zip(grads(run(dsa_ext), leaves), grads(run(reference), leaves)):
        torch.testing.assert_close(a, b, **TOL)


@st.composite
def kl_case(draw):
    ic = draw(indexer_case(causal=True))
    g = torch.Generator().manual_seed(draw(seeds()))
    B, T, Hi, Di = ic["q"].shape
    S = ic["k"].shape[1]
    Hkv, G, D = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    q = torch.randn(B, T, Hkv * G, D, generator=g, dtype=F64)
    k = torch.randn(B, S, Hkv, D, generator=g, dtype=F64)
    sparse = draw(st.booleans())
    idx = draw(index_rows(g, B, T, S, ic["topk"], causal_limit=True)) if sparse else None
    return dict(ic, aq=layout(draw, q), ak=layout(draw, k), idx=idx, attn_scale=draw(st.floats(0.1, 1.5)))


@given(kl_case())
def test_indexer_kl_loss(case):
    q, k, w = (case[n].detach().requires_grad_() for n in ("q", "k", "w"))
    args = (case["aq"], case["ak"], case["idx"], case["scale"], case["attn_scale"])
    kw = dict(key_start=case["key_start"], key_end=case["key_end"])
    got = dsa_ext.indexer_kl_loss(q, k, w, *args, **kw)
    want = reference.indexer_kl_loss(q, k, w, *args, **kw)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(grads(lambda *x: dsa_ext.indexer_kl_loss(*x, *args, **kw), (q, k, w)),
                    grads(lambda *x: reference.indexer_kl_loss(*x, *args, **kw), (q, k, w))):
        torch.testing.assert_close(a, b, **TOL)
