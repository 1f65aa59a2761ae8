"""A minimal decoder-only Transformer in plain PyTorch (Llama-style: RMSNorm, RoPE, GQA, SwiGLU),
and :func:`convert`, which swaps DSA into it.

The attention module computes q, k, v and hands them to its ``core`` submodule, the one seam a
conversion needs: :class:`DenseCore` (plain causal attention) in a dense model, a
:class:`dsa_ext.nn.DSAAttention` after :func:`convert`. Nothing else changes, so the q/k/v/o
weights of a dense checkpoint load into the converted model unchanged.

``model(ids, cache=cache)`` with a :class:`dsa_ext.nn.KVCache` runs incrementally: ``ids`` are the
tokens after the cached ones (a prompt chunk, or one token while decoding), the cache gains their
keys, values and (DSA layers) indexer keys. :mod:`dsa_ext.generation` generates with it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import context_parallel as cp_module, ranges
from .nn import DSAAttention, DSAConfig, dense_causal_attention
from .nn.cache import KVCache, LayerCache

__all__ = ["DecoderConfig", "Decoder", "DenseCore", "convert"]


@dataclass
class DecoderConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: MHA
    mlp_hidden: Optional[int] = None  # None: 8/3 d_model rounded up to a multiple of 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def _rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Full-width rotate-half RoPE on x [B, T, H, D] (the Llama layout) at positions [T] or [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = (positions.float()[..., None] * inv_freq).expand(x.shape[0], x.shape[1], half)[:, :, None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


class DenseCore(nn.Module):
    """Plain causal attention: the core of an unconverted model (over a context-parallel group's
    gathered keys when :func:`dsa_ext.context_parallel.enable` set ``context_parallel``)."""

    def __init__(self):
        super().__init__()
        self.context_parallel = None

    def forward(self, q, k, v, hidden_states=None, positions=None, scale=None, key_ranges=None, cache=None):
        if self.context_parallel is not None:
            return self.context_parallel.dense_attention(q, k, v, scale, key_ranges)
        return dense_causal_attention(q, k, v, scale, key_ranges)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        hd, nkv = cfg.head_dim, cfg.n_kv_heads or cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, nkv * hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, nkv * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.core: nn.Module = DenseCore()

    def forward(self, x: Tensor, positions: Tensor, key_ranges=None, cache: Optional[LayerCache] = None) -> Tensor:
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        q = _rope(self.q_proj(x).view(B, T, -1, hd), positions, self.cfg.rope_theta)
        k = _rope(self.k_proj(x).view(B, T, -1, hd), positions, self.cfg.rope_theta)
        v = self.v_proj(x).view(B, T, -1, hd)
        if cache is not None:
            k, v = cache.update(k, v)
        out = self.core(q, k, v, hidden_states=x, positions=positions, scale=hd ** -0.5, key_ranges=key_ranges,
                        cache=cache)
        return self.o_proj(out.reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        hidden = cfg.mlp_hidden or 32 * -(-8 * cfg.d_model // 3 // 32)
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.gate = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor, positions: Tensor, key_ranges=None, cache: Optional[LayerCache] = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), positions, key_ranges, cache)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    """Decoder-only LM: ``forward(ids [B, T]) -> logits [B, T, vocab]``.

    Packed documents: ``forward(ids, position_ids)`` with position ids [B, T] that restart per
    document, as transformers takes them: a document begins wherever the position does not
    continue the previous one (:func:`dsa_ext.ranges.from_position_ids`), RoPE (the host's and
    the indexers') uses these positions and every attention stays inside its document, so each
    document gives exactly the logits it gives alone. ``key_ranges`` ``(key_start, key_end)``
    [B, T] int32 overrides the documents (e.g. padding: ``dsa_ext.ranges.from_padding_mask``).

    Incremental decoding: ``forward(ids, cache=cache)`` with a :class:`~dsa_ext.nn.KVCache`: ``ids``
    follow the cached tokens, which the cache then holds too (one sequence per row: no packed
    documents or key ranges with a cache)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: Tensor, position_ids: Optional[Tensor] = None, key_ranges=None,
                cache: Optional[KVCache] = None) -> Tensor:
        """ids [B, T]; position_ids [T] or [B, T] (default arange(T), after the cached tokens when
        ``cache`` is given): ids that restart mark packed documents (each attends within itself,
        as ``key_ranges`` would say). Under context parallelism ids are the rank's tokens
        (``cp.shard``), the positions default to their global ones (``cp.positions()``), and
        position ids, when given, are the rank's share of the sequence's (``cp.shard``), whose
        documents :meth:`~dsa_ext.context_parallel.ContextParallel.key_ranges` finds."""
        if cache is not None and (position_ids is not None or key_ranges is not None):
            raise NotImplementedError("Decoder: position_ids or key_ranges (packed documents, padding) with a "
                                      "cache are not supported")
        cp = cp_module.group_of(self)
        if key_ranges is None and position_ids is not None:
            key_ranges = (ranges.from_position_ids(position_ids.expand(ids.shape)) if cp is None
                          else cp.key_ranges(position_ids, ids.shape[0]))
        if position_ids is not None:
            positions = position_ids
        elif cp is not None:
            positions = cp.positions(ids.device)
        else:
            past = 0 if cache is None else cache.get_seq_length()
            positions = torch.arange(past, past + ids.shape[1], device=ids.device)
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, key_ranges, None if cache is None else cache.layer(i))
        return self.lm_head(self.norm(x))


def convert(model: Decoder, config: DSAConfig) -> Decoder:
    """Swap DSA into every attention layer of a :class:`Decoder`, in place: each layer's core
    becomes a DSAAttention with a fresh indexer reading that layer's attention input. Weights of
    the host model are untouched. Returns the model."""
    if not isinstance(model, Decoder):
        raise TypeError(f"convert: expected a dsa_ext.decoder.Decoder, got {type(model).__name__}")
    p = next(model.parameters())
    for block in model.blocks:
        if isinstance(block.attn.core, DSAAttention):
            raise ValueError("convert: the model already has DSA attention")
        block.attn.core = DSAAttention.from_config(config, model.cfg.d_model).to(p.device, p.dtype)
    model.dsa_config = config
    return model
