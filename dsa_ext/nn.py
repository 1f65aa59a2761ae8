"""Modules that put DeepSeek Sparse Attention into a Transformer, and the helpers a training loop
needs around them.

- :class:`LightningIndexer`: the indexer of DeepSeek-V3.2 (query/key/weight projections,
  LayerNorm on the key, non-interleaved RoPE on the first ``rope_dim`` dims, optional Hadamard
  rotation). It reads its input detached, so only the indexer loss trains it.
- :class:`DSAAttention`: the attention core. Given the host model's q, k, v (after its own RoPE)
  and the hidden states, it runs in one of three modes:

  ``dense``  plain causal attention, the indexer is not run;
  ``warmup`` dense attention output + KL(main attention || indexer) over every causal key;
  ``sparse`` indexer top-k + ``sparse_attention`` + the same KL restricted to the top-k.

  In training mode the KL loss of each forward is kept on the module; ``indexer_loss(model)``
  collects it, so a training loop reads ``loss = lm_loss + indexer_loss(model)``.
- Helpers: ``set_mode``, ``freeze_for_warmup``, ``param_groups``, and recall statistics (the share
  of the dense attention mass that the indexer's top-k captures).

Layouts are batch-first like the operators: q ``[B, T, H, D]``, k/v ``[B, S, Hkv, D]``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fp8, ops, reference

__all__ = [
    "DSAConfig", "LightningIndexer", "DSAAttention", "MODES", "dense_causal_attention",
    "apply_partial_rope", "hadamard_matrix", "dsa_modules", "set_mode",
    "indexer_loss", "freeze_for_warmup", "unfreeze", "indexer_parameters", "param_groups",
    "recall_stats", "head_mean_attention",
]

MODES = ("dense", "warmup", "sparse")


@dataclass
class DSAConfig:
    """What a conversion adds to every attention layer.

    n_heads, head_dim: indexer heads Hi and their width Di (V3.2: 64 x 128; small models want
    few heads). rope_dim: leading dims of q_idx/k_idx that get RoPE (V3.2: 64). topk: keys per
    query in sparse mode (V3.2: 2048). hadamard: rotate q_idx/k_idx by an orthonormal Hadamard
    matrix (head_dim a power of two). fp8_topk: select the top-k from e4m3 indexer scores
    (dsa_ext.fp8, as V3.2 runs its indexer); the KL loss stays in the input dtype. mode: the
    initial mode, one of MODES.
    """
    n_heads: int = 4
    head_dim: int = 64
    rope_dim: int = 32
    topk: int = 128
    rope_theta: float = 10000.0
    hadamard: bool = False
    fp8_topk: bool = False
    mode: str = "sparse"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"DSAConfig.mode: expected one of {MODES}, got {self.mode!r}")
        if self.topk < 1:
            raise ValueError(f"DSAConfig.topk: expected >= 1, got {self.topk}")
        if self.rope_dim % 2 or not 0 <= self.rope_dim <= self.head_dim:
            raise ValueError(f"DSAConfig.rope_dim: expected an even number in [0, head_dim="
                             f"{self.head_dim}], got {self.rope_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DSAConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------------------------
# Indexer
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Attention helpers
# ---------------------------------------------------------------------------------------------


def head_mean_attention(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """The dense KL target: per-head causal softmax of ``scale * q.k`` averaged over heads,
    [B, T, S] (float32, float64 for float64 input). q [B,T,H,D], k [B,S,Hkv,D] with GQA (head h
    reads kv head h // G), bottom-right causal alignment."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    T, H, S, Hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    kk = k.to(acc).repeat_interleave(H // Hkv, dim=2)
    scores = scale * torch.einsum("bthd,bshd->bhts", q.to(acc), kk)
    scores = scores.masked_fill(~reference.causal_mask(T, S, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1).mean(1)


def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Plain causal attention in the batch-first layout (bottom-right aligned, GQA by head
    groups): q [B,T,H,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv] -> [B,T,H,Dv]."""
    T, S = q.shape[1], k.shape[1]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.shape[2] != k.shape[2]:
        g = q.shape[2] // k.shape[2]
        kh, vh = kh.repeat_interleave(g, dim=1), vh.repeat_interleave(g, dim=1)
    if S == T:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        mask = reference.causal_mask(T, S, q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Attention core
# ---------------------------------------------------------------------------------------------


DenseFn = Callable[[Tensor, Tensor, Tensor, float], Tensor]


class DSAAttention(nn.Module):
    """DSA attention core around a host model's q, k, v. See the module docstring for the modes.

    forward(q, k, v, hidden_states, positions=None, scale=None, dense_fn=None) -> [B, T, H, Dv]
      q [B,T,H,D] and k [B,S,Hkv,D] after the host's own RoPE, v [B,S,Hkv,Dv]; hidden_states
      [B,S,hidden] the input of the host attention (the indexer's input); positions [S] or [B,S]
      for the indexer RoPE; scale the host's softmax scale (default D**-0.5); dense_fn(q,k,v,scale)
      the host's dense attention (default :func:`dense_causal_attention`).

    In training mode (``self.training``) and modes warmup/sparse, the mean per-token KL loss is
    added to ``self.pending_loss`` for :func:`indexer_loss`. With ``record_recall`` on, each
    forward also accumulates recall statistics against the dense attention (see recall_stats).
    """

    def __init__(self, indexer: LightningIndexer, topk: int, mode: str = "sparse", fp8_topk: bool = False):
        super().__init__()
        self.indexer = indexer
        self.topk = int(topk)
        self.fp8_topk = bool(fp8_topk)
        self.mode = mode
        self.pending_loss: Optional[Tensor] = None
        self.record_recall = False
        self.reset_recall()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"DSAAttention.mode: expected one of {MODES}, got {mode!r}")
        self._mode = mode

    def reset_recall(self) -> None:
        # sums over queries of: recall, 1, and the best recall any k keys reach, for all queries
        # and for the queries that see more than k keys (see recall_stats)
        self.recall_sums = torch.zeros(6, dtype=torch.float64)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, hidden_states: Tensor,
                positions: Optional[Tensor] = None, scale: Optional[float] = None,
                dense_fn: Optional[DenseFn] = None) -> Tensor:
        if scale is None:
            scale = q.shape[-1] ** -0.5
        dense_fn = dense_fn or dense_causal_attention
        want_loss = self.training and self.mode != "dense"
        if self.mode == "dense" and not self.record_recall:
            return dense_fn(q, k, v, scale)
        if hidden_states.shape[1] != k.shape[1]:
            raise NotImplementedError(
                f"DSA modes warmup/sparse need the hidden states of every key (got "
                f"{hidden_states.shape[1]} hidden states for {k.shape[1]} keys): a KV cache is "
                "not supported; use mode 'dense' for cached generation")
        q_idx, k_idx, w = self.indexer(hidden_states, positions)
        idx_scale = self.indexer.scale
        indices = None
        if self.mode == "sparse" or self.record_recall:
            with torch.no_grad():
                select = fp8.indexer_topk if self.fp8_topk else ops.indexer_topk
                indices = select(q_idx.detach(), k_idx.detach(), w.detach(), self.topk, idx_scale)
        if self.record_recall:
            self._accumulate_recall(q, k, scale, indices)
        if self.mode == "sparse":
            out, lse = ops.sparse_attention(q, k, v, indices, scale, return_lse=True)
            if want_loss:
                self._add_loss(ops.indexer_kl_loss(q_idx, k_idx, w, q.detach(), k.detach(), indices,
                                                   idx_scale, scale, True, lse.detach()))
            return out
        out = dense_fn(q, k, v, scale)
        if want_loss:
            self._add_loss(ops.indexer_kl_loss(q_idx, k_idx, w, q.detach(), k.detach(), None,
                                               idx_scale, scale, True, None))
        return out

    def _add_loss(self, per_token: Tensor) -> None:
        loss = per_token.mean()
        self.pending_loss = loss if self.pending_loss is None else self.pending_loss + loss

    @torch.no_grad()
    def _accumulate_recall(self, q: Tensor, k: Tensor, scale: float, indices: Tensor) -> None:
        B, T = q.shape[:2]
        S = k.shape[1]
        p = head_mean_attention(q, k, scale)
        captured = p.gather(-1, indices.clamp_min(0).long()) * (indices >= 0)
        recall = captured.sum(-1).double()  # [B, T]
        oracle = p.topk(min(self.topk, S), dim=-1).values.sum(-1).double()
        hard = (torch.arange(T, device=q.device) + (S - T) + 1 > self.topk).expand(B, T).double()
        sums = [recall.sum(), torch.ones_like(recall).sum(), oracle.sum()]
        sums += [(x * hard).sum() for x in (recall, torch.ones_like(recall), oracle)]
        self.recall_sums += torch.stack(sums).cpu()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, topk={self.topk}, fp8_topk={self.fp8_topk}"


# ---------------------------------------------------------------------------------------------
# Helpers for training loops
# ---------------------------------------------------------------------------------------------


def dsa_modules(model: nn.Module) -> List[DSAAttention]:
    """Every DSA core in the model, in module order (one per converted attention layer)."""
    return [m for m in model.modules() if isinstance(m, DSAAttention)]


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every DSA core in ``mode`` (dense, warmup or sparse)."""
    mods = dsa_modules(model)
    if not mods:
        raise ValueError("set_mode: the model has no DSAAttention module (convert it first)")
    for m in mods:
        m.mode = mode


def indexer_loss(model: nn.Module) -> Tensor:
    """Sum over layers of the indexer KL losses of the forwards since the last call (each the
    mean over tokens), and clears them. A zero tensor when there is none (dense mode, eval)."""
    total = None
    for m in dsa_modules(model):
        if m.pending_loss is not None:
            total = m.pending_loss if total is None else total + m.pending_loss
            m.pending_loss = None
    if total is None:
        p = next(model.parameters())
        total = torch.zeros((), device=p.device)
    return total


def indexer_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for m in dsa_modules(model):
        yield from m.indexer.parameters()


def freeze_for_warmup(model: nn.Module) -> List[nn.Parameter]:
    """Dense warm-up: every parameter frozen except the indexers'. Returns the trainable ones."""
    idx = {id(p) for p in indexer_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in idx)
    return [p for p in model.parameters() if p.requires_grad]


def unfreeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def param_groups(model: nn.Module, lr: float, indexer_lr: Optional[float] = None,
                 weight_decay: float = 0.0) -> List[dict]:
    """Optimizer groups over the trainable parameters: the host model's matrices (with weight
    decay), its vectors (norms, biases: no decay), and the indexers (own lr, no decay). Empty
    groups are left out."""
    idx = {id(p) for p in indexer_parameters(model)}
    decay, no_decay, indexer = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in idx:
            indexer.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "model"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "model_no_decay"},
        {"params": indexer, "lr": lr if indexer_lr is None else indexer_lr, "weight_decay": 0.0,
         "name": "indexer"},
    ]
    return [g for g in groups if g["params"]]


class recall_stats:
    """Context manager measuring indexer recall: inside it, every DSA core also computes the
    dense head-mean attention p_t (the KL target, from the q and k the forward computes) and the
    indexer's top-k S_t, and accumulates recall_t = sum_{s in S_t} p_t(s).

    ``result()`` after the block, per layer: ``all`` the mean of recall_t over every query;
    ``hard`` over the queries that see more than k keys (the rows where the selection matters,
    the others are exactly dense and score 1); ``oracle``/``oracle_hard`` the same means for the
    best possible k keys (the top-k of p_t itself), the ceiling of any indexer. The raw sums
    (``self.sums`` [layers, 6]) add up across processes."""

    def __init__(self, model: nn.Module):
        self.mods = dsa_modules(model)
        self.sums: Optional[Tensor] = None

    def __enter__(self):
        for m in self.mods:
            m.reset_recall()
            m.record_recall = True
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.record_recall = False
        self.sums = torch.stack([m.recall_sums for m in self.mods])  # [layers, 6]
        return False

    def result(self, sums: Optional[Tensor] = None) -> Dict[str, List[float]]:
        s = self.sums if sums is None else sums

        def ratio(num, den):
            return [float(x / y) if y > 0 else 1.0 for x, y in zip(num.tolist(), den.tolist())]

        return {"all": ratio(s[:, 0], s[:, 1]), "oracle": ratio(s[:, 2], s[:, 1]),
                "hard": ratio(s[:, 3], s[:, 4]), "oracle_hard": ratio(s[:, 5], s[:, 4])}
