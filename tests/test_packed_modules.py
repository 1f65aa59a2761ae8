"""Key ranges through the modules (float64): a packed batch equals each document run alone and a
left- or right-padded batch equals its unpadded rows, for DSAAttention in every mode (the same
top-k, outputs, indexer losses, gradients of q, k, v and of the indexer) and for recall
statistics; queries that see nothing (padding, a tail past the last document) give 0 and no
NaN. Each equivalence is also run with the ranges left out, and must then fail."""
import itertools
from typing import List, NamedTuple, Optional

import pytest
import torch

from dsa_ext import decoder, ranges
from dsa_ext import nn as dnn
from models import dsa_cfg, small_decoder

HIDDEN, H, HKV, D, TOPK = 20, 4, 2, 8, 4
TOL = {"rtol": 0, "atol": 1e-12}


class Run(NamedTuple):
    indices: Optional[torch.Tensor]
    out: torch.Tensor
    loss: Optional[torch.Tensor]
    grads: List[torch.Tensor]  # q, k, v
    indexer_grads: List[Optional[torch.Tensor]]
    recall: dnn.RecallSums


def make_core(mode):
    torch.manual_seed(1)
    core = dnn.DSAAttention(dnn.LightningIndexer(HIDDEN, 3, 16, 8), topk=TOPK, mode=mode).double()
    with torch.no_grad():
        for p in core.parameters():
            p.mul_(3.0)  # sharper indexer scores: no ties at the top-k margin
    return core.train()


