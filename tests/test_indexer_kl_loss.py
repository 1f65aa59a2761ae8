"""indexer_kl_loss (forward, backward) against dsa_ext.reference.indexer_kl_loss, which builds the
full [B, H, T, S] probabilities; plus the loss's own properties (KL >= 0, 0 at a perfect indexer),
the constants q/k, the optional attn_lse, registration and compile."""
import pytest
import torch

import dsa_ext
from dsa_ext import reference
from helpers import KlShape, assert_close_to_reference, dense_causal_indices, randn, random_indices, shape_id

# T = 1, S > T (KV prefix), MHA / GQA / MQA, odd head dims, Dqk
# unrelated to Di, query tiles (16) and key blocks (256) crossed, batches split across threads.
SHAPES = [
    KlShape(1, 1, 1, 1, 8, 1, 1, 4),
    KlShape(2, 7, 13, 3, 24, 4, 2, 12),      # GQA, S > T
    KlShape(1, 13, 13, 4, 16, 3, 1, 20),     # MQA
    KlShape(3, 19, 19, 2, 8, 6, 6, 7),       # MHA, odd Dqk, 2 query tiles
    KlShape(2, 33, 300, 2, 24, 4, 1, 40),    # past one key block
    KlShape(1, 70, 70, 5, 40, 8, 2, 64),
]
# K for the sparse form; > S for some shapes (padding), 1 (one key per row)
K_VALUES = [1, 5, 40]


def kl_inputs(B, T, S, Hi, Di, H, Hkv, Dqk, dtype=torch.float64, requires_grad=False, w_dtype=None):
    q_idx = randn(B, T, Hi, Di, dtype=dtype, requires_grad=requires_grad)
    k_idx = randn(B, S, Di, dtype=dtype, requires_grad=requires_grad)
    w = randn(B, T, Hi, dtype=w_dtype or dtype, requires_grad=requires_grad)
    q = randn(B, T, H, Dqk, dtype=dtype)
    k = randn(B, S, Hkv, Dqk, dtype=dtype)
    return q_idx, k_idx, w, q, k


# the support of the loss: every causal key, every key, or the valid entries of `topk` indices
FORMS = ["dense_causal", "dense", *(f"sparse_topk{K}" for K in K_VALUES)]


def form_args(form, shape):
    """(indices, causal) of a form for a shape (fresh random indices for the sparse forms)."""
    if form.startswith("sparse"):
        return random_indices(shape.B, shape.T, shape.S, int(form.removeprefix("sparse_topk")), causal=True), True
    return None, form == "dense_causal"


def support(form, shape):
    """indices for a form that is just dense or sparse: None, or causal random indices."""
    return random_indices(shape.B, shape.T, shape.S, 9, causal=True) if form == "sparse" else None


def grads(loss, inputs, grad):
    return torch.autograd.grad(loss, inputs, grad)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("form", FORMS)
def test_float64_forward_backward(seed, shape, form):
    q_idx, k_idx, w, q, k = kl_inputs(*shape, requires_grad=True)
    indices, causal = form_args(form, shape)
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, causal=causal)
    ref = reference.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, causal=causal)
    assert loss.dtype == torch.float64 and loss.shape == shape[:2]
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(loss)
    for got, want, name in zip(grads(loss, (q_idx, k_idx, w), g), grads(ref, (q_idx, k_idx, w), g),
                               ("q_idx", "k_idx", "w")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"grad of {name}")


