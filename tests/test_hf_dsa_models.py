"""dsa_ext.hf on transformers' own DSA models, DeepSeek-V3.2 and GLM-5 (dsa_ext.hf_mla): in
sparse mode the converted model is the unconverted one (logits, host gradients, the selected
keys), its indexer scores as transformers' and DeepSeek's formulas, the modes, loss, recall and
training helpers work as for the other families, checkpoints round-trip under transformers'
names, every mode generates with a DynamicCache as an uncached forward does, and what is not
supported is refused."""
import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from cache_checks import check_left_padded_rows, compare_steps, hf_generate as generate
from dsa_ext import nn as dnn
from dsa_ext import reference
from indexer_formulas import deepseek_scores
from models import HF_VOCAB, dsa_cfg, hf_dsa_families, tiny_hf, tiny_hf_dsa

transformers = pytest.importorskip("transformers")
from dsa_ext import hf, hf_mla  # noqa: E402

FAMILIES = ["deepseek_v32", "glm_moe_dsa"]
TOPK = 8


def indexer_taps(model):
    """Records every indexer call of a forward: (args, output, selection) per full layer."""
    taps = []

    def tap(module, args, output):
        taps.append((args, output, getattr(module, "selection", None)))

    for m in model.modules():
        if getattr(m, "indexer", None) is not None and hasattr(m, "kv_b_proj"):
            m.indexer.register_forward_hook(tap)
    return taps


def host_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if ".indexer." not in n}


def assert_robust_selection(logits, topk):
    """Every row that sees more than topk keys has a gap between its topk-th and (topk+1)-th
    score far above float32 rounding (transformers scores in float32): both sides must then
    select the same keys."""
    if logits.shape[-1] <= topk:
        return
    top = logits.topk(topk + 1, dim=-1).values
    gap = (top[..., topk - 1] - top[..., topk])[torch.isfinite(top[..., topk])]
    assert gap.min() > 1e-4 * logits[torch.isfinite(logits)].abs().max(), gap.min()


def assert_same_keys(hf_top, ours):
    """transformers' top-k (which fills short rows with masked keys) and ours (-1 padded) name
    the same visible keys in every row."""
    T = hf_top.shape[1]
    visible = hf_top <= torch.arange(T)[None, :, None]
    for b in range(hf_top.shape[0]):
        for t in range(T):
            assert sorted(hf_top[b, t][visible[b, t]].tolist()) == sorted(ours[b, t][ours[b, t] >= 0].tolist())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("T", [6, 21])  # below and above index_topk
def test_sparse_mode_is_the_unconverted_model(family, T):
    """Logits and host gradients of the converted model (sparse mode, training: the KL loss rides
    on the outputs) equal transformers' to 1e-10, both selecting the same keys. Reference:
    transformers' sdpa path, float64 throughout; its eager path runs the softmax in float32
    (eager_attention_forward), so it agrees to float32 rounding only."""
    ref = tiny_hf_dsa(family, TOPK).train()
    m = hf.convert(copy.deepcopy(ref)).train()
    assert m.dsa_config.topk == TOPK and m.config._attn_implementation == hf_mla.ATTN_NAME
    ref_taps, taps = indexer_taps(ref), indexer_taps(m)
    ids = torch.randint(0, HF_VOCAB, (2, T))
    want, got = ref(ids).logits, m(ids).logits
    assert len(taps) == len(ref_taps) == (1 if family == "glm_moe_dsa" else 2)
    for (_, hf_top, _), (_, ours, sel) in zip(ref_taps, taps):
        scale = m.dsa_config.head_dim ** -0.5
        assert_robust_selection(reference.indexer_logits(sel.q_idx, sel.k_idx, sel.w, scale), TOPK)
        assert_same_keys(hf_top, ours)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    g = torch.randn_like(want)
    (want * g).sum().backward()
    (got * g).sum().backward()
    ours, theirs = host_grads(m), host_grads(ref)
    assert ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-10, atol=1e-10, msg=name)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dnn.indexer_parameters(m))
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, got, rtol=0, atol=1e-5)


def transformers_scores(family, idx, x, q_resid, cos, sin):
    """transformers' indexer score (DeepseekV32Indexer / GlmMoeDsaIndexer.forward) line by line
    on the same weights, with its own RoPE function, in float64 (its float32 casts left out)."""
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    rope_fn = mod.apply_rotary_pos_emb_interleave if family == "glm_moe_dsa" else mod.apply_rotary_pos_emb
    B, S, _ = x.shape
    Hi, Di, r = idx.n_heads, idx.head_dim, idx.rope_dim
    q = F.linear(q_resid, idx.wq.weight).view(B, S, Hi, Di)
    q_rot, q_pass = torch.split(q, [r, Di - r], dim=-1)
    k = idx.k_norm(F.linear(x, idx.wk.weight)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [r, Di - r], dim=-1)
    q_rot, k_rot = rope_fn(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q, k = torch.cat([q_rot, q_pass], dim=-1), torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    scores = F.relu(torch.matmul(q, k.transpose(-1, -2).unsqueeze(1)) * Di ** -0.5)
    weights = F.linear(x, idx.weights_proj.weight) * Hi ** -0.5
    index = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)
    return index.masked_fill(~reference.causal_mask(S, S), -math.inf)