def run(core, q, k, v, x, g, positions=None, key_ranges=None, loss_scale=1.0) -> Run:
    """One forward and backward of ``core`` on its own copies of q, k, v, with the output loss
    ``(out * g).sum()`` and the indexer loss injected at ``loss_scale``; then a forward under
    recall measurement (which also gives the top-k in every mode)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    core.zero_grad(set_to_none=True)
    core.last_loss, core.loss_scale = None, loss_scale
    out = core.attend(q, k, v, core.select(x, positions, key_ranges=key_ranges), 0.4, key_ranges=key_ranges)
    (out * g).sum().backward()
    grads = [q.grad, k.grad, v.grad]
    assert all(torch.isfinite(t).all() for t in [out, *grads]), "NaN or inf"
    core.recall = sums = dnn.RecallSums()
    with torch.no_grad():
        selection = core.select(x, positions, key_ranges=key_ranges)
        core.attend(q, k, v, selection, 0.4, key_ranges=key_ranges)
    core.recall = None
    return Run(selection.indices, out.detach(), core.last_loss, grads,
               [p.grad for p in core.indexer.parameters()], sums)


def inputs(B, T, seed):
    torch.manual_seed(seed)
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    k = torch.randn(B, T, HKV, D, dtype=torch.float64)
    v = torch.randn(B, T, HKV, D + 2, dtype=torch.float64)
    x = torch.randn(B, T, HIDDEN, dtype=torch.float64)
    g = torch.randn(B, T, H, D + 2, dtype=torch.float64)
    return q, k, v, x, g


def assert_equivalent(whole: Run, parts: List[Run], segments, mode):
    """``whole`` restricted to each segment (batch row, first position, length) is the part run
    alone: the same top-k (shifted by the segment's start), outputs, gradients of q, k, v; its
    loss is the token-weighted mean of theirs, its indexer gradients (each part's loss injected
    at length / total) and recall sums the sum of theirs."""
    total = sum(n for _, _, n in segments)
    for (b, a, n), part in zip(segments, parts):
        rows = (b, slice(a, a + n))
        shifted = torch.where(whole.indices[rows] >= 0, whole.indices[rows] - a, -1)
        assert torch.equal(shifted, part.indices[0]), "top-k differs"
        torch.testing.assert_close(whole.out[rows], part.out[0], **TOL)
        for got, want in zip(whole.grads, part.grads):
            torch.testing.assert_close(got[rows], want[0], **TOL)
    if mode == "dense":
        assert whole.loss is None and all(g is None for g in whole.indexer_grads)
    else:
        torch.testing.assert_close(whole.loss * total, sum(p.loss * n for p, (_, _, n) in zip(parts, segments)),
                                   **TOL)
        for i, got in enumerate(whole.indexer_grads):
            torch.testing.assert_close(got, sum(p.indexer_grads[i] for p in parts), **TOL)
    want = [sum(getattr(p.recall, f) for p in parts) for f in ("recall", "queries", "oracle", "recall_hard",
                                                               "queries_hard", "oracle_hard")]
    got = [getattr(whole.recall, f) for f in ("recall", "queries", "oracle", "recall_hard", "queries_hard",
                                              "oracle_hard")]
    assert got == pytest.approx(want, rel=0, abs=1e-12), "recall sums differ"


def run_parts(core, tensors, segments):
    """Each segment run alone, as a batch of one, its indexer loss injected at length / total."""
    total = sum(n for _, _, n in segments)
    return [run(core, *(t[b:b + 1, a:a + n] for t in tensors), loss_scale=n / total) for b, a, n in segments]


# documents shorter than topk, of length 1, longer; a tail of tokens in no document (empty ranges)
PACKS = [((5, 1, 13, 3, 9), 2), ((1, 1, 2), 0), ((17,), 3)]


@pytest.mark.parametrize("mode", dnn.MODES)
@pytest.mark.parametrize("lengths,tail", PACKS, ids=lambda x: str(x))
def test_packed_batch_equals_documents_alone(mode, lengths, tail):
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    T = int(cu[-1]) + tail
    key_ranges = ranges.from_cu_seqlens(cu, total=T)
    positions = torch.cat([ranges.position_ids_from_cu_seqlens(cu), torch.zeros(1, tail, dtype=torch.long)], 1)
    q, k, v, x, g = tensors = inputs(1, T, seed=len(lengths) + tail)
    core = make_core(mode)
    whole = run(core, q, k, v, x, g, positions, key_ranges)
    segments = [(0, int(a), n) for a, n in zip(cu[:-1], lengths)]
    assert_equivalent(whole, run_parts(core, tensors, segments), segments, mode)
    if tail:  # queries in no document: output 0, no gradient, not counted
        assert (whole.out[0, -tail:] == 0).all() and (whole.grads[0][0, -tail:] == 0).all()
        assert whole.recall.queries == sum(lengths)
    # the same batch with the ranges left out attends across documents: the comparison fails
    if len(lengths) > 1:
        ignored = run(core, q, k, v, x, g, positions, None)
        with pytest.raises(AssertionError):
            assert_equivalent(ignored, run_parts(core, tensors, segments), segments, mode)


@pytest.mark.parametrize("mode", dnn.MODES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_rows(mode, side):
    lengths, T = (7, 1, 10, 3), 10
    real = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        real[b, (T - n if side == "left" else 0):(T if side == "left" else n)] = True
    key_ranges = ranges.from_padding_mask(real)
    positions = (real.long().cumsum(1) - 1).clamp_min(0)  # each row's real tokens from 0, as generate gives them
    q, k, v, x, g = tensors = inputs(len(lengths), T, seed=7)
    core = make_core(mode)
    whole = run(core, q, k, v, x, g, positions, key_ranges)
    segments = [(b, T - n if side == "left" else 0, n) for b, n in enumerate(lengths)]
    assert_equivalent(whole, run_parts(core, tensors, segments), segments, mode)
    # padding queries see nothing (empty ranges): output 0, zero gradients, not counted
    assert (whole.out[~real] == 0).all() and (whole.grads[0][~real] == 0).all()
    assert whole.recall.queries == sum(lengths)
    ignored = run(core, q, k, v, x, g, positions, None)
    with pytest.raises(AssertionError):
        assert_equivalent(ignored, run_parts(core, tensors, segments), segments, mode)


@pytest.mark.parametrize("mode", dnn.MODES)
def test_decoder_packed_by_position_ids_equals_documents_alone(mode):
    """The plain decoder takes packed documents as transformers does, by position ids that
    restart: the logits of each document are those it gets alone (host RoPE, dense or sparse
    attention and the indexers' RoPE all restart)."""
    m = decoder.convert(small_decoder(), dsa_cfg(topk=TOPK, mode=mode)).eval()
    lengths = (6, 1, 11, 3)
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    ids = torch.randint(0, 61, (1, int(cu[-1])))
    with torch.no_grad():
        packed = m(ids, ranges.position_ids_from_cu_seqlens(cu))
        for a, n in zip(cu[:-1].tolist(), lengths):
            torch.testing.assert_close(packed[0, a:a + n], m(ids[:, a:a + n])[0], **TOL)
        ignored = m(ids)  # one stream: the second document onwards differs
        assert not torch.allclose(ignored[0, 6:], packed[0, 6:], rtol=0, atol=1e-6)
