"""Per-query key ranges in the modules (packed documents, padding): the type the modules take, the
dense mask they stand for, and which queries are real tokens.

The modules take ``key_ranges = (key_start, key_end)``, int32 ``[B, T]`` as :mod:`dsa_ext.ranges`
builds them (query t of row b sees key s iff ``key_start[b,t] <= s < key_end[b,t]`` and
``s <= t + S - T``). A query is *real* when its range holds its own position ``t + S - T``: the
queries of packed documents are, padding queries are not (``dsa_ext.ranges.from_padding_mask``
gives them empty ranges; transformers' masks let right-padding queries see the real tokens but
not themselves). Losses and recall statistics count real queries only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..conventions import causal_mask
from ..ranges import visible_mask

__all__ = ["KeyRanges", "visible_keys", "real_queries"]

KeyRanges = Tuple[Tensor, Tensor]


def visible_keys(key_ranges: Optional[KeyRanges], T: int, S: int, device) -> Tensor:
    """``[B, T, S]`` bool (``[1, T, S]`` without ranges): the keys each query sees, causal mask
    included."""
    if key_ranges is None:
        return causal_mask(T, S, device)[None]
    return visible_mask(key_ranges[0], key_ranges[1], S, causal=True)


def real_queries(key_ranges: Optional[KeyRanges], T: int, S: int,
                 positions: Optional[Tensor] = None) -> Optional[Tensor]:
    """``[B, T]`` bool, True where the query's range holds its own position; None without ranges
    (every query is real). The queries' positions among the S keys are ``t + S - T`` (bottom-right)
    unless ``positions`` [T] says otherwise (context parallelism: a rank's zigzag chunks)."""
    if key_ranges is None:
        return None
    start, end = key_ranges
    pos = torch.arange(T, device=start.device) + (S - T) if positions is None else positions
    return (start <= pos) & (pos < end)
