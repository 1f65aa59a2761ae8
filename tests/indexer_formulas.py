"""DeepSeek-V3.2's indexer score, transcribed from its inference code independently of
dsa_ext.nn.LightningIndexer's forward, in float64 on a module's weights: the oracle of the indexer
module tests (here and for transformers' DSA models)."""
import math

import torch
import torch.nn.functional as F


def rope_tables(positions, rope_dim, theta):
    """cos, sin [S, rope_dim/2] of the angles pos * theta ** (-2i / rope_dim), float64."""
    ang = positions.double()[:, None] * theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    return ang.cos(), ang.sin()


def deepseek_rope(x, cos, sin, rope_dim, interleaved=False):
    """DeepSeek's indexer RoPE on the first rope_dim dims of x [B, S, (H,) D] with angle tables
    [(B,) S, rope_dim/2]: pair i is dims (i, i + rope_dim/2) in the fixed code (rotate-half), dims
    (2i, 2i+1) as one complex number in the code before the fix (``interleaved``, GLM-5's layout)."""
    half = rope_dim // 2
    cos, sin = (cos[None], sin[None]) if cos.dim() == 2 else (cos, sin)
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    if interleaved:
        z = torch.view_as_complex(x[..., :rope_dim].contiguous().unflatten(-1, (half, 2)))
        rotated = torch.view_as_real(z * torch.complex(cos, sin)).flatten(-2)
    else:
        a, b = x[..., :half], x[..., half:rope_dim]
        rotated = torch.cat((a * cos - b * sin, b * cos + a * sin), -1)
    return torch.cat((rotated, x[..., rope_dim:]), -1)


def deepseek_scores(idx, x, q_input=None, positions=None, tables=None, interleaved=False):
    """I[t, s] = sum_j (Ww(x_t)_j * Hi**-0.5) * Di**-0.5 * relu(q_j . k_s), transcribed from
    DeepSeek-V3.2's inference code (2025-11): q = Wq(q_input), k = LayerNorm(Wk(x), eps 1e-6),
    weights from the hidden states x of the query tokens, causal (bottom-right). RoPE tables:
    ``tables`` (cos, sin) [(B,) S, rope_dim/2], else from positions (default arange(S)) and the
    module's theta."""
    B, S, _ = x.shape
    T = S if q_input is None else q_input.shape[1]
    Hi, Di, rope = idx.n_heads, idx.head_dim, idx.rope_dim
    if tables is None:
        tables = rope_tables(torch.arange(S) if positions is None else positions, rope, idx.rope_theta)
    cos, sin = tables
    q = ((x[:, S - T:] if q_input is None else q_input) @ idx.wq.weight.T).view(B, T, Hi, Di)
    k = F.layer_norm(x @ idx.wk.weight.T, (Di,), idx.k_norm.weight, idx.k_norm.bias, eps=1e-6)
    q = deepseek_rope(q, cos[..., S - T:, :], sin[..., S - T:, :], rope, interleaved)
    k = deepseek_rope(k, cos, sin, rope, interleaved)
    weights = (x[:, S - T:] @ idx.weights_proj.weight.T) * Hi ** -0.5 * Di ** -0.5
    scores = torch.einsum("bth,bths->bts", weights, torch.einsum("bthd,bsd->bths", q, k).relu())
    visible = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
    return scores.masked_fill(~visible, -math.inf)