@pytest.mark.parametrize("family", FAMILIES)
def test_indexer_scores_as_transformers_and_deepseek(family):
    """The converted indexer's score equals transformers' formula and DeepSeek's (with the
    model's RoPE angles; GLM-5: the interleaved pairs of DeepSeek's code before its fix), 1e-12."""
    m = hf.convert(tiny_hf_dsa(family, TOPK))
    taps = indexer_taps(m)
    with torch.no_grad():
        m(torch.randint(0, HF_VOCAB, (2, 17)))
        for (args, _, sel), idx in zip(taps, [c.indexer for c in dnn.dsa_modules(m) if c.indexer is not None]):
            x, q_resid, (cos, sin) = args[:3]
            got = reference.indexer_logits(sel.q_idx, sel.k_idx, sel.w, idx.scale)
            half = idx.rope_dim // 2
            want_ds = deepseek_scores(idx, x, q_resid, tables=(cos[..., :half], sin[..., :half]),
                                      interleaved=family == "glm_moe_dsa")
            for want in (transformers_scores(family, idx, x, q_resid, cos, sin), want_ds):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_modes_loss_recall_and_training_helpers(family):
    """dense mode is transformers' model with every key selected (1e-10); warm-up attends densely
    and trains only the indexers (frozen host); recall and the optimizer groups find every
    layer's core and exactly the model's own indexer weights."""
    T = 13
    dense_ref = tiny_hf_dsa(family, index_topk=T)
    m = hf.convert(copy.deepcopy(dense_ref), dnn.DSAConfig(topk=4, mode="dense"))
    cores = dnn.dsa_modules(m)
    assert len(cores) == 2 and [c.indexer is None for c in cores] == [False, family == "glm_moe_dsa"]
    own = [p for n, p in m.named_parameters() if ".dsa.indexer." in n]
    assert {id(p) for p in dnn.indexer_parameters(m)} == {id(p) for p in own}
    assert len(own) == 5 * (1 if family == "glm_moe_dsa" else 2)  # wq_b, wk, k_norm (2), weights_proj
    groups = {g["name"]: g["params"] for g in dnn.param_groups(m, 1e-3, 1e-2)}
    assert {id(p) for p in groups["indexer"]} == {id(p) for p in own}
    ids = torch.randint(0, HF_VOCAB, (2, T))
    with torch.no_grad():
        want = dense_ref(ids).logits
        torch.testing.assert_close(m(ids).logits, want, rtol=0, atol=1e-10)
        with dnn.recall_stats(m) as stats:
            m(ids)
    r = stats.result()
    assert len(r["all"]) == 2 and all(0 < x <= y + 1e-12 <= 1 + 1e-12 for x, y in zip(r["all"], r["oracle"]))

    dnn.set_mode(m, "warmup")
    trainable = dnn.freeze_for_warmup(m.train())
    assert {id(p) for p in trainable} == {id(p) for p in own}
    out = m(ids).logits
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    out.sum().backward()
    assert dnn.indexer_loss(m) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)

    dnn.unfreeze(m)
    dnn.set_mode(m, "sparse")
    m.zero_grad()
    m(ids).logits.sum().backward()
    assert all(c.last_loss is not None for c in cores if c.indexer is not None)
    assert all(p.grad.abs().sum() > 0 for p in own)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    """The converted model saves as an ordinary checkpoint of its family with the indexer weights
    under transformers' names and index_topk = the layers' top-k; hf.from_pretrained gives the
    same model back, plain from_pretrained the same weights; an unconverted checkpoint loads
    converted with its own indexer weights (no fresh indexer)."""
    m = hf.convert(tiny_hf_dsa(family, TOPK), dnn.DSAConfig(mode="warmup", hadamard=True))
    dnn.set_mode(m, "sparse")
    for c in dnn.dsa_modules(m):
        c.topk = 5
    with torch.no_grad():
        for p in dnn.indexer_parameters(m):
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, HF_VOCAB, (2, 15))
    with torch.no_grad():
        want = m(ids).logits
    hf.save_pretrained(m, str(tmp_path / "dsa"))
    assert not (tmp_path / "dsa" / hf.INDEXER_FILE).exists()
    loaded = hf.from_pretrained(str(tmp_path / "dsa"), dtype=torch.float64, experts_implementation="eager").eval()
    assert all(c.mode == "sparse" and c.topk == 5 for c in dnn.dsa_modules(loaded)) and loaded.dsa_config.hadamard
    saved = m.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-12, atol=1e-13)

    plain = hf_dsa_families()[family][1].from_pretrained(str(tmp_path / "dsa"), dtype=torch.float64)
    assert plain.config.index_topk == 5
    theirs = plain.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in hf_mla.checkpoint_state_dict(saved).items())
    plain.save_pretrained(str(tmp_path / "plain"))  # an unconverted checkpoint of the family
    again = hf.from_pretrained(str(tmp_path / "plain"), dtype=torch.float64, experts_implementation="eager").eval()
    assert again.dsa_config.topk == 5 and again.dsa_config.mode == "sparse"
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_mode_generates_with_a_cache(family):
    """Greedy generate() in dense mode (KV cache) gives transformers' tokens with every key selected."""
    ref = tiny_hf_dsa(family, index_topk=64)
    m = hf.convert(copy.deepcopy(ref), dnn.DSAConfig(topk=4, mode="dense"))
    prompt = torch.randint(0, HF_VOCAB, (2, 7))
    assert torch.equal(generate(m, prompt, 6), generate(ref, prompt, 6))


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_uncached_forward_at_every_step(family, mode):
    """Modes sparse and warm-up decode through the model's own DynamicCache (the indexer keys in
    its DynamicIndexedLayers, the latents of the cached keys through kv_b_proj): at every step
    the top-k of every layer with an indexer and the logits (1e-10) of an uncached forward over
    the whole sequence, and generate() gives the uncached tokens. No MoE layer: transformers'
    router scores in float32, whose rounding depends on the rows per call."""
    m = hf.convert(tiny_hf_dsa(family, index_topk=64, moe=False), dnn.DSAConfig(topk=4, mode=mode)).eval()
    prompt = torch.randint(0, HF_VOCAB, (2, 7))
    cache = transformers.DynamicCache(config=m.config)
    with torch.no_grad():
        seqs = compare_steps(lambda ids: m(ids, cache=cache, use_cache=True).logits,
                             lambda ids: m(ids, use_cache=False).logits, m, prompt, 16, mode == "sparse")
    assert torch.equal(generate(m, prompt, 16), seqs[:, :-1])
    assert torch.equal(generate(m, prompt, 16, use_cache=False), seqs[:, :-1])
    own = [layer for layer, core in zip(cache.layers, dnn.dsa_modules(m)) if core.indexer is not None]
    assert own and all(layer.indexer_keys.shape[1] == seqs.shape[1] - 1 for layer in own)


