"""Per-query key ranges (key_start, key_end) through indexer_logits, indexer_topk and
indexer_kl_loss (forward and backward), and the range builders of dsa_ext.ranges.

The equivalences: a packed sequence equals its documents run alone (indices, logits, losses and
gradients to 1e-12), a padded batch equals its unpadded rows, a sliding window equals the
reference with the window mask; plus empty ranges, either bound alone, S > T, the sparse KL form
(indices outside the range leave the support), registration (opcheck, compile, gradcheck) and bad
input. float64 throughout."""
import pytest
import torch

import dsa_ext
from dsa_ext import ranges, reference
from helpers import randn

TOL = dict(rtol=1e-12, atol=1e-12)
# document lengths of a packed sequence: shorter than topk, of length 1, longer than a CPU query
# block (16), and one past a CPU key tile (256) so that a document spans two tiles
DOCS = [5, 1, 17, 3, 9]
LONG_DOCS = [40, 270, 2]
TOPK = 8


def indexer_inputs(B, T, S, Hi=3, Di=8, requires_grad=False):
    return (randn(B, T, Hi, Di, requires_grad=requires_grad), randn(B, S, Di, requires_grad=requires_grad),
            randn(B, T, Hi, requires_grad=requires_grad))


def kl_inputs(B, T, S, H=4, Hkv=2, Dqk=8, requires_grad=False):
    return (*indexer_inputs(B, T, S, requires_grad=requires_grad), randn(B, T, H, Dqk), randn(B, S, Hkv, Dqk))


def leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def docs(lengths):
    """(start, end) of each document of a packed sequence."""
    bounds = cu(lengths).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def assert_same_grads(got, want, inputs, grad=None):
    """got and want (tensors of one shape) have the same gradients in inputs, to TOL, under the
    incoming gradient grad (default: ones)."""
    grad = torch.ones_like(got) if grad is None else grad
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------------------------------------
# packed documents == each document alone
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [DOCS, LONG_DOCS], ids=["short", "long"])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_logits_equal_documents_alone(seed, lengths, causal):
    T = sum(lengths)
    q, k, w = indexer_inputs(1, T, T, requires_grad=True)
    ks, ke = ranges.from_cu_seqlens(cu(lengths))
    logits = dsa_ext.indexer_logits(q, k, w, causal=causal, key_start=ks, key_end=ke)
    grad = torch.randn_like(logits)
    gq, gk, gw = torch.autograd.grad(logits, (q, k, w), grad.masked_fill(logits.isinf(), 0))
    seen = torch.zeros_like(logits, dtype=torch.bool)
    for a, b in docs(lengths):
        qa, ka, wa = leaves(q[:, a:b], k[:, a:b], w[:, a:b])
        alone = dsa_ext.indexer_logits(qa, ka, wa, causal=causal)
        torch.testing.assert_close(logits[:, a:b, a:b], alone, **TOL)
        ga = torch.autograd.grad(alone, (qa, ka, wa), grad[:, a:b, a:b].masked_fill(alone.isinf(), 0))
        for got, want in zip((gq[:, a:b], gk[:, a:b], gw[:, a:b]), ga):
            torch.testing.assert_close(got, want, **TOL)
        seen[:, a:b, a:b] = True
    assert logits[~seen].eq(float("-inf")).all()  # nothing across documents


@pytest.mark.parametrize("lengths", [DOCS, LONG_DOCS], ids=["short", "long"])
def test_packed_topk_equals_documents_alone(seed, lengths):
    T = sum(lengths)
    q, k, w = indexer_inputs(1, T, T)
    ks, ke = ranges.from_cu_seqlens(cu(lengths))
    packed = dsa_ext.indexer_topk(q, k, w, TOPK, key_start=ks, key_end=ke)
    for a, b in docs(lengths):
        alone = dsa_ext.indexer_topk(q[:, a:b], k[:, a:b], w[:, a:b], TOPK)
        assert torch.equal(packed[:, a:b], torch.where(alone >= 0, alone + a, alone))
    assert torch.equal(packed, reference.indexer_topk(q, k, w, TOPK, key_start=ks, key_end=ke))


