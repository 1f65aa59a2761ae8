"""The indexer-key cache of converted transformers models (:mod:`dsa_ext.hf`), kept in
transformers' own cache layers so that everything ``generate()`` does to a cache moves the
indexer keys with K and V.

A plain ``DynamicLayer`` or ``StaticLayer`` (what ``DynamicCache`` and ``StaticCache`` build for
Llama, Qwen2, Qwen3, Mistral) becomes transformers' ``DynamicIndexedLayer`` /
``StaticIndexedLayer`` (the layers of its DeepSeek-V3.2 and GLM-5 caches) on the first DSA call
that fills it, holding the same K/V state: their batch reorder (beam search), batch selection,
repeat and crop (assisted decoding) carry the indexer keys too.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["IndexerStore", "attach", "indexed_layer"]


class IndexerStore:
    """A transformers cache layer with an indexer-key cache, as the DSA core's store
    (:mod:`dsa_ext.nn.cache`): a static layer returns its whole preallocated buffer, cut here to
    the tokens it holds."""

    def __init__(self, layer):
        self.layer = layer

    def update_indexer(self, keys: torch.Tensor) -> torch.Tensor:
        stored = self.layer.update_indexer(keys)
        held = getattr(self.layer, "indexer_cumulative_length", None)
        return stored if held is None else stored[:, :int(held)]

    def get_seq_length(self) -> int:
        return int(self.layer.get_seq_length())


def indexed_layer(cache, layer_idx: int):
    """Layer ``layer_idx`` of ``cache`` as a layer that keeps indexer keys: itself when it does
    (DeepSeek-V3.2's and GLM-5's caches), else swapped in place for the indexed kind of it."""
    from transformers.cache_utils import DynamicIndexedLayer, DynamicLayer, StaticIndexedLayer, StaticLayer

    layer = cache.layers[layer_idx]
    if hasattr(layer, "update_indexer"):
        return layer
    if type(layer) is DynamicLayer:
        indexed = DynamicIndexedLayer()
    elif type(layer) is StaticLayer:
        indexed = StaticIndexedLayer(max_cache_len=layer.max_cache_len)
    else:
        raise NotImplementedError(f"DSA modes warmup/sparse keep indexer keys in DynamicCache and StaticCache "
                                  f"layers; got a {type(layer).__name__}")
    vars(indexed).update(vars(layer))  # the K/V state; the indexer fields stay fresh
    cache.layers[layer_idx] = indexed
    return indexed


def attach(cache, layer_idx: int, key: torch.Tensor, value: torch.Tensor,
           mask: Optional[torch.Tensor]) -> Tuple[IndexerStore, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Layer ``layer_idx`` of the transformers ``cache`` as the DSA core's store, and the key,
    value [B, Hkv, S', D] and attention mask [..., S'] the attention function received, cut to
    the S tokens the layer holds (a static cache hands over its whole buffers)."""
    store = IndexerStore(indexed_layer(cache, layer_idx))
    held = store.get_seq_length()
    if isinstance(mask, torch.Tensor):
        mask = mask[..., :held]
    return store, key[:, :, :held], value[:, :, :held], mask
