"""DSA on dsa_ext's operators for transformers' own DSA models, DeepSeek-V3.2 (``deepseek_v32``)
and GLM-5 (``glm_moe_dsa``), with their own indexer weights. :func:`dsa_ext.hf.convert` calls
:func:`convert` for these model types.

transformers runs these models' indexer under ``torch.no_grad``, scores it into a dense [T, S]
float32 matrix and attends through a dense [B, 1, T, S] mask: O(T*S) memory, no indexer training.
Converted, each layer's indexer weights (``wq_b`` on the query latent, ``wk``, ``k_norm``,
``weights_proj``: shared, not copied) form a :class:`~dsa_ext.nn.LightningIndexer` in a
:class:`~dsa_ext.nn.DSAAttention` core ``self_attn.dsa``: top-k by ``dsa_ext.indexer_topk``,
attention by ``dsa_ext.sparse_attention``, the modes dense/warmup/sparse and the indexer KL loss
as for the other families. Public transformers APIs only:

- ``self_attn.indexer`` becomes an :class:`IndexerCall`, which the model calls as it called its
  indexer (hidden states, query latent, its RoPE tables) and which returns the core's top-k;
- the model hands that top-k to the attention function as ``indices`` (GLM-5's ``"shared"``
  layers get the previous full layer's): ``"dsa_mla"`` in ``AttentionInterface`` runs the core;
- the mask builder registered under that name returns a zero-byte stand-in wherever the mask is
  purely causal (where sdpa itself would use ``is_causal``), instead of the [B, 1, T, S] mask
  these models always ask for; other masks (padding, packed documents from position ids that
  restart) are sdpa's, and the key ranges read off them (:mod:`dsa_ext.hf_ranges`) bound the
  indexer's top-k, the sparse attention and the indexer loss in every mode;
- a forward pre-hook on ``kv_b_proj`` hands the attention function the kv latent of every key
  (the cached tokens' too: the model expands the latents its cache returns through it);
- with a ``DynamicCache`` (generation), the indexer keys ride in the model's own cache layers
  (``DynamicIndexedLayer``, where transformers' indexer kept its own), so modes warmup and sparse
  decode incrementally as the other families do (:mod:`dsa_ext.hf_cache`).

**Sparse attention runs in MLA's absorbed (MQA) form**: one key per token, the 576-wide latent
``[kv_a_layernorm(c_kv), k_rope]`` (kv_lora_rank + qk_rope_head_dim) shared by all heads, V its
first 512 columns (kv_lora_rank), each head's query absorbed as ``q_nope @ W_UK[h]`` and its
output projected by ``W_UV[h]`` (``kv_b_proj``'s key and value rows). Why: a sparse query reads
its top-k keys by gather, and in the absorbed form one 576-wide row per selected key serves all
H heads, where the expanded form reads H rows of qk_head_dim + v_head_dim (V3.2: 1152 bytes
instead of 128 x 320 x 2 = 80 KiB per key in bf16); that makes the GPU kernel compute-bound
instead of gather-bound (docs/DESIGN.md §4) at 3.4x the FLOPs per (query, key, head), and it is
the form DeepSeek runs DSA in and the form of the latent KV cache. The absorption is an einsum on
the activations in every forward, never weights merged once, so ``kv_b_proj`` keeps its own
gradient (through both products) and training updates the same parameters as the expanded form.
Dense and warm-up attention are dense passes that the model's expanded per-head keys (which
transformers computes anyway) do at 3.4x fewer FLOPs: there the core gets those, and dense mode
is transformers' own sdpa on them. Both forms give the same logits (tested to 1e-10 in float64).

**The indexer as transformers computes it** (tested against transformers' and DeepSeek's formula,
1e-12): q from the query latent ``q_a_layernorm(q_a_proj(x))``, k = LayerNorm(Wk x) (eps 1e-6),
w = weights_proj(x) * Hi**-0.5, score sum_j w_j Di**-0.5 relu(q_j . k), RoPE on the first
qk_rope_head_dim dims taken from the model's own cos/sin tables; rotate-half pairs for
DeepSeek-V3.2, interleaved pairs for GLM-5 (the layout of DeepSeek's code before its 2025-11 fix).
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from . import hf_cache, hf_ranges
from .nn import DSAAttention, DSAConfig, LightningIndexer, Selection

__all__ = ["MODEL_TYPES", "ATTN_NAME", "IndexerCall", "convert", "attention", "causal_mask_builder", "absorbed_qkv",
           "model_dsa_config", "checkpoint_state_dict"]

MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa")
ATTN_NAME = "dsa_mla"
_INTERLEAVED_INDEXER_ROPE = {"deepseek_v32": False, "glm_moe_dsa": True}
_CAUSAL = "dsa_purely_causal"  # the attribute that marks the stand-in mask


def causal_mask_builder(**kwargs):
    """The mask function registered under ``"dsa_mla"``: sdpa's, except that a purely causal mask
    (no padding, and lengths for which sdpa would use ``is_causal``) is a [B, 1, T, S] view of one
    element, marked as such: the indexer and the sparse attention apply causality themselves."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if kwargs.get("mask_function") is not causal_mask_function:
        return sdpa_mask(**kwargs)
    mask = sdpa_mask(**{**kwargs, "allow_is_causal_skip": True})
    return mask if mask is not None else causal_stand_in(**kwargs)