def test_left_padded_batch_generates_as_its_rows_alone():
    """Left padding in cached sparse generation: each row generates what it generates alone."""
    m = hf.convert(tiny_hf_dsa("deepseek_v32", index_topk=64, moe=False), dnn.DSAConfig(topk=4)).eval()
    check_left_padded_rows(m, HF_VOCAB, 9, 3, 10)


def test_what_the_cache_cannot_do_is_refused():
    """A static cache in warm-up/sparse mode, and a cache filled in dense mode (no indexer keys)
    continued in sparse mode: clear errors."""
    m = hf.convert(tiny_hf_dsa("deepseek_v32", index_topk=64, moe=False), dnn.DSAConfig(topk=4)).eval()
    prompt = torch.randint(0, HF_VOCAB, (1, 7))
    with pytest.raises(NotImplementedError, match="static cache"):
        generate(m, prompt, 3, cache_implementation="static")
    assert all(a._dsa_latent is None for a in hf_mla._attention_modules(m)), "a refused call holds its latent"
    cache = transformers.DynamicCache(config=m.config)
    dnn.set_mode(m, "dense")
    with torch.no_grad():
        m(prompt, cache=cache, use_cache=True)
    dnn.set_mode(m, "sparse")
    with torch.no_grad(), pytest.raises(RuntimeError, match="cannot continue"):
        m(prompt[:, :1], cache=cache, use_cache=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_mode_with_padding_is_the_unconverted_model(family):
    """(Padding in every mode: tests/test_packed_hf.py.)"""
    ref = tiny_hf_dsa(family, index_topk=64)
    m = hf.convert(copy.deepcopy(ref), dnn.DSAConfig(topk=4, mode="dense"))
    ids = torch.randint(0, HF_VOCAB, (2, 9))
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(m(ids, attention_mask=padding).logits[:, 3:],
                                   ref(ids, attention_mask=padding).logits[:, 3:], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="already"):
        hf.convert(m)


@pytest.mark.parametrize("family", FAMILIES + ["llama"])
def test_trains_under_bf16_autocast(family):
    """Under autocast the host's RoPE leaves q and k in float32 beside bfloat16 values and indexer
    outputs: warm-up and sparse steps run in the autocast dtype and train the indexers."""
    m = tiny_hf(family).float() if family == "llama" else tiny_hf_dsa(family, TOPK, dtype=torch.float32)
    hf.convert(m, dsa_cfg(topk=TOPK) if family == "llama" else None).train()
    ids = torch.randint(0, HF_VOCAB, (2, 21))
    for mode in ("warmup", "sparse"):
        dnn.set_mode(m, mode)
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(ids).logits
        logits.float().sum().backward()
        assert torch.isfinite(logits).all() and dnn.indexer_loss(m) > 0
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in dnn.indexer_parameters(m))
