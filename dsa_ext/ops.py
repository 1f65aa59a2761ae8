"""Typed entry points of the ``torch.ops.dsa`` operators, their fake kernels (shape and dtype
only, for torch.compile and meta tensors) and their autograd formulas.

Conventions (docs/DESIGN.md): batch-first tensors whose last dimension is contiguous; causal
alignment is bottom-right (query t sees keys s <= t + S - T); the indexer operators take optional
per-query key ranges ``key_start``, ``key_end`` (int32 ``[B, T]``, built by :mod:`dsa_ext.ranges`
from cu_seqlens, padding masks, position ids or a window): query t then sees key s only if
``key_start[b,t] <= s < key_end[b,t]`` as well; index tensors are int32 with -1 for an empty
slot; scores, lse and losses are float32 (float64 for float64 inputs); ``topk`` is the number of
selected keys per query. Defaults (``scale=None`` and the like) live in the operator
schemas and are resolved in C++, so these wrappers pass them through unchanged.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["indexer_logits", "topk_indices", "indexer_topk", "sparse_attention", "indexer_kl_loss"]

_ops = torch.ops.dsa


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def indexer_logits(q_idx: Tensor, k_idx: Tensor, w: Tensor, scale: Optional[float] = None,
                   causal: bool = True, k_scale: Optional[Tensor] = None, key_start: Optional[Tensor] = None,
                   key_end: Optional[Tensor] = None) -> Tensor:
    """Lightning-indexer scores of every (query, key) pair.

    ``logits[b,t,s] = scale * sum_j w[b,t,j] * relu(q_idx[b,t,j,:] . k_idx[b,s,:])``, ``-inf``
    where key s is masked (causal: ``s > t + S - T``; outside the key range: ``s < key_start[b,t]``
    or ``s >= key_end[b,t]``). With ``k_scale``, each score of key s is also multiplied by
    ``k_scale[b,s]``. Only key tiles inside some query's range are computed.

    Args:
        q_idx: ``[B, T, Hi, Di]`` float64, float32, bfloat16 or float16: indexer queries; or
            float8_e4m3fn (forward only, see :mod:`dsa_ext.fp8`).
        k_idx: ``[B, S, Di]``, q_idx's dtype: one indexer key per token, shared by all Hi heads.
        w: ``[B, T, Hi]`` float32 or q_idx's dtype: per-query head weights (float32 for FP8 inputs,
            with the query rows' scales folded in).
        scale: multiplies every score; default ``(Hi * Di) ** -0.5``.
        causal: mask keys after each query (bottom-right aligned; needs S >= T).
        k_scale: ``[B, S]`` float32 per-key scales of float8_e4m3fn keys, or None.
        key_start, key_end: ``[B, T]`` int32 per-query key ranges ``[key_start, key_end)`` with
            values in ``[0, S]``, or None (0, resp. S); either may come alone. ``key_start >=
            key_end`` is an empty row (all ``-inf``).

    Returns:
        ``[B, T, S]`` float32 (float64 for float64 inputs). Differentiable in q_idx, k_idx, w
        (not for FP8 inputs).
    """
    return _ops.indexer_logits(q_idx, k_idx, w, scale, bool(causal), k_scale, key_start, key_end)


def topk_indices(logits: Tensor, topk: int) -> Tensor:
    """Positions of the ``topk`` highest scores of each row, deterministically.

    Ties go to the lower position; each row lists its positions in ascending order followed by
    ``-1`` padding when fewer than ``topk`` scores are valid (``-inf`` and NaN are never
    selected), so a causal row with fewer than ``topk`` visible keys is exactly dense.

    Args:
        logits: ``[B, T, S]`` float64, float32, bfloat16 or float16.
        topk: number of positions per row, ``topk >= 1`` (``topk > S`` is allowed: padded with -1).

    Returns:
        ``[B, T, topk]`` int32. Not differentiable.
    """
    return _ops.topk_indices(logits, int(topk))


def indexer_topk(q_idx: Tensor, k_idx: Tensor, w: Tensor, topk: int, scale: Optional[float] = None,
                 causal: bool = True, k_scale: Optional[Tensor] = None, key_start: Optional[Tensor] = None,
                 key_end: Optional[Tensor] = None) -> Tensor:
    """``topk_indices(indexer_logits(q_idx, k_idx, w, scale, causal, k_scale, key_start, key_end),
    topk)`` without ever materialising the ``[B, T, S]`` logits: scores stream through a running
    selection, memory is O(B*T*topk). Key tiles outside every query's range are never scored, so
    a packed sequence costs what its documents cost.

    Args:
        q_idx: ``[B, T, Hi, Di]``; k_idx: ``[B, S, Di]``; w: ``[B, T, Hi]``, as in
            :func:`indexer_logits`.
        topk: positions per row, ``topk >= 1``.
        scale: default ``(Hi * Di) ** -0.5``.
        causal: bottom-right causal mask (needs S >= T).
        k_scale: ``[B, S]`` float32 key scales of float8_e4m3fn inputs, as in :func:`indexer_logits`.
        key_start, key_end: ``[B, T]`` int32 per-query key ranges, as in :func:`indexer_logits`;
            a query with an empty range gets an all ``-1`` row.

    Returns:
        ``[B, T, topk]`` int32, ascending positions then -1 padding. Not differentiable.
    """
    return _ops.indexer_topk(q_idx, k_idx, w, int(topk), scale, bool(causal), k_scale, key_start, key_end)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: Optional[float] = None,
                     return_lse: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Softmax attention of each query over the keys its index row selects (no other mask).

    Query head h reads kv head ``h // (H // Hkv)`` (MHA: Hkv == H; GQA; MQA: Hkv == 1). An index
    of -1 is an empty slot; duplicates count once per occurrence; a row with no valid index gets
    output 0 and lse -inf (with zero gradients).

    Args:
        q: ``[B, T, H, Dqk]`` float64, float32, bfloat16 or float16.
        k: ``[B, S, Hkv, Dqk]``, q's dtype. Any strides with a contiguous last dimension.
        v: ``[B, S, Hkv, Dv]``, q's dtype; may be a view of k's storage (``kv[..., :Dv]``).
        indices: ``[B, T, topk]`` int32 (one row serves every head) or ``[B, T, Hkv, topk]``;
            entries -1 or in ``[0, S)``.
        scale: score scale, default ``Dqk ** -0.5``.
        return_lse: also return the natural-log log-sum-exp of the scores.

    Returns:
        out ``[B, T, H, Dv]`` in q's dtype, and with ``return_lse`` the lse ``[B, T, H]`` float32
        (float64 for float64 inputs). Differentiable in q, k, v (also through lse).
    """
    out, lse = _ops.sparse_attention(q, k, v, indices, scale)
    return (out, lse) if return_lse else out


