"""Converted transformers models on packed and padded batches (float64), in modes dense, warmup and
sparse: a batch packed by DataCollatorWithFlattening (position ids that restart, cu_seq_lens_q/k;
use_cache=False, as in training: transformers takes the documents from position ids only without a cache)
gives each document the logits it gets alone, and its indexer losses and every gradient are the
documents' (host gradients summed, indexer losses token-weighted); a left- or right-padded batch
gives its unpadded rows. Padding positions are never NaN. Each equivalence fails when the
documents or the padding are not passed."""
import itertools

import pytest
import torch

from dsa_ext import nn as dnn
from models import HF_VOCAB, dsa_cfg, tiny_hf, tiny_hf_dsa

transformers = pytest.importorskip("transformers")
from dsa_ext import hf  # noqa: E402

TOPK = 4
FAMILIES = ["llama", "qwen3", "deepseek_v32", "glm_moe_dsa"]
# largest error allowed, relative to the largest value of the tensor compared: DeepSeek-V3.2 and
# GLM-5 in transformers run parts of the model in float32 whatever its dtype (RoPE tables, MoE
# routing), whose rounding depends on the batch's shape (measured: up to 1e-7)
TOLERANCE = {"llama": 1e-12, "qwen3": 1e-12, "deepseek_v32": 1e-6, "glm_moe_dsa": 1e-6}


def assert_near(got, want, tol, what):
    err, scale = (got - want).abs().max().item(), max(want.abs().max().item(), 1.0)
    assert err <= tol * scale, f"{what}: error {err:.2e} > {tol:.0e} x {scale:.2e}"


def converted(family, mode):
    if family in ("llama", "qwen3"):
        return hf.convert(tiny_hf(family), dsa_cfg(topk=TOPK, mode=mode)).train()
    return hf.convert(tiny_hf_dsa(family, index_topk=16), dnn.DSAConfig(topk=TOPK, mode=mode)).train()