@pytest.mark.parametrize("lengths", [DOCS, LONG_DOCS], ids=["short", "long"])
@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_packed_kl_loss_equals_documents_alone(seed, lengths, form):
    T = sum(lengths)
    q_idx, k_idx, w, q, k = kl_inputs(1, T, T, requires_grad=True)
    ks, ke = ranges.from_cu_seqlens(cu(lengths))
    indices = dsa_ext.indexer_topk(q_idx, k_idx, w, TOPK, key_start=ks, key_end=ke) if form == "sparse" else None
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, key_start=ks, key_end=ke)
    g = torch.randn_like(loss)
    grads = torch.autograd.grad(loss, (q_idx, k_idx, w), g)
    for a, b in docs(lengths):
        xa = leaves(q_idx[:, a:b], k_idx[:, a:b], w[:, a:b])
        ia = None if indices is None else torch.where(indices[:, a:b] >= 0, indices[:, a:b] - a, -1).int()
        alone = dsa_ext.indexer_kl_loss(*xa, q[:, a:b], k[:, a:b], ia)
        torch.testing.assert_close(loss[:, a:b], alone, **TOL)
        for got, want in zip((x[:, a:b] for x in grads), torch.autograd.grad(alone, xa, g[:, a:b])):
            torch.testing.assert_close(got, want, **TOL)
    starts = [a for a, _ in docs(lengths)]
    assert loss[:, starts].abs().max() < 1e-15  # a document's first query sees one key (or none selected)


LOW_PRECISION = ["float32", "bfloat16", "bfloat16-widening", "e4m3"]


@pytest.mark.parametrize("kind", LOW_PRECISION)
def test_packed_low_precision_equals_documents_alone(seed, kind):
    """The float32, bfloat16 (AVX512-BF16 tiles where the CPU has them, and the widening path) and
    FP8 kernels honour the ranges too: a packed sequence selects what its documents select alone
    and scores them as they are scored alone; the KL loss and its gradients agree (not FP8:
    forward-only selection)."""
    T = sum(LONG_DOCS)
    ks, ke = ranges.from_cu_seqlens(cu(LONG_DOCS))
    q_idx, k_idx, w, q, k = kl_inputs(1, T, T)
    extra = {}
    if kind == "e4m3":  # per-row scales: slicing the quantised rows is quantising the slice
        q_idx, k_idx, w, extra["k_scale"] = dsa_ext.fp8.indexer_inputs(q_idx, k_idx, w)
    else:
        dtype = torch.float32 if kind == "float32" else torch.bfloat16
        q_idx, k_idx, q, k = (x.to(dtype) for x in (q_idx, k_idx, q, k))
        w = w.float()
    tiles_before = dsa_ext.cpu_bf16_tiles_enabled()
    dsa_ext.set_cpu_bf16_tiles(kind != "bfloat16-widening")
    try:
        idx = dsa_ext.indexer_topk(q_idx, k_idx, w, TOPK, key_start=ks, key_end=ke, **extra)
        logits = dsa_ext.indexer_logits(q_idx, k_idx, w, key_start=ks, key_end=ke, **extra)
        if kind != "e4m3":
            xs = leaves(q_idx, k_idx, w)
            loss = dsa_ext.indexer_kl_loss(*xs, q, k, key_start=ks, key_end=ke)
            grads = torch.autograd.grad(loss.sum(), xs)
        for a, b in docs(LONG_DOCS):
            part = dict(k_scale=extra["k_scale"][:, a:b]) if extra else {}
            alone = dsa_ext.indexer_topk(q_idx[:, a:b], k_idx[:, a:b], w[:, a:b], TOPK, **part)
            assert torch.equal(idx[:, a:b], torch.where(alone >= 0, alone + a, alone))
            torch.testing.assert_close(logits[:, a:b, a:b],
                                       dsa_ext.indexer_logits(q_idx[:, a:b], k_idx[:, a:b], w[:, a:b], **part))
            assert logits[:, a:b, :a].eq(float("-inf")).all() and logits[:, a:b, b:].eq(float("-inf")).all()
            if kind == "e4m3":
                continue
            xa = leaves(q_idx[:, a:b], k_idx[:, a:b], w[:, a:b])
            alone = dsa_ext.indexer_kl_loss(*xa, q[:, a:b], k[:, a:b])
            torch.testing.assert_close(loss[:, a:b], alone)
            for got, want in zip((x[:, a:b] for x in grads), torch.autograd.grad(alone.sum(), xa)):
                torch.testing.assert_close(got, want)
    finally:
        dsa_ext.set_cpu_bf16_tiles(tiles_before)


