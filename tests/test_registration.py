"""Operator registration: torch.library.opcheck on every op (schema, fake kernel, autograd
registration), defaults carried by the schemas, torch.compile(fullgraph=True) through forward and
backward (values and gradients equal to eager), and shape errors raised by the fake kernels at
trace time."""
import pytest
import torch

import dsa_ext
from helpers import randn, random_indices


def indexer_args(dtype=torch.float64, requires_grad=False):
    return (randn(2, 5, 3, 8, dtype=dtype, requires_grad=requires_grad),
            randn(2, 7, 8, dtype=dtype, requires_grad=requires_grad),
            randn(2, 5, 3, dtype=dtype, requires_grad=requires_grad))


def attention_args(dtype=torch.float64, requires_grad=False, per_head=False):
    q = randn(2, 5, 4, 8, dtype=dtype, requires_grad=requires_grad)
    k = randn(2, 9, 2, 8, dtype=dtype, requires_grad=requires_grad)
    v = randn(2, 9, 2, 6, dtype=dtype, requires_grad=requires_grad)
    return q, k, v, random_indices(2, 5, 9, 4, Hkv=2 if per_head else None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_indexer_logits(seed, dtype):
    q, k, w = indexer_args(dtype, requires_grad=dtype != torch.bfloat16)
    torch.library.opcheck(torch.ops.dsa.indexer_logits.default, (q, k, w, 0.25, True))
    torch.library.opcheck(torch.ops.dsa.indexer_logits.default, (q, k, w, 0.25, False))
    grad = torch.randn(2, 5, 7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(torch.ops.dsa.indexer_logits_backward.default,
                          (grad, q.detach(), k.detach(), w.detach(), 0.25, True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_topk(seed, dtype):
    logits = torch.randn(2, 5, 11).to(dtype)
    torch.library.opcheck(torch.ops.dsa.topk_indices.default, (logits, 4))
    q, k, w = indexer_args(dtype)
    torch.library.opcheck(torch.ops.dsa.indexer_topk.default, (q, k, w, 3, 0.25, True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_head", [False, True])
def test_opcheck_sparse_attention(seed, dtype, per_head):
    q, k, v, idx = attention_args(dtype, requires_grad=dtype != torch.bfloat16, per_head=per_head)
    torch.library.opcheck(torch.ops.dsa.sparse_attention.default, (q, k, v, idx, 0.3))
    out, lse = torch.ops.dsa.sparse_attention(q, k, v, idx, 0.3)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    args = (q.detach(), k.detach(), v.detach(), idx, out.detach(), lse.detach(), 0.3)
    torch.library.opcheck(torch.ops.dsa.sparse_attention_backward.default, (go, gl, *args))
    torch.library.opcheck(torch.ops.dsa.sparse_attention_backward.default, (go, None, *args))


def test_compile_fullgraph_forward_backward(seed):
    q_idx, k_idx, w = indexer_args(torch.float32, requires_grad=True)
    q = randn(2, 5, 4, 8, dtype=torch.float32, requires_grad=True)
    k = randn(2, 7, 2, 8, dtype=torch.float32, requires_grad=True)
    v = randn(2, 7, 2, 8, dtype=torch.float32, requires_grad=True)

    def step(q_idx, k_idx, w, q, k, v):
        logits = dsa_ext.indexer_logits(q_idx, k_idx, w)
        idx = dsa_ext.topk_indices(logits, 3)
        fused = dsa_ext.indexer_topk(q_idx, k_idx, w, 3)
        out, lse = dsa_ext.sparse_attention(q, k, v, idx, return_lse=True)
        loss = out.square().sum() + lse.sum() + logits.masked_fill(logits.isinf(), 0).sum()
        return loss, idx, fused

    inputs = (q_idx, k_idx, w, q, k, v)
    loss, idx, fused = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    eager_loss, eager_idx, _ = step(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    assert torch.equal(idx, eager_idx) and torch.equal(fused, eager_idx)
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_compile_inductor(seed):
    q, k, v, idx = attention_args(torch.float32, requires_grad=True)
    go = torch.randn(2, 5, 4, 6)

    def step(q, k, v):
        return (dsa_ext.sparse_attention(q, k, v, idx) * go).sum() * 2

    loss = torch.compile(step, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager = step(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, eager_grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,args", [
    ("indexer_logits", lambda: indexer_args()),
    ("indexer_topk", lambda: (*indexer_args(), 3)),
    ("sparse_attention", lambda: attention_args()),
])
def test_schema_defaults_equal_explicit_values(seed, name, args):
    """scale=None (and every other default) is resolved by the operator: the same result as the
    explicit default values, from Python positional calls that omit them."""
    a = args()
    op = getattr(torch.ops.dsa, name)
    if name == "sparse_attention":
        explicit = op(*a, a[0].shape[-1] ** -0.5)
    else:
        explicit = op(*a, (a[0].shape[2] * a[0].shape[3]) ** -0.5, True, None)
    got = op(*a)
    for x, y in zip(got if isinstance(got, tuple) else (got,), explicit if isinstance(explicit, tuple) else (explicit,)):
        assert torch.equal(x, y)


def test_opcheck_defaults(seed):
    """opcheck through calls that leave the optional arguments to the schema."""
    q, k, w = indexer_args(requires_grad=True)
    torch.library.opcheck(torch.ops.dsa.indexer_logits.default, (q, k, w))
    torch.library.opcheck(torch.ops.dsa.indexer_topk.default, (q.detach(), k.detach(), w.detach(), 3))
    aq, ak, av, idx = attention_args(requires_grad=True)
    torch.library.opcheck(torch.ops.dsa.sparse_attention.default, (aq, ak, av, idx))
    kq = randn(2, 5, 4, 6)
    kk = randn(2, 7, 2, 6)
    torch.library.opcheck(torch.ops.dsa.indexer_kl_loss.default, (q, k, w, kq, kk))


@pytest.mark.parametrize("fn,pattern", [
    (lambda q, k, v, i: dsa_ext.sparse_attention(q, k[:, :, :1].expand(2, 9, 3, 8), v, i),
     r"expected v.size\(2\) == 3 \(kv heads Hkv of k\)"),
    (lambda q, k, v, i: dsa_ext.sparse_attention(q, k, v, i[:, :3]), r"expected indices.size\(1\) == 5"),
    (lambda q, k, v, i: dsa_ext.indexer_topk(q[..., :2, :], k[:, :, 0], v[:, :5, 0, :1], 3),
     r"expected w.size\(2\) == 2 \(heads Hi of q_idx\)"),
])
def test_fake_kernels_report_bad_shapes_at_trace_time(seed, fn, pattern):
    q, k, v, idx = attention_args()
    with pytest.raises(Exception, match=pattern):
        torch.compile(fn, fullgraph=True, backend="eager")(q, k, v, idx)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, pytest.raises(Exception, match=pattern):
        fn(*(mode.from_tensor(x) for x in (q, k, v, idx)))