def causal_stand_in(**kwargs) -> Tensor:
    """The zero-byte [B, 1, T, S] stand-in for a purely causal mask, from a mask function's keyword
    arguments: a view of one element, marked as such."""
    shape = (kwargs["batch_size"], 1, kwargs["q_length"], kwargs["kv_length"])
    one = torch.ones((), dtype=torch.bool, device=kwargs.get("device", "cpu"))
    setattr(one, _CAUSAL, True)  # views of the stand-in (the model hands its indexer mask[:, 0]) share it
    return one.expand(shape)


def _is_causal_stand_in(mask: Optional[Tensor]) -> bool:
    return mask is not None and getattr(mask if mask._base is None else mask._base, _CAUSAL, False)


def _key_ranges(mask: Optional[Tensor], batch: int):
    """The key ranges of the mask the model passes (None when purely causal)."""
    return None if mask is None or _is_causal_stand_in(mask) else hf_ranges.from_mask(mask, batch)


def model_dsa_config(model_config, config: Optional[DSAConfig] = None) -> DSAConfig:
    """The DSAConfig of a converted model of these types: ``config``'s top-k, mode, FP8
    selection, Hadamard rotation and loss coefficient (default: the model's ``index_topk``, mode
    sparse) with the indexer geometry of the model's own weights."""
    if config is None:
        config = DSAConfig(topk=model_config.index_topk)
    return replace(config, n_heads=model_config.index_n_heads, head_dim=model_config.index_head_dim,
                   rope_dim=model_config.qk_rope_head_dim,
                   rope_theta=float(model_config.rope_parameters["rope_theta"]))


