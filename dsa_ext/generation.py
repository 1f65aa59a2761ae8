"""Text generation for hand-written models such as :class:`dsa_ext.decoder.Decoder`: greedy
decoding, sampling and beam search over a :class:`dsa_ext.nn.KVCache` (transformers models have
their own ``model.generate()``, which :mod:`dsa_ext.hf` serves).

The model is any ``model(ids [B, T], cache=cache) -> logits [B, T, vocab]`` that appends ``ids`` to the
cache (``model(ids)`` alone runs the whole sequence uncached). In modes warmup and sparse each step
is one DSA decode step: the new token's indexer key joins the layer's indexer-key cache and its
top-k is taken over every cached key, so a cached run picks the same keys as an uncached one
(``use_cache=False`` re-runs the whole sequence at every step, for comparison).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.cache import KVCache

__all__ = ["generate"]


def _last_logits(model: nn.Module, seqs: Tensor, cache: Optional[KVCache], chunk: Optional[int]) -> Tensor:
    """The logits after the last token of ``seqs`` [B, L]: the tokens the cache lacks are fed in
    chunks of ``chunk`` (all at once when None); without a cache the whole sequence runs."""
    if cache is None:
        return model(seqs)[:, -1]
    new = seqs[:, cache.get_seq_length():]
    for part in new.split(chunk or new.shape[1], dim=1):
        logits = model(part, cache=cache)
    return logits[:, -1]


def _sample(logits: Tensor, temperature: float, top_k: Optional[int], generator) -> Tensor:
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits.float(), dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: nn.Module, ids: Tensor, max_new_tokens: int, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, num_beams: int = 1,
             prefill_chunk: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """Continues each prompt row of ``ids`` [B, L] by ``max_new_tokens`` tokens; returns
    [B, L + max_new_tokens]. Greedy by default; ``do_sample`` draws from the softmax of the logits
    over ``temperature`` (restricted to the ``top_k`` largest when given) with ``generator``;
    ``num_beams`` > 1 is beam search (sum of token log-probabilities, no length penalty), returning
    each row's best beam. ``prefill_chunk`` feeds the prompt in chunks of that many tokens;
    ``use_cache=False`` runs the whole sequence at every step instead of the cache."""
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_beams < 1 or (num_beams > 1 and do_sample):
        raise ValueError(f"generate: num_beams must be >= 1 and beam search does not sample; got "
                         f"num_beams={num_beams}, do_sample={do_sample}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"generate: prefill_chunk must be >= 1, got {prefill_chunk}")
    cache = KVCache() if use_cache else None
    if num_beams > 1:
        return _beam_search(model, ids, max_new_tokens, num_beams, cache, prefill_chunk)
    seqs = ids
    for _ in range(max_new_tokens):
        logits = _last_logits(model, seqs, cache, prefill_chunk)
        token = _sample(logits, temperature, top_k, generator) if do_sample else logits.argmax(-1)
        seqs = torch.cat((seqs, token[:, None]), dim=1)
    return seqs


def _beam_search(model: nn.Module, ids: Tensor, max_new_tokens: int, beams: int, cache: Optional[KVCache],
                 chunk: Optional[int]) -> Tensor:
    B = ids.shape[0]
    logp = F.log_softmax(_last_logits(model, ids, cache, chunk), dim=-1).repeat_interleave(beams, 0)
    if cache is not None:  # the prompt ran once per row; each of its beams starts from that cache
        cache.batch_repeat_interleave(beams)
    seqs = ids.repeat_interleave(beams, 0)
    # every beam of a row starts as the prompt: only the first may extend it, or all would pick the same
    scores = torch.full((B, beams), float("-inf"), dtype=logp.dtype, device=ids.device)
    scores[:, 0] = 0
    scores = scores.flatten()
    rows = torch.arange(B, device=ids.device)[:, None] * beams
    for step in range(max_new_tokens):
        if step:
            logp = F.log_softmax(_last_logits(model, seqs, cache, chunk), dim=-1)
        vocab = logp.shape[-1]
        best, flat = (scores[:, None] + logp).view(B, beams * vocab).topk(beams, dim=-1)
        parent = (flat // vocab + rows).flatten()
        seqs = torch.cat((seqs[parent], (flat % vocab).flatten()[:, None]), dim=1)
        scores = best.flatten()
        if cache is not None:
            cache.reorder_cache(parent)
    return seqs.view(B, beams, -1)[:, 0]  # topk sorts: beam 0 is each row's best
