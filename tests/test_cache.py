"""Incremental decoding with DSA in the plain decoder (dsa_ext.nn.cache, dsa_ext.generation):
a cached run selects and computes what an uncached run over the whole sequence does (float64)."""
import pytest
import torch

from cache_checks import compare_steps, indexer_keys_of_full_forward
from dsa_ext import decoder, fp8, generation
from dsa_ext import nn as dnn
from models import VOCAB, dsa_cfg, small_decoder

TOPK = 8
PROMPT = 13  # longer than TOPK: selection is sparse from the first step


def dsa_decoder(mode="sparse", topk=TOPK, **kw):
    return decoder.convert(small_decoder(), dsa_cfg(topk=topk, mode=mode, **kw)).eval()


@pytest.mark.parametrize("fp8_topk", [False, True])
@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_cached_decoding_equals_uncached_forward_at_every_step(mode, fp8_topk):
    m = dsa_decoder(mode, fp8_topk=fp8_topk)
    prompt = torch.randint(0, VOCAB, (2, PROMPT))
    cache = dnn.KVCache()
    with torch.no_grad():
        seqs = compare_steps(lambda ids: m(ids, cache=cache), m, m, prompt, steps=32, sparse=mode == "sparse")
        assert cache.get_seq_length() == PROMPT + 32  # the last token was fed too
        assert torch.equal(seqs[:, :-1], generation.generate(m, prompt, 32))
        assert torch.equal(seqs[:, :-1], generation.generate(m, prompt, 32, use_cache=False))


@pytest.mark.parametrize("fp8_topk", [False, True])
def test_cache_after_prefill_holds_the_uncached_indexer_keys(fp8_topk):
    m = dsa_decoder(fp8_topk=fp8_topk)
    ids = torch.randint(0, VOCAB, (2, PROMPT))
    cache = dnn.KVCache()
    with torch.no_grad():
        m(ids, cache=cache)
        want = indexer_keys_of_full_forward(m, ids, m)
    for i, keys in enumerate(want):
        held = cache.layer(i).indexer_keys
        assert torch.equal(held, fp8.pack_keys(keys) if fp8_topk else keys)
        if fp8_topk:  # the packed row is the e4m3 values and the float32 scale
            k8, scale = fp8.quantize_rows(keys)
            assert held.dtype == torch.uint8 and held.shape[-1] == keys.shape[-1] + 4
            got8, got_scale = fp8.unpack_keys(held)
            assert torch.equal(got8.view(torch.uint8), k8.view(torch.uint8)) and torch.equal(got_scale, scale)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_chunked_prefill_equals_one_shot(mode):
    m = dsa_decoder(mode)
    ids = torch.randint(0, VOCAB, (2, 29))
    with torch.no_grad():
        one = dnn.KVCache()
        want = m(ids, cache=one)
        for chunk in (1, 4, 7, 16):
            cache = dnn.KVCache()
            got = torch.cat([m(part, cache=cache) for part in ids.split(chunk, dim=1)], dim=1)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
            for a, b in zip(cache.layers, one.layers):
                for name in ("keys", "values", "indexer_keys"):
                    torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12)
        prompt = ids[:, :PROMPT]
        assert torch.equal(generation.generate(m, prompt, 8, prefill_chunk=5), generation.generate(m, prompt, 8))


def test_topk_at_least_context_generates_as_dense():
    m = dsa_decoder(topk=64)
    prompt = torch.randint(0, VOCAB, (2, PROMPT))
    sparse = generation.generate(m, prompt, 40)  # context 53 <= 64: every row is dense
    dnn.set_mode(m, "dense")
    assert torch.equal(sparse, generation.generate(m, prompt, 40))
    with torch.no_grad():
        cache = dnn.KVCache()
        dense = m(sparse, cache=cache)
        dnn.set_mode(m, "sparse")
        torch.testing.assert_close(m(sparse, cache=dnn.KVCache()), dense, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["sparse", "warmup"])
