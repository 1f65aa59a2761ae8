"""dsa_ext.nn.LightningIndexer: the score exactly as DeepSeek computes it (against an independent
transcription), shapes and dtypes, the non-interleaved RoPE on the first dims, the Hadamard
rotation, the detached input, checkpoints of the earlier convention; DSAConfig validation."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import dsa_ext
from dsa_ext import nn as dnn
from dsa_ext import reference
from indexer_formulas import deepseek_rope, deepseek_scores, rope_tables
from models import dsa_cfg


@pytest.mark.parametrize("B,S,T,hidden,q_width,Hi,Di,rope", [
    (2, 13, 13, 24, None, 3, 16, 8),   # q from the hidden state
    (1, 11, 4, 20, 36, 4, 32, 16),     # q from a query latent of another width, 4 new queries
    (2, 9, 9, 16, 16, 1, 8, 0),        # a latent of the hidden width (once silently wrong), no RoPE
])
def test_scores_exactly_as_deepseek(B, S, T, hidden, q_width, Hi, Di, rope):
    idx = dnn.LightningIndexer(hidden, Hi, Di, rope, q_input_size=q_width).double()
    with torch.no_grad():  # a non-trivial LayerNorm affine
        idx.k_norm.weight.normal_()
        idx.k_norm.bias.normal_()
    x = torch.randn(B, S, hidden, dtype=torch.float64)
    q_input = None if q_width is None else torch.randn(B, T, q_width, dtype=torch.float64)
    q_idx, k_idx, w = idx(x, q_input=q_input)
    want = deepseek_scores(idx, x, q_input)
    for got in (reference.indexer_logits(q_idx, k_idx, w, idx.scale),
                dsa_ext.indexer_logits(q_idx, k_idx, w, idx.scale)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the operators' default scale assumes a raw w: it would apply Hi**-0.5 a second time
    if Hi > 1:
        assert not torch.allclose(reference.indexer_logits(q_idx, k_idx, w), want)


def test_checkpoints_of_the_earlier_convention_score_as_they_did(tmp_path):
    """A version-1 state dict (w from the query input, Hi**-0.5 twice, eps 1e-5) loads converted:
    the new module's scores equal the old formula's on the same weights."""
    idx = dnn.LightningIndexer(24, 4, 16, 8).double()
    state = idx.state_dict()
    state._metadata[""]["version"] = 1  # what torch.save wrote before the convention changed
    torch.save(state, tmp_path / "old.pt")
    old = dnn.LightningIndexer(24, 4, 16, 8).double()
    with pytest.warns(UserWarning, match="earlier indexer convention"):
        old.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    q_idx, k_idx, w = old(x)
    # the old formula: LayerNorm eps 1e-5, w = Ww(x) Hi**-0.5, scale (Hi Di)**-0.5
    k_old = deepseek_rope(F.layer_norm(x @ idx.wk.weight.T, (16,), idx.k_norm.weight, idx.k_norm.bias, eps=1e-5),
                          *rope_tables(torch.arange(10), 8, idx.rope_theta), 8)
    w_old = (x @ idx.weights_proj.weight.T) * 4 ** -0.5
    want = reference.indexer_logits(q_idx, k_old, w_old, (4 * 16) ** -0.5)
    torch.testing.assert_close(reference.indexer_logits(q_idx, k_idx, w, old.scale), want, rtol=1e-12, atol=1e-12)
    # a current state dict loads unchanged and silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = dnn.LightningIndexer(24, 4, 16, 8).double()
        fresh.load_state_dict(idx.state_dict())
    assert torch.equal(fresh.weights_proj.weight, idx.weights_proj.weight) and fresh.k_norm.eps == 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,S,Hi,Di,rope", [(2, 13, 3, 16, 8), (1, 7, 1, 8, 0), (3, 5, 4, 32, 32)])
def test_indexer_shapes_and_dtypes(dtype, B, S, Hi, Di, rope):
    idx = dnn.LightningIndexer(24, Hi, Di, rope).to(dtype)
    x = torch.randn(B, S, 24, dtype=dtype)
    q, k, w = idx(x)
    assert q.shape == (B, S, Hi, Di) and q.dtype == dtype
    assert k.shape == (B, S, Di) and k.dtype == dtype
    assert w.shape == (B, S, Hi) and w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert idx.scale == pytest.approx(Di ** -0.5)
    # the key is LayerNorm(Wk x) before RoPE: RoPE only rotates pairs, norms of the pairs are kept
    ref = F.layer_norm(x @ idx.wk.weight.T, (Di,), idx.k_norm.weight, idx.k_norm.bias, eps=1e-6)
    torch.testing.assert_close(k[..., rope:], ref[..., rope:])
    half = rope // 2
    torch.testing.assert_close(k[..., :half] ** 2 + k[..., half:rope] ** 2,
                               ref[..., :half] ** 2 + ref[..., half:rope] ** 2)
    torch.testing.assert_close(w, (x @ idx.weights_proj.weight.T).to(w.dtype) * Hi ** -0.5)


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
    assert not torch.allclose(y, deepseek_rope(x, *rope_tables(pos, rope_dim, theta), rope_dim, interleaved=True))


@pytest.mark.parametrize("rope_dim,D", [(8, 16), (4, 12)])
def test_rope_interleaved_is_deepseeks_earlier_layout_deinterleaved(rope_dim, D):
    """interleaved=True (GLM-5's indexer): pairs (2i, 2i+1) as DeepSeek's code before its fix
    rotated them, written out de-interleaved as transformers does (first members, then second):
    a permutation of the dims, so every dot product is the in-place layout's."""
    x = torch.randn(2, 9, 3, D, dtype=torch.float64)
    pos = torch.arange(9) + 5
    y = dnn.apply_partial_rope(x, pos, rope_dim, 500.0, interleaved=True)
    z = deepseek_rope(x, *rope_tables(pos, rope_dim, 500.0), rope_dim, interleaved=True)
    torch.testing.assert_close(y, torch.cat((z[..., 0:rope_dim:2], z[..., 1:rope_dim:2], z[..., rope_dim:]), -1),
                               rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(torch.einsum("bthd,bshd->bhts", y, y), torch.einsum("bthd,bshd->bhts", z, z))
    assert not torch.allclose(y, dnn.apply_partial_rope(x, pos, rope_dim, 500.0))


@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_with_the_hosts_rope_tables(interleaved):
    """rope=(cos, sin) as transformers' rotary embeddings build them ([B, S, rope_dim], pair i's
    angle in columns i and i + rope_dim/2, here at per-row positions): the score is DeepSeek's
    with those angles, 1e-12."""
    B, S, T, rope = 2, 12, 5, 8
    idx = dnn.LightningIndexer(20, 4, 16, rope, q_input_size=28, interleaved_rope=interleaved).double()
    pos = torch.stack([torch.arange(S) + 3, torch.arange(S) * 2])
    cos, sin = rope_tables(pos.flatten(), rope, 777.0)
    cos, sin = cos.view(B, S, -1), sin.view(B, S, -1)
    x, q_input = torch.randn(B, S, 20, dtype=torch.float64), torch.randn(B, T, 28, dtype=torch.float64)
    q_idx, k_idx, w = idx(x, q_input=q_input, rope=(torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)))
    want = deepseek_scores(idx, x, q_input, tables=(cos, sin), interleaved=interleaved)
    torch.testing.assert_close(reference.indexer_logits(q_idx, k_idx, w, idx.scale), want, rtol=1e-12, atol=1e-12)
    other = deepseek_scores(idx, x, q_input, tables=(cos, sin), interleaved=not interleaved)
    assert not torch.allclose(other, want)


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
