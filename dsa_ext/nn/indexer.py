"""The lightning indexer of DeepSeek-V3.2 as a module, and its rotary embedding and Hadamard
rotation."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LightningIndexer", "apply_partial_rope", "hadamard_matrix"]


def apply_partial_rope(x: Tensor, positions: Tensor, rope_dim: int, theta: float) -> Tensor:
    """Rotary embedding on the first ``rope_dim`` dims of ``x`` [B, T, ..., D], non-interleaved
    (rotate-half: dim i pairs with dim i + rope_dim/2), the layout of DeepSeek's fixed indexer.
    The remaining dims pass through. positions: [T] or [B, T] integer positions."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=acc) / half)
    angles = positions.to(acc)[..., None] * inv_freq  # [(B,) T, half]
    if angles.dim() == 2:
        angles = angles[None]
    angles = angles.reshape(angles.shape[0], angles.shape[1], *([1] * (x.dim() - 3)), half)
    cos, sin = angles.cos(), angles.sin()
    x1 = x[..., :half].to(acc)
    x2 = x[..., half:rope_dim].to(acc)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, x[..., rope_dim:]), dim=-1)


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard rotation needs head_dim a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


class LightningIndexer(nn.Module):
    """The DSA lightning indexer: from hidden states x [B, S, hidden] it produces
    ``q_idx`` [B, T, Hi, Di], ``k_idx`` [B, S, Di] (one key per token, shared by all heads) and
    float32 head weights ``w`` [B, T, Hi] for ``indexer_logits``/``indexer_topk``.

    q_idx = Wq(x_q); k_idx = LayerNorm(Wk(x)); w = Ww(x) * Hi**-0.5 in float32; RoPE on the first
    rope_dim dims of q_idx and k_idx (non-interleaved); optional Hadamard rotation of both.
    ``detach_input`` (default, as in the paper): the indexer reads its inputs detached, so its
    loss never reaches the host model.
    """

    def __init__(self, hidden_size: int, n_heads: int = 4, head_dim: int = 64, rope_dim: int = 32,
                 rope_theta: float = 10000.0, hadamard: bool = False,
                 q_input_size: Optional[int] = None, detach_input: bool = True):
        super().__init__()
        if rope_dim % 2 or not 0 <= rope_dim <= head_dim:
            raise ValueError(f"rope_dim: expected an even number in [0, head_dim={head_dim}], "
                             f"got {rope_dim}")
        self.n_heads, self.head_dim, self.rope_dim = n_heads, head_dim, rope_dim
        self.rope_theta = rope_theta
        self.detach_input = detach_input
        self.wq = nn.Linear(q_input_size or hidden_size, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)
        if hadamard:
            self.register_buffer("hadamard", hadamard_matrix(head_dim), persistent=False)
        else:
            self.hadamard = None

    @property
    def scale(self) -> float:
        """The score scale of indexer_logits: (Hi * Di) ** -0.5."""
        return (self.n_heads * self.head_dim) ** -0.5

    def forward(self, x: Tensor, positions: Optional[Tensor] = None,
                q_input: Optional[Tensor] = None):
        """x: [B, S, hidden]; positions: [S] or [B, S] (default arange(S)); q_input: [B, T, *]
        the query-side input (default x, T = S). Returns (q_idx, k_idx, w)."""
        q_in = x if q_input is None else q_input
        if self.detach_input:
            x, q_in = x.detach(), q_in.detach()
        B, S, _ = x.shape
        T = q_in.shape[1]
        if positions is None:
            positions = torch.arange(S, device=x.device)
        q_pos = positions[..., S - T:]
        q = self.wq(q_in).view(B, T, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x)).to(q.dtype)  # autocast runs LayerNorm in float32
        q = apply_partial_rope(q, q_pos, self.rope_dim, self.rope_theta)
        k = apply_partial_rope(k, positions, self.rope_dim, self.rope_theta)
        if self.hadamard is not None:
            q = q @ self.hadamard.to(q.dtype)
            k = k @ self.hadamard.to(k.dtype)
        with torch.autocast(x.device.type, enabled=False):  # the weights stay float32 under autocast
            w = F.linear(q_in.float(), self.weights_proj.weight.float()) * self.n_heads ** -0.5
        return q, k, w

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, head_dim={self.head_dim}, rope_dim={self.rope_dim}, "
                f"hadamard={self.hadamard is not None}, detach_input={self.detach_input}")
