"""Typed entry points of the ``torch.ops.dsa`` operators, their fake kernels (shape and dtype
only, for torch.compile and meta tensors) and their autograd formulas.

Conventions (shared/DESIGN.md): batch-first tensors whose last dimension is contiguous; causal
alignment is bottom-right (query t sees keys s <= t + S - T); index tensors are int32 with -1 for
an empty slot; scores, lse and losses are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["indexer_logits", "topk_indices", "indexer_topk", "sparse_attention", "indexer_kl_loss"]

_ops = torch.ops.dsa


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _indexer_scale(q_idx: Tensor, scale: Optional[float]) -> float:
    if scale is not None:
        return float(scale)
    if q_idx.dim() != 4:  # the operator raises the shape error
        return 1.0
    return float((q_idx.shape[2] * q_idx.shape[3]) ** -0.5)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def indexer_logits(q_idx: Tensor, k_idx: Tensor, w: Tensor, scale: Optional[float] = None,
                   causal: bool = True, k_scale: Optional[Tensor] = None) -> Tensor:
    """Lightning-indexer scores of every (query, key) pair.

    ``logits[b,t,s] = scale * sum_j w[b,t,j] * relu(q_idx[b,t,j,:] . k_idx[b,s,:])``, ``-inf``
    where key s is masked (causal: ``s > t + S - T``). With ``k_scale``, each score of key s is
    also multiplied by ``k_scale[b,s]``.

    Args:
        q_idx: ``[B, T, Hi, Di]`` float64, float32, bfloat16 or float16: indexer queries; or
            float8_e4m3fn (forward only, see :mod:`dsa_ext.fp8`).
        k_idx: ``[B, S, Di]``, q_idx's dtype: one indexer key per token, shared by all Hi heads.
        w: ``[B, T, Hi]`` float32 or q_idx's dtype: per-query head weights (float32 for FP8 inputs,
            with the query rows' scales folded in).
        scale: multiplies every score; default ``(Hi * Di) ** -0.5``.
        causal: mask keys after each query (bottom-right aligned; needs S >= T).
        k_scale: ``[B, S]`` float32 per-key scales of float8_e4m3fn keys, or None.

    Returns:
        ``[B, T, S]`` float32 (float64 for float64 inputs). Differentiable in q_idx, k_idx, w
        (not for FP8 inputs).
    """
    return _ops.indexer_logits(q_idx, k_idx, w, _indexer_scale(q_idx, scale), bool(causal), k_scale)


def topk_indices(logits: Tensor, k: int) -> Tensor:
    """Positions of the k highest scores of each row, deterministically.

    Ties go to the lower position; each row lists its positions in ascending order followed by
    ``-1`` padding when fewer than k scores are valid (``-inf`` and NaN are never selected), so a
    causal row with fewer than k visible keys is exactly dense.

    Args:
        logits: ``[B, T, S]`` float64, float32, bfloat16 or float16.
        k: number of positions per row, ``k >= 1`` (k > S is allowed: padded with -1).

    Returns:
        ``[B, T, k]`` int32. Not differentiable.
    """
    return _ops.topk_indices(logits, int(k))


def indexer_topk(q_idx: Tensor, k_idx: Tensor, w: Tensor, k: int, scale: Optional[float] = None,
                 causal: bool = True, k_scale: Optional[Tensor] = None) -> Tensor:
    """``topk_indices(indexer_logits(q_idx, k_idx, w, scale, causal), k)`` without ever
    materialising the ``[B, T, S]`` logits: scores stream through a running selection, memory is
    O(B*T*k).

    Args:
        q_idx: ``[B, T, Hi, Di]``; k_idx: ``[B, S, Di]``; w: ``[B, T, Hi]``, as in
            :func:`indexer_logits`.
        k: positions per row, ``k >= 1``.
        scale: default ``(Hi * Di) ** -0.5``.
        causal: bottom-right causal mask (needs S >= T).
        k_scale: ``[B, S]`` float32 key scales of float8_e4m3fn inputs, as in :func:`indexer_logits`.

    Returns:
        ``[B, T, k]`` int32, ascending positions then -1 padding. Not differentiable.
    """
    return _ops.indexer_topk(q_idx, k_idx, w, int(k), _indexer_scale(q_idx, scale), bool(causal), k_scale)


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
        indices: ``[B, T, K]`` int32 (one row serves every head) or ``[B, T, Hkv, K]``;
            entries -1 or in ``[0, S)``.
        scale: score scale, default ``Dqk ** -0.5``.
        return_lse: also return the natural-log log-sum-exp of the scores.

    Returns:
        out ``[B, T, H, Dv]`` in q's dtype, and with ``return_lse`` the lse ``[B, T, H]`` float32
        (float64 for float64 inputs). Differentiable in q, k, v (also through lse).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.dim() == 4 else 1.0
    out, lse = _ops.sparse_attention(q, k, v, indices, float(scale))
    return (out, lse) if return_lse else out


def indexer_kl_loss(q_idx: Tensor, k_idx: Tensor, w: Tensor, q: Tensor, k: Tensor,
                    indices: Optional[Tensor] = None, idx_scale: Optional[float] = None,
                    attn_scale: Optional[float] = None, causal: bool = True,
                    attn_lse: Optional[Tensor] = None) -> Tensor:
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
      (bottom-right aligned), all S keys otherwise;
    - ``indices`` given (sparse stage): the valid (``!= -1``) entries of ``indices[b, t]``, both
      distributions renormalised over them. No causal mask is applied on top (the indices say
      what is attended, as in :func:`sparse_attention`). A position listed twice is two support
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
        indices: ``None`` (dense) or ``[B, T, K]`` int32 with ``K >= 1``, entries -1 or in
            ``[0, S)`` (e.g. from :func:`indexer_topk`).
        idx_scale: indexer score scale, default ``(Hi * Di) ** -0.5``.
        attn_scale: attention score scale, default ``Dqk ** -0.5``.
        causal: dense form only: mask keys after each query (needs S >= T).
        attn_lse: optional ``[B, T, H]`` float32 (float64 for float64 inputs): the main
            attention's own natural-log lse over the same support (``sparse_attention(...,
            return_lse=True)`` returns it), used instead of recomputing it, which saves one pass
            over the keys. Read detached. The result does not depend on whether it is given
            (up to the rounding of the lse itself).

    Returns:
        ``[B, T]`` per-token loss, float32 (float64 for float64 inputs); reduce it as the
        training recipe says (DeepSeek-V3.2 sums over tokens). Differentiable in q_idx, k_idx
        and w only.
    """
    if attn_scale is None:
        attn_scale = q.shape[-1] ** -0.5 if q.dim() == 4 else 1.0
    loss, _, _ = _ops.indexer_kl_loss(
        q_idx, k_idx, w, q.detach(), k.detach(), indices, _indexer_scale(q_idx, idx_scale),
        float(attn_scale), bool(causal), None if attn_lse is None else attn_lse.detach())
    return loss


