"""Per-query key ranges from what transformers hands an attention function: its attention mask and
the keyword arguments of packed batches. :mod:`dsa_ext.hf` and :mod:`dsa_ext.hf_mla` use them so
that converted models take padded and packed batches in every DSA mode.

transformers (5.x) builds one mask per forward from the 2-D padding mask (left or right padding)
and, without one, from position ids that restart per document (packed sequences, as
``DataCollatorWithFlattening`` makes them): a ``[B, 1, T, S]`` boolean mask (True = attend) for
sdpa. Each query of such a mask sees one contiguous run of keys cut by the causal mask, which is
exactly what a key range expresses; :func:`from_mask` reads the ranges off it (and refuses a mask
they cannot express). ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` also passes
``cu_seq_lens_q``/``cu_seq_lens_k`` (flash-attn's cumulative document lengths) down to every
attention function: :func:`for_attention` takes the documents from them as well, and checks them
against the mask when both come.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import ranges
from .nn.key_ranges import KeyRanges

__all__ = ["from_mask", "is_packed", "from_packed_kwargs", "for_attention"]

_CACHE = "_dsa_key_ranges"  # attribute of a mask's storage root: its ranges, computed once per forward
_ANSWER = "_dsa_for_attention"  # attribute of a mask's (or cu_seq_lens_q's) root: for_attention's answers


def _root(mask: Tensor) -> Tensor:
    return mask if mask._base is None else mask._base


def from_mask(mask: Tensor, batch: int) -> KeyRanges:
    """The key ranges of a transformers attention mask ``[B or 1, 1, T, S]`` or ``[B or 1, T, S]``
    (bool, True = attend; or additive float, 0 = attend), bottom-right causal, as ``[batch, T]``
    int32: each query's first and one past its last visible key (``[0, 0)`` when it sees none).

    Raises NotImplementedError when the mask is not the causal mask cut to one contiguous range
    per query (e.g. a hole inside a row, or bidirectional blocks). The result is cached on the
    mask's storage, which every layer of a forward shares, so the ``O(B*T*S)`` reading and check
    happen once per forward."""
    visible = mask if mask.dtype == torch.bool else mask == 0
    if visible.dim() == 4:
        if visible.shape[1] != 1:
            raise NotImplementedError(f"DSA: expected an attention mask with one head, [B, 1, T, S], got "
                                      f"{list(mask.shape)}")
        visible = visible[:, 0]
    T, S = visible.shape[-2:]
    key = (batch, T, S)
    cached = getattr(_root(mask), _CACHE, {})
    if key in cached:
        return cached[key]
    visible = visible.expand(batch, T, S)
    seen = visible.any(-1)
    first = visible.to(torch.uint8).argmax(-1)  # argmax returns the first of equal maxima
    end = S - visible.flip(-1).to(torch.uint8).argmax(-1)
    result = (torch.where(seen, first, 0).to(torch.int32), torch.where(seen, end, 0).to(torch.int32))
    if not torch.equal(ranges.visible_mask(*result, S, causal=True), visible):
        raise NotImplementedError("DSA modes warmup/sparse support attention masks that give each query one "
                                  "contiguous range of earlier keys (causal, padding, packed documents); got a "
                                  "mask with holes or non-causal entries")
    setattr(_root(mask), _CACHE, {**cached, key: result})
    return result


def is_packed(kwargs: dict) -> bool:
    """Whether an attention call got ``cu_seq_lens_q``/``cu_seq_lens_k`` (a packed batch)."""
    return kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None


def from_packed_kwargs(kwargs: dict, batch: int, T: int, S: int) -> Optional[KeyRanges]:
    """The documents of a packed batch from the ``cu_seq_lens_q``/``cu_seq_lens_k`` keyword
    arguments transformers passes to attention functions (``[num_docs + 1]`` cumulative lengths,
    one row of T = S tokens), or None when they are absent."""
    if not is_packed(kwargs):
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or not torch.equal(cu_q, cu_k) or batch != 1 or T != S:
        raise NotImplementedError(
            f"DSA: packed inputs need cu_seq_lens_q equal to cu_seq_lens_k over one row of T = S tokens "
            f"(as DataCollatorWithFlattening gives), got cu_seq_lens_q={_show(cu_q)}, "
            f"cu_seq_lens_k={_show(cu_k)}, batch {batch}, T={T}, S={S}")
    if int(cu_q[-1]) > T:
        raise ValueError(f"DSA: cu_seq_lens_q ends at {int(cu_q[-1])}, past the {T} tokens of the batch")
    return ranges.from_cu_seqlens(cu_q, total=T)


def _show(t: Optional[Tensor]) -> str:
    return "None" if t is None else str(t.tolist())


def _clipped(key_ranges: KeyRanges, T: int, S: int) -> Tuple[Tensor, Tensor]:
    """The same visible keys in one canonical form: the end cut at the query's position + 1 (the
    causal mask), empty ranges as [0, 0)."""
    start, end = key_ranges
    end = torch.minimum(end, torch.arange(T, device=end.device) + (S - T) + 1)
    empty = start >= end
    return start.masked_fill(empty, 0), end.masked_fill(empty, 0)


def for_attention(mask: Optional[Tensor], kwargs: dict, batch: int, T: int, S: int
                  ) -> Tuple[Optional[KeyRanges], Optional[Tensor]]:
    """The key ranges of one attention call and the dense mask that goes with them:
    ``(ranges, mask)``. Ranges come from the mask transformers built (padding, packed position
    ids) and from ``cu_seq_lens_q/k``; when both are there they must agree (ValueError otherwise).
    The mask returned is transformers' own, or, where transformers built none (cu_seq_lens with
    position ids that do not restart), one made from the documents: ``[batch, 1, T, S]`` bool.

    The answer is kept on the mask's storage (or, without a mask, on ``cu_seq_lens_q``'s), which
    every layer of a forward shares: the reading and the checks, with their device
    synchronisations, happen once per forward (or per cu_seq_lens tensor), not once per layer."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    holder = _root(mask) if mask is not None else (_root(cu_q) if cu_q is not None else None)
    if holder is None and not is_packed(kwargs):
        return None, None
    # refilled cu_seq_lens buffers are read anew; the cu tensors are held weakly (the holder may
    # be one of them: no reference cycle, nothing kept past the batch)
    kept = getattr(holder, _ANSWER, None)
    if kept is not None and kept[0] == (batch, T, S) and all(
            (cu is None and ref is None) or (ref is not None and ref() is cu and version == cu._version)
            for cu, (ref, version) in zip((cu_q, cu_k), kept[1])):
        return kept[2], mask if mask is not None else kept[3]
    key_ranges, used_mask = _for_attention(mask, kwargs, batch, T, S)
    if holder is not None:  # the latest answer only; transformers' mask itself is not kept
        cus = tuple((None, None) if cu is None else (weakref.ref(cu), cu._version) for cu in (cu_q, cu_k))
        setattr(holder, _ANSWER, ((batch, T, S), cus, key_ranges, None if mask is not None else used_mask))
    return key_ranges, used_mask


def _for_attention(mask: Optional[Tensor], kwargs: dict, batch: int, T: int, S: int
                   ) -> Tuple[Optional[KeyRanges], Optional[Tensor]]:
    packed = from_packed_kwargs(kwargs, batch, T, S)
    if mask is None:
        if packed is None:
            return None, None
        return packed, ranges.visible_mask(*packed, S, causal=True)[:, None]
    from_host = from_mask(mask, batch)
    if packed is not None and not all(torch.equal(a, b) for a, b in zip(_clipped(packed, T, S),
                                                                        _clipped(from_host, T, S))):
        raise ValueError("DSA: cu_seq_lens_q/k and the attention mask (built from the attention mask or the "
                         "position ids) describe different documents")
    return from_host, mask
