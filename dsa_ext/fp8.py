"""FP8 (e4m3) lightning-indexer inputs, the way DeepSeek-V3.2 runs its indexer.

Each row of q_idx ([B, T, Hi, Di], one row per query head) and of k_idx ([B, S, Di], one row per
key) is scaled by its own float32 factor so that its largest magnitude maps to e4m3's 448, then
rounded to float8_e4m3fn (for Di = 128 this is DeepSeek's 128-element block scaling). Because the
scales are positive they leave the ReLU alone and factor out of the score:

    logits[t,s] = scale * k_scale[s] * sum_j (w[t,j] * q_scale[t,j]) * relu(q8[t,j] . k8[s])

so the query scales fold into the head weights and the key scale multiplies after the head sum;
``dsa_ext.indexer_logits`` / ``indexer_topk`` take the e4m3 tensors, the folded float32 weights
and ``k_scale``. Products of e4m3 values are exact; the CPU adds them in float32, Hopper's FP8
tensor cores with about 14 bits. The main error is the rounding of q_idx and k_idx to 3 mantissa
bits (measured against bfloat16 by ``python/bench_fp8_indexer.py``). FP8 inputs are forward-only:
train the indexer in bfloat16.

An indexer-key cache keeps each key in this form, packed into one uint8 row of Di + 4 bytes (the
e4m3 values, then the float32 scale; :func:`pack_keys`, :func:`unpack_keys`): quantising a key
depends on that key alone, so keys quantised as they arrive select exactly as keys quantised
together.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import ops

__all__ = ["E4M3_MAX", "quantize_rows", "indexer_inputs", "query_inputs", "indexer_logits", "indexer_topk",
           "pack_keys", "unpack_keys", "indexer_topk_packed"]

E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_rows(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row e4m3 quantisation over the last dimension.

    Args:
        x: ``[..., D]`` float tensor.

    Returns:
        ``(x8, scale)``: ``x8`` ``[..., D]`` float8_e4m3fn and ``scale`` ``[...]`` float32 with
        ``x ~= x8.float() * scale[..., None]``; an all-zero row gets scale 1.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    # clamp: amax / (amax / 448) can round a hair above 448, which e4m3fn cannot hold
    x8 = (xf / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, scale


def indexer_inputs(q_idx: Tensor, k_idx: Tensor, w: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """FP8 operands of the indexer ops from full-precision ones.

    Args:
        q_idx: ``[B, T, Hi, Di]``; k_idx: ``[B, S, Di]``; w: ``[B, T, Hi]`` (any float dtype).

    Returns:
        ``(q8, k8, w_scaled, k_scale)``: ``[B, T, Hi, Di]`` and ``[B, S, Di]`` float8_e4m3fn,
        ``[B, T, Hi]`` float32 head weights times the query rows' scales, ``[B, S]`` float32 key
        scales. Pass them as ``indexer_topk(q8, k8, w_scaled, topk, scale, causal, k_scale=k_scale)``.
    """
    q8, w_scaled = query_inputs(q_idx, w)
    k8, k_scale = quantize_rows(k_idx)
    return q8, k8, w_scaled, k_scale


def query_inputs(q_idx: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """The query half of :func:`indexer_inputs`: ``(q8, w_scaled)``."""
    q8, q_scale = quantize_rows(q_idx)
    return q8, w.float() * q_scale


def indexer_logits(q_idx: Tensor, k_idx: Tensor, w: Tensor, scale: Optional[float] = None,
                   causal: bool = True, key_start: Optional[Tensor] = None,
                   key_end: Optional[Tensor] = None) -> Tensor:
    """``dsa_ext.indexer_logits`` on e4m3-quantised q_idx and k_idx (same arguments and output;
    the scale default ``(Hi * Di) ** -0.5`` is unchanged). Not differentiable."""
    q8, k8, ws, ks = indexer_inputs(q_idx, k_idx, w)
    return ops.indexer_logits(q8, k8, ws, scale, causal, k_scale=ks, key_start=key_start, key_end=key_end)


def indexer_topk(q_idx: Tensor, k_idx: Tensor, w: Tensor, topk: int, scale: Optional[float] = None,
                 causal: bool = True, key_start: Optional[Tensor] = None,
                 key_end: Optional[Tensor] = None) -> Tensor:
    """``dsa_ext.indexer_topk`` on e4m3-quantised q_idx and k_idx: ``[B, T, topk]`` int32."""
    q8, k8, ws, ks = indexer_inputs(q_idx, k_idx, w)
    return ops.indexer_topk(q8, k8, ws, topk, scale, causal, k_scale=ks, key_start=key_start, key_end=key_end)


def pack_keys(k_idx: Tensor) -> Tensor:
    """Indexer keys ``[B, S, Di]`` (any float dtype) as cache rows: ``[B, S, Di + 4]`` uint8, the
    e4m3 values of :func:`quantize_rows` followed by the bytes of their float32 scale."""
    k8, scale = quantize_rows(k_idx)
    return torch.cat((k8.view(torch.uint8), scale[..., None].view(torch.uint8)), dim=-1)


def unpack_keys(packed: Tensor) -> Tuple[Tensor, Tensor]:
    """The operands of :func:`pack_keys` rows ``[B, S, Di + 4]``: ``(k8 [B, S, Di]`` float8_e4m3fn,
    a view of the rows, ``k_scale [B, S]`` float32)."""
    di = packed.shape[-1] - 4
    # the scale bytes start at an offset that need not be 4-aligned: copied ([B, S] floats)
    return packed[..., :di].view(torch.float8_e4m3fn), packed[..., di:].contiguous().view(torch.float32)[..., 0]


def indexer_topk_packed(q_idx: Tensor, packed: Tensor, w: Tensor, topk: int, scale: Optional[float] = None,
                        causal: bool = True, key_start: Optional[Tensor] = None,
                        key_end: Optional[Tensor] = None) -> Tensor:
    """:func:`indexer_topk` with the keys already quantised (:func:`pack_keys` rows, e.g. a cache):
    the same ``[B, T, topk]`` as quantising the full-precision keys here."""
    q8, w_scaled = query_inputs(q_idx, w)
    k8, k_scale = unpack_keys(packed)
    return ops.indexer_topk(q8, k8, w_scaled, topk, scale, causal, k_scale=k_scale, key_start=key_start,
                            key_end=key_end)
