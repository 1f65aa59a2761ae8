"""Context-parallel attention for transformers models (:func:`dsa_ext.context_parallel.enable`).

A model under context parallelism is called on its rank's tokens (``cp.shard(input_ids)``) with
their global ``position_ids`` (``cp.positions()[None]``): the model's RoPE and the DSA indexer
then see global positions. Its attention implementation is switched to ``"dsa_cp"`` (``"dsa_mla_cp"``
for DeepSeek-V3.2 and GLM-5), whose attention function runs every layer through the
:class:`~dsa_ext.context_parallel.ContextParallel` group: converted layers through their DSA core
in any mode, unconverted ones (a dense model) as dense attention over the gathered keys and
values. Their mask builders build no mask: with zigzag positions transformers would otherwise
detect "packed sequences" and build an [L, L] block mask for the local tokens, which means
nothing here (causality is by global position, inside the group's attention). Padding masks are
refused.

Packed documents: call the model with each rank's share of the sequence's restarting position
ids (``cp.shard(position_ids)``, as ``DataCollatorWithFlattening`` makes them for the whole
sequence). Before each attention layer a hook turns them into the local queries' key ranges
(:meth:`~dsa_ext.context_parallel.ContextParallel.key_ranges`: one all-gather of the position ids
per forward), which every DSA mode and the dense layers then keep to. ``cu_seq_lens_q/k`` of the
whole sequence may come too; they must describe the same documents.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import hf_mla
from .nn import DSAAttention

__all__ = ["ATTN_NAME", "MLA_ATTN_NAME", "register", "enable", "disable", "attention"]

ATTN_NAME = "dsa_cp"
MLA_ATTN_NAME = "dsa_mla_cp"


def _no_mask(**kwargs):
    return None


def _mla_causal_stand_in(**kwargs):
    """hf_mla's zero-byte causal stand-in, whatever mask function transformers asks for."""
    return hf_mla.causal_stand_in(**kwargs)


def attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
              scaling: Optional[float] = None, **kwargs):
    """The attention function ``"dsa_cp"``: query [B,H,L,D], key/value [B,Hkv,L,D] of the local
    tokens -> ([B,L,H,Dv], None)."""
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("context parallelism does not support sliding-window layers")
    if dropout:
        raise NotImplementedError("context parallelism has no attention dropout (attention_dropout must be 0)")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    key_ranges = module._dsa_cp_ranges
    core = getattr(module, "dsa", None)
    if isinstance(core, DSAAttention):
        hidden, positions, cache = module._dsa_inputs
        module._dsa_inputs = (None, None, None)
        if cache is not None:
            raise NotImplementedError("context parallelism does not support a KV cache (use_cache=False)")
        return core(q, k, v, hidden, positions, scaling, key_ranges=key_ranges), None
    return module.context_parallel.dense_attention(q, k, v, scaling, key_ranges), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    AttentionInterface.register(MLA_ATTN_NAME, hf_mla.attention)
    AttentionMaskInterface.register(MLA_ATTN_NAME, _mla_causal_stand_in)


def _batch_size(args, kwargs) -> Optional[int]:
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    inputs = inputs if inputs is not None else (args[0] if args and torch.is_tensor(args[0]) else None)
    return None if inputs is None else inputs.shape[0]


def _require_positions(model: nn.Module, args, kwargs) -> None:
    """Before the model: position ids are there, and cu_seq_lens, if any, agree with them."""
    positions = kwargs.get("position_ids")
    if positions is None:
        raise ValueError("a model under context parallelism needs the position_ids of its tokens: call it with "
                         "position_ids=cp.positions()[None] (or cp.shard(position_ids) of packed documents)")
    mask = kwargs.get("attention_mask")
    if mask is not None and model._dsa_cp.any_rank(~mask.bool().all()):  # every rank refuses alike
        raise NotImplementedError("context parallelism supports causal sequences without padding; "
                                  "got a padding mask")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None or not torch.equal(cu_q, cu_k):
            raise NotImplementedError("context parallelism: packed inputs need cu_seq_lens_q equal to cu_seq_lens_k")
        # checks them; the layers then find the documents kept (the same position ids and batch)
        model._dsa_cp.key_ranges(positions, _batch_size(args, kwargs), cu_seq_lens=cu_q)


def _stash_key_ranges(module: nn.Module, args, kwargs) -> None:
    """Before an attention layer: the key ranges of its queries' documents (None: one each)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    positions = kwargs.get("position_ids")
    if positions is None:  # the model got them (its hook checks): a layer that does not hand them on
        raise NotImplementedError(f"context parallelism: {type(module).__name__} is not given position_ids, "
                                  "which it needs for the documents of its queries")
    module._dsa_cp_ranges = module.context_parallel.key_ranges(positions, hidden.shape[0])


def _attention_modules(model: nn.Module):
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


def enable(model: nn.Module, cp) -> None:
    """Switch a transformers model to context-parallel attention over ``cp`` (see the module
    docstring); :func:`disable` switches back."""
    if getattr(model, "_dsa_cp_previous", None) is not None:
        raise ValueError("context_parallel.enable: the model already runs context-parallel")
    mla = model.config.model_type in hf_mla.MODEL_TYPES
    if mla and not any(isinstance(getattr(m, "dsa", None), DSAAttention) for m in _attention_modules(model)):
        raise NotImplementedError("context parallelism of DeepSeek-V3.2 / GLM-5 needs the converted model "
                                  "(dsa_ext.hf.convert)")
    register()
    hooks = [model.register_forward_pre_hook(_require_positions, with_kwargs=True)]
    for m in _attention_modules(model):
        m.context_parallel, m._dsa_cp_ranges = cp, None
        hooks.append(m.register_forward_pre_hook(_stash_key_ranges, with_kwargs=True))
    model._dsa_cp, model._dsa_cp_hooks = cp, hooks
    model._dsa_cp_previous = model.config._attn_implementation
    model.set_attn_implementation(MLA_ATTN_NAME if mla else ATTN_NAME)


def disable(model: nn.Module) -> None:
    previous = getattr(model, "_dsa_cp_previous", None)
    if previous is None:
        return
    model.set_attn_implementation(previous)
    for hook in model._dsa_cp_hooks:
        hook.remove()
    model._dsa_cp_previous = model._dsa_cp_hooks = model._dsa_cp = None
    for m in _attention_modules(model):
        m.context_parallel = m._dsa_cp_ranges = None
