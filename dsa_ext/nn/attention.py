"""The DSA attention core around a host model's q, k, v, and the dense attention it replaces.

:class:`DSAAttention` runs in one of three modes:

``dense``  plain causal attention, the indexer is not run;
``warmup`` dense attention output, and the indexer learns KL(main attention || indexer) over every
           causal key;
``sparse`` indexer top-k + ``sparse_attention``, and the same KL restricted to the top-k.

In training (``module.training`` and a mode other than dense) the indexer's KL loss is attached
to the attention output by :class:`AttachIndexerLoss`: the output is returned unchanged and its
backward also sends ``loss_scale * loss_coeff`` into the loss, so ``lm_loss.backward()`` trains the
indexer with no extra term in the loop. The loss belongs to the autograd graph of the forward
that produced it: activation checkpointing (which runs a forward twice) and forwards that are
never backpropagated cannot count it twice or leak it into the next step. A detached copy per
layer (``last_loss``) is kept for logging.
"""
from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fp8, ops
from ..conventions import causal_mask, default_attention_scale
from .cache import append_indexer_keys
from .config import MODES, DSAConfig
from .indexer import LightningIndexer
from .key_ranges import KeyRanges, real_queries, visible_keys

if TYPE_CHECKING:
    from .recall import RecallSums

__all__ = ["DSAAttention", "AttachIndexerLoss", "Selection", "dense_causal_attention",
           "head_mean_attention", "dsa_modules", "DenseFn"]

DenseFn = Callable[[Tensor, Tensor, Tensor, float], Tensor]


class Selection(NamedTuple):
    """What an indexer made for one attention call: its outputs ``q_idx`` [B,T,Hi,Di], ``k_idx``
    [B,S,Di], ``w`` [B,T,Hi] (None when the selection is borrowed from another layer; ``k_idx``
    alone None where an FP8 cache keeps only the e4m3 form of earlier keys) and the top-k
    ``indices`` [B,T,topk] (None where the mode needs none)."""
    q_idx: Optional[Tensor]
    k_idx: Optional[Tensor]
    w: Optional[Tensor]
    indices: Optional[Tensor]