def test_empty_ranges(seed):
    """key_start >= key_end: logits all -inf, top-k all -1, KL 0 with zero gradients, never NaN;
    the tail of a packed buffer (from_cu_seqlens(total=...)) gets such rows."""
    lengths, T = [4, 3], 10
    q_idx, k_idx, w, q, k = kl_inputs(1, T, T, requires_grad=True)
    ks, ke = ranges.from_cu_seqlens(cu(lengths), total=T)
    ks[0, 2], ke[0, 2] = 3, 1  # start > end inside a document: empty as well
    empty = [2, 7, 8, 9]
    logits = dsa_ext.indexer_logits(q_idx, k_idx, w, key_start=ks, key_end=ke)
    assert logits[0, empty].eq(float("-inf")).all() and not logits.isnan().any()
    idx = dsa_ext.indexer_topk(q_idx, k_idx, w, TOPK, key_start=ks, key_end=ke)
    assert idx[0, empty].eq(-1).all()
    for indices in (None, idx):
        loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, key_start=ks, key_end=ke)
        assert loss[0, empty].eq(0).all()
        torch.testing.assert_close(loss, reference.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, key_start=ks,
                                                                   key_end=ke), **TOL)
        gq, _, gw = torch.autograd.grad(loss.sum(), (q_idx, k_idx, w))
        assert gq[0, empty].eq(0).all() and gw[0, empty].eq(0).all()
    # sparse attention over an empty row's indices: out 0, lse -inf
    out, lse = dsa_ext.sparse_attention(q, k, k, idx, return_lse=True)
    assert out[0, empty].eq(0).all() and lse[0, empty].eq(float("-inf")).all()


# ---------------------------------------------------------------------------------------------
# padded batches == their unpadded rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_rows(seed, side):
    """Rows of 7 and 11 real tokens in a batch of 13 positions. Padding queries get empty ranges:
    all -inf logits, all -1 indices, loss 0 and zero gradients, no NaN anywhere."""
    T, lengths = 13, [7, 11]
    q_idx, k_idx, w, q, k = kl_inputs(2, T, T, requires_grad=True)
    real = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            real[b, T - n:] = 1
        else:
            real[b, :n] = 1
    ks, ke = ranges.from_padding_mask(real)
    logits = dsa_ext.indexer_logits(q_idx, k_idx, w, key_start=ks, key_end=ke)
    idx = dsa_ext.indexer_topk(q_idx, k_idx, w, TOPK, key_start=ks, key_end=ke)
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, key_start=ks, key_end=ke)
    g = torch.randn_like(loss)
    grads = torch.autograd.grad(loss, (q_idx, k_idx, w), g)
    assert not any(x.isnan().any() for x in (logits, loss, *grads))
    for b, n in enumerate(lengths):
        rows = slice(T - n, T) if side == "left" else slice(0, n)
        pad = real[b] == 0
        xa = leaves(q_idx[b:b + 1, rows], k_idx[b:b + 1, rows], w[b:b + 1, rows])
        torch.testing.assert_close(logits[b:b + 1, rows, rows], dsa_ext.indexer_logits(*xa), **TOL)
        alone = dsa_ext.indexer_topk(*xa, TOPK)
        assert torch.equal(idx[b:b + 1, rows], torch.where(alone >= 0, alone + rows.start, alone))
        alone = dsa_ext.indexer_kl_loss(*xa, q[b:b + 1, rows], k[b:b + 1, rows])
        torch.testing.assert_close(loss[b:b + 1, rows], alone, **TOL)
        for got, want in zip((x[b:b + 1, rows] for x in grads), torch.autograd.grad(alone, xa, g[b:b + 1, rows])):
            torch.testing.assert_close(got, want, **TOL)
        assert logits[b, pad].eq(float("-inf")).all() and idx[b, pad].eq(-1).all() and loss[b, pad].eq(0).all()
        assert logits[b, :, pad].eq(float("-inf")).all()  # no real query sees a padding key
        assert grads[0][b, pad].eq(0).all() and grads[1][b, pad].eq(0).all() and grads[2][b, pad].eq(0).all()