@pytest.mark.parametrize("shape", SHAPES[1:5], ids=shape_id)
def test_selecting_every_causal_key_equals_dense(seed, shape):
    """The sparse form over indices that list every causal key is the dense warm-up form."""
    B, T, S = shape[:3]
    q_idx, k_idx, w, q, k = kl_inputs(*shape, requires_grad=True)
    indices = dense_causal_indices(B, T, S, S + 3)
    dense = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k)
    sparse = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-13)
    g = torch.randn_like(dense)
    for a, b in zip(grads(sparse, (q_idx, k_idx, w), g), grads(dense, (q_idx, k_idx, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_duplicate_indices_count_per_occurrence(seed):
    """A key listed twice is two support elements: the same loss as weighting that key by 2 in
    both distributions (log 2 added to both logits), as the reference writes it out."""
    q_idx, k_idx, w, q, k = kl_inputs(1, 6, 9, 2, 8, 4, 2, 8, requires_grad=True)
    indices = torch.tensor([[0, 3, 3, -1], [1, 2, 5, 5], [7, 7, 7, 7], [4, 4, 0, 2], [8, -1, 8, 1],
                            [6, 5, 4, 3]], dtype=torch.int32)[None]
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices)
    ref = reference.indexer_kl_loss(q_idx, k_idx, w, q, k, indices)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-13)
    assert loss[0, 2].abs() < 1e-15  # one key listed four times: both distributions are a point mass
    # Against a hand-built weighted KL for row 0: keys {0: 1, 3: 2}
    with torch.no_grad():
        logw = torch.tensor([1.0, 2.0], dtype=torch.float64).log()
        I = reference.indexer_logits(q_idx, k_idx, w, causal=False)[0, 0, [0, 3]] + logw
        kh = k[0, [0, 3]].repeat_interleave(2, dim=1)  # [2 keys, H, D]
        a = (8 ** -0.5) * torch.einsum("hd,shd->hs", q[0, 0], kh) + logw
        p = a.softmax(-1).mean(0)
        want = (p * (p.log() - I.log_softmax(-1))).sum()
    torch.testing.assert_close(loss[0, 0], want, rtol=1e-12, atol=1e-13)
    g = torch.randn_like(loss)
    for a, b in zip(grads(loss, (q_idx, k_idx, w), g), grads(ref, (q_idx, k_idx, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rows_with_one_key_and_empty_rows(seed):
    """One key: both distributions are a point mass, loss 0. No key (all -1; S = 0): loss 0, both
    lse -inf, zero and finite gradients."""
    B, T, S = 2, 5, 8
    q_idx, k_idx, w, q, k = kl_inputs(B, T, S, 2, 8, 4, 2, 8, requires_grad=True)
    indices = random_indices(B, T, S, 3, causal=True)
    indices[1, :, 0] = 0                                                 # batch 1: no row empty
    indices[0, 1] = -1                                                   # empty
    indices[1, 3] = torch.tensor([-1, 6, -1], dtype=torch.int32)         # one key
    indices[1, 4] = torch.tensor([2, 2, -1], dtype=torch.int32)          # one key, twice
    loss, idx_lse, attn_lse = torch.ops.dsa.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, 0.2, 0.3, True, None)
    assert loss[0, 1] == 0 and loss[1, 3] == 0
    assert loss[1, 4].abs() < 1e-15  # two slots of one key: 0 up to the rounding of log 2
    assert idx_lse[0, 1] == float("-inf") and (attn_lse[0, 1] == float("-inf")).all()
    assert torch.isfinite(idx_lse[1]).all() and torch.isfinite(attn_lse[1]).all()
    ref = reference.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, 0.2, 0.3)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-13)
    gq, gk, gw = grads(loss, (q_idx, k_idx, w), torch.randn_like(loss))
    assert all(torch.isfinite(x).all() for x in (gq, gk, gw))
    for r in ((0, 1), (1, 3)):  # these rows' loss is constant: no gradient
        assert (gq[r] == 0).all() and (gw[r] == 0).all()
    assert gq[1, 4].abs().max() < 1e-13 and gw[1, 4].abs().max() < 1e-13
    # dense: query 0 of a causal T == S sequence sees one key
    dense = dsa_ext.indexer_kl_loss(q_idx, k_idx[:, :T], w, q, k[:, :T])
    assert (dense[:, 0] == 0).all()
    # non-causal with no keys at all
    empty = dsa_ext.indexer_kl_loss(q_idx, k_idx[:, :0], w, q, k[:, :0], causal=False)
    assert torch.equal(empty, torch.zeros_like(empty))
    g_empty = grads(empty, (q_idx, w), torch.ones_like(empty))
    assert all(torch.equal(x, torch.zeros_like(x)) for x in g_empty)


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_ties_in_indexer_logits(seed, form):
    """ReLU turns negative dots into exact zeros: many keys tie at I = 0 (and duplicated keys tie
    exactly). The loss and its gradients still match the reference."""
    q_idx, k_idx, w, q, k = kl_inputs(2, 24, 40, 3, 16, 4, 2, 16)
    q_idx = (-q_idx.abs()).requires_grad_()  # mostly negative dots
    k_idx = k_idx.abs()
    k_idx[:, 20:30] = k_idx[:, 10:11]  # identical keys: identical logits
    k_idx.requires_grad_()
    w.requires_grad_()
    logits = reference.indexer_logits(q_idx, k_idx, w)
    assert (logits == 0).sum() > 100
    indices = support(form, KlShape(2, 24, 40, 3, 16, 4, 2, 16))
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices)
    ref = reference.indexer_kl_loss(q_idx, k_idx, w, q, k, indices)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(loss)
    for a, b in zip(grads(loss, (q_idx, k_idx, w), g), grads(ref, (q_idx, k_idx, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4], SHAPES[5]], ids=shape_id)