def indexer_kl_loss(q_idx: Tensor, k_idx: Tensor, w: Tensor, q: Tensor, k: Tensor,
                    indices: Optional[Tensor] = None, idx_scale: Optional[float] = None,
                    attn_scale: Optional[float] = None, causal: bool = True,
                    attn_lse: Optional[Tensor] = None, key_start: Optional[Tensor] = None,
                    key_end: Optional[Tensor] = None) -> Tensor:
    """The indexer's training loss: per query token, the KL divergence from the main attention's
    distribution to the indexer's, streamed over keys (no ``[B, T, S]`` or ``[B, H, T, S]``
    tensor is ever built: extra memory is O(B*T*(H+Hi))).

    For query token t with support ``U_t`` (below)::

        I(s)    = idx_scale * sum_j w[t,j] * relu(q_idx[t,j] . k_idx[s])      (indexer logits)
        p_t(s)  = mean_h softmax_{U_t}(attn_scale * q[t,h] . k[s, h // (H // Hkv)])(s)
        loss[t] = KL(p_t || softmax_{U_t}(I)) = sum_{s in U_t} p_t(s) * (log p_t(s) - log softmax_{U_t}(I)(s))

    ``p_t`` is the per-head attention probabilities summed over heads and L1-normalised (their
    mean). The support ``U_t`` is

    - ``indices=None`` (dense warm-up): every key the query sees, ``s <= t + S - T`` when causal
      (bottom-right aligned), all S keys otherwise, and inside ``[key_start, key_end)`` when
      ranges are given (tiles outside them are skipped);
    - ``indices`` given (sparse stage): the valid (``!= -1``) entries of ``indices[b, t]`` that
      lie in ``[key_start[b,t], key_end[b,t])`` when ranges are given, both distributions
      renormalised over them. No causal mask is applied on top (the indices say what is
      attended, as in :func:`sparse_attention`). A position listed twice is two support
      elements (duplicates count once per occurrence, as in :func:`sparse_attention`), which
      amounts to weighting that key by its multiplicity in both distributions.

    A row with an empty support has loss 0 and zero gradients.

    Args:
        q_idx: ``[B, T, Hi, Di]`` float64, float32, bfloat16 or float16: indexer queries.
        k_idx: ``[B, S, Di]``, q_idx's dtype: indexer keys (one per token, shared by all heads).
        w: ``[B, T, Hi]`` float32 or q_idx's dtype: indexer head weights.
        q: ``[B, T, H, Dqk]``, q_idx's dtype: the main attention's queries (any Dqk). Constant:
            never receives a gradient (read detached).
        k: ``[B, S, Hkv, Dqk]``, q_idx's dtype, H a multiple of Hkv (MHA, GQA, MQA): the main
            attention's keys. Constant, like q.
        indices: ``None`` (dense) or ``[B, T, topk]`` int32 with ``topk >= 1``, entries -1 or
            in ``[0, S)`` (e.g. from :func:`indexer_topk`).
        idx_scale: indexer score scale, default ``(Hi * Di) ** -0.5``.
        attn_scale: attention score scale, default ``Dqk ** -0.5``.
        causal: dense form only: mask keys after each query (needs S >= T).
        attn_lse: optional ``[B, T, H]`` float32 (float64 for float64 inputs): the main
            attention's own natural-log lse over the same support (``sparse_attention(...,
            return_lse=True)`` returns it), used instead of recomputing it, which saves one pass
            over the keys. Read detached. The result does not depend on whether it is given
            (up to the rounding of the lse itself).
        key_start, key_end: ``[B, T]`` int32 per-query key ranges (values in ``[0, S]``; either
            may come alone), or None: see the support above. An empty range gives loss 0.

    Returns:
        ``[B, T]`` per-token loss, float32 (float64 for float64 inputs); reduce it as the
        training recipe says (DeepSeek-V3.2 sums over tokens). Differentiable in q_idx, k_idx
        and w only.
    """
    loss, _, _ = _ops.indexer_kl_loss(
        q_idx, k_idx, w, q.detach(), k.detach(), indices, idx_scale, attn_scale, bool(causal),
        None if attn_lse is None else attn_lse.detach(), key_start, key_end)
    return loss


