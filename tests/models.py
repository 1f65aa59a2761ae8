"""Small models the module tests share: the plain decoder and tiny transformers models, all in
float64 unless asked otherwise, with weights larger than an LM init (sharper attention)."""
import torch

from dsa_ext import decoder
from dsa_ext import nn as dnn

VOCAB = 61
HF_VOCAB = 97


def small_decoder(dtype=torch.float64, n_kv_heads=2, layers=2):
    cfg = decoder.DecoderConfig(vocab_size=VOCAB, d_model=48, n_layers=layers, n_heads=4,
                                n_kv_heads=n_kv_heads)
    m = decoder.Decoder(cfg).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)
    return m


def dsa_cfg(topk=8, mode="sparse", **kw):
    kw = {"n_heads": 3, "head_dim": 16, "rope_dim": 8, **kw}
    return dnn.DSAConfig(topk=topk, mode=mode, **kw)


def indexer_grads(model):
    return [p.grad for p in dnn.indexer_parameters(model)]


def host_params(model):
    idx = {id(p) for p in dnn.indexer_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in idx]


def hf_families(mistral=False):
    """The converted families with full attention; ``mistral`` adds Mistral, whose layers
    :func:`tiny_hf` builds without a sliding window (DSA modes refuse windowed layers)."""
    import transformers

    families = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    if mistral:
        families["mistral"] = (transformers.MistralConfig, transformers.MistralForCausalLM)
    return families


def tiny_hf(family, tie=False):
    config_cls, model_cls = hf_families(mistral=True)[family]
    extra = {"sliding_window": None} if family == "mistral" else {}
    cfg = config_cls(vocab_size=HF_VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                     max_position_embeddings=128, tie_word_embeddings=tie, attn_implementation="sdpa", **extra)
    # built as from_pretrained(dtype=float64) builds it: float64 weights, float32 RoPE buffers
    m = model_cls._from_config(cfg, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)
    return m


def hf_dsa_families():
    import transformers

    return {
        "deepseek_v32": (transformers.DeepseekV32Config, transformers.DeepseekV32ForCausalLM),
        "glm_moe_dsa": (transformers.GlmMoeDsaConfig, transformers.GlmMoeDsaForCausalLM),
    }


def tiny_hf_dsa(family, index_topk=8, attn="sdpa", dtype=torch.float64, moe=True):
    """A tiny DeepSeek-V3.2 or GLM-5: MLA with a query latent, its own indexer (8 heads of 16,
    RoPE on 8 dims), a dense MLP then a MoE layer (``moe=False``: dense MLPs only; the router
    scores in float32 whatever the model's dtype); GLM-5's second layer shares the first one's
    top-k ("shared"). transformers' eager experts (its grouped_mm has no float64)."""
    config_cls, model_cls = hf_dsa_families()[family]
    extra = {"indexer_types": ["full", "shared"]} if family == "glm_moe_dsa" else {}
    cfg = config_cls(vocab_size=HF_VOCAB, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                     kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                     n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                     first_k_dense_replace=1 if moe else 2, index_topk=index_topk, index_head_dim=16, index_n_heads=8,
                     max_position_embeddings=256, attn_implementation=attn, experts_implementation="eager",
                     **extra)
    m = model_cls._from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)
    return m
