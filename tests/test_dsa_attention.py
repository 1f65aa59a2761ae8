"""dsa_ext.nn.DSAAttention: the KL loss it trains with (against a row-by-row transcription of the
definition), its three modes, FP8 selection, the dense limit topk >= T, and recall statistics."""
import math

import pytest
import torch

import dsa_ext
from dsa_ext import decoder, reference
from dsa_ext import nn as dnn
from dsa_ext.conventions import causal_mask
from models import dsa_cfg, small_decoder


def kl_by_loops(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale):
    """Row by row, head by head: the definition in docs/DESIGN.md (the KL the modules train
    with, checked independently of the operator's own tests)."""
    B, T, H, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    logits = reference.indexer_logits(q_idx, k_idx, w, idx_scale)
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if indices is None:
                U = list(range(t + S - T + 1))
            else:
                U = sorted({int(s) for s in indices[b, t] if s >= 0})
            if not U:
                continue
            p = sum(torch.softmax(attn_scale * k[b, U, h // (H // Hkv)] @ q[b, t, h], 0) for h in range(H)) / H
            logq = torch.log_softmax(logits[b, t, U], 0)
            out[b, t] = (p * (p.log() - logq)).sum()
    return out


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("B,T,S,H,Hkv", [(2, 9, 9, 4, 2), (1, 6, 10, 2, 2), (1, 5, 5, 3, 1)])
def test_kl_loss_matches_definition(sparse, B, T, S, H, Hkv):
    D, Hi, Di = 8, 3, 6
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    k = torch.randn(B, S, Hkv, D, dtype=torch.float64)
    q_idx = torch.randn(B, T, Hi, Di, dtype=torch.float64)
    k_idx = torch.randn(B, S, Di, dtype=torch.float64)
    w = torch.randn(B, T, Hi, dtype=torch.float64)
    indices = None
    if sparse:
        indices = reference.indexer_topk(q_idx, k_idx, w, 4)
        indices[0, -1, :] = -1  # an empty row: loss 0
    got = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, 0.3, 0.5)
    want = kl_by_loops(q_idx, k_idx, w, q, k, indices, 0.3, 0.5)
    torch.testing.assert_close(got, want)
    assert got.shape == (B, T) and (got >= -1e-12).all()
    if sparse:
        assert got[0, -1] == 0


def test_kl_loss_gradient_reaches_only_the_indexer():
    B, T, H, D = 1, 7, 2, 8
    q = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    q_idx = torch.randn(B, T, 2, 4, dtype=torch.float64, requires_grad=True)
    k_idx = torch.randn(B, T, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, T, 2, dtype=torch.float64, requires_grad=True)
    loss = dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k).sum()
    gq, gk, gqi, gki, gw = torch.autograd.grad(loss, (q, k, q_idx, k_idx, w), allow_unused=True)
    assert gq is None and gk is None
    assert all(g is not None and g.abs().sum() > 0 for g in (gqi, gki, gw))


def core_inputs(B=2, T=12, H=4, Hkv=2, D=8, hidden=20, dtype=torch.float64):
    q = torch.randn(B, T, H, D, dtype=dtype)
    k = torch.randn(B, T, Hkv, D, dtype=dtype)
    v = torch.randn(B, T, Hkv, D + 2, dtype=dtype)
    x = torch.randn(B, T, hidden, dtype=dtype)
    return q, k, v, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modes(dtype):
    q, k, v, x = core_inputs(dtype=dtype)
    core = dnn.DSAAttention(dnn.LightningIndexer(20, 2, 8, 4), topk=5).to(dtype)
    dense = dnn.dense_causal_attention(q, k, v, 0.3)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    for mode in dnn.MODES:
        core.mode = mode
        core.train()
        core.last_loss = None
        out = core(q, k, v, x, scale=0.3)
        assert out.shape == (2, 12, 4, 10) and out.dtype == dtype
        loss = core.last_loss
        if mode == "dense":
            assert loss is None
            torch.testing.assert_close(out, dense, **tol)
        elif mode == "warmup":
            assert loss is not None and loss > 0
            torch.testing.assert_close(out, dense, **tol)
        else:
            q_idx, k_idx, w = core.indexer(x)
            indices = reference.indexer_topk(q_idx, k_idx, w, 5)
            torch.testing.assert_close(out, reference.sparse_attention(q, k, v, indices, 0.3), **tol)
            assert not torch.allclose(out, dense, **tol)
            torch.testing.assert_close(
                loss, dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, core.indexer.scale, 0.3).mean())
        core.eval()  # no loss outside training
        core.last_loss = None
        assert core(q, k, v, x, scale=0.3).grad_fn is None
        assert core.last_loss is None