@pytest.mark.parametrize("sparse", [False, True])
def test_low_precision(seed, dtype, shape, sparse):
    """Loss and gradients within 2x the reference's own error in that precision (the reference
    then computes in the input dtype throughout) of the float64 reference on the same inputs."""
    B, T, S = shape[:3]
    q_idx, k_idx, w, q, k = kl_inputs(*shape, dtype=dtype, requires_grad=True, w_dtype=torch.float32)
    indices = random_indices(B, T, S, 24, causal=True) if sparse else None
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices)
    assert loss.dtype == torch.float32
    inputs64 = [x.detach().double().requires_grad_() for x in (q_idx, k_idx, w)]
    ref64 = reference.indexer_kl_loss(*inputs64, q.double(), k.double(), indices)
    ref_lp = reference.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, upcast=False)
    assert_close_to_reference(loss, ref64, ref_lp)
    g = torch.rand_like(loss)
    got = grads(loss, (q_idx, k_idx, w), g)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    want64 = grads(ref64, inputs64, g.double())
    want_lp = grads(ref_lp, (q_idx, k_idx, w), g.to(ref_lp.dtype))
    for a, r64, rlp in zip(got, want64, want_lp):
        assert_close_to_reference(a, r64, rlp)


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[3]], ids=shape_id)
@pytest.mark.parametrize("form", ["dense_causal", "dense", "sparse_topk5"])
def test_gradcheck(seed, shape, form):
    q_idx, k_idx, w, q, k = kl_inputs(*shape, requires_grad=True)
    idx, causal = form_args(form, shape)
    assert torch.autograd.gradcheck(lambda a, b, c: dsa_ext.indexer_kl_loss(a, b, c, q, k, idx, causal=causal),
                                    (q_idx, k_idx, w))


def test_q_and_k_are_constants(seed):
    q_idx, k_idx, w, q, k = kl_inputs(2, 6, 9, 2, 8, 4, 2, 8, requires_grad=True)
    q.requires_grad_()
    k.requires_grad_()
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k)
    loss.sum().backward()
    assert q.grad is None and k.grad is None
    assert q_idx.grad is not None and k_idx.grad is not None and w.grad is not None
    # only q and k require grad: the loss is a constant
    assert not dsa_ext.indexer_kl_loss(q_idx.detach(), k_idx.detach(), w.detach(), q, k).requires_grad
    # also through the raw operator: no gradient for q, k or attn_lse, none through the lse outputs
    _, lse = dsa_ext.sparse_attention(q, k, k, random_indices(2, 6, 9, 3), return_lse=True)
    out = torch.ops.dsa.indexer_kl_loss(q_idx, k_idx, w, q, k, random_indices(2, 6, 9, 3), 0.3, 0.3, True, lse)
    assert not out[1].requires_grad and not out[2].requires_grad
    for g in torch.autograd.grad(out[0].sum(), (q, k, lse), allow_unused=True):
        assert g is None or torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("shape", SHAPES[1:5], ids=shape_id)
@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_given_attn_lse(seed, shape, form):
    """attn_lse given: bit-identical to recomputing it when it is the operator's own, and equal up
    to the lse's rounding when it comes from sparse_attention over the same indices."""
    B, T, S = shape[:3]
    q_idx, k_idx, w, q, k = kl_inputs(*shape, dtype=torch.float32, requires_grad=True)
    indices = support(form, shape)
    loss, idx_lse, attn_lse = torch.ops.dsa.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, 0.2, 0.3, True, None)
    again = torch.ops.dsa.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, 0.2, 0.3, True, attn_lse)
    assert torch.equal(again[0], loss) and torch.equal(again[1], idx_lse) and torch.equal(again[2], attn_lse)
    assert again[2].data_ptr() != attn_lse.data_ptr()  # a fresh output, never the input
    g = torch.randn_like(loss)
    for a, b in zip(grads(again[0], (q_idx, k_idx, w), g), grads(loss, (q_idx, k_idx, w), g)):
        assert torch.equal(a, b)
    indices = random_indices(B, T, S, 9, causal=True)
    _, lse = dsa_ext.sparse_attention(q, k, k, indices, scale=0.3, return_lse=True)
    with_lse = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, 0.2, 0.3, attn_lse=lse)
    without = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, 0.2, 0.3)
    torch.testing.assert_close(with_lse, without, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_kl_is_nonnegative(seed, dtype, tol, form):
    shape = KlShape(2, 50, 80, 4, 16, 4, 2, 16)
    q_idx, k_idx, w, q, k = kl_inputs(*shape, dtype=dtype)
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q * 3, k, support(form, shape))
    assert loss.min() >= -tol, f"{dtype}: min KL {loss.min().item():.3e}"
    assert loss.max() > 1e-3  # an untrained indexer is not a perfect one


