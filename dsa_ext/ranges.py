"""Per-query key ranges for the indexer operators, built from what training and inference code has.

``indexer_logits``, ``indexer_topk`` and ``indexer_kl_loss`` take optional int32 ``key_start``,
``key_end`` of shape ``[B, T]``: query t of batch row b sees key s only if
``key_start[b, t] <= s < key_end[b, t]`` (and, with ``causal=True``, ``s <= t + S - T``). One range
per query expresses

- packed documents (flash-attn's ``cu_seqlens``, Megatron's THD layout, transformers'
  ``DataCollatorWithFlattening`` position ids): B = 1, every query confined to its document;
- left or right padding (a ``[B, S]`` attention mask): real queries see the real keys, padding
  queries see nothing (an empty range: indexer_topk gives an all -1 row, the KL loss 0);
- sliding windows, and chunked prefill (the T queries are the last T of S keys).

Ranges say nothing about causality: ranges of documents span whole documents and the operators'
``causal`` flag cuts them at each query, so the same ranges serve decoders and encoders. Every
function returns ``(key_start, key_end)`` as int32 tensors on its input's device; an empty range
is ``[0, 0)``. :func:`intersect` combines two sets of ranges (documents and a window);
:func:`visible_mask` is the dense ``[B, T, S]`` boolean mask the ranges stand for.

Worked example: two documents of 3 and 2 tokens packed into one sequence select, per query,
exactly what each document selects alone (shifted by its offset), at about the cost of the two
documents apart::

    >>> import dsa_ext
    >>> q_idx, k_idx, w = torch.randn(1, 5, 4, 16), torch.randn(1, 5, 16), torch.randn(1, 5, 4)
    >>> key_start, key_end = from_cu_seqlens(torch.tensor([0, 3, 5]))
    >>> key_start, key_end
    (tensor([[0, 0, 0, 3, 3]], dtype=torch.int32), tensor([[3, 3, 3, 5, 5]], dtype=torch.int32))
    >>> dsa_ext.indexer_topk(q_idx, k_idx, w, 2, key_start=key_start, key_end=key_end)
    tensor([[[ 0, -1], [ 0,  1], [ ...], [ 3, -1], [ 3,  4]]], dtype=torch.int32)

The first query of each document sees only itself (causal), the second sees two keys; the
third query of document 0 keeps the better two of its three keys.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .conventions import causal_mask

__all__ = ["from_cu_seqlens", "from_position_ids", "position_ids_from_cu_seqlens", "from_padding_mask",
           "sliding_window", "intersect", "visible_mask"]

Ranges = Tuple[Tensor, Tensor]


def _int32(start: Tensor, end: Tensor) -> Ranges:
    return start.to(torch.int32), end.to(torch.int32)


def _check_cu_seqlens(cu_seqlens: Tensor) -> Tensor:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"expected cu_seqlens to be a 1-D tensor [num_docs + 1], got shape {list(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    if cu[0].item() != 0 or (cu.diff() < 0).any():
        raise ValueError(f"expected cu_seqlens to start at 0 and never decrease, got {cu.tolist()}")
    return cu


def from_cu_seqlens(cu_seqlens: Tensor, total: Optional[int] = None) -> Ranges:
    """Ranges of packed documents, as flash-attn's ``flash_attn_varlen_func`` describes them:
    document i holds tokens ``cu_seqlens[i] .. cu_seqlens[i+1] - 1`` and each of its queries sees
    exactly its document's keys.

    Args:
        cu_seqlens: ``[num_docs + 1]`` integer, ``0 = cu[0] <= cu[1] <= ...`` (empty documents allowed).
        total: the packed length T (default ``cu_seqlens[-1]``); tokens past the last document
            (the tail of a fixed-size buffer) get empty ranges.

    Returns:
        ``(key_start, key_end)``, ``[1, total]`` int32.

    Example::

        >>> from_cu_seqlens(torch.tensor([0, 3, 5]), total=6)
        (tensor([[0, 0, 0, 3, 3, 0]], dtype=torch.int32), tensor([[3, 3, 3, 5, 5, 0]], dtype=torch.int32))
    """
    cu = _check_cu_seqlens(cu_seqlens)
    used = int(cu[-1])
    total = used if total is None else int(total)
    if total < used:
        raise ValueError(f"expected total >= cu_seqlens[-1] = {used}, got total={total}")
    lengths = cu.diff()
    start = torch.repeat_interleave(cu[:-1], lengths, output_size=used)
    end = torch.repeat_interleave(cu[1:], lengths, output_size=used)
    tail = torch.zeros(total - used, dtype=torch.long, device=cu.device)
    return _int32(torch.cat([start, tail])[None], torch.cat([end, tail])[None])


def from_position_ids(position_ids: Tensor) -> Ranges:
    """Ranges of packed documents from position ids that restart per document, as transformers'
    ``DataCollatorWithFlattening`` produces them: a document begins at t = 0 and wherever the
    position does not continue the previous one (``position_ids[t] != position_ids[t-1] + 1``, so
    a restart at 0 or at any other value, e.g. a document continued from an earlier chunk).

    Args:
        position_ids: ``[B, T]`` (or ``[T]``) integer.

    Returns:
        ``(key_start, key_end)``, ``[B, T]`` int32: each query's document ``[start, end)``.

    Example::

        >>> from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0]]))
        (tensor([[0, 0, 0, 3, 3, 5]], dtype=torch.int32), tensor([[3, 3, 3, 5, 5, 6]], dtype=torch.int32))
    """
    pos = position_ids.long()
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() != 2:
        raise ValueError(f"expected position_ids to be [B, T] or [T], got shape {list(position_ids.shape)}")
    B, T = pos.shape
    t = torch.arange(T, device=pos.device).expand(B, T)
    begins = torch.ones(B, T, dtype=torch.bool, device=pos.device)
    begins[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    start = torch.where(begins, t, torch.zeros_like(t)).cummax(dim=1).values
    # a document ends after t when the next token begins one (or t is the last token)
    ends_here = torch.ones(B, T, dtype=torch.bool, device=pos.device)
    ends_here[:, :-1] = begins[:, 1:]
    end = torch.where(ends_here, t + 1, torch.full_like(t, T)).flip(1).cummin(dim=1).values.flip(1)
    return _int32(start, end)


def position_ids_from_cu_seqlens(cu_seqlens: Tensor) -> Tensor:
    """Position ids that restart at 0 for every packed document (what ``DataCollatorWithFlattening``
    would give the same batch); :func:`from_position_ids` turns them back into the ranges of
    :func:`from_cu_seqlens`.

    Args:
        cu_seqlens: ``[num_docs + 1]`` integer, as in :func:`from_cu_seqlens`.

    Returns:
        ``[1, cu_seqlens[-1]]`` int64.

    Example::

        >>> position_ids_from_cu_seqlens(torch.tensor([0, 3, 5]))
        tensor([[0, 1, 2, 0, 1]])
    """
    cu = _check_cu_seqlens(cu_seqlens)
    used = int(cu[-1])
    start = torch.repeat_interleave(cu[:-1], cu.diff(), output_size=used)
    return (torch.arange(used, device=cu.device) - start)[None]


def from_padding_mask(attention_mask: Tensor, T: Optional[int] = None) -> Ranges:
    """Ranges of a padded batch from its 2-D attention mask (1 = real token, 0 = padding; left or
    right padding). Every real query sees the row's real keys; a padding query gets an empty
    range. The queries are the last T of the S masked positions (bottom-right, as the operators
    align them; T = S by default).

    Args:
        attention_mask: ``[B, S]`` bool or integer; each row's real tokens must be contiguous
            (one range per query cannot skip a hole).
        T: number of queries, ``1 <= T <= S`` (default S).

    Returns:
        ``(key_start, key_end)``, ``[B, T]`` int32.

    Example (row 0 left-padded, row 1 right-padded)::

        >>> from_padding_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]))
        (tensor([[0, 0, 2, 2, 2], [0, 0, 0, 0, 0]], dtype=torch.int32),
         tensor([[0, 0, 5, 5, 5], [3, 3, 3, 0, 0]], dtype=torch.int32))
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"expected attention_mask to be [B, S], got shape {list(attention_mask.shape)}")
    real = attention_mask.bool()
    B, S = real.shape
    T = S if T is None else int(T)
    if not 1 <= T <= S:
        raise ValueError(f"expected 1 <= T <= S={S} queries, got T={T}")
    count = real.sum(dim=1)
    first = torch.where(count > 0, real.int().argmax(dim=1), torch.zeros_like(count))
    contiguous = real.int().diff(dim=1).ne(0).sum(dim=1) + real[:, 0].int() + real[:, -1].int() <= 2
    if not contiguous.all():
        row = int((~contiguous).nonzero()[0])
        raise ValueError(f"expected the real tokens of every attention_mask row to be contiguous (left or right "
                         f"padding), row {row} has a hole: {real[row].int().tolist()}")
    query_real = real[:, S - T:]
    start = torch.where(query_real, first[:, None], torch.zeros_like(first[:, None]))
    end = torch.where(query_real, (first + count)[:, None], torch.zeros_like(first[:, None]))
    return _int32(start, end)


