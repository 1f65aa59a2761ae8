"""CPU indexer_topk with fewer query blocks than threads (decode: one query over a long cache):
each block's keys are split over the threads and the parts' candidates merged
(csrc/cpu/topk.cpp). The result is exactly the one-pass selection (ties included) for any
thread count, and the split really spreads one query over the threads."""
import sys

import pytest
import torch

import dsa_ext
from dsa_ext import fp8
from test_parallel import threads, threads_used  # noqa: F401  (the fixture)


def inputs(T, S, dtype, ties):
    q_idx, k_idx, w = torch.randn(2, T, 3, 16), torch.randn(2, S, 16), torch.randn(2, T, 3)
    if ties:  # the same keys again further on: equal scores in different parts, lower position wins
        k_idx[:, S // 2:S // 2 + 700] = k_idx[:, 100:800]
    return q_idx.to(dtype), k_idx.to(dtype), w.to(dtype)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_split_keys_select_exactly_as_one_pass(threads, dtype, T, causal):  # noqa: F811
    S, k = 4099, 300
    q_idx, k_idx, w = inputs(T, S, dtype, ties=True)
    want = dsa_ext.topk_indices(dsa_ext.indexer_logits(q_idx, k_idx, w, causal=causal), k)
    for n in (1, 2, 3, 5):
        threads(n)
        assert torch.equal(dsa_ext.indexer_topk(q_idx, k_idx, w, k, causal=causal), want), f"{n} threads"


def test_split_keys_fp8(threads):  # noqa: F811
    q_idx, k_idx, w = inputs(1, 5000, torch.float32, ties=True)
    q8, k8, ws, ks = fp8.indexer_inputs(q_idx, k_idx, w)
    threads(1)
    want = dsa_ext.indexer_topk(q8, k8, ws, 256, k_scale=ks)
    threads(4)
    assert torch.equal(dsa_ext.indexer_topk(q8, k8, ws, 256, k_scale=ks), want)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the build uses OpenMP on Linux")
def test_one_query_runs_on_every_thread(threads):  # noqa: F811
    q_idx, k_idx, w = inputs(1, 8192, torch.float32, ties=False)
    threads(2)
    assert threads_used(lambda: dsa_ext.indexer_topk(q_idx[:1], k_idx[:1], w[:1], 64)) == 2
