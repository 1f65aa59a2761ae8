"""Modules that put DeepSeek Sparse Attention into a Transformer, and the helpers a training loop
needs around them.

- :class:`LightningIndexer` (``indexer.py``): the indexer of DeepSeek-V3.2 (query/key/weight
  projections, LayerNorm on the key, non-interleaved RoPE on the first ``rope_dim`` dims,
  optional Hadamard rotation). It reads its input detached, so only the indexer loss trains it.
- :class:`DSAAttention` (``attention.py``): the attention core in modes ``dense``, ``warmup`` and
  ``sparse``; in training its indexer KL loss rides on the attention output's autograd graph.
- ``training.py``: ``set_mode``, ``freeze_for_warmup``, ``param_groups``, ``indexer_loss`` (the
  logged value), ``set_loss_scale``.
- ``recall.py``: recall statistics (the share of the dense attention mass the top-k captures).
- ``key_ranges.py``: per-query key ranges in the modules (packed documents, padding): every mode,
  loss and recall statistic respects them; padding queries do not count.
- ``cache.py``: the indexer-key cache protocol of incremental decoding, and :class:`KVCache`, the
  KV + indexer-key cache of hand-written models.

Layouts are batch-first like the operators: q ``[B, T, H, D]``, k/v ``[B, S, Hkv, D]``.
"""
from .attention import (AttachIndexerLoss, DSAAttention, Selection, dense_causal_attention,
                        dsa_modules, head_mean_attention)
from .cache import KVCache, LayerCache
from .config import MODES, DSAConfig
from .indexer import LightningIndexer, apply_partial_rope, hadamard_matrix, rotate_partial
from .key_ranges import KeyRanges, real_queries, visible_keys
from .recall import RecallSums, recall_stats
from .training import (freeze_for_warmup, indexer_loss, indexer_parameters, param_groups,
                       set_loss_scale, set_mode, unfreeze)

__all__ = [
    "DSAConfig", "MODES", "LightningIndexer", "DSAAttention", "AttachIndexerLoss", "Selection",
    "dense_causal_attention", "head_mean_attention", "apply_partial_rope", "rotate_partial", "hadamard_matrix",
    "dsa_modules", "set_mode", "indexer_loss", "set_loss_scale", "freeze_for_warmup", "unfreeze",
    "indexer_parameters", "param_groups", "RecallSums", "recall_stats", "KeyRanges", "real_queries", "visible_keys",
    "KVCache", "LayerCache",
]
