"""Conventions every operator shares, for the runtime and the reference alike (docs/DESIGN.md,
"Conventions"): the bottom-right causal alignment and the default score scales. The C++ host code
resolves the same defaults when an operator is called with ``scale=None`` (csrc/host.cpp)."""
from __future__ import annotations

import torch

__all__ = ["causal_mask", "default_indexer_scale", "default_attention_scale"]


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """``[T, S]`` bool, True where query t may see key s: ``s <= t + S - T`` (bottom-right
    aligned, so with a KV prefix (S > T) the last query sees every key)."""
    t = torch.arange(T, device=device)[:, None]
    s = torch.arange(S, device=device)[None, :]
    return s <= t + (S - T)


def default_indexer_scale(Hi: int, Di: int) -> float:
    """The indexer operators' default score scale ``(Hi * Di) ** -0.5``, for raw head weights w.
    DeepSeek folds ``Hi ** -0.5`` into w and scores with ``Di ** -0.5``: the same product, with
    ``Hi ** -0.5`` applied exactly once either way."""
    return float((Hi * Di) ** -0.5)


def default_attention_scale(Dqk: int) -> float:
    """The attention operators' default softmax scale ``Dqk ** -0.5``."""
    return float(Dqk ** -0.5)
