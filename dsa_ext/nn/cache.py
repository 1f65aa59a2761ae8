"""Caches for incremental decoding and chunked prefill with DSA (docs/DESIGN.md section 8).

With bottom-right causal alignment, T new queries over S cached-plus-new keys are simply the last
T of S positions, so the operators need nothing new. What a DSA layer adds to its host's KV cache
is one indexer key per token (``k_idx`` after LayerNorm, RoPE and the optional Hadamard rotation;
with FP8 selection its e4m3 form and scale, packed by :func:`dsa_ext.fp8.pack_keys`).

The DSA core reads and extends that store through a small object it receives per call, with two
methods (transformers' indexed cache layers have the first; :mod:`dsa_ext.hf_cache` adapts them,
and :class:`LayerCache` here serves hand-written models):

``update_indexer(keys [B, T, ...]) -> [B, S, ...]``
    append the new tokens' indexer keys, return those of every cached token;
``get_seq_length() -> int``
    the tokens in the layer's KV cache, the new ones included (hosts update their KV cache before
    attention runs). The two counts must agree: a cache filled in dense mode, where no indexer
    runs, cannot continue in warmup or sparse mode.

:class:`KVCache` is the cache of :mod:`dsa_ext.decoder`: per layer K, V ``[B, S, Hkv, D]`` and the
indexer keys, in buffers that grow by doubling (so appending a token does not copy the cache), and
the batch operations generation needs: beam reorder, batch select, repeat, crop.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import fp8

__all__ = ["IndexerKeys", "append_indexer_keys", "LayerCache", "KVCache"]


class IndexerKeys(NamedTuple):
    """The indexer keys of every cached token after one call: ``full`` [B, S, Di] in the indexer's
    dtype (None when FP8 selection keeps only the packed e4m3 form of earlier tokens) and
    ``packed`` [B, S, Di + 4] uint8 (FP8 selection only)."""
    full: Optional[Tensor]
    packed: Optional[Tensor]


def append_indexer_keys(cache, k_new: Tensor, fp8_topk: bool) -> IndexerKeys:
    """Appends the new tokens' indexer keys ``k_new`` [B, T, Di] to ``cache`` (the protocol of
    the module docstring) and returns every cached token's keys; checks that the indexer-key and
    KV caches hold the same tokens."""
    stored = cache.update_indexer(fp8.pack_keys(k_new) if fp8_topk else k_new)
    kv = int(cache.get_seq_length())
    if stored.shape[1] != kv:
        raise RuntimeError(
            f"DSA cache: the indexer-key cache holds {stored.shape[1]} tokens but the KV cache {kv}; a cache "
            "filled in mode 'dense' (which runs no indexer) cannot continue in mode 'warmup' or 'sparse'")
    if not fp8_topk:
        return IndexerKeys(stored, None)
    return IndexerKeys(k_new if stored.shape[1] == k_new.shape[1] else None, stored)


def _grow(buf: Optional[Tensor], length: int, new: Tensor) -> Tensor:
    """``buf`` (a buffer whose first ``length`` rows along dim 1 are in use) with ``new``
    appended there, reallocated to twice the size when full."""
    need = length + new.shape[1]
    if buf is None or buf.shape[1] < need:
        grown = new.new_empty(new.shape[0], max(need, 2 * length, 16), *new.shape[2:])
        if length:
            grown[:, :length] = buf[:, :length]
        buf = grown
    buf[:, length:need] = new
    return buf


class LayerCache:
    """One layer's cache: ``update(k, v)`` appends K, V [B, T, Hkv, D] and returns every cached
    token's [B, S, Hkv, D] (views of growing buffers); ``update_indexer`` as the module docstring
    says. The tensors it returns are views that a later update may overwrite beyond their end,
    never within it."""

    def __init__(self):
        self._k: Optional[Tensor] = None
        self._v: Optional[Tensor] = None
        self._idx: Optional[Tensor] = None
        self.length = 0      # tokens in K, V
        self.idx_length = 0  # tokens in the indexer keys

    def update(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        self._k = _grow(self._k, self.length, k)
        self._v = _grow(self._v, self.length, v)
        self.length += k.shape[1]
        return self.keys, self.values

    def update_indexer(self, keys: Tensor) -> Tensor:
        self._idx = _grow(self._idx, self.idx_length, keys)
        self.idx_length += keys.shape[1]
        return self.indexer_keys

    def get_seq_length(self) -> int:
        return self.length

    @property
    def keys(self) -> Optional[Tensor]:
        return None if self._k is None else self._k[:, :self.length]

    @property
    def values(self) -> Optional[Tensor]:
        return None if self._v is None else self._v[:, :self.length]

    @property
    def indexer_keys(self) -> Optional[Tensor]:
        return None if self._idx is None else self._idx[:, :self.idx_length]

    def _map(self, fn) -> None:
        """Applies ``fn`` to the tokens in use of every buffer (a batch operation)."""
        self._k = None if self._k is None else fn(self.keys)
        self._v = None if self._v is None else fn(self.values)
        self._idx = None if self._idx is None else fn(self.indexer_keys)

    def crop(self, length: int) -> None:
        """Keeps the first ``length`` tokens (K, V and indexer keys alike)."""
        self.length = min(self.length, length)
        self.idx_length = min(self.idx_length, length)


class KVCache:
    """The cache of a hand-written model (:mod:`dsa_ext.decoder`): one :class:`LayerCache` per
    layer (``cache.layer(i)``, created on first use) and the batch operations of generation,
    applied to every layer's K, V and indexer keys alike."""

    def __init__(self):
        self.layers: List[LayerCache] = []

    def layer(self, i: int) -> LayerCache:
        while len(self.layers) <= i:
            self.layers.append(LayerCache())
        return self.layers[i]

    def get_seq_length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Row i becomes the former row ``beam_idx[i]`` (beam search)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keeps the batch rows ``indices`` (a LongTensor of row numbers), in that order."""
        for layer in self.layers:
            layer._map(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each batch row ``repeats`` times in a row (one prompt's cache for each of its beams)."""
        for layer in self.layers:
            layer._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, length: int) -> None:
        """Keeps the first ``length`` tokens (a negative ``length`` removes that many at the end)."""
        if length < 0:
            length = max(0, self.get_seq_length() + length)
        for layer in self.layers:
            layer.crop(length)