# ---------------------------------------------------------------------------------------------
# sliding window == the reference with the window mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,S,window", [(30, 30, 5), (12, 300, 40), (20, 21, 1)])
def test_sliding_window_equals_reference_with_window_mask(seed, T, S, window):
    q_idx, k_idx, w, q, k = kl_inputs(2, T, S, requires_grad=True)
    ks, ke = ranges.sliding_window(window, T, S, batch=2)
    pos = torch.arange(T)[:, None] + (S - T)
    s = torch.arange(S)[None, :]
    window_mask = (s <= pos) & (s > pos - window)  # written out, independent of dsa_ext.ranges
    logits = dsa_ext.indexer_logits(q_idx, k_idx, w, key_start=ks, key_end=ke)
    want = reference.indexer_logits(q_idx, k_idx, w).masked_fill(~window_mask, float("-inf"))
    torch.testing.assert_close(logits, want, **TOL)
    assert_same_grads(logits, want, (q_idx, k_idx, w), torch.randn_like(logits).masked_fill(~window_mask, 0))
    idx = dsa_ext.indexer_topk(q_idx, k_idx, w, TOPK, key_start=ks, key_end=ke)
    assert torch.equal(idx, reference.topk_indices(want, TOPK))
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, key_start=ks, key_end=ke)
    ref = reference.indexer_kl_loss(q_idx, k_idx, w, q, k, key_start=ks, key_end=ke)
    torch.testing.assert_close(loss, ref, **TOL)
    assert_same_grads(loss, ref, (q_idx, k_idx, w), torch.randn_like(loss))
    # the reference's mask is the written-out window mask
    assert torch.equal(ranges.visible_mask(ks, ke, S), window_mask.expand(2, T, S))


# ---------------------------------------------------------------------------------------------
# other range shapes, the sparse KL form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["start", "end"])
@pytest.mark.parametrize("causal", [True, False])
def test_one_bound_alone(seed, which, causal):
    """Either bound may come alone; the other defaults to 0 or S."""
    B, T, S = 2, 9, 14
    q_idx, k_idx, w, q, k = kl_inputs(B, T, S, requires_grad=True)
    bound = torch.randint(0, S + 1, (B, T), dtype=torch.int32)
    r = dict(key_start=bound) if which == "start" else dict(key_end=bound)
    full = dict(key_start=bound, key_end=torch.full_like(bound, S)) if which == "start" else \
        dict(key_start=torch.zeros_like(bound), key_end=bound)
    torch.testing.assert_close(dsa_ext.indexer_logits(q_idx, k_idx, w, causal=causal, **r),
                               reference.indexer_logits(q_idx, k_idx, w, causal=causal, **full), **TOL)
    assert torch.equal(dsa_ext.indexer_topk(q_idx, k_idx, w, 4, causal=causal, **r),
                       dsa_ext.indexer_topk(q_idx, k_idx, w, 4, causal=causal, **full))
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, causal=causal, **r)
    ref = reference.indexer_kl_loss(q_idx, k_idx, w, q, k, causal=causal, **full)
    torch.testing.assert_close(loss, ref, **TOL)
    assert_same_grads(loss, ref, (q_idx, k_idx, w))