# ---------------------------------------------------------------------------------------------
# Fake kernels: output metadata, and the shape checks of the C++ host code as torch._check, so
# that torch.compile reports a bad shape at trace time with the operator's own message.
# ---------------------------------------------------------------------------------------------


def _check_rank(op: str, name: str, t: Tensor, rank: int, layout: str) -> None:
    torch._check(t.dim() == rank, lambda: f"{op}: expected {name} to be a {rank}-D tensor {layout}, "
                                          f"got shape {list(t.shape)}")


def _check_dim(op: str, name: str, t: Tensor, dim: int, expected, what: str) -> None:
    torch._check(t.shape[dim] == expected, lambda: f"{op}: expected {name}.size({dim}) == {expected} "
                                                   f"({what}), got shape {list(t.shape)}")


def _check_indexer(op: str, q_idx: Tensor, k_idx: Tensor, w: Tensor, causal: bool) -> None:
    _check_rank(op, "q_idx", q_idx, 4, "[B, T, Hi, Di]")
    _check_rank(op, "k_idx", k_idx, 3, "[B, S, Di]")
    _check_rank(op, "w", w, 3, "[B, T, Hi]")
    B, T, Hi, Di = q_idx.shape
    _check_dim(op, "k_idx", k_idx, 0, B, "batch B of q_idx")
    _check_dim(op, "k_idx", k_idx, 2, Di, "head dim Di of q_idx")
    _check_dim(op, "w", w, 0, B, "batch B of q_idx")
    _check_dim(op, "w", w, 1, T, "length T of q_idx")
    _check_dim(op, "w", w, 2, Hi, "heads Hi of q_idx")
    if causal:
        torch._check(k_idx.shape[1] >= T, lambda: f"{op}: causal attention needs S >= T, got T={T} "
                                                  f"from q_idx and S={k_idx.shape[1]} from k_idx")


