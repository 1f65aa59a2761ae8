"""Converted transformers models (Llama, Qwen2, Qwen3, Mistral) generate in DSA modes through
transformers' own caches: the indexer keys ride in each layer's cache beside K and V, and a
cached run selects and computes what an uncached run over the whole sequence does (float64)."""
import copy

import pytest
import torch

from cache_checks import check_left_padded_rows, compare_steps, hf_generate as gen, indexer_keys_of_full_forward
from dsa_ext import fp8
from dsa_ext import nn as dnn
from models import HF_VOCAB, dsa_cfg, hf_families, tiny_hf

transformers = pytest.importorskip("transformers")
from dsa_ext import hf  # noqa: E402

FAMILIES = sorted(hf_families(mistral=True))
TOPK = 8
PROMPT = 13  # longer than TOPK


def converted(family="llama", mode="sparse", topk=TOPK, **kw):
    return hf.convert(tiny_hf(family), dsa_cfg(topk=topk, mode=mode, **kw))


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_equals_uncached_forward_at_every_step(family, mode):
    m = converted(family, mode)
    prompt = torch.randint(0, HF_VOCAB, (2, PROMPT))
    cache = transformers.DynamicCache(config=m.config)
    with torch.no_grad():
        seqs = compare_steps(lambda ids: m(ids, cache=cache, use_cache=True).logits,
                             lambda ids: m(ids, use_cache=False).logits, m, prompt, 32, mode == "sparse")
    assert all(type(layer).__name__ == "DynamicIndexedLayer" for layer in cache.layers)
    assert torch.equal(gen(m, prompt, 32), seqs[:, :-1])
    assert torch.equal(gen(m, prompt, 32, use_cache=False), seqs[:, :-1])


@pytest.mark.parametrize("fp8_topk", [False, True])
def test_cache_after_prefill_holds_the_uncached_indexer_keys(fp8_topk):
    m = converted(fp8_topk=fp8_topk)
    ids = torch.randint(0, HF_VOCAB, (2, PROMPT))
    cache = transformers.DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids, cache=cache, use_cache=True)
        want = indexer_keys_of_full_forward(m, ids, lambda x: m(x, use_cache=False))
    for layer, keys in zip(cache.layers, want):
        assert torch.equal(layer.indexer_keys, fp8.pack_keys(keys) if fp8_topk else keys)


@pytest.mark.parametrize("fp8_topk", [False, True])
def test_fp8_and_static_cache_generate_as_uncached(fp8_topk):
    m = converted("qwen3", fp8_topk=fp8_topk)
    prompt = torch.randint(0, HF_VOCAB, (2, PROMPT))
    want = gen(m, prompt, 32, use_cache=False)
    assert torch.equal(gen(m, prompt, 32), want)
    assert torch.equal(gen(m, prompt, 32, cache_implementation="static"), want)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_chunked_prefill_equals_one_shot(mode):
    m = converted("qwen2", mode)
    ids = torch.randint(0, HF_VOCAB, (2, 29))
    with torch.no_grad():
        one = transformers.DynamicCache(config=m.config)
        want = m(ids, cache=one, use_cache=True).logits
        for chunk in (1, 5, 16):
            cache = transformers.DynamicCache(config=m.config)
            got = torch.cat([m(part, cache=cache, use_cache=True).logits for part in ids.split(chunk, dim=1)], 1)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
            for a, b in zip(cache.layers, one.layers):
                torch.testing.assert_close(a.indexer_keys, b.indexer_keys, rtol=0, atol=1e-12)
    prompt = ids[:, :PROMPT + 10]
    assert torch.equal(gen(m, prompt, 12, prefill_chunk_size=4), gen(m, prompt, 12))


def test_topk_at_least_context_generates_as_dense():
    ref = tiny_hf("llama")
    m = hf.convert(copy.deepcopy(ref), dsa_cfg(topk=64))
    prompt = torch.randint(0, HF_VOCAB, (2, PROMPT))
    want = gen(ref, prompt, 40)  # context <= 53 < 64: every row is dense
    assert torch.equal(gen(m, prompt, 40), want)
    dnn.set_mode(m, "dense")
    assert torch.equal(gen(m, prompt, 40), want)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_beam_search_cached_equals_uncached(family):
    m = converted(family)
    prompt = torch.randint(0, HF_VOCAB, (2, PROMPT))
    kw = dict(num_beams=3, num_return_sequences=2, early_stopping=False, length_penalty=0.0)
    got = gen(m, prompt, 16, **kw)
    assert got.shape == (4, PROMPT + 16)
    assert torch.equal(got, gen(m, prompt, 16, use_cache=False, **kw))


def test_sampling_cached_equals_uncached():
    m = converted("qwen3")
    prompt = torch.randint(0, HF_VOCAB, (3, PROMPT))
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        runs.append(gen(m, prompt, 24, do_sample=True, top_k=10, temperature=0.8, use_cache=use_cache))
    assert torch.equal(*runs)
    assert not torch.equal(runs[0], gen(m, prompt, 24))  # it did sample


def test_cache_crop_and_batch_select_keep_indexer_keys_aligned():
    m = converted()
    ids = torch.randint(0, HF_VOCAB, (3, 20))
    with torch.no_grad():
        cache = transformers.DynamicCache(config=m.config)
        m(ids, cache=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor([2, 0]))
        cache.crop(-4)
        assert all(layer.indexer_keys.shape[:2] == (2, 16) for layer in cache.layers)
        got = m(ids[[2, 0], 16:], cache=cache, use_cache=True).logits
        torch.testing.assert_close(got, m(ids[[2, 0]], use_cache=False).logits[:, 16:], rtol=0, atol=1e-10)


def test_cache_filled_in_dense_mode_cannot_continue_sparse():
    m = converted(mode="dense")
    ids = torch.randint(0, HF_VOCAB, (1, 12))
    cache = transformers.DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids, cache=cache, use_cache=True)
        dnn.set_mode(m, "sparse")
        with pytest.raises(RuntimeError, match="filled in mode 'dense'"):
            m(ids[:, :1], cache=cache, use_cache=True)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_left_padded_batch_generates_as_its_rows_alone(mode):
    """Left padding in cached generation: the padding is outside every query's key range (the
    indexer's top-k, the sparse attention), so each row generates what it generates alone."""
    check_left_padded_rows(converted(mode=mode), HF_VOCAB, PROMPT, 4, 12)
