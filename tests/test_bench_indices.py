"""The index sets python/bench_cuda_attention.py times the GPU kernels on: valid top-k rows
(causal, ascending, distinct, k per row or every visible key, -1 padding), and the 'local'
distribution overlaps between neighbouring queries far more than the random one."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
import bench_cuda_attention as bench  # noqa: E402


@pytest.mark.parametrize("make", [bench.causal_topk_indices, bench.local_topk_indices])
@pytest.mark.parametrize("B,T,S,k", [(2, 700, 900, 64), (1, 300, 300, 32), (1, 5, 40, 64)])
def test_rows_are_valid_topk_sets(seed, make, B, T, S, k):
    idx = make(B, T, S, k, "cpu")
    assert idx.shape == (B, T, k) and idx.dtype == torch.int32
    valid = idx >= 0
    t = torch.arange(T)[None, :, None]
    assert ((idx <= t + S - T) | ~valid).all(), "a key after its query"
    assert (valid[..., 1:] <= valid[..., :-1]).all(), "-1 padding must come last"
    both = valid[..., 1:] & valid[..., :-1]
    assert ((idx[..., 1:] > idx[..., :-1]) | ~both).all(), "rows must be ascending and distinct"
    assert torch.equal(valid.sum(-1), (torch.arange(T) + S - T + 1).clamp(max=k).expand(B, T))


def test_local_indices_overlap_between_neighbours(seed):
    random_idx = bench.causal_topk_indices(1, 2048, 4096, 256, "cpu")
    local_idx = bench.local_topk_indices(1, 2048, 4096, 256, "cpu")
    assert bench.neighbour_overlap(random_idx) < 0.2
    assert bench.neighbour_overlap(local_idx) > 0.6