def _check_key_ranges(op: str, q_idx: Tensor, key_start: Optional[Tensor], key_end: Optional[Tensor]) -> None:
    B, T = q_idx.shape[:2]
    for name, r in (("key_start", key_start), ("key_end", key_end)):
        if r is None:
            continue
        torch._check(r.dtype == torch.int32, lambda: f"{op}: expected {name} to be int32, got {r.dtype}")
        _check_rank(op, name, r, 2, "[B, T]")
        _check_dim(op, name, r, 0, B, "batch B of q_idx")
        _check_dim(op, name, r, 1, T, "length T of q_idx")


def _check_topk(op: str, topk: int) -> None:
    torch._check_value(1 <= topk < 2**31, lambda: f"{op}: expected 1 <= topk < 2^31, got topk={topk}")


def _check_attention(op: str, q: Tensor, k: Tensor, v: Tensor, indices: Tensor) -> None:
    _check_rank(op, "q", q, 4, "[B, T, H, Dqk]")
    _check_rank(op, "k", k, 4, "[B, S, Hkv, Dqk]")
    _check_rank(op, "v", v, 4, "[B, S, Hkv, Dv]")
    B, T, H, Dqk = q.shape
    _check_dim(op, "k", k, 0, B, "batch B of q")
    _check_dim(op, "k", k, 3, Dqk, "head dim Dqk of q")
    _check_dim(op, "v", v, 0, B, "batch B of q")
    _check_dim(op, "v", v, 1, k.shape[1], "length S of k")
    _check_dim(op, "v", v, 2, k.shape[2], "kv heads Hkv of k")
    torch._check(H % k.shape[2] == 0, lambda: f"{op}: expected the H={H} query heads of q to be a "
                                              f"multiple of the Hkv={k.shape[2]} kv heads of k")
    torch._check(indices.dim() in (3, 4), lambda: f"{op}: expected indices to be [B, T, topk] or "
                                                  f"[B, T, Hkv, topk], got shape {list(indices.shape)}")
    _check_dim(op, "indices", indices, 0, B, "batch B of q")
    _check_dim(op, "indices", indices, 1, T, "length T of q")
    if indices.dim() == 4:
        _check_dim(op, "indices", indices, 2, k.shape[2], "kv heads Hkv of k")


