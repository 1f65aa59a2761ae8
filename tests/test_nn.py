"""dsa_ext.nn, dsa_ext.decoder, dsa_ext.hf: the indexer module, the DSA attention core in its
three modes, the detach invariants, warm-up freezing, conversion of a plain decoder and of
transformers Llama/Qwen2/Qwen3 models (equivalence at k >= T), save/load round trips."""
import math

import pytest
import torch

import dsa_ext
from dsa_ext import decoder, reference
from dsa_ext import nn as dnn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_decoder(dtype=torch.float64, n_kv_heads=2, layers=2):
    cfg = decoder.DecoderConfig(vocab_size=61, d_model=48, n_layers=layers, n_heads=4,
                                n_kv_heads=n_kv_heads)
    m = decoder.Decoder(cfg).to(dtype)
    with torch.no_grad():  # larger weights than the LM init: sharper, less uniform attention
        for p in m.parameters():
            p.mul_(4.0)
    return m


def dsa_cfg(topk=8, mode="sparse", **kw):
    kw = {"n_heads": 3, "head_dim": 16, "rope_dim": 8, **kw}
    return dnn.DSAConfig(topk=topk, mode=mode, **kw)


def indexer_grads(model):
    return [p.grad for p in dnn.indexer_parameters(model)]


def host_params(model):
    idx = {id(p) for p in dnn.indexer_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in idx]


# ---------------------------------------------------------------------------------------------
# LightningIndexer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,S,Hi,Di,rope", [(2, 13, 3, 16, 8), (1, 7, 1, 8, 0), (3, 5, 4, 32, 32)])
def test_indexer_shapes_and_dtypes(dtype, B, S, Hi, Di, rope):
    idx = dnn.LightningIndexer(24, Hi, Di, rope).to(dtype)
    x = torch.randn(B, S, 24, dtype=dtype)
    q, k, w = idx(x)
    assert q.shape == (B, S, Hi, Di) and q.dtype == dtype
    assert k.shape == (B, S, Di) and k.dtype == dtype
    assert w.shape == (B, S, Hi) and w.dtype == torch.float32
    assert idx.scale == pytest.approx((Hi * Di) ** -0.5)
    # the key is LayerNorm(Wk x) before RoPE: RoPE only rotates pairs, norms of the pairs are kept
    ref = torch.nn.functional.layer_norm(x @ idx.wk.weight.T, (Di,), idx.k_norm.weight, idx.k_norm.bias)
    torch.testing.assert_close(k[..., rope:], ref[..., rope:])
    half = rope // 2
    torch.testing.assert_close(k[..., :half] ** 2 + k[..., half:rope] ** 2,
                               ref[..., :half] ** 2 + ref[..., half:rope] ** 2)
    torch.testing.assert_close(w, (x.float() @ idx.weights_proj.weight.float().T) * Hi ** -0.5)


def _interleaved_rope(x, pos, rope_dim, theta):
    """The layout DeepSeek fixed: pairs (2i, 2i+1). Used to show the test tells them apart."""
    half = rope_dim // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) / half)
    ang = pos.double()[:, None] * inv
    xr = x[..., :rope_dim].double().unflatten(-1, (half, 2))
    c = torch.complex(xr[..., 0], xr[..., 1]) * torch.polar(torch.ones_like(ang), ang)[:, None]
    return torch.cat((torch.view_as_real(c).flatten(-2), x[..., rope_dim:].double()), -1)


@pytest.mark.parametrize("rope_dim,D", [(8, 16), (16, 16), (4, 12)])
def test_rope_non_interleaved_on_first_dims(rope_dim, D):
    T, H, theta = 11, 2, 10000.0
    x = torch.randn(1, T, H, D, dtype=torch.float64)
    pos = torch.arange(T) + 3
    y = dnn.apply_partial_rope(x, pos, rope_dim, theta)
    # dims past rope_dim untouched
    torch.testing.assert_close(y[..., rope_dim:], x[..., rope_dim:])
    # dim i pairs with dim i + rope_dim/2 and turns by pos * theta^(-i / (rope_dim/2))
    half = rope_dim // 2
    ang = pos.double()[:, None] * theta ** (-torch.arange(half, dtype=torch.float64) / half)
    z = torch.complex(x[..., :half], x[..., half:rope_dim]) * torch.polar(torch.ones_like(ang), ang)[None, :, None]
    torch.testing.assert_close(y[..., :half], z.real)
    torch.testing.assert_close(y[..., half:rope_dim], z.imag)
    # relative: q.k depends on the position difference only
    a = dnn.apply_partial_rope(x, pos + 17, rope_dim, theta)
    torch.testing.assert_close(torch.einsum("bthd,bshd->bhts", y, y), torch.einsum("bthd,bshd->bhts", a, a))
    # and it is not the interleaved layout
    assert not torch.allclose(y, _interleaved_rope(x, pos, rope_dim, theta))