def forward_backward(m, g, loss_scale=1.0, **inputs):
    """Logits, each layer's indexer loss and every parameter's gradient, for the loss
    ``(logits * g).sum()`` with the indexer losses injected at ``loss_scale``."""
    m.zero_grad(set_to_none=True)
    dnn.set_loss_scale(m, loss_scale)
    for c in dnn.dsa_modules(m):
        c.last_loss = None
    logits = m(**inputs, use_cache=False).logits  # transformers reads packing off position ids without a cache
    (logits * g).sum().backward()
    assert torch.isfinite(logits).all()
    return logits.detach(), [c.last_loss for c in dnn.dsa_modules(m)], \
        {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def assert_parts(whole, parts, segments, tol):
    """``whole`` (logits, losses, grads) against the parts run alone over segments (row, start, length)."""
    total = sum(n for _, _, n in segments)
    for (b, a, n), part in zip(segments, parts):
        assert_near(whole[0][b, a:a + n], part[0][0], tol, f"logits of row {b} at {a}")
    for layer, loss in enumerate(whole[1]):
        if loss is None:
            assert all(p[1][layer] is None for p in parts)
        else:
            assert_near(loss * total, sum(p[1][layer] * n for p, (_, _, n) in zip(parts, segments)), tol,
                        f"indexer loss of layer {layer}")
    assert set(whole[2]) == set().union(*(p[2] for p in parts))  # MoE experts no token of a part reached: None
    for name, grad in whole[2].items():
        assert_near(grad, sum(p[2].get(name, torch.zeros_like(grad)) for p in parts), tol, name)


def run_alone(m, ids, g, segments):
    total = sum(n for _, _, n in segments)
    return [forward_backward(m, g[b:b + 1, a:a + n], n / total, input_ids=ids[b:b + 1, a:a + n])
            for b, a, n in segments]


@pytest.mark.parametrize("mode", dnn.MODES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
def test_packed_batch_equals_documents_alone(family, mode, flash_kwargs):
    lengths = (6, 1, 11, 3, 2)  # shorter than topk, of length 1, longer
    torch.manual_seed(0)
    docs = [torch.randint(0, HF_VOCAB, (n,)).tolist() for n in lengths]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(
        [{"input_ids": d} for d in docs], return_tensors="pt")
    batch.pop("labels")
    if flash_kwargs:
        assert batch["cu_seq_lens_q"].tolist() == [0, *itertools.accumulate(lengths)]
    m = converted(family, mode)
    g = torch.randn(1, sum(lengths), HF_VOCAB, dtype=torch.float64)
    whole = forward_backward(m, g, **batch)
    segments = [(0, a, n) for a, n in zip(itertools.accumulate((0,) + lengths), lengths)]
    parts = run_alone(m, batch["input_ids"], g, segments)
    assert_parts(whole, parts, segments, TOLERANCE[family])
    # the same tokens as one stream attend across documents
    stream = forward_backward(m, g, input_ids=batch["input_ids"])
    with pytest.raises(AssertionError):
        assert_parts(stream, parts, segments, TOLERANCE[family])


@pytest.mark.parametrize("mode", dnn.MODES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_unpadded_rows(family, mode, side):
    lengths, T = (9, 1, 12, 4), 12
    torch.manual_seed(1)
    ids = torch.randint(0, HF_VOCAB, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    segments = []
    for b, n in enumerate(lengths):
        a = T - n if side == "left" else 0
        mask[b, a:a + n] = 1
        segments.append((b, a, n))
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # each row's real tokens from 0, as generate gives them
    g = torch.randn(len(lengths), T, HF_VOCAB, dtype=torch.float64) * mask[..., None]  # padding outputs unused
    m = converted(family, mode)
    whole = forward_backward(m, g, input_ids=ids, attention_mask=mask, position_ids=positions)
    assert_parts(whole, run_alone(m, ids, g, segments), segments, TOLERANCE[family])
    if side == "left":  # the padding queries see nothing, and are no part of the loss or recall
        with torch.no_grad(), dnn.recall_stats(m) as stats:
            m(input_ids=ids, attention_mask=mask, position_ids=positions)
        assert all(s.queries == sum(lengths) for s in stats.sums)
    if side == "left" or mode != "dense":  # no padding mask: real queries see padding, or losses count it
        no_padding = torch.ones_like(mask)  # (without any mask, transformers reads documents off the positions)
        unmasked = forward_backward(m, g, input_ids=ids, attention_mask=no_padding, position_ids=positions)
        alone = run_alone(m, ids, g, segments)
        with pytest.raises(AssertionError):
            assert_parts(unmasked, alone, segments, TOLERANCE[family])


def test_masks_ranges_cannot_express_are_refused():
    m = converted("llama", "sparse")
    ids = torch.randint(0, HF_VOCAB, (1, 8))
    holes = torch.ones(1, 8, dtype=torch.long)
    holes[0, 3] = 0  # a hole inside the row
    with torch.no_grad(), pytest.raises(NotImplementedError, match="contiguous"):
        m(input_ids=ids, attention_mask=holes)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])  # documents [0, 4) and [4, 8): not cu's
    with torch.no_grad(), pytest.raises(ValueError, match="different documents"):
        m(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False)


def test_cu_seq_lens_alone_keep_documents_apart_in_every_mode():
    """cu_seq_lens_q/k with position ids that do not restart (transformers then builds no mask):
    the documents come from cu_seq_lens, for the dense attention too, so every mode agrees."""
    m = converted("llama", "dense")
    ids = torch.randint(0, HF_VOCAB, (1, 10))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with torch.no_grad():
        dense = m(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits
        # the second document alone, up to the float32 RoPE tables at positions shifted by 4
        torch.testing.assert_close(dense[:, 4:], m(input_ids=ids[:, 4:]).logits, rtol=0, atol=1e-5)
        assert not torch.allclose(dense[:, 4:], m(input_ids=ids).logits[:, 4:], rtol=0, atol=1e-3)
        for c in dnn.dsa_modules(m):
            c.topk = 10  # every key of a document: sparse attention is the dense one
        for mode in ("warmup", "sparse"):
            dnn.set_mode(m, mode)
            torch.testing.assert_close(m(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits, dense,
                                       rtol=0, atol=1e-12)


@pytest.mark.parametrize("restart", [True, False], ids=["mask_and_cu_seq_lens", "cu_seq_lens_alone"])
def test_documents_are_read_once_per_forward(monkeypatch, restart):
    """The ranges of a packed batch (and the check that the mask and cu_seq_lens agree, a device
    synchronisation) are worked out once per forward, not in every layer; a new forward works
    them out again when it has a new mask, or cu_seq_lens alone that are new or refilled."""
    from dsa_ext import hf_ranges

    calls = []
    real = hf_ranges._for_attention
    monkeypatch.setattr(hf_ranges, "_for_attention", lambda *a: calls.append(1) or real(*a))
    m = converted("llama", "sparse")
    assert len(dnn.dsa_modules(m)) > 1
    lengths = (5, 9, 4)
    ids = torch.randint(0, HF_VOCAB, (1, sum(lengths)))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    kw = {"position_ids": torch.cat([torch.arange(n) for n in lengths])[None]} if restart else {}
    m(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False, **kw)
    assert len(calls) == 1
    m(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False, **kw)
    assert len(calls) == (2 if restart else 1)  # transformers builds a new mask; the same cu_seq_lens alone
    cu.copy_(torch.tensor([0, 6, 9, sum(lengths)]))  # the same buffer, other documents
    m(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False,
      **({"position_ids": torch.cat([torch.arange(n) for n in (6, 3, 9)])[None]} if restart else {}))
    assert len(calls) == (3 if restart else 2)


def test_documents_kept_for_a_forward_do_not_outlive_it():
    """What for_attention keeps on the mask or on cu_seq_lens holds neither alive: both go with
    the batch, without waiting for the cycle collector."""
    import gc
    import weakref

    m = converted("llama", "sparse")
    lengths = (5, 9, 4)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    ids = torch.randint(0, HF_VOCAB, (1, sum(lengths)))
    gone = weakref.ref(cu)
    gc.disable()
    try:
        m(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False)
        del cu
        assert gone() is None
    finally:
        gc.enable()