@pytest.mark.parametrize("H,Hkv", [(1, 1), (4, 1), (6, 3)])
@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_zero_when_the_indexer_reproduces_the_target(seed, H, Hkv, form):
    """Every head's logits equal (up to a constant) the indexer's: p == softmax(I), KL == 0 and
    the gradient vanishes. Positive q_idx and k_idx keep every ReLU active, so with one indexer
    head I(s) = idx_scale * w * q_idx . k_idx[s]; the attention uses the same vectors."""
    B, T, S, D = 2, 20, 30, 16
    q_idx = randn(B, T, 1, D).abs().requires_grad_()
    k_idx = randn(B, S, D).abs().requires_grad_()
    w = torch.full((B, T, 1), 2.0, dtype=torch.float64, requires_grad=True)
    q = q_idx.detach().expand(B, T, H, D)
    k = k_idx.detach()[:, :, None].expand(B, S, Hkv, D)
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, support(form, KlShape(B, T, S, 1, D, H, Hkv, D)),
                                   idx_scale=0.25, attn_scale=0.5)
    assert loss.abs().max() < 1e-13
    for g in grads(loss, (q_idx, k_idx, w), torch.ones_like(loss)):
        assert g.abs().max() < 1e-11
    # and a slightly different indexer is penalised
    loss = dsa_ext.indexer_kl_loss(q_idx * 1.1, k_idx, w, q, k, idx_scale=0.25, attn_scale=0.5)
    assert (loss[:, 1:] > 1e-6).all()


@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_thread_counts_and_determinism(seed, threads, form):
    """Work is split by the thread count: every split agrees with the reference, and a repeated
    backward at a fixed thread count is bit-identical (dk_idx sums in a fixed order)."""
    shape = KlShape(3, 21, 29, 2, 8, 4, 2, 8)
    q_idx, k_idx, w, q, k = kl_inputs(*shape, requires_grad=True)
    idx = support(form, shape)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, idx)
        ref = reference.indexer_kl_loss(q_idx, k_idx, w, q, k, idx)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(loss)
        first = grads(loss, (q_idx, k_idx, w), g)
        second = grads(dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, idx), (q_idx, k_idx, w), g)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        for a, b in zip(first, grads(ref, (q_idx, k_idx, w), g)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_num_threads(before)


def test_strided_inputs(seed):
    """Views whose last dimension is contiguous (heads sliced, kv sliced from a wider tensor)."""
    q_idx = randn(2, 9, 6, 16)[:, :, ::2]
    k_idx = randn(2, 11, 2, 16)[:, :, 1]
    w = randn(2, 3, 9).transpose(1, 2)
    q = randn(2, 9, 8, 24)[:, :, 1::2, :12]
    kv = randn(2, 11, 2, 40)
    k = kv[..., 8:20]
    indices = random_indices(2, 9, 11, 16, causal=True)[:, :, ::2]
    for idx in (None, indices):  # the same views, dense and sparse
        torch.testing.assert_close(dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, idx),
                                   reference.indexer_kl_loss(q_idx, k_idx, w, q, k, idx), rtol=1e-12, atol=1e-13)


def test_default_scales(seed):
    q_idx, k_idx, w, q, k = kl_inputs(1, 5, 7, 3, 8, 2, 1, 12)
    torch.testing.assert_close(dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k),
                               dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, None, (3 * 8) ** -0.5, 12 ** -0.5),
                               rtol=0, atol=0)