def _check_kl_loss(op: str, q_idx: Tensor, k_idx: Tensor, w: Tensor, q: Tensor, k: Tensor,
                   indices: Optional[Tensor], causal: bool) -> None:
    _check_indexer(op, q_idx, k_idx, w, causal)
    _check_rank(op, "q", q, 4, "[B, T, H, Dqk]")
    _check_rank(op, "k", k, 4, "[B, S, Hkv, Dqk]")
    B, T = q_idx.shape[:2]
    _check_dim(op, "q", q, 0, B, "batch B of q_idx")
    _check_dim(op, "q", q, 1, T, "length T of q_idx")
    _check_dim(op, "k", k, 0, B, "batch B of q_idx")
    _check_dim(op, "k", k, 1, k_idx.shape[1], "length S of k_idx")
    _check_dim(op, "k", k, 3, q.shape[3], "head dim Dqk of q")
    torch._check(q.shape[2] % k.shape[2] == 0, lambda: f"{op}: expected the H={q.shape[2]} query heads "
                                                      f"of q to be a multiple of the Hkv={k.shape[2]} kv heads of k")
    if indices is not None:
        _check_rank(op, "indices", indices, 3, "[B, T, topk]")
        _check_dim(op, "indices", indices, 0, B, "batch B of q_idx")
        _check_dim(op, "indices", indices, 1, T, "length T of q_idx")


@torch.library.register_fake("dsa::indexer_logits")
def _indexer_logits_fake(q_idx, k_idx, w, scale=None, causal=True, k_scale=None, key_start=None, key_end=None):
    _check_indexer("dsa.indexer_logits", q_idx, k_idx, w, causal)
    _check_key_ranges("dsa.indexer_logits", q_idx, key_start, key_end)
    return q_idx.new_empty((q_idx.shape[0], q_idx.shape[1], k_idx.shape[1]),
                           dtype=_score_dtype(q_idx.dtype))


@torch.library.register_fake("dsa::indexer_logits_backward")
def _indexer_logits_backward_fake(grad_logits, q_idx, k_idx, w, scale=None, causal=True, key_start=None,
                                  key_end=None):
    _check_indexer("dsa.indexer_logits_backward", q_idx, k_idx, w, causal)
    _check_key_ranges("dsa.indexer_logits_backward", q_idx, key_start, key_end)
    return q_idx.new_empty(q_idx.shape), k_idx.new_empty(k_idx.shape), w.new_empty(w.shape)


@torch.library.register_fake("dsa::topk_indices")
def _topk_indices_fake(logits, topk):
    _check_rank("dsa.topk_indices", "logits", logits, 3, "[B, T, S]")
    _check_topk("dsa.topk_indices", topk)
    return logits.new_empty((logits.shape[0], logits.shape[1], topk), dtype=torch.int32)


@torch.library.register_fake("dsa::indexer_topk")
def _indexer_topk_fake(q_idx, k_idx, w, topk, scale=None, causal=True, k_scale=None, key_start=None, key_end=None):
    _check_indexer("dsa.indexer_topk", q_idx, k_idx, w, causal)
    _check_key_ranges("dsa.indexer_topk", q_idx, key_start, key_end)
    _check_topk("dsa.indexer_topk", topk)
    return q_idx.new_empty((q_idx.shape[0], q_idx.shape[1], topk), dtype=torch.int32)


