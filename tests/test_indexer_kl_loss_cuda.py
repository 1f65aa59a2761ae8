"""CUDA indexer_kl_loss (forward, backward) against the CPU operator on the same inputs and the
float64 reference. Skipped without a GPU."""
import pytest
import torch

import dsa_ext
from dsa_ext import ranges, reference
from helpers import KlShape, random_indices, shape_id

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() or not dsa_ext.built_with_cuda,
                       reason="needs a CUDA device and a CUDA build of dsa_ext"),
]

SHAPES = [
    KlShape(2, 7, 13, 3, 24, 4, 2, 12),      # GQA, S > T
    KlShape(1, 13, 13, 4, 16, 3, 1, 20),     # MQA
    KlShape(1, 70, 700, 8, 64, 8, 8, 64),    # MHA, more than one key block
    KlShape(1, 33, 33, 64, 128, 16, 1, 96),  # indexer at V3.2 size, MQA
]


def inputs(shape, dtype, device="cuda"):
    B, T, S, Hi, Di, H, Hkv, Dqk = shape
    r = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    return r(B, T, Hi, Di).to(dtype), r(B, S, Di).to(dtype), r(B, T, Hi) * Hi ** -0.5, r(B, T, H, Dqk).to(dtype), \
        r(B, S, Hkv, Dqk).to(dtype)


def forms(shape):
    B, T, S = shape[:3]
    idx = random_indices(B, T, S, 40, causal=True, device="cuda")
    idx[:, 0] = -1  # an empty row
    return [("causal", None, True), ("full", None, False), ("sparse", idx, True)]


def run_op(args, grad):
    q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, attn_lse = args
    out = torch.ops.dsa.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, attn_lse)
    grads = torch.ops.dsa.indexer_kl_loss_backward(grad, q_idx, k_idx, w, q, k, indices, out[1], out[2], idx_scale,
                                                   attn_scale, causal)
    return out, grads


def to_cpu(args):
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_matches_cpu_operator(seed, dtype, shape):
    q_idx, k_idx, w, q, k = inputs(shape, dtype)
    Hi, Di, Dqk = shape[3], shape[4], shape[7]
    for name, indices, causal in forms(shape):
        for given_lse in (False, True):
            lse = None
            if given_lse:
                lse = torch.ops.dsa.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, (Hi * Di) ** -0.5, Dqk ** -0.5,
                                                    causal, None)[2]
            args = (q_idx, k_idx, w, q, k, indices, (Hi * Di) ** -0.5, Dqk ** -0.5, causal, lse)
            grad = torch.randn(shape[0], shape[1], device="cuda")
            (out, grads) = run_op(args, grad)
            (out_c, grads_c) = run_op(to_cpu(args), grad.cpu())
            for a, b, what in zip(out, out_c, ("loss", "idx_lse", "attn_lse")):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4, msg=f"{name} {what}")
            for a, b, what in zip(grads, grads_c, ("q_idx", "k_idx", "w")):
                assert a.dtype == b.dtype, what
                tol = 1e-4 if dtype == torch.float32 else 1e-2  # one rounding to the input dtype
                torch.testing.assert_close(a.cpu().float(), b.float(), rtol=tol,
                                           atol=tol * b.float().abs().max().item() + 1e-7, msg=f"{name} d{what}")


def test_against_float64_reference(seed):
    shape = (1, 20, 60, 4, 16, 4, 2, 16)
    q_idx, k_idx, w, q, k = inputs(shape, torch.float32)
    for name, indices, causal in forms(shape):
        loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, causal=causal)
        ref = reference.indexer_kl_loss(q_idx.double(), k_idx.double(), w.double(), q.double(), k.double(), indices,
                                        causal=causal)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5, msg=name)


