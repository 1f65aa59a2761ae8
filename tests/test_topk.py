"""topk_indices: deterministic selection against dsa_ext.reference."""
import pytest
import torch

import dsa_ext
from dsa_ext import reference


def tied_logits(B, T, S, dtype=torch.float32):
    """Few distinct values (many exact ties, many zeros as ReLU sums give), plus -inf and NaN."""
    x = torch.randint(-2, 3, (B, T, S)).to(dtype).clamp(min=0)  # 0 is the most common value
    x = x + torch.randint(0, 2, (B, T, S)).to(dtype) * 0.5
    x[torch.rand(B, T, S) < 0.1] = float("-inf")
    x[torch.rand(B, T, S) < 0.05] = float("nan")
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [1, 13, 257, 1000])
@pytest.mark.parametrize("k", [1, 7, 64, 1100])
def test_ties_match_reference(seed, dtype, S, k):
    logits = tied_logits(2, 5, S, dtype)
    out = dsa_ext.topk_indices(logits, k)
    assert out.dtype == torch.int32 and out.shape == (2, 5, k)
    assert torch.equal(out, reference.topk_indices(logits, k))


def test_random_scores_match_torch_topk_set(seed):
    logits = torch.randn(3, 17, 500)
    out = dsa_ext.topk_indices(logits, 40)
    want = torch.topk(logits, 40, dim=-1).indices.sort(dim=-1).values.int()
    assert torch.equal(out, want)


def test_deterministic_under_ties(seed):
    logits = torch.zeros(4, 8, 777)  # every score tied: the lowest positions win
    out = dsa_ext.topk_indices(logits, 100)
    assert torch.equal(out, torch.arange(100, dtype=torch.int32).expand(4, 8, 100))
    for _ in range(3):
        assert torch.equal(dsa_ext.topk_indices(logits, 100), out)


def test_invalid_scores_never_selected(seed):
    logits = torch.full((1, 2, 10), float("-inf"))
    logits[0, 0, 3] = 1.0
    logits[0, 1, :] = float("nan")
    out = dsa_ext.topk_indices(logits, 4)
    assert out.tolist() == [[[3, -1, -1, -1], [-1, -1, -1, -1]]]


def test_causal_rows_are_dense_before_k(seed):
    T = S = 12
    logits = torch.randn(1, T, S).masked_fill(~reference.causal_mask(T, S), float("-inf"))
    out = dsa_ext.topk_indices(logits, 5)
    for t in range(5):
        assert out[0, t].tolist() == list(range(t + 1)) + [-1] * (4 - t)


def test_strided_logits(seed):
    logits = torch.randn(2, 30, 9).transpose(1, 2)[:, :, ::2]  # [2, 9, 15], last stride 2
    assert torch.equal(dsa_ext.topk_indices(logits, 4), reference.topk_indices(logits, 4))
