"""dsa_ext.hf: transformers Llama/Qwen2/Qwen3 models converted to DSA: equivalence at topk >= T,
sparse mode against a hand computation, save/load round trips, training invariants, refusals."""
import pytest
import torch

from dsa_ext import nn as dnn
from dsa_ext import reference
from models import dsa_cfg, hf_families, tiny_hf

transformers = pytest.importorskip("transformers")
from dsa_ext import hf  # noqa: E402

FAMILIES = sorted(hf_families())


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_conversion_equivalent_at_k_ge_T(family):
    m = tiny_hf(family)
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        want = m(ids).logits
        hf.convert(m, dsa_cfg(topk=19, mode="dense"))
        assert m.config._attn_implementation == hf.ATTN_NAME
        assert len(dnn.dsa_modules(m)) == 2
        torch.testing.assert_close(m(ids).logits, want, rtol=0, atol=0)
        for mode in ("warmup", "sparse"):
            dnn.set_mode(m, mode)
            torch.testing.assert_close(m(ids).logits, want)
        for c in dnn.dsa_modules(m):
            c.topk = 5
        assert not torch.allclose(m(ids).logits, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hf_sparse_matches_the_decoder_semantics(family):
    """Sparse mode inside the HF model is the DSA core on the model's own q, k, v: check one
    layer's output against sparse_attention over the indexer's top-k, computed by hand."""
    m = hf.convert(tiny_hf(family), dsa_cfg(topk=4, mode="sparse"))
    attn = m.model.layers[0].self_attn
    seen = {}

    def grab(module, args, kwargs, output):
        seen["out"] = output[0]

    def grab_in(module, args, kwargs):
        seen["x"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["pe"] = kwargs["position_embeddings"]

    attn.register_forward_pre_hook(grab_in, with_kwargs=True)
    attn.register_forward_hook(grab, with_kwargs=True)
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        m(ids)
        x, (cos, sin) = seen["x"], seen["pe"]
        shape = (1, 11, -1, 12)
        q = attn.q_proj(x).view(shape)
        k = attn.k_proj(x).view(shape)
        if family == "qwen3":
            q, k = attn.q_norm(q), attn.k_norm(k)
        rot = lambda t: t * cos[:, :, None] + torch.cat((-t[..., 6:], t[..., :6]), -1) * sin[:, :, None]
        q, k = rot(q), rot(k)
        v = attn.v_proj(x).view(shape)
        indices = reference.indexer_topk(*attn.dsa.indexer(x, torch.arange(11)), 4)
        out = reference.sparse_attention(q, k, v, indices, 12 ** -0.5)
        torch.testing.assert_close(seen["out"], attn.o_proj(out.reshape(1, 11, -1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_save_load_round_trip(family, tmp_path):
    m = tiny_hf(family, tie=family == "qwen3")
    ids = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        dense = m(ids).logits
    hf.convert(m, dsa_cfg(topk=5, mode="warmup", hadamard=True))
    dnn.set_mode(m, "sparse")  # the saved config records the mode the layers are in now
    with torch.no_grad():
        for p in dnn.indexer_parameters(m):  # indexer weights that differ from a fresh init
            p.add_(0.1 * torch.randn_like(p))
        want = m(ids).logits
    hf.save_pretrained(m, str(tmp_path))
    assert (tmp_path / hf.INDEXER_FILE).exists() and (tmp_path / hf.CONFIG_FILE).exists()
    loaded = hf.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    assert loaded.dsa_config.mode == "sparse" and loaded.dsa_config.hadamard
    assert all(c.mode == "sparse" and c.topk == 5 for c in dnn.dsa_modules(loaded))
    saved = m.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())  # bit for bit
    # transformers memory-maps the loaded weights at unaligned offsets, which sends BLAS down
    # other code paths: the same weights give logits that differ in the last bits
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-12, atol=1e-13)
    # the same directory is an ordinary dense checkpoint for plain transformers
    plain = hf_families()[family][1].from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    assert not dnn.dsa_modules(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, dense, rtol=1e-12, atol=1e-13)


def test_hf_from_dense_checkpoint_gets_fresh_indexers(tmp_path):
    m = tiny_hf("llama")
    m.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 97, (1, 9))
    loaded = hf.from_pretrained(str(tmp_path), config=dsa_cfg(topk=9), dtype=torch.float64).eval()
    assert len(dnn.dsa_modules(loaded)) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, m(ids).logits)


def test_hf_refusals():
    m = hf.convert(tiny_hf("llama"), dsa_cfg(topk=4, mode="sparse"))  # padding: tests/test_packed_hf.py
    with pytest.raises(ValueError, match="already"):
        hf.convert(m, dsa_cfg())
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(ValueError, match="tested"):
        hf.convert(gpt2, dsa_cfg())


def test_hf_checkpoint_of_the_earlier_indexer_convention_is_converted(tmp_path):
    """dsa_config.json without indexer_version was written before the indexer matched DeepSeek's
    score: its weights load converted (weights_proj x Hi**-0.5, LayerNorm eps 1e-5)."""
    import json

    m = hf.convert(tiny_hf("llama"), dsa_cfg(topk=5))
    hf.save_pretrained(m, str(tmp_path))
    cfg_path = tmp_path / hf.CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    assert cfg.pop("indexer_version") == 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="earlier indexer convention"):
        loaded = hf.from_pretrained(str(tmp_path), dtype=torch.float64)
    for a, b in zip(dnn.dsa_modules(m), dnn.dsa_modules(loaded)):
        torch.testing.assert_close(b.indexer.weights_proj.weight, a.indexer.weights_proj.weight * 3 ** -0.5,
                                   rtol=0, atol=0)
        assert b.indexer.k_norm.eps == 1e-5