def test_autograd_and_opcheck(seed):
    shape = (1, 6, 9, 2, 8, 4, 2, 8)
    q_idx, k_idx, w, q, k = inputs(shape, torch.float32)
    idx = random_indices(1, 6, 9, 5, causal=True, device="cuda")
    for indices in (None, idx):
        leaves = [x.clone().requires_grad_() for x in (q_idx, k_idx, w)]
        dsa_ext.indexer_kl_loss(*leaves, q, k, indices).sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in leaves)
        torch.library.opcheck(torch.ops.dsa.indexer_kl_loss.default,
                              (*leaves, q, k, indices, 0.3, 0.4, True, None))


def test_bounded_memory(seed):
    B, T, S, Hi, Di, H, Hkv, Dqk = 1, 4096, 4096, 8, 64, 32, 32, 64
    q_idx, k_idx, w, q, k = inputs((B, T, S, Hi, Di, H, Hkv, Dqk), torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    probs = B * H * T * S * 4  # what the reference materialises
    assert peak < probs / 3, (peak, probs)


def test_sparse_backward_is_deterministic(seed):
    shape = (2, 50, 300, 8, 32, 4, 1, 32)
    q_idx, k_idx, w, q, k = inputs(shape, torch.bfloat16)
    idx = random_indices(2, 50, 300, 64, causal=True, device="cuda")
    args = (q_idx, k_idx, w, q, k, idx, 0.1, 0.2, True, None)
    g = torch.randn(2, 50, device="cuda")
    a, b = run_op(args, g), run_op(args, g)
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)


def test_float64_is_refused(seed):
    q_idx, k_idx, w, q, k = inputs((1, 2, 3, 1, 4, 1, 1, 4), torch.float32)
    with pytest.raises(RuntimeError, match="float64"):
        dsa_ext.indexer_kl_loss(q_idx.double(), k_idx.double(), w, q.double(), k.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_ranges_match_cpu_operator(seed, dtype):
    """Packed documents and random ranges (empty rows included), dense and sparse forms."""
    shape = KlShape(2, 40, 700, 4, 32, 4, 2, 32)
    B, T, S, Hi, Di, Dqk = shape.B, shape.T, shape.S, shape.Hi, shape.Di, shape.Dqk
    q_idx, k_idx, w, q, k = inputs(shape, dtype)
    ks, ke = ranges.from_cu_seqlens(torch.tensor([0, 200, 660, 690, S]))
    packed = (ks[:, S - T:].expand(B, T).contiguous().cuda(), ke[:, S - T:].expand(B, T).contiguous().cuda())
    start = torch.randint(0, S + 1, (B, T), dtype=torch.int32, device="cuda")
    rand = (start, torch.randint(0, S + 1, (B, T), dtype=torch.int32, device="cuda"))
    idx = random_indices(B, T, S, 40, causal=True, device="cuda")
    for name, (key_start, key_end) in (("packed", packed), ("random", rand)):
        for indices in (None, idx):
            args = (q_idx, k_idx, w, q, k, indices, (Hi * Di) ** -0.5, Dqk ** -0.5, True, None, key_start, key_end)
            grad = torch.randn(B, T, device="cuda")
            out = torch.ops.dsa.indexer_kl_loss(*args)
            grads = torch.ops.dsa.indexer_kl_loss_backward(grad, *args[:6], out[1], out[2], *args[6:9], key_start,
                                                           key_end)
            cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
            out_c = torch.ops.dsa.indexer_kl_loss(*cpu)
            grads_c = torch.ops.dsa.indexer_kl_loss_backward(grad.cpu(), *cpu[:6], out_c[1], out_c[2], *cpu[6:9],
                                                             cpu[10], cpu[11])
            for a, b, what in zip(out, out_c, ("loss", "idx_lse", "attn_lse")):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4, msg=f"{name} {what}")
            for a, b, what in zip(grads, grads_c, ("q_idx", "k_idx", "w")):
                tol = 1e-4 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(a.cpu().float(), b.float(), rtol=tol,
                                           atol=tol * b.float().abs().max().item() + 1e-7, msg=f"{name} d{what}")