def test_random_ranges_with_kv_prefix_against_reference(seed):
    """S > T (chunked prefill: the queries are the last T keys), random ranges incl. empty rows,
    crossing the CPU tiles (16 queries, 256 keys)."""
    B, T, S = 2, 37, 300
    q_idx, k_idx, w, q, k = kl_inputs(B, T, S, requires_grad=True)
    ks = torch.randint(0, S + 1, (B, T), dtype=torch.int32)
    ke = torch.randint(0, S + 1, (B, T), dtype=torch.int32)
    args = dict(key_start=ks, key_end=ke)
    logits = dsa_ext.indexer_logits(q_idx, k_idx, w, **args)
    torch.testing.assert_close(logits, reference.indexer_logits(q_idx, k_idx, w, **args), **TOL)
    assert torch.equal(dsa_ext.indexer_topk(q_idx, k_idx, w, 5, **args),
                       reference.indexer_topk(q_idx, k_idx, w, 5, **args))
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, **args)
    ref = reference.indexer_kl_loss(q_idx, k_idx, w, q, k, **args)
    torch.testing.assert_close(loss, ref, **TOL)
    assert_same_grads(loss, ref, (q_idx, k_idx, w))


def test_sparse_kl_support_is_indices_inside_the_range(seed):
    """With indices, the support is the valid entries that lie in [key_start, key_end): the same
    loss as with the entries outside the range replaced by -1 (no causal mask added)."""
    B, T, S = 2, 11, 20
    q_idx, k_idx, w, q, k = kl_inputs(B, T, S, requires_grad=True)
    indices = torch.randint(-1, S, (B, T, 9), dtype=torch.int32)
    ks = torch.randint(0, S // 2, (B, T), dtype=torch.int32)
    ke = ks + torch.randint(0, S // 2 + 1, (B, T), dtype=torch.int32)
    pos = indices.long()
    inside = torch.where((pos >= ks[..., None]) & (pos < ke[..., None]), indices, -1)
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, key_start=ks, key_end=ke)
    want = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, inside)
    torch.testing.assert_close(loss, want, **TOL)
    torch.testing.assert_close(loss, reference.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, key_start=ks,
                                                               key_end=ke), **TOL)
    assert_same_grads(loss, want, (q_idx, k_idx, w))


def test_backward_ignores_gradients_outside_the_ranges(seed):
    """Logits outside a range are -inf constants: gradients arriving there (even NaN) move nothing."""
    T = sum(DOCS)
    q, k, w = indexer_inputs(1, T, T)
    ks, ke = ranges.from_cu_seqlens(cu(DOCS))
    inside = ranges.visible_mask(ks, ke, T)
    g = torch.randn(1, T, T, dtype=torch.float64)
    got = torch.ops.dsa.indexer_logits_backward(g.masked_fill(~inside, float("nan")), q, k, w, 0.3, True, ks, ke)
    want = torch.ops.dsa.indexer_logits_backward(g.masked_fill(~inside, 0), q, k, w, 0.3, True, ks, ke)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# registration, gradcheck, compile, bad input
# ---------------------------------------------------------------------------------------------