class IndexerCall(nn.Module):
    """Takes the place of a layer's transformers indexer and is called as it was:
    ``(hidden_states, q_resid, position_embeddings, mask, position_ids, cache=...)`` -> top-k
    [B, T, topk] int32 (-1 padded; [B, T, 0] where the mode selects nothing). It runs the core's
    :meth:`~dsa_ext.nn.DSAAttention.select` and keeps the selection for the attention function
    (:meth:`take`). Holds no weights: they are the core's (``self_attn.dsa.indexer``)."""

    def __init__(self, core: DSAAttention, layer_idx: int):
        super().__init__()
        object.__setattr__(self, "core", core)  # not a submodule: the weights appear once, under .dsa
        self.layer_idx = layer_idx
        self.selection: Optional[Selection] = None

    def forward(self, hidden_states: Tensor, q_resid: Tensor, position_embeddings, attention_mask=None,
                position_ids=None, cache=None) -> Tensor:
        key_ranges, store = None, None
        if self.core.context_parallel is not None:  # the documents, from the position ids (no mask)
            key_ranges = self.core.context_parallel.key_ranges(position_ids, hidden_states.shape[0])
        elif self.core.mode != "dense" or self.core.recall is not None:
            if cache is not None:  # the model updated the layer's K/V cache before calling its indexer
                store = _indexer_store(cache, self.layer_idx)
            key_ranges = _key_ranges(attention_mask, hidden_states.shape[0])
        self.selection = self.core.select(hidden_states, q_input=q_resid, rope=position_embeddings,
                                          key_ranges=key_ranges, cache=store)
        if self.selection is None or self.selection.indices is None:
            return torch.empty(*hidden_states.shape[:2], 0, dtype=torch.int32, device=hidden_states.device)
        return self.selection.indices

    def take(self) -> Optional[Selection]:
        """The selection of the latest call, handed over once (the activations are not held on)."""
        selection, self.selection = self.selection, None
        return selection


def _indexer_store(cache, layer_idx: int) -> "hf_cache.IndexerStore":
    """Layer ``layer_idx`` of the model's cache as the core's indexer-key store."""
    layer = cache.layers[layer_idx]
    if hasattr(layer, "max_cache_len"):
        raise NotImplementedError("DSA modes warmup/sparse of DeepSeek-V3.2 / GLM-5 decode with a DynamicCache; "
                                  f"got a {type(layer).__name__} (a static cache)")
    return hf_cache.IndexerStore(hf_cache.indexed_layer(cache, layer_idx))


def _keep_latent(attn: nn.Module, proj: nn.Module, args) -> None:
    """kv_b_proj's input: the normalised kv latents [B, 1, S, r] of every key, cached ones too."""
    attn._dsa_latent = args[0][:, 0]


def _drop_latent(attn: nn.Module, args, output) -> None:
    """After the layer, whether it returned or raised: the latent is not held on."""
    attn._dsa_latent = None


