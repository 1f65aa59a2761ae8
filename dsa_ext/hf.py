"""DSA for Hugging Face ``transformers`` causal LMs (Llama, Qwen2, Qwen3, Mistral families, and
the DSA models DeepSeek-V3.2 and GLM-5 with their own indexers: :mod:`dsa_ext.hf_mla`), without
editing their source.

How it hooks in (public transformers APIs only):
- an attention function ``"dsa"`` registered in ``AttentionInterface`` (with ``sdpa``'s mask
  builder registered under the same name in ``AttentionMaskInterface``); the converted model's
  ``attn_implementation`` is set to it. Every attention layer then calls it with its q, k, v
  (after the model's own RoPE and norms) and it runs the layer's :class:`DSAAttention` core.
  Dense attention (mode dense/warmup, and unconverted layers) is transformers' own ``sdpa``
  function, so a dense-mode model computes exactly what the original computes;
- a forward pre-hook on each attention module hands the core the module's input hidden states,
  position ids (the indexer's input) and cache, which the attention function is not given;
- with a cache (``generate()``, chunked prefill), each converted layer's cache layer keeps the
  indexer keys beside K and V (:mod:`dsa_ext.hf_cache`);
- each core is a submodule ``dsa`` of its attention module, so ``model.parameters()`` and
  ``state_dict()`` include the indexers (``...self_attn.dsa.indexer.*``).

:func:`save_pretrained` writes an ordinary checkpoint of the host model (loadable by plain
``from_pretrained``) plus ``dsa_config.json`` and ``dsa_indexer.safetensors``;
:func:`from_pretrained` loads it back converted (or converts a dense checkpoint with fresh
indexers).

Padded and packed batches work in every mode (:mod:`dsa_ext.hf_ranges`): each query's key range
comes from the mask transformers builds (2-D padding masks, left or right; position ids that
restart per document) or from the ``cu_seq_lens_q/k`` arguments of packed batches, and bounds the
indexer's top-k, the sparse attention and the indexer loss; the dense attention uses the same
mask. Padding queries: left-padding ones see no key (output 0 in every mode); right-padding ones
see the real tokens as transformers' mask makes them (dense/warmup: sdpa's output; sparse: their
top-k of those tokens). Neither counts in the indexer loss nor in recall, and none gives NaN.
Generation: each DSA layer's indexer keys ride in transformers' own cache (:mod:`dsa_ext.hf_cache`).
Limits: sliding-window layers are only supported in dense mode; a cache filled in dense mode
cannot continue in warmup or sparse mode.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Optional

from torch import nn

from . import hf_cache, hf_mla, hf_ranges
from .nn import DSAAttention, DSAConfig, LightningIndexer, dsa_modules

__all__ = ["ATTN_NAME", "TESTED_MODEL_TYPES", "register", "convert", "save_pretrained",
           "from_pretrained", "INDEXER_FILE", "CONFIG_FILE"]

ATTN_NAME = "dsa"
TESTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral") + hf_mla.MODEL_TYPES
INDEXER_FILE = "dsa_indexer.safetensors"
CONFIG_FILE = "dsa_config.json"


def _dsa_attention(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                   scaling: Optional[float] = None, **kwargs):
    """The registered attention function: query [B,H,T,D], key/value [B,Hkv,S,D] ->
    ([B,T,H,D], None), the AttentionInterface contract."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    core = getattr(module, "dsa", None)
    if not isinstance(core, DSAAttention):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)

    hidden, positions, cache = module._dsa_inputs
    module._dsa_inputs = (None, None, None)  # hold the activations no longer than the call
    key_ranges, store = None, None
    if core.mode != "dense" or core.recall is not None or hf_ranges.is_packed(kwargs):
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError("DSA modes warmup/sparse do not support sliding-window layers")
        if cache is not None and (core.mode != "dense" or core.recall is not None):
            # the indexer keys ride in the layer's cache (dense() sees the cut mask)
            store, key, value, attention_mask = hf_cache.attach(cache, module.layer_idx, key, value, attention_mask)
        key_ranges, attention_mask = hf_ranges.for_attention(attention_mask, kwargs, query.shape[0],
                                                             query.shape[2], key.shape[2])

    def dense(q, k, v, scale):
        return sdpa_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2),
                                      v.transpose(1, 2), attention_mask, dropout=dropout,
                                      scaling=scale, **kwargs)[0]

    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return core(q, k, v, hidden, positions, scaling, dense, key_ranges, cache=store), None


def _stash_inputs(module: nn.Module, args, kwargs):
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    positions = kwargs.get("position_ids")
    module._dsa_inputs = (hidden, positions, kwargs.get("cache", kwargs.get("past_key_values")))