def some_ranges(B, T, S):
    ks = torch.randint(0, S, (B, T), dtype=torch.int32)
    return ks, (ks + torch.randint(0, S, (B, T), dtype=torch.int32)).clamp(max=S)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(seed, dtype):
    B, T, S = 2, 5, 9
    rg = dtype != torch.bfloat16
    q_idx, k_idx, w, q, k = (x.to(dtype).detach().requires_grad_(rg) for x in kl_inputs(B, T, S))
    q, k = q.detach(), k.detach()
    ks, ke = some_ranges(B, T, S)
    ops = torch.ops.dsa
    torch.library.opcheck(ops.indexer_logits.default, (q_idx, k_idx, w, 0.3, True, None, ks, ke))
    torch.library.opcheck(ops.indexer_topk.default, (q_idx.detach(), k_idx.detach(), w.detach(), 3, 0.3, True, None,
                                                     ks, ke))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    args = (q_idx.detach(), k_idx.detach(), w.detach())
    torch.library.opcheck(ops.indexer_logits_backward.default, (torch.randn(B, T, S, dtype=sdt), *args, 0.3, True,
                                                                ks, ke))
    indices = torch.randint(-1, S, (B, T, 4), dtype=torch.int32)
    for ind in (None, indices):
        torch.library.opcheck(ops.indexer_kl_loss.default, (q_idx, k_idx, w, q, k, ind, 0.3, 0.4, True, None, ks, ke))
        loss, idx_lse, attn_lse = ops.indexer_kl_loss(*args, q, k, ind, 0.3, 0.4, True, None, ks, ke)
        torch.library.opcheck(ops.indexer_kl_loss_backward.default,
                              (torch.randn_like(loss), *args, q, k, ind, idx_lse, attn_lse, 0.3, 0.4, True, ks, ke))


def test_gradcheck(seed):
    B, T, S = 1, 6, 8
    q_idx, k_idx, w, q, k = kl_inputs(B, T, S, requires_grad=True)
    ks, ke = some_ranges(B, T, S)
    mask = ranges.visible_mask(ks, ke, S)
    fn = lambda a, b, c: dsa_ext.indexer_logits(a, b, c, key_start=ks, key_end=ke).masked_fill(~mask, 0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q_idx, k_idx, w))
    indices = torch.randint(-1, S, (B, T, 4), dtype=torch.int32)
    for ind in (None, indices):
        assert torch.autograd.gradcheck(
            lambda a, b, c: dsa_ext.indexer_kl_loss(a, b, c, q, k, ind, key_start=ks, key_end=ke), (q_idx, k_idx, w))


def test_compile_fullgraph_forward_backward(seed):
    B, T, S = 1, 12, 12
    q_idx, k_idx, w, q, k = (x.float() for x in kl_inputs(B, T, S))
    inputs = [x.requires_grad_() for x in (q_idx, k_idx, w)]
    ks, ke = ranges.from_cu_seqlens(cu([5, 7]))

    def step(q_idx, k_idx, w):
        logits = dsa_ext.indexer_logits(q_idx, k_idx, w, key_start=ks, key_end=ke)
        idx = dsa_ext.indexer_topk(q_idx, k_idx, w, 3, key_start=ks, key_end=ke)
        loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, key_start=ks, key_end=ke).sum()
        return loss + logits.masked_fill(logits.isinf(), 0).sum(), idx

    for backend in ("aot_eager", "inductor"):
        got, got_idx = torch.compile(step, fullgraph=True, backend=backend)(*inputs)
        eager, eager_idx = step(*inputs)
        assert torch.equal(got_idx, eager_idx)
        torch.testing.assert_close(got, eager)
        for a, b in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(eager, inputs)):
            torch.testing.assert_close(a, b)


def test_fake_kernels_report_bad_range_shapes_at_trace_time(seed):
    q, k, w = indexer_inputs(1, 5, 7)
    bad = torch.zeros(1, 4, dtype=torch.int32)
    with pytest.raises(Exception, match=r"expected key_end.size\(1\) == 5 \(length T of q_idx\)"):
        torch.compile(lambda *x: dsa_ext.indexer_topk(*x, 2, key_end=bad), fullgraph=True, backend="eager")(q, k, w)