def sliding_window(window: int, T: int, S: Optional[int] = None, batch: int = 1, device=None) -> Ranges:
    """Ranges of a causal sliding window: the query at absolute position ``p = t + S - T`` sees
    the ``window`` keys ``p - window + 1 .. p`` (itself included, as Mistral's ``sliding_window``
    and flash-attn's ``window_size=(window - 1, 0)``), clipped at 0.

    Args:
        window: keys per query, ``>= 1``.
        T: queries; S: keys (default T), ``S >= T``.
        batch: rows B of the result (the same ranges in each).

    Returns:
        ``(key_start, key_end)``, ``[batch, T]`` int32.

    Example::

        >>> sliding_window(2, T=4)
        (tensor([[0, 0, 1, 2]], dtype=torch.int32), tensor([[1, 2, 3, 4]], dtype=torch.int32))
    """
    S = T if S is None else int(S)
    if window < 1 or S < T:
        raise ValueError(f"expected window >= 1 and S >= T, got window={window}, T={T}, S={S}")
    p = torch.arange(T, device=device) + (S - T)
    start = (p - window + 1).clamp(min=0)
    return _int32(start.expand(batch, T), (p + 1).expand(batch, T))


def intersect(a: Ranges, b: Ranges) -> Ranges:
    """The keys both sets of ranges allow: ``(max(start_a, start_b), min(end_a, end_b))``, e.g.
    packed documents with a sliding window inside each.

    Example::

        >>> docs = from_cu_seqlens(torch.tensor([0, 3, 5]))
        >>> intersect(docs, sliding_window(2, T=5))
        (tensor([[0, 0, 1, 3, 3]], dtype=torch.int32), tensor([[1, 2, 3, 4, 5]], dtype=torch.int32))
    """
    return _int32(torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1]))


def visible_mask(key_start: Optional[Tensor], key_end: Optional[Tensor], S: int, causal: bool = True) -> Tensor:
    """The ``[B, T, S]`` boolean mask the ranges stand for, True where query t may see key s:
    ``key_start[b,t] <= s < key_end[b,t]`` and, when causal, ``s <= t + S - T`` (for a dense
    attention over the same keys, and for tests). Either range may be None (0, resp. S), not both.

    Example::

        >>> visible_mask(*from_cu_seqlens(torch.tensor([0, 2, 3])), S=3).int()
        tensor([[[1, 0, 0],
                 [1, 1, 0],
                 [0, 0, 1]]], dtype=torch.int32)
    """
    like = key_start if key_start is not None else key_end
    if like is None:
        raise ValueError("expected key_start or key_end (or both), got neither")
    B, T = like.shape
    s = torch.arange(S, device=like.device)
    mask = torch.ones(B, T, S, dtype=torch.bool, device=like.device)
    if key_start is not None:
        mask &= s >= key_start.long()[..., None]
    if key_end is not None:
        mask &= s < key_end.long()[..., None]
    if causal:
        mask &= causal_mask(T, S, like.device)
    return mask
