"""Context-parallel DSA (dsa_ext.context_parallel) on 2 and 4 gloo processes equals one process:
the same top-k indices, outputs, losses and gradients (1e-10, float64) for the DSA core in modes
warmup and sparse, and for training steps of the plain decoder and a converted transformers
model (with activation checkpointing), sequence lengths that are not multiples of the rank count,
top-k larger than a rank's chunks, FSDP2 over the same ranks, and packed documents (key ranges)
that the chunk boundaries cut, for the core, the decoder and transformers models. The ranks'
code is tests/cp_workers.py; the layout is checked here without processes."""
import pytest
import torch
import torch.multiprocessing as mp

import cp_workers
from dsa_ext.context_parallel import ZigzagLayout


@pytest.mark.parametrize("seq_len,size", [(8, 2), (37, 2), (37, 4), (10, 4), (1001, 3)])
def test_zigzag_layout(seq_len, size):
    """Every position on exactly one rank, in order within a rank; chunk sizes and rank lengths
    differ by at most one token; rank r holds chunks r and 2N-1-r, so the causal work (the sum
    of visible keys) differs between ranks by at most about one token's keys."""
    layouts = [ZigzagLayout(seq_len, size, r) for r in range(size)]
    seen = torch.cat([lay.positions() for lay in layouts])
    assert torch.equal(seen.sort().values, torch.arange(seq_len))
    sizes = [e - s for lay in layouts for s, e in lay.ranges[lay.rank]]
    assert max(sizes) - min(sizes) <= 1 and max(layouts[0].lengths) - min(layouts[0].lengths) <= 1
    work = [int((lay.positions() + 1).sum()) for lay in layouts]
    assert max(work) - min(work) <= seq_len + 2 * size, work
    x = torch.arange(seq_len).view(1, seq_len)
    for lay in layouts:
        assert torch.equal(lay.take(x)[0], lay.positions())
        rows = lay.gather_index()
        assert rows.unique().numel() == seq_len and int(rows.max()) < size * lay.max_len


def test_zigzag_layout_needs_two_tokens_per_rank():
    with pytest.raises(ValueError, match="at least 8 tokens"):
        ZigzagLayout(7, 4, 0)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_equals_one_process(world, tmp_path):
    mp.spawn(cp_workers.run, args=(world, str(tmp_path / "init"), list(cp_workers.CASES)), nprocs=world)
