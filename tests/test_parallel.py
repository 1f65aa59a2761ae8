"""The CPU kernels run on every thread torch is given (a build without OpenMP silently runs them
on one: at::parallel_for's OpenMP code is compiled into the extension), the process holds one
OpenMP runtime (torch's), and the gradients that sum over queries are bit-identical for any
thread count. Checked through the threads the kernels record, never through timings."""
import os
import sys

import pytest
import torch

import dsa_ext
from dsa_ext import _C
from helpers import random_indices

THREADS = 2  # enough to show a split; more threads than cores is fine for these checks


@pytest.fixture
def threads():
    """torch.set_num_threads for the test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def threads_used(fn):
    """The number of distinct threads that ran kernel work while fn() ran."""
    _C.take_cpu_threads_seen()
    fn()
    return bin(_C.take_cpu_threads_seen()).count("1")


def indexer_inputs(T=128, S=128, Hi=2, Di=16, requires_grad=False):
    q_idx = torch.randn(1, T, Hi, Di, requires_grad=requires_grad)
    k_idx = torch.randn(1, S, Di, requires_grad=requires_grad)
    w = torch.randn(1, T, Hi, requires_grad=requires_grad)
    return q_idx, k_idx, w


def attention_inputs(T=128, S=128, H=4, Hkv=2, D=16, dtype=torch.float32):
    return [torch.randn(1, n, h, D, dtype=dtype, requires_grad=True) for n, h in ((T, H), (S, Hkv), (S, Hkv))]


def every_operator():
    """Each CPU kernel (forward and backward) as a call on inputs with work for several threads
    (the backward sums over queries in 4 chunks: csrc/cpu/chunked_sum.h, fixed_chunks)."""
    q_idx, k_idx, w = indexer_inputs(requires_grad=True)
    q, k, v = attention_inputs()
    idx = random_indices(1, 128, 128, 64, causal=True)
    kl_q, kl_k = torch.randn(1, 128, 4, 16), torch.randn(1, 128, 2, 16)
    logits = dsa_ext.indexer_logits(q_idx, k_idx, w)

    def backward(out, inputs):
        return lambda: torch.autograd.grad(out, inputs, torch.ones_like(out), retain_graph=True)

    return {
        "indexer_logits": lambda: dsa_ext.indexer_logits(q_idx, k_idx, w),
        "indexer_logits_backward": backward(logits.masked_fill(logits.isinf(), 0), (q_idx, k_idx, w)),
        "topk_indices": lambda: dsa_ext.topk_indices(logits.detach(), 16),
        "indexer_topk": lambda: dsa_ext.indexer_topk(q_idx, k_idx, w, 16),
        "sparse_attention": lambda: dsa_ext.sparse_attention(q, k, v, idx),
        "sparse_attention_backward": backward(dsa_ext.sparse_attention(q, k, v, idx), (q, k, v)),
        "indexer_kl_loss": lambda: dsa_ext.indexer_kl_loss(q_idx, k_idx, w, kl_q, kl_k),
        "indexer_kl_loss_backward": backward(dsa_ext.indexer_kl_loss(q_idx, k_idx, w, kl_q, kl_k), (q_idx, k_idx, w)),
        "indexer_kl_loss_backward_sparse": backward(dsa_ext.indexer_kl_loss(q_idx, k_idx, w, kl_q, kl_k, idx),
                                                    (q_idx, k_idx, w)),
    }


OPERATORS = ["indexer_logits", "indexer_logits_backward", "topk_indices", "indexer_topk", "sparse_attention",
             "sparse_attention_backward", "indexer_kl_loss", "indexer_kl_loss_backward",
             "indexer_kl_loss_backward_sparse"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the build uses OpenMP on Linux")
def test_built_with_openmp():
    assert _C.openmp_version >= 201511, f"_OPENMP of the build: {_C.openmp_version} (0: built without -fopenmp)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the build uses OpenMP on Linux")
@pytest.mark.parametrize("name", OPERATORS)
def test_every_kernel_runs_on_every_thread(threads, name):
    op = every_operator()[name]
    threads(1)
    assert threads_used(op) == 1
    threads(THREADS)
    assert threads_used(op) == THREADS, f"{name} ran on fewer than {THREADS} threads"


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings")
def test_one_openmp_runtime_and_it_is_torchs():
    """The extension links torch's libgomp by path: after a kernel ran, the process maps exactly
    one OpenMP runtime (two would fight over threads), the one libtorch_cpu depends on."""
    dsa_ext.sparse_attention(*attention_inputs(), random_indices(1, 128, 128, 8))
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    runtimes = {os.path.realpath(p) for p in paths
                if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))}
    assert len(runtimes) == 1, f"OpenMP runtimes in the process: {sorted(runtimes)}"
    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    if any(n.startswith("libgomp") for n in os.listdir(torch_lib)):  # pip wheels bring their own
        assert os.path.dirname(runtimes.pop()) == torch_lib


def backward_grads(threads, n, fn, inputs):
    threads(n)
    out = fn(*inputs)
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", ["sparse_attention", "kl_dense", "kl_sparse"])
def test_gradients_bit_identical_for_any_thread_count(threads, case, deterministic):
    """dk/dv (sparse attention) and dk_idx (KL loss) sum over the queries that use a key: fixed
    chunks and a fixed order make them bit-identical at 1, 2 and 3 threads, with or without
    torch.use_deterministic_algorithms. float32 with about 128 terms per key, so a different
    summation order shows in the last bits; the sizes make 8 (attention, top-k KL) and 16 (dense
    KL) chunks (csrc/cpu/chunked_sum.h: fixed_chunks), so 2 and 3 threads run several waves."""
    T = S = 512
    idx = random_indices(1, T, S, 128, causal=True, p_empty=0.0)
    if case == "sparse_attention":
        fn, inputs = (lambda q, k, v: dsa_ext.sparse_attention(q, k, v, idx)), attention_inputs(T, S)
    else:
        q_idx, k_idx, w = indexer_inputs(T, S, requires_grad=True)
        q, k = torch.randn(1, T, 4, 16), torch.randn(1, S, 2, 16)
        kl_idx = idx if case == "kl_sparse" else None
        fn, inputs = (lambda *x: dsa_ext.indexer_kl_loss(*x, q, k, kl_idx)), (q_idx, k_idx, w)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        one, *more = [backward_grads(threads, n, fn, inputs) for n in (1, 2, 3)]
    finally:
        torch.use_deterministic_algorithms(before)
    for grads in more:
        for a, b in zip(one, grads):
            assert torch.equal(a, b)
