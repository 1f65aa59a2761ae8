"""dsa_ext.decoder: the plain reference decoder and its conversion to DSA (equivalence at
topk >= T in every mode, weights kept, state-dict round trip, bfloat16 training step)."""
import pytest
import torch

from dsa_ext import decoder
from dsa_ext import nn as dnn
from models import dsa_cfg, small_decoder


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_conversion_equivalent_at_k_ge_T(n_kv_heads, dtype):
    m = small_decoder(dtype, n_kv_heads).eval()
    ids = torch.randint(0, 61, (2, 17))
    with torch.no_grad():
        want = m(ids)
        decoder.convert(m, dsa_cfg(topk=17, mode="dense"))
        torch.testing.assert_close(m(ids), want, rtol=0, atol=0)
        for mode in ("warmup", "sparse"):
            dnn.set_mode(m, mode)
            tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
            torch.testing.assert_close(m(ids), want, **tol)
        for c in dnn.dsa_modules(m):
            c.topk = 4
        assert not torch.allclose(m(ids), want, rtol=1e-3, atol=1e-3)


def test_decoder_conversion_keeps_weights_and_round_trips(tmp_path):
    m = small_decoder()
    host = {k: v.clone() for k, v in m.state_dict().items()}
    decoder.convert(m, dsa_cfg(topk=4))
    state = m.state_dict()
    assert all(torch.equal(state[k], v) for k, v in host.items())
    assert any(".indexer." in k for k in state)
    torch.save(state, tmp_path / "m.pt")
    fresh = decoder.convert(small_decoder(), dsa_cfg(topk=4))
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    ids = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids), m.eval()(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already"):
        decoder.convert(m, dsa_cfg())
    with pytest.raises(TypeError):
        decoder.convert(torch.nn.Linear(2, 2), dsa_cfg())


def test_bfloat16_sparse_forward_backward():
    m = decoder.convert(small_decoder(torch.bfloat16), dsa_cfg(topk=6))
    ids = torch.randint(0, 61, (2, 20))
    logits = m(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
