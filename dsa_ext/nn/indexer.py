"""The lightning indexer of DeepSeek-V3.2 as a module, and its rotary embedding and Hadamard
rotation."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LightningIndexer", "apply_partial_rope", "rotate_partial", "hadamard_matrix"]


def rotate_partial(x: Tensor, cos: Tensor, sin: Tensor, rope_dim: int, interleaved: bool = False) -> Tensor:
    """Rotary embedding on the first ``rope_dim`` dims of ``x`` [B, T, ..., D] by the angle tables
    ``cos``/``sin`` [T, rope_dim/2] or [B, T, rope_dim/2] (pair i turns by the angle in column i).
    The remaining dims pass through. Pairs: dim i with dim i + rope_dim/2 (rotate-half, DeepSeek's
    fixed indexer), or with ``interleaved`` dims 2i and 2i+1 (GLM-5's indexer), whose rotated pairs
    come out de-interleaved (first members, then second members) as transformers lays them out: the
    same permutation of q's and k's dims, so every dot product is that of the in-place layout.
    Computed in float32 at least (float64 for float64 input)."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    shape = (cos.shape[0], cos.shape[1], *([1] * (x.dim() - 3)), half)
    cos, sin = cos.to(acc).reshape(shape), sin.to(acc).reshape(shape)
    if interleaved:
        x1, x2 = x[..., 0:rope_dim:2].to(acc), x[..., 1:rope_dim:2].to(acc)
    else:
        x1, x2 = x[..., :half].to(acc), x[..., half:rope_dim].to(acc)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((rotated, x[..., rope_dim:]), dim=-1)


def apply_partial_rope(x: Tensor, positions: Tensor, rope_dim: int, theta: float,
                       interleaved: bool = False) -> Tensor:
    """Rotary embedding on the first ``rope_dim`` dims of ``x`` [B, T, ..., D] at integer
    ``positions`` [T] or [B, T], pair i turning by ``position * theta ** (-2i / rope_dim)``; the
    pairing as :func:`rotate_partial` (default rotate-half, the layout of DeepSeek's fixed indexer)."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=acc) / half)
    angles = positions.to(acc)[..., None] * inv_freq  # [(B,) T, half]
    return rotate_partial(x, angles.cos(), angles.sin(), rope_dim, interleaved)


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard rotation needs head_dim a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


class LightningIndexer(nn.Module):
    """The DSA lightning indexer as DeepSeek-V3.2's (fixed, 2025-11) code builds it: from hidden
    states x [B, S, hidden] (and an optional query-side input, V3.2's query latent) it produces
    ``q_idx`` [B, T, Hi, Di], ``k_idx`` [B, S, Di] (one key per token, shared by all heads) and
    float32 head weights ``w`` [B, T, Hi], scored by ``indexer_logits``/``indexer_topk`` with
    ``scale = self.scale = Di ** -0.5``:

        q_idx = Wq(q_input or x_q);  k_idx = LayerNorm(Wk(x)) (eps 1e-6);
        w = Ww(x_q) * Hi ** -0.5 in float32 (float64 for a float64 model), from the query
            tokens' hidden states x_q;
        I[t, s] = sum_j w[t, j] * Di ** -0.5 * relu(q_idx[t, j] . k_idx[s])

    with RoPE on the first rope_dim dims of q_idx and k_idx (non-interleaved; ``interleaved_rope``
    for GLM-5's layout, see :func:`rotate_partial`) and an optional Hadamard rotation of both.
    ``Hi ** -0.5`` is applied once, in w. ``detach_input`` (default, as in the paper): the indexer
    reads its inputs detached, so its loss never reaches the host.

    Checkpoints of the earlier convention (w from the query input, ``Hi ** -0.5`` applied twice,
    LayerNorm eps 1e-5: module version 1) are converted on load so that they score exactly as
    they did: ``weights_proj`` is multiplied by ``Hi ** -0.5`` and the key LayerNorm keeps eps
    1e-5 (a warning says so).
    """

    _version = 2  # 1: the convention before DeepSeek's formula was matched (see the class docstring)

    def __init__(self, hidden_size: int, n_heads: int = 4, head_dim: int = 64, rope_dim: int = 32,
                 rope_theta: float = 10000.0, hadamard: bool = False,
                 q_input_size: Optional[int] = None, detach_input: bool = True, norm_eps: float = 1e-6,
                 interleaved_rope: bool = False):
        super().__init__()
        if rope_dim % 2 or not 0 <= rope_dim <= head_dim:
            raise ValueError(f"rope_dim: expected an even number in [0, head_dim={head_dim}], "
                             f"got {rope_dim}")
        self.n_heads, self.head_dim, self.rope_dim = n_heads, head_dim, rope_dim
        self.rope_theta = rope_theta
        self.interleaved_rope = interleaved_rope
        self.detach_input = detach_input
        self.wq = nn.Linear(q_input_size or hidden_size, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=norm_eps)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)
        self.register_buffer("hadamard", hadamard_matrix(head_dim) if hadamard else None, persistent=False)

    @classmethod
    def around(cls, wq: nn.Linear, wk: nn.Linear, k_norm: nn.LayerNorm, weights_proj: nn.Linear,
               rope_dim: int, hadamard: bool = False, interleaved_rope: bool = False) -> "LightningIndexer":
        """An indexer on existing projections (a host model's own indexer weights, shared, not
        copied): ``wq`` [Hi*Di, q input], ``wk`` [Di, hidden], ``k_norm`` LayerNorm(Di),
        ``weights_proj`` [Hi, hidden]. Its RoPE comes from the tables passed to forward."""
        head_dim, hidden = wk.weight.shape
        with torch.device("meta"):  # the projections are replaced: allocate nothing for them
            m = cls(hidden, weights_proj.out_features, head_dim, rope_dim, q_input_size=wq.in_features,
                    norm_eps=k_norm.eps, interleaved_rope=interleaved_rope)
        m.wq, m.wk, m.k_norm, m.weights_proj = wq, wk, k_norm, weights_proj
        if hadamard:
            m.hadamard = hadamard_matrix(head_dim, device=wk.weight.device)
        return m

    @property
    def scale(self) -> float:
        """The score scale to pass to indexer_logits/indexer_topk/indexer_kl_loss: Di ** -0.5
        (w already carries Hi ** -0.5)."""
        return self.head_dim ** -0.5

    def forward(self, x: Tensor, positions: Optional[Tensor] = None,
                q_input: Optional[Tensor] = None, rope: Optional[Tuple[Tensor, Tensor]] = None):
        """x: [B, S, hidden] the hidden states of every key token (the last T are the queries');
        positions: [S] or [B, S] (default arange(S)); q_input: [B, T, *] the query-side input of
        Wq (default: the queries' hidden states); rope: the host model's RoPE tables (cos, sin)
        for the S tokens as transformers builds them, [(B,) S, rope_dim] with pair i's angle in
        columns i and i + rope_dim/2, used instead of positions and rope_theta. Returns
        (q_idx, k_idx, w)."""
        if self.detach_input:
            x = x.detach()
            q_input = None if q_input is None else q_input.detach()
        B, S, _ = x.shape
        T = S if q_input is None else q_input.shape[1]
        x_q = x[:, S - T:]
        q = self.wq(x_q if q_input is None else q_input).view(B, T, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x)).to(q.dtype)  # autocast runs LayerNorm in float32
        q, k = self._rope(q, k, S, x.device, positions, rope)
        if self.hadamard is not None:
            q = q @ self.hadamard.to(q.dtype)
            k = k @ self.hadamard.to(k.dtype)
        # the head weights in float32 at least (float64 for a float64 model), also under autocast
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            w = F.linear(x_q.to(acc), self.weights_proj.weight.to(acc)) * self.n_heads ** -0.5
        return q, k, w

    def _rope(self, q: Tensor, k: Tensor, S: int, device, positions: Optional[Tensor],
              rope: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
        T, half, il = q.shape[1], self.rope_dim // 2, self.interleaved_rope
        if rope is None:
            pos = torch.arange(S, device=device) if positions is None else positions
            return (apply_partial_rope(q, pos[..., S - T:], self.rope_dim, self.rope_theta, il),
                    apply_partial_rope(k, pos, self.rope_dim, self.rope_theta, il))
        cos, sin = rope[0][..., :half], rope[1][..., :half]
        return (rotate_partial(q, cos[..., S - T:, :], sin[..., S - T:, :], self.rope_dim, il),
                rotate_partial(k, cos, sin, self.rope_dim, il))

    def convert_legacy(self, state_dict: dict, prefix: str = "") -> None:
        """Converts the indexer weights of a version-1 checkpoint in ``state_dict`` (in place) and
        sets this module's key LayerNorm eps to 1e-5, so that it scores exactly as that
        checkpoint did under the old convention."""
        key = prefix + "weights_proj.weight"
        if key in state_dict:
            state_dict[key] = state_dict[key] * self.n_heads ** -0.5
        self.k_norm.eps = 1e-5
        warnings.warn(f"{prefix or 'LightningIndexer'}: converted a checkpoint of the earlier indexer "
                      "convention (Hi**-0.5 applied twice, LayerNorm eps 1e-5): weights_proj scaled by "
                      "Hi**-0.5 and eps kept at 1e-5, so it scores as it did", stacklevel=3)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # state dicts saved by torch carry each module's version; a plain dict (safetensors) does not
        if local_metadata.get("version") == 1:
            self.convert_legacy(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, head_dim={self.head_dim}, rope_dim={self.rope_dim}, "
                f"hadamard={self.hadamard is not None}, interleaved_rope={self.interleaved_rope}, "
                f"detach_input={self.detach_input}, norm_eps={self.k_norm.eps}")