@torch.library.register_fake("dsa::sparse_attention")
def _sparse_attention_fake(q, k, v, indices, scale=None):
    _check_attention("dsa.sparse_attention", q, k, v, indices)
    B, T, H = q.shape[:3]
    out = q.new_empty((B, T, H, v.shape[-1]))
    lse = q.new_empty((B, T, H), dtype=_score_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("dsa::sparse_attention_backward")
def _sparse_attention_backward_fake(grad_out, grad_lse, q, k, v, indices, out, lse, scale=None):
    _check_attention("dsa.sparse_attention_backward", q, k, v, indices)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("dsa::indexer_kl_loss")
def _indexer_kl_loss_fake(q_idx, k_idx, w, q, k, indices=None, idx_scale=None, attn_scale=None,
                          causal=True, attn_lse=None, key_start=None, key_end=None):
    _check_kl_loss("dsa.indexer_kl_loss", q_idx, k_idx, w, q, k, indices, causal)
    _check_key_ranges("dsa.indexer_kl_loss", q_idx, key_start, key_end)
    B, T = q_idx.shape[:2]
    dtype = _score_dtype(q_idx.dtype)
    return (q_idx.new_empty((B, T), dtype=dtype), q_idx.new_empty((B, T), dtype=dtype),
            q_idx.new_empty((B, T, q.shape[2]), dtype=dtype))


@torch.library.register_fake("dsa::indexer_kl_loss_backward")
def _indexer_kl_loss_backward_fake(grad_loss, q_idx, k_idx, w, q, k, indices, idx_lse, attn_lse,
                                   idx_scale=None, attn_scale=None, causal=True, key_start=None, key_end=None):
    _check_kl_loss("dsa.indexer_kl_loss_backward", q_idx, k_idx, w, q, k, indices, causal)
    _check_key_ranges("dsa.indexer_kl_loss_backward", q_idx, key_start, key_end)
    return q_idx.new_empty(q_idx.shape), k_idx.new_empty(k_idx.shape), w.new_empty(w.shape)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def _indexer_logits_setup(ctx, inputs, output):
    q_idx, k_idx, w, scale, causal, k_scale, key_start, key_end = inputs
    ctx.save_for_backward(q_idx, k_idx, w, key_start, key_end)
    ctx.scale, ctx.causal = scale, causal


def _indexer_logits_backward(ctx, grad_logits):
    q_idx, k_idx, w, key_start, key_end = ctx.saved_tensors
    # FP8 inputs (the only ones with k_scale) raise in the backward op: they are forward-only
    gq, gk, gw = _ops.indexer_logits_backward(grad_logits, q_idx, k_idx, w, ctx.scale, ctx.causal, key_start,
                                              key_end)
    return gq, gk, gw, None, None, None, None, None


torch.library.register_autograd("dsa::indexer_logits", _indexer_logits_backward,
                                setup_context=_indexer_logits_setup)


def _sparse_attention_setup(ctx, inputs, output):
    q, k, v, indices, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, indices, out, lse)
    ctx.scale = scale


def _sparse_attention_backward(ctx, grad_out, grad_lse):
    q, k, v, indices, out, lse = ctx.saved_tensors
    gq, gk, gv = _ops.sparse_attention_backward(grad_out, grad_lse, q, k, v, indices, out, lse, ctx.scale)
    return gq, gk, gv, None, None


torch.library.register_autograd("dsa::sparse_attention", _sparse_attention_backward,
                                setup_context=_sparse_attention_setup)


def _indexer_kl_loss_setup(ctx, inputs, output):
    q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, _attn_lse, key_start, key_end = inputs
    _loss, idx_lse, attn_lse_out = output
    # The lse outputs are statistics saved for the backward, not differentiable results.
    ctx.mark_non_differentiable(idx_lse, attn_lse_out)
    ctx.save_for_backward(q_idx, k_idx, w, q, k, indices, idx_lse, attn_lse_out, key_start, key_end)
    ctx.idx_scale, ctx.attn_scale, ctx.causal = idx_scale, attn_scale, causal


def _indexer_kl_loss_backward(ctx, grad_loss, _grad_idx_lse, _grad_attn_lse):
    q_idx, k_idx, w, q, k, indices, idx_lse, attn_lse, key_start, key_end = ctx.saved_tensors
    gq, gk, gw = _ops.indexer_kl_loss_backward(grad_loss, q_idx, k_idx, w, q, k, indices, idx_lse,
                                               attn_lse, ctx.idx_scale, ctx.attn_scale, ctx.causal,
                                               key_start, key_end)
    # q, k (the main attention), the given attn_lse and the key ranges are constants of this loss.
    return gq, gk, gw, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("dsa::indexer_kl_loss", _indexer_kl_loss_backward,
                                setup_context=_indexer_kl_loss_setup)