BAD_RANGES = [
    (lambda r: {**r, "key_start": r["key_start"].long()}, r"expected key_start to be int32, got Long"),
    (lambda r: {**r, "key_end": r["key_end"][0]}, r"expected key_end to be a 2-D tensor \[B, T\]"),
    (lambda r: {**r, "key_end": r["key_end"][:, :3]}, r"expected key_end.size\(1\) == 4 \(length T of q_idx\)"),
    (lambda r: {**r, "key_start": r["key_start"].expand(2, 4)}, r"expected key_start.size\(0\) == 1 \(batch B"),
]


def _call_every_op(r):
    q_idx, k_idx, w, q, k = kl_inputs(1, 4, 7)
    yield lambda: dsa_ext.indexer_logits(q_idx, k_idx, w, **r)
    yield lambda: dsa_ext.indexer_topk(q_idx, k_idx, w, 2, **r)
    yield lambda: dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, **r)
    yield lambda: dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, torch.zeros(1, 4, 2, dtype=torch.int32), **r)
    yield lambda: torch.ops.dsa.indexer_logits_backward(torch.zeros(1, 4, 7, dtype=torch.float64), q_idx, k_idx, w,
                                                        None, True, r["key_start"], r["key_end"])
    z = torch.zeros(1, 4, dtype=torch.float64)
    yield lambda: torch.ops.dsa.indexer_kl_loss_backward(z, q_idx, k_idx, w, q, k, None, z,
                                                         torch.zeros(1, 4, 4, dtype=torch.float64), None, None, True,
                                                         r["key_start"], r["key_end"])


@pytest.mark.parametrize("mutate,pattern", BAD_RANGES)
def test_bad_range_tensors(mutate, pattern):
    r = mutate(dict(key_start=torch.zeros(1, 4, dtype=torch.int32), key_end=torch.full((1, 4), 7, dtype=torch.int32)))
    for call in _call_every_op(r):
        with pytest.raises(RuntimeError, match=pattern):
            call()


@pytest.mark.parametrize("name,bad", [("key_start", -1), ("key_end", 8), ("key_start", 100), ("key_end", -3)])
def test_range_values_outside_0_S_raise(name, bad):
    r = dict(key_start=torch.zeros(1, 4, dtype=torch.int32), key_end=torch.full((1, 4), 7, dtype=torch.int32))
    r[name][0, 2] = bad
    for call in _call_every_op(r):
        message = rf"expected every {name} to be in \[0, S=7\], got {bad} at {name}\[0, 2\]"
        with pytest.raises(IndexError, match=message):
            call()
    with pytest.raises(IndexError, match=rf"expected every {name} to be in \[0, S=7\]"):
        reference.indexer_logits(*indexer_inputs(1, 4, 7), **r)


# ---------------------------------------------------------------------------------------------
# dsa_ext.ranges: the worked examples of the docstrings, round trips and errors
# ---------------------------------------------------------------------------------------------