def test_fp8_topk_selects_from_e4m3_scores():
    q, k, v, x = core_inputs(T=40, dtype=torch.float32)
    core = dnn.DSAAttention(dnn.LightningIndexer(20, 2, 16, 4), topk=6, mode="sparse", fp8_topk=True)
    core.train()
    out = core(q, k, v, x, scale=0.3)
    q_idx, k_idx, w = core.indexer(x)
    indices = dsa_ext.fp8.indexer_topk(q_idx, k_idx, w, 6)
    assert not torch.equal(indices, dsa_ext.indexer_topk(q_idx, k_idx, w, 6))  # e4m3 moves the margin
    torch.testing.assert_close(out, reference.sparse_attention(q, k, v, indices, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(core.last_loss,
                               dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, core.indexer.scale, 0.3).mean())
    assert "fp8_topk=True" in repr(core)
    converted = decoder.convert(small_decoder(), dsa_cfg(fp8_topk=True))
    assert all(c.fp8_topk for c in dnn.dsa_modules(converted))


def test_sparse_with_k_at_least_T_is_dense():
    q, k, v, x = core_inputs(T=10)
    core = dnn.DSAAttention(dnn.LightningIndexer(20, 2, 8, 4), topk=10, mode="sparse").double()
    torch.testing.assert_close(core(q, k, v, x), dnn.dense_causal_attention(q, k, v))


def test_cached_keys_without_the_cache_are_refused_in_indexed_modes():
    q, k, v, x = core_inputs(T=6)
    core = dnn.DSAAttention(dnn.LightningIndexer(20, 2, 8, 4), topk=4, mode="sparse").double()
    with pytest.raises(ValueError, match="pass the layer's cache"):
        core(q[:, -2:], k, v, x[:, -2:])


def test_recall_stats():
    m = decoder.convert(small_decoder(layers=1), dsa_cfg(topk=4, mode="sparse")).eval()
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad(), dnn.recall_stats(m) as r:
        m(ids)
    res = r.result()
    # independent: p from the layer's q and k, top-k from the indexer
    blk = m.blocks[0]
    x = blk.attn_norm(m.embed(ids))
    pos = torch.arange(13)
    q = decoder._rope(blk.attn.q_proj(x).view(2, 13, 4, 12), pos, 10000.0)
    k = decoder._rope(blk.attn.k_proj(x).view(2, 13, 2, 12), pos, 10000.0)
    p = torch.stack([torch.softmax((q[:, :, h] @ k[:, :, h // 2].transpose(1, 2) / math.sqrt(12))
                                   .masked_fill(~causal_mask(13, 13), -math.inf), -1)
                     for h in range(4)]).mean(0)
    indices = reference.indexer_topk(*blk.attn.core.indexer(x, pos), 4)
    per_query = torch.stack([p[b, t, [s for s in indices[b, t].tolist() if s >= 0]].sum()
                             for b in range(2) for t in range(13)]).view(2, 13)
    assert res["all"][0] == pytest.approx(per_query.mean().item(), rel=1e-9)
    assert res["hard"][0] == pytest.approx(per_query[:, 4:].mean().item(), rel=1e-9)
    assert res["oracle"][0] == pytest.approx(p.topk(4, -1).values.sum(-1).mean().item(), rel=1e-9)
    assert 0 < res["hard"][0] <= res["oracle_hard"][0] <= 1
    assert all(c.recall is None for c in dnn.dsa_modules(m))
    # the sums add up across calls and processes: twice the batch, the same means
    with torch.no_grad(), dnn.recall_stats(m) as r2:
        m(ids)
        m(ids)
    assert r2.sums[0].queries == 2 * r.sums[0].queries
    assert r2.result(r.tensor() * 2)["all"] == pytest.approx(res["all"], rel=1e-12)
    assert dnn.RecallSums.from_tensor(r.sums[0].to_tensor()) == r.sums[0]