def test_rope_batched_positions():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    pos = torch.stack([torch.arange(5), torch.arange(5) + 9])
    y = dnn.apply_partial_rope(x, pos, 8, 500.0)
    for b in range(2):
        torch.testing.assert_close(y[b:b + 1], dnn.apply_partial_rope(x[b:b + 1], pos[b], 8, 500.0))


def test_hadamard_rotation_keeps_scores():
    h = dnn.hadamard_matrix(16, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(16, dtype=torch.float64))
    plain = dnn.LightningIndexer(24, 3, 16, 8).double()
    rotated = dnn.LightningIndexer(24, 3, 16, 8, hadamard=True).double()
    rotated.load_state_dict(plain.state_dict())
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    qa, ka, wa = plain(x)
    qb, kb, wb = rotated(x)
    assert not torch.allclose(qa, qb)
    torch.testing.assert_close(reference.indexer_logits(qa, ka, wa), reference.indexer_logits(qb, kb, wb))
    with pytest.raises(ValueError, match="power of two"):
        dnn.LightningIndexer(24, 3, 12, 8, hadamard=True)


def test_indexer_reads_its_input_detached():
    idx = dnn.LightningIndexer(16, 2, 8, 4).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)
    q, k, w = idx(x)
    assert (q.sum() + k.sum() + w.sum()).grad_fn is not None
    with pytest.raises(RuntimeError):  # no path back to x
        torch.autograd.grad(q.sum() + k.sum() + w.sum(), x)
    attached = dnn.LightningIndexer(16, 2, 8, 4, detach_input=False).double()
    q, k, w = attached(x)
    (g,) = torch.autograd.grad(q.sum() + k.sum() + w.sum(), x)
    assert g.abs().sum() > 0


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        dnn.DSAConfig(mode="fast")
    with pytest.raises(ValueError, match="topk"):
        dnn.DSAConfig(topk=0)
    with pytest.raises(ValueError, match="rope_dim"):
        dnn.DSAConfig(rope_dim=7)
    core = dnn.DSAAttention(dnn.LightningIndexer(8, 1, 8, 4), 4)
    with pytest.raises(ValueError, match="mode"):
        core.mode = "sparse!"
    assert dnn.DSAConfig.from_dict({**dsa_cfg().to_dict(), "unknown": 1}) == dsa_cfg()


# ---------------------------------------------------------------------------------------------
# The KL loss
# ---------------------------------------------------------------------------------------------


