"""Indexer recall: the share of the dense attention mass that the indexer's top-k captures.

For query t, p_t is the dense head-mean attention (the warm-up KL target) and S_t the indexer's
top-k; recall_t = sum_{s in S_t} p_t(s). The oracle is the same sum for the best possible k keys
(the top-k of p_t itself), the ceiling of any indexer. "Hard" queries see more than k keys: the
others are exactly dense and score 1.

With key ranges (packed documents, padding) every figure is per document: p_t is the attention
over the query's own document, a query is hard when its document gives it more than k keys, and
padding queries (:func:`dsa_ext.nn.key_ranges.real_queries`) are not counted. A packed batch thus
adds exactly what its documents add when run alone.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .attention import dsa_modules, head_mean_attention
from .key_ranges import KeyRanges, real_queries, visible_keys

__all__ = ["RecallSums", "recall_stats"]


@dataclass
class RecallSums:
    """Sums over queries, which add up across batches, layers' calls and processes."""
    recall: float = 0.0        # sum of recall_t over every query
    queries: float = 0.0       # number of queries
    oracle: float = 0.0        # sum of the oracle recall over every query
    recall_hard: float = 0.0   # the same three over the queries that see more than topk keys
    queries_hard: float = 0.0
    oracle_hard: float = 0.0

    @torch.no_grad()
    def add(self, q: Tensor, k: Tensor, scale: float, indices: Tensor, topk: int,
            key_ranges: Optional[KeyRanges] = None) -> None:
        """Adds the queries of one attention call: q [B,T,H,D], k [B,S,Hkv,D] (after the host's
        RoPE), indices [B,T,topk] the indexer's selection (made within ``key_ranges``, the
        ``(key_start, key_end)`` [B,T] int32 of the call, if any)."""
        B, T = q.shape[:2]
        S = k.shape[1]
        p = head_mean_attention(q, k, scale, key_ranges)
        captured = p.gather(-1, indices.clamp_min(0).long()) * (indices >= 0)
        recall = captured.sum(-1).double()  # [B, T]
        oracle = p.topk(min(topk, S), dim=-1).values.sum(-1).double()
        real = real_queries(key_ranges, T, S)
        real = torch.ones(B, T, dtype=torch.float64, device=q.device) if real is None else real.double()
        hard = (visible_keys(key_ranges, T, S, q.device).sum(-1) > topk).expand(B, T).double() * real
        self.recall += (recall * real).sum().item()
        self.queries += real.sum().item()
        self.oracle += (oracle * real).sum().item()
        self.recall_hard += (recall * hard).sum().item()
        self.queries_hard += hard.sum().item()
        self.oracle_hard += (oracle * hard).sum().item()

    def to_tensor(self) -> Tensor:
        """The sums as a float64 tensor (e.g. for ``dist.all_reduce``)."""
        return torch.tensor(astuple(self), dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "RecallSums":
        return cls(*t.tolist())

    def means(self) -> Dict[str, float]:
        """``all``/``hard`` recall and ``oracle``/``oracle_hard``: means over the queries (1.0
        when there is none)."""
        ratio = lambda num, den: num / den if den > 0 else 1.0  # noqa: E731
        return {"all": ratio(self.recall, self.queries), "oracle": ratio(self.oracle, self.queries),
                "hard": ratio(self.recall_hard, self.queries_hard),
                "oracle_hard": ratio(self.oracle_hard, self.queries_hard)}


class recall_stats:
    """Context manager measuring indexer recall: inside it, every DSA core also computes the
    dense head-mean attention p_t (from the q and k of its forward) and the indexer's top-k, and
    adds its :class:`RecallSums`.

    ``sums`` after the block: one RecallSums per layer. ``result(sums=None)``: per layer, the
    means of :meth:`RecallSums.means` as lists (``all``, ``hard``, ``oracle``, ``oracle_hard``);
    pass sums added up across processes to report a global figure. ``tensor()`` gives the sums as
    ``[layers, 6]`` for an all-reduce."""

    def __init__(self, model: nn.Module):
        self.mods = dsa_modules(model)
        self.sums: List[RecallSums] = []

    def __enter__(self):
        for m in self.mods:
            m.recall = RecallSums()
        return self

    def __exit__(self, *exc):
        self.sums = [m.recall for m in self.mods]
        for m in self.mods:
            m.recall = None
        return False

    def tensor(self) -> Tensor:
        return torch.stack([s.to_tensor() for s in self.sums])

    def result(self, sums: Optional[Tensor] = None) -> Dict[str, List[float]]:
        per_layer = self.sums if sums is None else [RecallSums.from_tensor(row) for row in sums]
        means = [s.means() for s in per_layer]
        return {key: [m[key] for m in means] for key in ("all", "oracle", "hard", "oracle_hard")}