def register() -> None:
    """Register the attention functions ``"dsa"`` and ``"dsa_mla"`` (:mod:`dsa_ext.hf_mla`) and
    their mask builders with transformers (idempotent; :func:`convert` calls it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _dsa_attention)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    AttentionInterface.register(hf_mla.ATTN_NAME, hf_mla.attention)
    AttentionMaskInterface.register(hf_mla.ATTN_NAME, hf_mla.causal_mask_builder)


def _attention_modules(model: nn.Module):
    return [m for name, m in model.named_modules()
            if name.endswith("self_attn") and all(hasattr(m, a) for a in ("q_proj", "k_proj", "o_proj"))]


def convert(model: nn.Module, config: Optional[DSAConfig] = None, allow_untested: bool = False) -> nn.Module:
    """Swap DSA into a transformers causal LM in place: one fresh indexer per attention layer
    (reading that layer's input hidden states), attention implementation set to ``"dsa"``.
    DeepSeek-V3.2 and GLM-5 keep their own indexers instead (:func:`dsa_ext.hf_mla.convert`; the
    indexer geometry is theirs, ``config`` default: their ``index_topk``, mode sparse).
    Pretrained weights are untouched. Returns the model (``model.dsa_config`` holds the config;
    default ``DSAConfig()``)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in TESTED_MODEL_TYPES and not allow_untested:
        raise ValueError(f"convert: model_type {model_type!r} is not one of the tested families "
                         f"{TESTED_MODEL_TYPES}; pass allow_untested=True to try anyway")
    if dsa_modules(model):
        raise ValueError("convert: the model already has DSA attention")
    if model_type in hf_mla.MODEL_TYPES:
        register()
        return hf_mla.convert(model, config)
    config = config or DSAConfig()
    attn = _attention_modules(model)
    if not attn:
        raise ValueError("convert: found no '*self_attn' module with q_proj/k_proj/o_proj")
    register()
    hidden_size = model.config.hidden_size
    for m in attn:
        ref = m.q_proj.weight
        m.dsa = DSAAttention.from_config(config, hidden_size).to(ref.device, ref.dtype)
        m._dsa_inputs = (None, None, None)
        m.register_forward_pre_hook(_stash_inputs, with_kwargs=True)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_NAME)
    else:
        model.config._attn_implementation = ATTN_NAME
    model.dsa_config = config
    return model


def save_pretrained(model: nn.Module, path: str, **kwargs) -> None:
    """Save a converted model: the host model's own checkpoint (``model.save_pretrained``,
    without the indexers, so plain ``from_pretrained`` loads it as the dense model), plus
    ``dsa_config.json`` (with the layers' current mode and top-k) and the indexer weights in
    ``dsa_indexer.safetensors``. DeepSeek-V3.2 and GLM-5 keep their indexer weights in their own
    checkpoint, under transformers' names, with ``index_topk`` set to the layers' top-k: plain
    ``from_pretrained`` loads the trained indexers (and selects as many keys)."""
    from safetensors.torch import save_file

    cores = dsa_modules(model)
    modes = {(c.mode, c.topk) for c in cores}
    if len(modes) != 1:
        raise ValueError(f"save_pretrained: the layers differ in (mode, topk): {sorted(modes)}")
    mode, topk = modes.pop()  # the current ones, which set_mode may have changed since convert
    state = model.state_dict()
    if model.config.model_type in hf_mla.MODEL_TYPES:
        model.config.index_topk = topk
        model.save_pretrained(path, state_dict=hf_mla.checkpoint_state_dict(state), **kwargs)
    else:
        indexer = {k: v.detach().contiguous().cpu() for k, v in state.items() if ".dsa." in k}
        model.save_pretrained(path, state_dict={k: v for k, v in state.items() if ".dsa." not in k}, **kwargs)
        save_file(indexer, os.path.join(path, INDEXER_FILE))
    saved = {**replace(model.dsa_config, mode=mode, topk=topk).to_dict(), "indexer_version": LightningIndexer._version}
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(saved, f, indent=2)


def from_pretrained(path: str, config: Optional[DSAConfig] = None, **kwargs) -> nn.Module:
    """Load a causal LM from a local directory and convert it. ``config`` default: the saved
    ``dsa_config.json``, else :func:`convert`'s default. Saved indexer weights are loaded when
    present (a dense checkpoint gets fresh indexers; DeepSeek-V3.2 and GLM-5 load their own from
    their checkpoint). kwargs go to ``AutoModelForCausalLM.from_pretrained``."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    cfg_file = os.path.join(path, CONFIG_FILE)
    saved = {}
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            saved = json.load(f)
    if config is None and saved:
        config = DSAConfig.from_dict(saved)
    convert(model, config)
    weights = os.path.join(path, INDEXER_FILE)
    if os.path.exists(weights):
        expected = {k for k in model.state_dict() if ".dsa." in k}
        state = load_file(weights, device=str(next(model.parameters()).device))
        if saved.get("indexer_version", 1) < LightningIndexer._version:  # written before the fix
            for name, m in model.named_modules():
                if isinstance(m, LightningIndexer):
                    m.convert_legacy(state, name + ".")
        if set(state) != expected:
            raise ValueError(f"{weights}: indexer keys do not match the model "
                             f"(missing {sorted(expected - set(state))[:3]}, "
                             f"unexpected {sorted(set(state) - expected)[:3]})")
        model.load_state_dict(state, strict=False)
    return model
