"""dsa_ext.nn.LightningIndexer: shapes and dtypes, DeepSeek's non-interleaved RoPE on the first
dims, the Hadamard rotation, the detached input; DSAConfig validation."""
import pytest
import torch

from dsa_ext import nn as dnn
from dsa_ext import reference
from models import dsa_cfg


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