def absorbed_qkv(module: nn.Module, query: Tensor, key: Tensor, latent: Tensor):
    """MLA's absorbed (MQA) form of one layer's attention inputs. query [B,H,T,nope+rope] and key
    [B,H,S,nope+rope] as transformers hands them over, latent [B,S,r] the normalised kv latent.
    Returns q [B,T,H,r+rope] (``q_nope @ W_UK[h]``, then the query's RoPE part), k [B,S,1,r+rope]
    (the latent, then the shared RoPE key), v = k[..., :r] (a view) and W_UV [H, v_head_dim, r]:
    ``softmax(q.k) v @ W_UV[h].T`` is the layer's attention output per head."""
    nope, r = module.qk_nope_head_dim, module.kv_lora_rank
    w = module.kv_b_proj.weight.view(query.shape[1], -1, r).to(query.dtype)  # per head: W_UK rows, then W_UV rows
    q = torch.cat((torch.einsum("bhtd,hdr->bthr", query[..., :nope], w[:, :nope]),
                   query[..., nope:].transpose(1, 2)), dim=-1)
    k = torch.cat((latent, key[:, 0, :, nope:]), dim=-1).unsqueeze(2).to(q.dtype)
    return q, k, k[..., :r], w[:, nope:]


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
              dropout: float = 0.0, scaling: Optional[float] = None, indices: Optional[Tensor] = None,
              **kwargs):
    """The attention function ``"dsa_mla"``: query [B,H,T,Dqk], key [B,H,S,Dqk], value
    [B,H,S,Dv] (transformers' expanded per-head form), ``indices`` the top-k the model got from
    its indexer (or a shared layer from the previous one) -> ([B,T,H,Dv], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    core: DSAAttention = module.dsa
    selection = module.indexer.take() if module.indexer is not None else None
    latent, module._dsa_latent = module._dsa_latent, None
    causal = _is_causal_stand_in(attention_mask)
    mask = None if causal else attention_mask  # sdpa then applies is_causal (valid where the stand-in is made)

    def dense(q, k, v, scale):
        return sdpa_attention_forward(module, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                      dropout=dropout, scaling=scale, **kwargs)[0]

    if core.mode == "dense" and core.recall is None and core.context_parallel is None:
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if core.context_parallel is not None and key.shape[2] != query.shape[2]:
        raise NotImplementedError("context parallelism does not support a KV cache (use_cache=False)")
    if core.context_parallel is not None:  # the documents, from the position ids (no mask)
        key_ranges = module._dsa_cp_ranges
    elif hf_ranges.is_packed(kwargs):
        if mask is None:  # the indexer has selected without the documents
            raise NotImplementedError("DSA: packed inputs of this model need position ids that restart per "
                                      "document (as DataCollatorWithFlattening gives) besides cu_seq_lens_q/k: "
                                      "the model builds its indexer's mask from the position ids")
        # the mask's ranges, checked against cu_seq_lens (raises if they differ)
        key_ranges, _ = hf_ranges.for_attention(mask, kwargs, query.shape[0], query.shape[2], key.shape[2])
    else:
        key_ranges = _key_ranges(attention_mask, query.shape[0])
    if selection is None:  # a shared layer: the selection is the previous full layer's
        selection = Selection(None, None, None, indices if indices is not None and indices.shape[-1] else None)
    if core.mode != "sparse":
        return core.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), selection,
                           scaling, dense, key_ranges), None
    if dropout:
        raise NotImplementedError("DSA sparse mode has no attention dropout (attention_dropout must be 0)")
    q, k, v, w_uv = absorbed_qkv(module, query, key, latent)
    out = core.attend(q, k, v, selection, scaling, key_ranges=key_ranges)
    return torch.einsum("bthr,hvr->bthv", out, w_uv.to(out.dtype)), None


def _attention_modules(model: nn.Module):
    return [m for m in model.modules() if hasattr(m, "kv_b_proj") and hasattr(m, "indexer")]


def convert(model: nn.Module, config: Optional[DSAConfig] = None) -> nn.Module:
    """Convert a DeepSeek-V3.2 or GLM-5 causal LM in place (see the module docstring); the model's
    weights, its indexers' included, are untouched. ``config`` as :func:`model_dsa_config`.
    GLM-5's ``"shared"`` layers get a core without an indexer, which attends over the previous
    full layer's selection (their modes follow :func:`dsa_ext.nn.set_mode` like the others)."""
    model_type = model.config.model_type
    config = model_dsa_config(model.config, config)
    for attn in _attention_modules(model):
        own = attn.indexer
        indexer = None if own is None else LightningIndexer.around(
            own.wq_b, own.wk, own.k_norm, own.weights_proj, config.rope_dim, config.hadamard,
            _INTERLEAVED_INDEXER_ROPE[model_type])
        attn.dsa = DSAAttention(indexer, config.topk, config.mode, config.fp8_topk, config.loss_coeff)
        if own is not None:
            attn.indexer = IndexerCall(attn.dsa, attn.layer_idx)
        attn._dsa_latent = None
        attn.kv_b_proj.register_forward_pre_hook(partial(_keep_latent, attn))
        attn.register_forward_hook(_drop_latent, always_call=True)
    model.set_attn_implementation(ATTN_NAME)
    model.dsa_config = config
    return model


def checkpoint_state_dict(state: dict) -> dict:
    """A converted model's state dict under transformers' names: ``...self_attn.dsa.indexer.wq``
    is the model's ``...self_attn.indexer.wq_b``, the other indexer weights keep their names."""
    def name(key: str) -> str:
        return key.replace(".dsa.indexer.wq.", ".indexer.wq_b.").replace(".dsa.indexer.", ".indexer.")
    return {name(k): v for k, v in state.items()}