def kl_by_loops(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale):
    """Row by row, head by head: the definition in shared/DESIGN.md (the KL the modules train
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


# ---------------------------------------------------------------------------------------------
# DSAAttention modes
# ---------------------------------------------------------------------------------------------


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
        out = core(q, k, v, x, scale=0.3)
        assert out.shape == (2, 12, 4, 10) and out.dtype == dtype
        loss = core.pending_loss
        core.pending_loss = None
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
                loss, dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, None, 0.3).mean())
        core.eval()  # no loss outside training
        core(q, k, v, x, scale=0.3)
        assert core.pending_loss is None


def test_fp8_topk_selects_from_e4m3_scores():
    q, k, v, x = core_inputs(T=40, dtype=torch.float32)
    core = dnn.DSAAttention(dnn.LightningIndexer(20, 2, 16, 4), topk=6, mode="sparse", fp8_topk=True)
    core.train()
    out = core(q, k, v, x, scale=0.3)
    q_idx, k_idx, w = core.indexer(x)
    indices = dsa_ext.fp8.indexer_topk(q_idx, k_idx, w, 6)
    assert not torch.equal(indices, dsa_ext.indexer_topk(q_idx, k_idx, w, 6))  # e4m3 moves the margin
    torch.testing.assert_close(out, reference.sparse_attention(q, k, v, indices, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(core.pending_loss,
                               dsa_ext.indexer_kl_loss(q_idx, k_idx, w, q, k, indices, None, 0.3).mean())
    assert "fp8_topk=True" in repr(core)
    converted = decoder.convert(small_decoder(), dsa_cfg(fp8_topk=True))
    assert all(c.fp8_topk for c in dnn.dsa_modules(converted))


def test_sparse_with_k_at_least_T_is_dense():
    q, k, v, x = core_inputs(T=10)
    core = dnn.DSAAttention(dnn.LightningIndexer(20, 2, 8, 4), topk=10, mode="sparse").double()
    torch.testing.assert_close(core(q, k, v, x), dnn.dense_causal_attention(q, k, v))


def test_kv_cache_shapes_are_refused_in_indexed_modes():
    q, k, v, x = core_inputs(T=6)
    core = dnn.DSAAttention(dnn.LightningIndexer(20, 2, 8, 4), topk=4, mode="sparse").double()
    with pytest.raises(NotImplementedError, match="KV cache"):
        core(q[:, -2:], k, v, x[:, -2:])


def test_indexer_loss_collects_sums_and_clears():
    m = decoder.convert(small_decoder(), dsa_cfg(mode="warmup"))
    ids = torch.randint(0, 61, (2, 14))
    assert dnn.indexer_loss(m) == 0
    m(ids)
    first = [c.pending_loss.detach().clone() for c in dnn.dsa_modules(m)]
    m(ids)
    torch.testing.assert_close(dnn.indexer_loss(m).detach(), 2 * sum(first))
    assert all(c.pending_loss is None for c in dnn.dsa_modules(m))
    with pytest.raises(ValueError, match="no DSAAttention"):
        dnn.set_mode(small_decoder(), "sparse")


# ---------------------------------------------------------------------------------------------
# Detach invariants, freezing, optimizer groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_kl_loss_changes_no_host_gradient(mode):
    m = decoder.convert(small_decoder(), dsa_cfg(topk=5, mode=mode))
    m(torch.randint(0, 61, (2, 14)))
    dnn.indexer_loss(m).backward()
    for name, p in host_params(m):
        assert p.grad is None or not p.grad.any(), name
    assert all(g is not None and g.abs().sum() > 0 for g in indexer_grads(m))


@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_lm_loss_gives_the_indexer_no_gradient(mode):
    m = decoder.convert(small_decoder(), dsa_cfg(topk=5, mode=mode))
    ids = torch.randint(0, 61, (2, 15))
    logits = m(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert all(g is None or not g.any() for g in indexer_grads(m))
    assert all(p.grad is not None for _, p in host_params(m))


def test_total_loss_gradients_split_exactly():
    """LM + KL: the host gets exactly the LM gradient, the indexer exactly the KL gradient."""
    m = decoder.convert(small_decoder(), dsa_cfg(topk=5, mode="sparse"))
    ids = torch.randint(0, 61, (2, 15))

    def grads(use_lm, use_kl):
        m.zero_grad(set_to_none=False)
        logits = m(ids[:, :-1])
        lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        (use_lm * lm + use_kl * dnn.indexer_loss(m)).backward()
        return [p.grad.clone() for p in m.parameters()]

    both, lm_only, kl_only = grads(1, 1), grads(1, 0), grads(0, 1)
    idx = {id(p) for p in dnn.indexer_parameters(m)}
    for p, g, gl, gk in zip(m.parameters(), both, lm_only, kl_only):
        torch.testing.assert_close(g, gk if id(p) in idx else gl)


def test_warmup_freezing_trains_only_the_indexers():
    m = decoder.convert(small_decoder(), dsa_cfg(mode="warmup"))
    trainable = dnn.freeze_for_warmup(m)
    assert {id(p) for p in trainable} == {id(p) for p in dnn.indexer_parameters(m)}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        m(torch.randint(0, 61, (2, 14)))
        dnn.indexer_loss(m).backward()
        opt.step()
        opt.zero_grad()
    idx_names = {n for n, _ in m.named_parameters() if ".indexer." in n}
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) != (n in idx_names), n
    dnn.unfreeze(m)
    assert all(p.requires_grad for p in m.parameters())


def test_param_groups_cover_each_trainable_parameter_once():
    m = decoder.convert(small_decoder(), dsa_cfg())
    groups = dnn.param_groups(m, lr=1e-3, indexer_lr=5e-3, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["indexer"]["params"]} == {id(p) for p in dnn.indexer_parameters(m)}
    assert by_name["indexer"]["lr"] == 5e-3 and by_name["indexer"]["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in by_name["model"]["params"])
    dnn.freeze_for_warmup(m)
    assert [g["name"] for g in dnn.param_groups(m, lr=1e-3)] == ["indexer"]


# ---------------------------------------------------------------------------------------------
# Recall statistics
# ---------------------------------------------------------------------------------------------


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
                                   .masked_fill(~reference.causal_mask(13, 13), -math.inf), -1)
                     for h in range(4)]).mean(0)
    indices = reference.indexer_topk(*blk.attn.core.indexer(x, pos), 4)
    per_query = torch.stack([p[b, t, [s for s in indices[b, t].tolist() if s >= 0]].sum()
                             for b in range(2) for t in range(13)]).view(2, 13)
    assert res["all"][0] == pytest.approx(per_query.mean().item(), rel=1e-9)
    assert res["hard"][0] == pytest.approx(per_query[:, 4:].mean().item(), rel=1e-9)
    assert res["oracle"][0] == pytest.approx(p.topk(4, -1).values.sum(-1).mean().item(), rel=1e-9)
    assert 0 < res["hard"][0] <= res["oracle_hard"][0] <= 1
    assert not any(c.record_recall for c in dnn.dsa_modules(m))


# ---------------------------------------------------------------------------------------------
# Conversion: the plain decoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_conversion_equivalent_at_k_ge_T(n_kv_heads, dtype):
    m = small_decoder(dtype, n_kv_heads).eval()
    ids = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        want = m(ids)
        decoder.convert(m, dsa_cfg(topk=17, mode="dense"))
        torch.testing.assert_close(m(ids), want, rtol=0, atol=0)
        for mode in ("warmup", "sparse"):
            dnn.set_mode(m, mode)
            tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
            torch.testing.assert_close(m(ids), want, **tol)
        for c in dnn.dsa_modules(m):
            c.topk = 4
        assert not torch.allclose(m(ids), want, rtol=1e-3, atol=1e-3)


def test_decoder_conversion_keeps_weights_and_round_trips(tmp_path):
    m = small_decoder()
    host = {k: v.clone() for k, v in m.state_dict().items()}
    decoder.convert(m, dsa_cfg(topk=4))
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in host.items())
    assert any(".indexer." in k for k in state)
    torch.save(state, tmp_path / "m.pt")
    fresh = decoder.convert(small_decoder(), dsa_cfg(topk=4))
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    ids = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids), m.eval()(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already"):
        decoder.convert(m, dsa_cfg())
    with pytest.raises(TypeError):
        decoder.convert(torch.nn.Linear(2, 2), dsa_cfg())


def test_bfloat16_sparse_forward_backward():
    m = decoder.convert(small_decoder(torch.bfloat16), dsa_cfg(topk=6))
    ids = torch.randint(0, 61, (2, 20))
    logits = m(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    (loss + dnn.indexer_loss(m)).backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# Conversion: Hugging Face transformers
# ---------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from dsa_ext import hf  # noqa: E402

HF_FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def tiny_hf(family, tie=False):
    config_cls, model_cls = HF_FAMILIES[family]
    cfg = config_cls(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                     max_position_embeddings=128, tie_word_embeddings=tie, attn_implementation="sdpa")
    m = model_cls(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)
    return m


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_hf_conversion_equivalent_at_k_ge_T(family):
    m = tiny_hf(family)
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        want = m(ids).logits
        hf.convert(m, dsa_cfg(topk=19, mode="dense"))
        assert m.config._attn_implementation == hf.ATTN_NAME
        assert len(dnn.dsa_modules(m)) == 2
        torch.testing.assert_close(m(ids).logits, want, rtol=0, atol=0)
        for mode in ("warmup", "sparse"):
            dnn.set_mode(m, mode)
            torch.testing.assert_close(m(ids).logits, want)
        for c in dnn.dsa_modules(m):
            c.topk = 5
        assert not torch.allclose(m(ids).logits, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hf_sparse_matches_the_decoder_semantics(family):
    """Sparse mode inside the HF model is the DSA core on the model's own q, k, v: check one
    layer's output against sparse_attention over the indexer's top-k, computed by hand."""
    m = hf.convert(tiny_hf(family), dsa_cfg(topk=4, mode="sparse"))
    attn = m.model.layers[0].self_attn
    seen = {}

    def grab(module, args, kwargs, output):
        seen["out"] = output[0]

    def grab_in(module, args, kwargs):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["pe"] = kwargs["position_embeddings"]

    attn.register_forward_pre_hook(grab_in, with_kwargs=True)
    attn.register_forward_hook(grab, with_kwargs=True)
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        m(ids)
        x, (cos, sin) = seen["x"], seen["pe"]
        shape = (1, 11, -1, 12)
        q = attn.q_proj(x).view(shape)
        k = attn.k_proj(x).view(shape)
        if family == "qwen3":
            q, k = attn.q_norm(q), attn.k_norm(k)
        rot = lambda t: t * cos[:, :, None] + torch.cat((-t[..., 6:], t[..., :6]), -1) * sin[:, :, None]
        q, k = rot(q), rot(k)
        v = attn.v_proj(x).view(shape)
        indices = reference.indexer_topk(*attn.dsa.indexer(x, torch.arange(11)), 4)
        out = reference.sparse_attention(q, k, v, indices, 12 ** -0.5)
        torch.testing.assert_close(seen["out"], attn.o_proj(out.reshape(1, 11, -1)))


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_hf_save_load_round_trip(family, tmp_path):
    m = tiny_hf(family, tie=family == "qwen3")
    ids = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        dense = m(ids).logits
    hf.convert(m, dsa_cfg(topk=5, mode="warmup", hadamard=True))
    dnn.set_mode(m, "sparse")  # the saved config records the mode the layers are in now
    with torch.no_grad():
        for p in dnn.indexer_parameters(m):  # indexer weights that differ from a fresh init
            p.add_(0.1 * torch.randn_like(p))
        want = m(ids).logits
    hf.save_pretrained(m, str(tmp_path))
    assert (tmp_path / hf.INDEXER_FILE).exists() and (tmp_path / hf.CONFIG_FILE).exists()
    loaded = hf.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    assert loaded.dsa_config.mode == "sparse" and loaded.dsa_config.hadamard
    assert all(c.mode == "sparse" and c.topk == 5 for c in dnn.dsa_modules(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    # the same directory is an ordinary dense checkpoint for plain transformers
    plain = HF_FAMILIES[family][1].from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    assert not dnn.dsa_modules(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, dense, rtol=0, atol=0)


def test_hf_from_dense_checkpoint_gets_fresh_indexers(tmp_path):
    m = tiny_hf("llama")
    m.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 97, (1, 9))
    loaded = hf.from_pretrained(str(tmp_path), config=dsa_cfg(topk=9), dtype=torch.float64).eval()
    assert len(dnn.dsa_modules(loaded)) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m(ids).logits)


def test_hf_training_invariants():
    m = hf.convert(tiny_hf("qwen2"), dsa_cfg(topk=4, mode="sparse")).train()
    ids = torch.randint(0, 97, (2, 12))
    loss = m(ids, labels=ids).loss
    loss.backward()
    assert all(g is None or not g.any() for g in indexer_grads(m))
    m.zero_grad(set_to_none=True)
    m(ids)
    dnn.indexer_loss(m).backward()
    assert all(p.grad is None for _, p in host_params(m))
    assert all(g is not None and g.abs().sum() > 0 for g in indexer_grads(m))


def test_hf_refusals():
    m = hf.convert(tiny_hf("llama"), dsa_cfg(topk=4, mode="sparse"))
    ids = torch.randint(0, 97, (2, 8))
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    with torch.no_grad(), pytest.raises(NotImplementedError, match="padding"):
        m(ids, attention_mask=padding)
    dnn.set_mode(m, "dense")  # dense mode is transformers' own sdpa path: padding works
    with torch.no_grad():
        m(ids, attention_mask=padding)
    with pytest.raises(ValueError, match="already"):
        hf.convert(m, dsa_cfg())
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="tested"):
        hf.convert(gpt2, dsa_cfg())