def test_beam_search_cached_equals_uncached(mode):
    m = dsa_decoder(mode)
    prompt = torch.randint(0, VOCAB, (2, PROMPT))
    got = generation.generate(m, prompt, 20, num_beams=3)
    assert torch.equal(got, generation.generate(m, prompt, 20, num_beams=3, use_cache=False))
    assert got.shape == (2, PROMPT + 20)


def test_beam_search_two_steps_is_the_best_of_the_top_first_tokens():
    """Oracle: 3 beams for 2 tokens keep the 3 likeliest first tokens and return the likeliest
    (first, second) pair among them, scored here by uncached forwards."""
    m = dsa_decoder()
    prompt = torch.randint(0, VOCAB, (2, PROMPT))
    got = generation.generate(m, prompt, 2, num_beams=3)
    with torch.no_grad():
        for row in range(2):
            p = prompt[row:row + 1]
            first = torch.log_softmax(m(p)[0, -1], -1)
            top = first.topk(3).indices
            seqs = torch.cat((p.expand(3, -1), top[:, None]), 1)
            total = first[top][:, None] + torch.log_softmax(m(seqs)[:, -1], -1)
            best = int(total.flatten().argmax())
            assert got[row, PROMPT:].tolist() == [int(top[best // VOCAB]), best % VOCAB]


def test_sampling_cached_equals_uncached():
    m = dsa_decoder()
    prompt = torch.randint(0, VOCAB, (3, PROMPT))
    runs = [generation.generate(m, prompt, 24, do_sample=True, top_k=10, temperature=0.8,
                                generator=torch.Generator().manual_seed(7), use_cache=c) for c in (True, False)]
    assert torch.equal(*runs)
    assert not torch.equal(runs[0], generation.generate(m, prompt, 24))  # it did sample


def test_cache_batch_operations_keep_indexer_keys_aligned():
    m = dsa_decoder()
    ids = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        cache = dnn.KVCache()
        m(ids, cache=cache)
        cache.batch_select_indices(torch.tensor([2, 0]))  # rows 2 and 0
        cache.crop(-4)  # forget the last 4 tokens
        torch.testing.assert_close(m(ids[[2, 0], 16:], cache=cache), m(ids[[2, 0]])[:, 16:], rtol=0, atol=1e-10)
        cache.batch_repeat_interleave(2)
        cache.reorder_cache(torch.tensor([3, 0, 1, 2]))
        nxt = torch.randint(0, VOCAB, (4, 3))
        rows = ids[[2, 0]].repeat_interleave(2, 0)[[3, 0, 1, 2]]
        torch.testing.assert_close(m(nxt, cache=cache), m(torch.cat((rows, nxt), 1))[:, -3:], rtol=0, atol=1e-10)
        cache.crop(5)  # a non-negative length keeps that many tokens
        assert all(layer.length == layer.idx_length == 5 for layer in cache.layers)


def test_cache_filled_in_dense_mode_cannot_continue_sparse():
    m = dsa_decoder("dense")
    ids = torch.randint(0, VOCAB, (1, 12))
    cache = dnn.KVCache()
    with torch.no_grad():
        m(ids, cache=cache)
        dnn.set_mode(m, "sparse")
        with pytest.raises(RuntimeError, match="filled in mode 'dense'"):
            m(ids[:, :1], cache=cache)


def test_generate_rejects_bad_arguments():
    m = dsa_decoder()
    prompt = torch.randint(0, VOCAB, (1, 4))
    for kw, what in ((dict(max_new_tokens=-1), "max_new_tokens"), (dict(num_beams=0), "num_beams"),
                     (dict(num_beams=2, do_sample=True), "num_beams"), (dict(prefill_chunk=0), "prefill_chunk")):
        args = {"max_new_tokens": 2, **kw}
        with pytest.raises(ValueError, match=what):
            generation.generate(m, prompt, args.pop("max_new_tokens"), **args)