@pytest.mark.parametrize("mutate,pattern", [
    (lambda a: {**a, "q": a["q"][0]}, r"expected q to be a 4-D tensor \[B, T, H, Dqk\]"),
    (lambda a: {**a, "q": a["q"].float()}, r"expected q to have the dtype of q_idx \(Double\), got Float"),
    (lambda a: {**a, "k": a["k"][:, :5]}, r"expected k.size\(1\) == 7 \(length S of k_idx\)"),
    (lambda a: {**a, "k": a["k"][..., :3]}, r"expected k.size\(3\) == 8 \(head dim Dqk of q\)"),
    (lambda a: {**a, "k": randn(1, 7, 3, 8)}, r"query heads of q to be a positive multiple"),
    (lambda a: {**a, "q": a["q"][:, :3]}, r"expected q.size\(1\) == 4 \(length T of q_idx\)"),
    (lambda a: {**a, "indices": a["indices"].long()}, r"expected indices to be int32, got Long"),
    (lambda a: {**a, "indices": a["indices"][:, :2]}, r"expected indices.size\(1\) == 4 \(length T of q_idx\)"),
    (lambda a: {**a, "indices": a["indices"][..., :0]}, r"expected indices to hold topk >= 1 entries"),
    (lambda a: {**a, "indices": a["indices"][:, :, None]}, r"expected indices to be a 3-D tensor \[B, T, topk\]"),
    (lambda a: {**a, "attn_lse": a["attn_lse"][..., :1]}, r"expected attn_lse of shape \[1, 4, 2\]"),
    (lambda a: {**a, "attn_lse": a["attn_lse"].float()}, r"expected attn_lse to be Double, got Float"),
    (lambda a: {**a, "k_idx": a["k_idx"][:, :3]}, r"causal attention needs S >= T"),
])
def test_bad_inputs(mutate, pattern):
    args = dict(q_idx=randn(1, 4, 2, 8), k_idx=randn(1, 7, 8), w=randn(1, 4, 2), q=randn(1, 4, 2, 8),
                k=randn(1, 7, 1, 8), indices=torch.randint(0, 4, (1, 4, 3), dtype=torch.int32),
                attn_lse=randn(1, 4, 2))
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        dsa_ext.indexer_kl_loss(**mutate(args))


@pytest.mark.parametrize("bad", [-2, 7, 1000])
def test_out_of_range_index_raises(bad):
    indices = torch.randint(0, 4, (1, 4, 3), dtype=torch.int32)
    indices[0, 2, 1] = bad
    with pytest.raises(IndexError, match=rf"-1 or in \[0, S=7\), got {bad} at indices\[0, 2, 1\]"):
        dsa_ext.indexer_kl_loss(randn(1, 4, 2, 8), randn(1, 7, 8), randn(1, 4, 2), randn(1, 4, 2, 8),
                                randn(1, 7, 1, 8), indices)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
def test_opcheck(seed, dtype, sparse):
    q_idx, k_idx, w, q, k = kl_inputs(2, 5, 9, 3, 8, 4, 2, 6, dtype=dtype, requires_grad=dtype != torch.bfloat16)
    indices = random_indices(2, 5, 9, 4, causal=True) if sparse else None
    op, bwd = torch.ops.dsa.indexer_kl_loss.default, torch.ops.dsa.indexer_kl_loss_backward.default
    torch.library.opcheck(op, (q_idx, k_idx, w, q, k, indices, 0.3, 0.4, True, None))
    loss, idx_lse, attn_lse = op(q_idx, k_idx, w, q, k, indices, 0.3, 0.4, True, None)
    torch.library.opcheck(op, (q_idx, k_idx, w, q, k, indices, 0.3, 0.4, True, attn_lse.detach()))
    torch.library.opcheck(op, (q_idx, k_idx, w, q, k, indices, 0.3, 0.4, False, None))
    torch.library.opcheck(bwd, (torch.randn_like(loss), q_idx.detach(), k_idx.detach(), w.detach(), q, k, indices,
                                idx_lse.detach(), attn_lse.detach(), 0.3, 0.4, True))


def test_compile_fullgraph_forward_backward(seed):
    q_idx, k_idx, w, q, k = kl_inputs(2, 9, 12, 3, 8, 4, 2, 8, dtype=torch.float32, requires_grad=True)
    indices = random_indices(2, 9, 12, 5, causal=True)

    def step(q_idx, k_idx, w):
        dense = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k)
        sparse = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices)
        return dense.sum() + 0.5 * sparse.mean()

    inputs = (q_idx, k_idx, w)
    for backend in ("aot_eager", "inductor"):
        loss = torch.compile(step, fullgraph=True, backend=backend)(*inputs)
        eager = step(*inputs)
        torch.testing.assert_close(loss, eager)
        for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(eager, inputs)):
            torch.testing.assert_close(a, b)
