"""What the cache tests of the plain decoder (test_cache.py) and of converted transformers models
(test_hf_cache.py) share: recording each DSA layer's top-k and indexer keys per call, and the
step-by-step comparison of cached decoding against uncached full forwards."""
import contextlib

import torch

from dsa_ext import nn as dnn


@contextlib.contextmanager
def record_selections(model):
    """Inside the block, every ``select`` of every DSA core appends its Selection to the list
    yielded, one list per core (in model order)."""
    cores = dnn.dsa_modules(model)
    calls = [[] for _ in cores]
    for core, seen in zip(cores, calls):
        def select(*args, _orig=core.select, _seen=seen, **kwargs):
            sel = _orig(*args, **kwargs)
            _seen.append(sel)
            return sel
        core.select = select
    try:
        yield calls
    finally:
        for core in cores:
            del core.select


def compare_steps(step_cached, full_forward, model, prompt, steps, sparse):
    """Greedy decoding two ways, compared at every step: ``step_cached(ids)`` feeds the new ids to
    the model with its cache and returns their logits [B, T, V]; ``full_forward(ids)`` runs the
    whole sequence uncached. The prompt goes through the cache in one call, then one token a step.
    Checks, at each step, logits within 1e-10, the same greedy token, and (sparse) the same top-k
    rows in every layer with an indexer. Returns the generated sequence."""
    seqs = prompt
    new = prompt
    for step in range(steps + 1):
        with record_selections(model) as cached_sel:
            cached = step_cached(new)
        with record_selections(model) as full_sel:
            full = full_forward(seqs)
        T = new.shape[1]
        torch.testing.assert_close(cached, full[:, -T:], rtol=0, atol=1e-10, msg=f"step {step}: logits")
        for layer, (core, c, f) in enumerate(zip(dnn.dsa_modules(model), cached_sel, full_sel)):
            # one selection per core with an indexer; GLM-5's shared layers attend over another's
            calls = int(core.indexer is not None)
            assert len(c) == len(f) == calls, f"step {step}, layer {layer}: selections {len(c)}, {len(f)}"
            if not calls:
                continue
            if sparse:
                assert torch.equal(c[0].indices, f[0].indices[:, -T:]), f"step {step}, layer {layer}: top-k"
            else:
                assert c[0].indices is None and f[0].indices is None
        token = cached[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(token, full[:, -1].argmax(-1, keepdim=True))
        seqs = torch.cat((seqs, token), dim=1)
        new = token
    return seqs


def indexer_keys_of_full_forward(model, ids, forward):
    """The indexer keys [B, S, Di] each DSA layer computes in one uncached forward of ``ids``."""
    with record_selections(model) as sels:
        forward(ids)
    return [s[0].k_idx for s in sels]


def hf_generate(m, prompt, n, **kw):
    """A transformers model's ``generate`` of exactly n tokens (no end-of-sequence token), greedy
    unless kw say otherwise."""
    m.generation_config.eos_token_id = None
    kw = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": n, "do_sample": False, "pad_token_id": 0, **kw}
    with torch.no_grad():
        return m.generate(prompt, **kw)


def check_left_padded_rows(m, vocab, prompt_len, pad, n):
    """A batch of two prompts, row 0 left-padded by ``pad`` tokens, generates in each row what
    that row's prompt generates alone (the padding outside every query's key range)."""
    prompt = torch.randint(1, vocab, (2, prompt_len))
    mask = torch.ones_like(prompt)
    mask[0, :pad] = 0
    prompt[0, :pad] = 0
    both = hf_generate(m, prompt, n, attention_mask=mask)
    for row, skip in ((0, pad), (1, 0)):
        alone = hf_generate(m, prompt[row:row + 1, skip:], n)
        assert torch.equal(both[row, -n:], alone[0, -n:]), f"row {row}"