def head_mean_attention(q: Tensor, k: Tensor, scale: float, key_ranges: Optional[KeyRanges] = None) -> Tensor:
    """The dense KL target: per-head causal softmax of ``scale * q.k`` averaged over heads,
    [B, T, S] (float32, float64 for float64 input). q [B,T,H,D], k [B,S,Hkv,D] with GQA (head h
    reads kv head h // G), bottom-right causal alignment, restricted to ``key_ranges``
    (``(key_start, key_end)`` [B,T] int32; a query that sees no key gets a zero row).
    Materialises [B, H, T, S]: for measurements (recall), not for training."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    T, H, S, Hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    kk = k.to(acc).repeat_interleave(H // Hkv, dim=2)
    scores = scale * torch.einsum("bthd,bshd->bhts", q.to(acc), kk)
    visible = visible_keys(key_ranges, T, S, q.device)
    blind = ~visible.any(-1, keepdim=True)  # queries that see nothing: a finite softmax, zeroed after
    scores = scores.masked_fill(~(visible | blind)[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(1).masked_fill(blind, 0.0)


def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                           key_ranges: Optional[KeyRanges] = None) -> Tensor:
    """Plain causal attention in the batch-first layout (bottom-right aligned, GQA by head
    groups): q [B,T,H,D], k [B,S,Hkv,D], v [B,S,Hkv,Dv] -> [B,T,H,Dv]. With ``key_ranges``
    (``(key_start, key_end)`` [B,T] int32) each query sees only its range; a query that sees no
    key gets 0, as from sparse_attention."""
    T, S = q.shape[1], k.shape[1]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.shape[2] != k.shape[2]:
        g = q.shape[2] // k.shape[2]
        kh, vh = kh.repeat_interleave(g, dim=1), vh.repeat_interleave(g, dim=1)
    if key_ranges is not None:
        visible = visible_keys(key_ranges, T, S, q.device)
        blind = ~visible.any(-1, keepdim=True)  # sdpa would give NaN there: attend to all, then zero
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=(visible | blind)[:, None], scale=scale)
        return out.transpose(1, 2).masked_fill(blind[..., None], 0.0)
    if S == T:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    elif T == 1:  # one query at the end sees every key
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_mask(T, S, q.device), scale=scale)
    return out.transpose(1, 2)


class AttachIndexerLoss(torch.autograd.Function):
    """``out = AttachIndexerLoss.apply(out, loss, coeff)``: the identity on ``out`` whose backward
    also returns ``coeff`` as the gradient of the scalar ``loss`` (the pattern Megatron-LM uses for
    auxiliary losses). Whatever backpropagates through ``out`` thereby adds ``coeff * loss`` to
    the objective, once per forward that backward runs through."""

    @staticmethod
    def forward(ctx, out: Tensor, loss: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        shape, dtype, device = ctx.loss_meta
        return grad_out, torch.full(shape, ctx.coeff, dtype=dtype, device=device), None


class DSAAttention(nn.Module):
    """DSA attention core around a host model's q, k, v. See the module docstring for the modes.

    forward(q, k, v, hidden_states, positions=None, scale=None, dense_fn=None, key_ranges=None,
            cache=None) -> [B, T, H, Dv]
      q [B,T,H,D] and k [B,S,Hkv,D] after the host's own RoPE, v [B,S,Hkv,Dv]; hidden_states
      [B,S,hidden] the input of the host attention (the indexer's input); positions [S] or [B,S]
      for the indexer RoPE; scale the host's softmax scale (default D**-0.5); dense_fn(q,k,v,scale)
      the host's dense attention (default :func:`dense_causal_attention`); key_ranges
      ``(key_start, key_end)`` [B,T] int32 (:mod:`dsa_ext.ranges`: packed documents, padding).
      With ``cache`` (incremental decoding, chunked prefill: k and v then hold the host's cached
      tokens and the T new ones, S >= T), hidden_states [B,T,hidden] and positions [T] or [B,T]
      are the new tokens' only: the indexer computes their keys, appends them to the layer's
      indexer-key cache and selects over all S (see :mod:`dsa_ext.nn.cache`). Warm-up mode then
      gives the dense output; the indexer loss needs the full-precision keys of every token,
      which an FP8 cache of earlier tokens does not keep.

    Key ranges (packed documents, padding) hold in every mode: the top-k, the dense output, the
    warm-up KL target and the top-k KL see only each query's range. ``dense_fn``, when given,
    must apply the same ranges itself (transformers' mask does). Pass packed documents' position
    ids that restart per document as ``positions`` (what the host's RoPE gets): each document
    then scores exactly as when run alone. A query that sees no key (padding) gets output 0 and
    no loss; the loss is the mean over the real queries (:mod:`dsa_ext.nn.key_ranges`).

    ``forward`` is :meth:`select` (the indexer and its top-k) followed by :meth:`attend`; a host
    that computes its indexer's input elsewhere than its attention (transformers' DeepSeek-V3.2,
    GLM-5) calls the two halves itself. ``indexer=None``: a core that attends over a selection
    made by another layer's indexer (GLM-5's shared layers) and has no loss of its own.

    Indexer loss (training, modes warmup/sparse): the mean over tokens of the per-token KL,
    attached to the output with weight ``loss_coeff * loss_scale`` (see
    :func:`dsa_ext.nn.set_loss_scale` for gradient accumulation and loss scaling); its detached
    value is ``last_loss``. While ``recall`` holds a :class:`~dsa_ext.nn.recall.RecallSums`, each
    forward also adds its recall statistics to it (see :class:`~dsa_ext.nn.recall_stats`).
    """

    def __init__(self, indexer: Optional[LightningIndexer], topk: int, mode: str = "sparse", fp8_topk: bool = False,
                 loss_coeff: float = 1.0):
        super().__init__()
        self.indexer = indexer
        self.topk = int(topk)
        self.fp8_topk = bool(fp8_topk)
        self.mode = mode
        self.loss_coeff = float(loss_coeff)
        self.loss_scale = 1.0
        self.last_loss: Optional[Tensor] = None
        self.recall: Optional["RecallSums"] = None
        # a dsa_ext.context_parallel.ContextParallel: q, k, v, hidden states are this rank's tokens
        self.context_parallel = None

    @classmethod
    def from_config(cls, config: DSAConfig, hidden_size: int) -> "DSAAttention":
        """The core a conversion adds to one attention layer: a fresh indexer reading hidden
        states of width ``hidden_size``, and ``config``'s top-k, mode, FP8 selection and loss
        coefficient."""
        indexer = LightningIndexer(hidden_size, config.n_heads, config.head_dim, config.rope_dim,
                                   config.rope_theta, config.hadamard)
        return cls(indexer, config.topk, config.mode, config.fp8_topk, config.loss_coeff)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"DSAAttention.mode: expected one of {MODES}, got {mode!r}")
        self._mode = mode

    def forward(self, q: Tensor, k: Tensor, v: Tensor, hidden_states: Tensor,
                positions: Optional[Tensor] = None, scale: Optional[float] = None,
                dense_fn: Optional[DenseFn] = None, key_ranges: Optional[KeyRanges] = None,
                cache=None) -> Tensor:
        selection = self.select(hidden_states, positions, key_ranges=key_ranges, cache=cache)
        return self.attend(q, k, v, selection, scale, dense_fn, key_ranges)

    def select(self, hidden_states: Tensor, positions: Optional[Tensor] = None,
               q_input: Optional[Tensor] = None, rope=None, key_ranges: Optional[KeyRanges] = None,
               cache=None) -> Optional[Selection]:
        """The indexer's half of :meth:`forward`: its outputs and (sparse mode, or while recall is
        measured) its top-k within ``key_ranges``, or None in dense mode, where the indexer is not
        run. The arguments are the indexer's (:meth:`LightningIndexer.forward`), and the layer's
        ``cache`` (see :meth:`forward`), whose indexer keys the selection then covers; the
        selection's ``k_idx`` is None where an FP8 cache keeps only the e4m3 form of earlier
        tokens."""
        if self.mode == "dense" and self.recall is None:
            return None
        if self.indexer is None:
            raise ValueError("DSAAttention.select: this core has no indexer (it attends over another "
                             "layer's selection)")
        q_idx, k_idx, w = self.indexer(hidden_states, positions, q_input=q_input, rope=rope)
        if self.context_parallel is not None:
            if cache is not None:
                raise NotImplementedError("DSAAttention: a KV cache under context parallelism is not supported")
            return self.context_parallel.select(self, q_idx, k_idx, w, key_ranges)
        packed = None
        if cache is not None:
            k_idx, packed = append_indexer_keys(cache, k_idx, self.fp8_topk)
        indices = None
        if self.mode == "sparse" or self.recall is not None:
            with torch.no_grad():
                q, wd = q_idx.detach(), w.detach()
                if packed is not None:
                    indices = fp8.indexer_topk_packed(q, packed, wd, self.topk, self.indexer.scale,
                                                      **_range_args(key_ranges))
                else:
                    pick = fp8.indexer_topk if self.fp8_topk else ops.indexer_topk
                    indices = pick(q, k_idx.detach(), wd, self.topk, self.indexer.scale, **_range_args(key_ranges))
        return Selection(q_idx, k_idx, w, indices)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, selection: Optional[Selection],
               scale: Optional[float] = None, dense_fn: Optional[DenseFn] = None,
               key_ranges: Optional[KeyRanges] = None) -> Tensor:
        """The attention half of :meth:`forward`, on ``selection`` from :meth:`select` (this
        core's, or with ``q_idx`` None one made by another layer's indexer, which then trains
        nothing here), with the ``key_ranges`` the selection was made with."""
        if scale is None:
            scale = default_attention_scale(q.shape[-1])
        dense_fn = dense_fn or partial(dense_causal_attention, key_ranges=key_ranges)
        if self.mode == "dense" and self.recall is None and self.context_parallel is None:
            return dense_fn(q, k, v, scale)
        if torch.is_autocast_enabled(q.device.type):  # a host's RoPE in float32 leaves q, k in float32
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if self.context_parallel is not None:  # global causality: the host's dense_fn does not apply
            return self.context_parallel.attend(self, q, k, v, selection, scale, key_ranges)
        own = selection is not None and selection.q_idx is not None
        if own and selection.k_idx is not None and selection.k_idx.shape[1] != k.shape[1]:
            raise ValueError(
                f"DSAAttention: {selection.k_idx.shape[1]} indexer keys for {k.shape[1]} attention keys; "
                "with a KV cache, pass the layer's cache to the core (cache=...) so that it keeps the "
                "indexer keys of the cached tokens")
        indices = None if selection is None else selection.indices
        if indices is None and (self.mode == "sparse" or self.recall is not None):
            raise ValueError(f"DSAAttention in mode {self.mode!r}: no top-k selection to attend over")
        want_loss = own and self.training and self.mode != "dense" and torch.is_grad_enabled()
        if want_loss and selection.k_idx is None:
            raise NotImplementedError("DSAAttention: the indexer loss needs full-precision indexer keys, "
                                      "which an FP8 indexer-key cache does not keep for earlier tokens")
        real = real_queries(key_ranges, q.shape[1], k.shape[1])
        if self.recall is not None:
            self.recall.add(q, k, scale, indices, self.topk, key_ranges)
        if self.mode == "sparse":
            out, lse = ops.sparse_attention(q, k, v, indices, scale, return_lse=True)
            if want_loss:
                out = self._attach_loss(out, _mean_over(real, ops.indexer_kl_loss(
                    selection.q_idx, selection.k_idx, selection.w, q.detach(), k.detach(), indices,
                    self.indexer.scale, scale, True, lse.detach(), **_range_args(key_ranges))))
            return out
        out = dense_fn(q, k, v, scale)
        if want_loss:
            out = self._attach_loss(out, _mean_over(real, ops.indexer_kl_loss(
                selection.q_idx, selection.k_idx, selection.w, q.detach(), k.detach(), None,
                self.indexer.scale, scale, True, None, **_range_args(key_ranges))))
        return out

    def _attach_loss(self, out: Tensor, loss: Tensor) -> Tensor:
        """Attach this layer's indexer loss (a scalar: the mean over real tokens, or under context
        parallelism this rank's share of it) to the attention output."""
        self.last_loss = loss.detach()
        return AttachIndexerLoss.apply(out, loss, self.loss_coeff * self.loss_scale)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, topk={self.topk}, fp8_topk={self.fp8_topk}, loss_coeff={self.loss_coeff}"


def _mean_over(real: Optional[Tensor], per_token: Tensor) -> Tensor:
    """The mean of ``per_token`` [B, T] over the real queries (``real`` [B, T] bool; None: all),
    0 when there is none."""
    return per_token.mean() if real is None else (per_token * real).sum() / real.sum().clamp_min(1)


def _range_args(key_ranges: Optional[KeyRanges]) -> dict:
    """The operators' ``key_start``/``key_end`` keyword arguments for ``key_ranges``."""
    return {} if key_ranges is None else {"key_start": key_ranges[0], "key_end": key_ranges[1]}


def dsa_modules(model: nn.Module) -> List[DSAAttention]:
    """Every DSA core in the model, in module order (one per converted attention layer)."""
    return [m for m in model.modules() if isinstance(m, DSAAttention)]