def test_docstring_examples_hold():
    """Every worked example of dsa_ext.ranges (module and functions) runs and prints what it shows."""
    import doctest

    result = doctest.testmod(ranges, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted >= 12 and result.failed == 0, result


def i32(rows):
    return torch.tensor(rows, dtype=torch.int32)


def test_from_cu_seqlens():
    ks, ke = ranges.from_cu_seqlens(torch.tensor([0, 3, 5]), total=6)
    assert torch.equal(ks, i32([[0, 0, 0, 3, 3, 0]])) and torch.equal(ke, i32([[3, 3, 3, 5, 5, 0]]))
    ks, ke = ranges.from_cu_seqlens(torch.tensor([0, 2, 2, 3], dtype=torch.int32))  # an empty document
    assert torch.equal(ks, i32([[0, 0, 2]])) and torch.equal(ke, i32([[2, 2, 3]]))
    for bad in (torch.tensor([1, 3]), torch.tensor([0, 3, 2]), torch.tensor([[0, 3]])):
        with pytest.raises(ValueError, match="cu_seqlens"):
            ranges.from_cu_seqlens(bad)
    with pytest.raises(ValueError, match="total >= cu_seqlens"):
        ranges.from_cu_seqlens(torch.tensor([0, 3]), total=2)


def test_position_ids_both_directions():
    assert torch.equal(ranges.position_ids_from_cu_seqlens(torch.tensor([0, 3, 5])), torch.tensor([[0, 1, 2, 0, 1]]))
    ks, ke = ranges.from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    assert torch.equal(ks, i32([[0, 0, 0, 3, 3, 5]])) and torch.equal(ke, i32([[3, 3, 3, 5, 5, 6]]))
    # a document continued from an earlier chunk starts where the positions jump
    ks, ke = ranges.from_position_ids(torch.tensor([7, 8, 0, 1, 2]))
    assert torch.equal(ks, i32([[0, 0, 2, 2, 2]])) and torch.equal(ke, i32([[2, 2, 5, 5, 5]]))
    cu_seqlens = cu([4, 1, 6, 2])
    round_trip = ranges.from_position_ids(ranges.position_ids_from_cu_seqlens(cu_seqlens))
    for a, b in zip(round_trip, ranges.from_cu_seqlens(cu_seqlens)):
        assert torch.equal(a, b)


def test_from_padding_mask():
    ks, ke = ranges.from_padding_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]))
    assert torch.equal(ks, i32([[0, 0, 2, 2, 2], [0, 0, 0, 0, 0]]))
    assert torch.equal(ke, i32([[0, 0, 5, 5, 5], [3, 3, 3, 0, 0]]))
    ks, ke = ranges.from_padding_mask(torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool), T=2)
    assert torch.equal(ks, i32([[1, 1], [0, 0]])) and torch.equal(ke, i32([[4, 4], [0, 0]]))
    with pytest.raises(ValueError, match="row 1 has a hole"):
        ranges.from_padding_mask(torch.tensor([[1, 1, 0], [1, 0, 1]]))
    with pytest.raises(ValueError, match="1 <= T <= S"):
        ranges.from_padding_mask(torch.ones(1, 3), T=4)


def test_sliding_window_and_intersect():
    ks, ke = ranges.sliding_window(2, T=4)
    assert torch.equal(ks, i32([[0, 0, 1, 2]])) and torch.equal(ke, i32([[1, 2, 3, 4]]))
    ks, ke = ranges.sliding_window(3, T=2, S=5, batch=2)
    assert torch.equal(ks, i32([[1, 2]] * 2)) and torch.equal(ke, i32([[4, 5]] * 2))
    ks, ke = ranges.intersect(ranges.from_cu_seqlens(torch.tensor([0, 3, 5])), ranges.sliding_window(2, T=5))
    assert torch.equal(ks, i32([[0, 0, 1, 3, 3]])) and torch.equal(ke, i32([[1, 2, 3, 4, 5]]))
    with pytest.raises(ValueError, match="window >= 1"):
        ranges.sliding_window(0, T=3)


def test_visible_mask():
    mask = ranges.visible_mask(*ranges.from_cu_seqlens(torch.tensor([0, 2, 3])), S=3)
    assert torch.equal(mask.int(), torch.tensor([[[1, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.int32))
    bidirectional = ranges.visible_mask(*ranges.from_cu_seqlens(torch.tensor([0, 2, 3])), S=3, causal=False)
    assert torch.equal(bidirectional.int(), torch.tensor([[[1, 1, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.int32))
    assert torch.equal(ranges.visible_mask(None, i32([[1, 2]]), S=2, causal=False),
                       torch.tensor([[[1, 0], [1, 1]]]).bool())