# ---------------------------------------------------------------------------------------------
# Fake kernels: output metadata only
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake("dsa::indexer_logits")
def _indexer_logits_fake(q_idx, k_idx, w, scale, causal, k_scale=None):
    return q_idx.new_empty((q_idx.shape[0], q_idx.shape[1], k_idx.shape[1]),
                           dtype=_score_dtype(q_idx.dtype))


@torch.library.register_fake("dsa::indexer_logits_backward")
def _indexer_logits_backward_fake(grad_logits, q_idx, k_idx, w, scale, causal):
    return q_idx.new_empty(q_idx.shape), k_idx.new_empty(k_idx.shape), w.new_empty(w.shape)


@torch.library.register_fake("dsa::topk_indices")
def _topk_indices_fake(logits, k):
    return logits.new_empty((logits.shape[0], logits.shape[1], k), dtype=torch.int32)


@torch.library.register_fake("dsa::indexer_topk")
def _indexer_topk_fake(q_idx, k_idx, w, k, scale, causal, k_scale=None):
    return q_idx.new_empty((q_idx.shape[0], q_idx.shape[1], k), dtype=torch.int32)


@torch.library.register_fake("dsa::sparse_attention")
def _sparse_attention_fake(q, k, v, indices, scale):
    B, T, H = q.shape[:3]
    out = q.new_empty((B, T, H, v.shape[-1]))
    lse = q.new_empty((B, T, H), dtype=_score_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("dsa::sparse_attention_backward")
def _sparse_attention_backward_fake(grad_out, grad_lse, q, k, v, indices, out, lse, scale):
    return (q.new_empty(q.shape),
            k.new_empty(k.shape), v.new_empty(v.shape))


@torch.library.register_fake("dsa::indexer_kl_loss")
def _indexer_kl_loss_fake(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, attn_lse):
    B, T = q_idx.shape[:2]
    dtype = _score_dtype(q_idx.dtype)
    return (q_idx.new_empty((B, T), dtype=dtype), q_idx.new_empty((B, T), dtype=dtype),
            q_idx.new_empty((B, T, q.shape[2]), dtype=dtype))


@torch.library.register_fake("dsa::indexer_kl_loss_backward")
def _indexer_kl_loss_backward_fake(grad_loss, q_idx, k_idx, w, q, k, indices, idx_lse, attn_lse,
                                   idx_scale, attn_scale, causal):
    return q_idx.new_empty(q_idx.shape), k_idx.new_empty(k_idx.shape), w.new_empty(w.shape)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def _indexer_logits_setup(ctx, inputs, output):
    q_idx, k_idx, w, scale, causal, k_scale = inputs
    ctx.save_for_backward(q_idx, k_idx, w)
    ctx.scale, ctx.causal = scale, causal


def _indexer_logits_backward(ctx, grad_logits):
    q_idx, k_idx, w = ctx.saved_tensors
    # FP8 inputs (the only ones with k_scale) raise in the backward op: they are forward-only
    gq, gk, gw = _ops.indexer_logits_backward(grad_logits, q_idx, k_idx, w, ctx.scale, ctx.causal)
    return gq, gk, gw, None, None, None


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
    q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, _attn_lse = inputs
    _loss, idx_lse, attn_lse_out = output
    # The lse outputs are statistics saved for the backward, not differentiable results.
    ctx.mark_non_differentiable(idx_lse, attn_lse_out)
    ctx.save_for_backward(q_idx, k_idx, w, q, k, indices, idx_lse, attn_lse_out)
    ctx.idx_scale, ctx.attn_scale, ctx.causal = idx_scale, attn_scale, causal


def _indexer_kl_loss_backward(ctx, grad_loss, _grad_idx_lse, _grad_attn_lse):
    q_idx, k_idx, w, q, k, indices, idx_lse, attn_lse = ctx.saved_tensors
    gq, gk, gw = _ops.indexer_kl_loss_backward(grad_loss, q_idx, k_idx, w, q, k, indices, idx_lse,
                                               attn_lse, ctx.idx_scale, ctx.attn_scale, ctx.causal)
    # q, k (the main attention) and the given attn_lse are constants of this loss.
    return gq, gk, gw, None, None, None, None, None, None, None


torch.library.register_autograd("dsa::indexer_kl_loss", _indexer_kl_loss_backward,
                                setup_context=_indexer_kl_loss_setup)
