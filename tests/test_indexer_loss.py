"""The indexer's KL loss rides on the attention outputs' autograd graph (DSAAttention +
AttachIndexerLoss): backpropagating the LM loss trains the indexers on coeff x their KL and the
host model on the LM loss alone; activation checkpointing (torch.utils.checkpoint, reentrant and
not; transformers' gradient_checkpointing_enable) gives the same gradients; only the forward that
backward runs through counts; the logged value and the loss scale. Warm-up freezing and the
optimizer groups. All float64, gradients to 1e-12."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import dsa_ext
from dsa_ext import decoder, reference
from dsa_ext import nn as dnn
from models import HF_VOCAB, VOCAB, dsa_cfg, host_params, indexer_grads, small_decoder, tiny_hf

COEFF = 0.7
KINDS = ["decoder", "llama"]
TOL = dict(rtol=1e-10, atol=1e-12)


def build(kind, mode, coeff=COEFF, topk=5):
    """A converted model in training mode, and its vocabulary size."""
    cfg = dsa_cfg(topk=topk, mode=mode, loss_coeff=coeff)
    if kind == "decoder":
        return decoder.convert(small_decoder(), cfg).train(), VOCAB
    from dsa_ext import hf

    return hf.convert(tiny_hf(kind), cfg).train(), HF_VOCAB


def lm_loss(model, ids):
    out = model(ids[:, :-1])
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


class Checkpointed(torch.nn.Module):
    """A decoder block under torch.utils.checkpoint."""

    def __init__(self, block, reentrant):
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x, positions, *rest):  # rest: the block's key ranges and cache
        return checkpoint(self.block, x, positions, *rest, use_reentrant=self.reentrant)


def enable_checkpointing(model, reentrant):
    if isinstance(model, decoder.Decoder):
        model.blocks = torch.nn.ModuleList(Checkpointed(b, reentrant) for b in model.blocks)
        if reentrant:  # reentrant checkpoints need an input that requires grad (frozen warm-up)
            model.embed.register_forward_hook(lambda mod, args, out: out.requires_grad_(True))
    else:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()


def kl_by_hand(model, run):
    """sum over layers of mean_t KL, recomputed by the reference from the inputs each DSA core
    received during run() (the indexer re-run on them, differentiable in its parameters)."""
    calls = []
    sig = inspect.signature(dnn.DSAAttention.forward)

    def grab(core, args, kwargs):
        bound = sig.bind(core, *args, **kwargs)
        bound.apply_defaults()
        calls.append((core, bound.arguments))

    handles = [c.register_forward_pre_hook(grab, with_kwargs=True) for c in dnn.dsa_modules(model)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    total = 0
    for core, a in calls:
        q_idx, k_idx, w = core.indexer(a["hidden_states"], a["positions"])
        scale = a["scale"] if a["scale"] is not None else a["q"].shape[-1] ** -0.5
        indices = None
        if core.mode == "sparse":
            indices = reference.indexer_topk(q_idx.detach(), k_idx.detach(), w.detach(), core.topk,
                                             core.indexer.scale)
        total = total + reference.indexer_kl_loss(q_idx, k_idx, w, a["q"].detach(), a["k"].detach(), indices,
                                                  core.indexer.scale, scale).mean()
    return total


def all_grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_grads_equal(got, want, **tol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, **(tol or TOL))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["warmup", "sparse"])
def test_lm_backward_trains_the_indexer_on_its_kl_only(kind, mode):
    model, vocab = build(kind, mode)
    if mode == "warmup":
        dnn.freeze_for_warmup(model)
    ids = torch.randint(0, vocab, (2, 16))
    lm_loss(model, ids).backward()
    # the indexers: exactly COEFF x the gradient of the KL, recomputed independently
    kl = kl_by_hand(model, lambda: lm_loss(model, ids))
    want = torch.autograd.grad(COEFF * kl, list(dnn.indexer_parameters(model)))
    for g, w in zip(indexer_grads(model), want):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, w, **TOL)
    # the host: exactly the LM gradient, as without any indexer loss (coefficient 0)
    plain, _ = build(kind, mode, coeff=0.0)
    plain.load_state_dict(model.state_dict())
    if mode == "warmup":
        dnn.freeze_for_warmup(plain)
    lm_loss(plain, ids).backward()
    for (name, p), (_, q) in zip(host_params(model), host_params(plain)):
        if mode == "warmup":
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["warmup", "sparse"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_gives_the_same_gradients(kind, mode, reentrant):
    """Two training steps, with and without checkpointing: the same parameter gradients at each
    step. Module-state losses fail here: reentrant checkpoints lose the loss (the first forward
    runs without grad), non-reentrant ones count the recomputed forward's loss in the next step."""
    ref, vocab = build(kind, mode)
    ckpt = copy.deepcopy(ref)
    enable_checkpointing(ckpt, reentrant)
    for m in (ref, ckpt):
        if mode == "warmup":
            dnn.freeze_for_warmup(m)
    for step in range(2):
        ids = torch.randint(0, vocab, (2, 14))
        got = []
        for m in (ref, ckpt):
            m.zero_grad(set_to_none=True)
            lm_loss(m, ids).backward()
            got.append((all_grads(m), dnn.indexer_loss(m)))
        assert_grads_equal(got[1][0], got[0][0])
        torch.testing.assert_close(got[1][1], got[0][1], **TOL)
        assert all(g is not None and g.abs().sum() > 0 for g in indexer_grads(ckpt)), step


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_forward_backward_runs_through_counts(kind):
    """Forward A, forward B, backward of A alone: the gradients of forward A + backward alone."""
    model, vocab = build(kind, "sparse")
    a, b = (torch.randint(0, vocab, (2, 13)) for _ in range(2))
    loss_a = lm_loss(model, a)
    lm_loss(model, b)
    loss_a.backward()
    got = all_grads(model)
    model.zero_grad(set_to_none=True)
    lm_loss(model, a).backward()
    assert_grads_equal(got, all_grads(model), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_logged_value(kind):
    model, vocab = build(kind, "warmup")
    assert dnn.indexer_loss(model) == 0  # no training forward yet
    ids = torch.randint(0, vocab, (2, 12))
    kl = kl_by_hand(model, lambda: lm_loss(model, ids))
    logged = dnn.indexer_loss(model)
    assert logged.grad_fn is None
    torch.testing.assert_close(logged, kl.detach(), **TOL)
    torch.testing.assert_close(logged, sum(c.last_loss for c in dnn.dsa_modules(model)), rtol=0, atol=0)
    with torch.no_grad():  # no loss without grad or in eval: the logged value stays
        lm_loss(model, torch.randint(0, vocab, (2, 12)))
        lm_loss(model.eval(), torch.randint(0, vocab, (2, 12)))
    assert torch.equal(dnn.indexer_loss(model), logged)


def test_loss_scale_scales_the_injected_gradient():
    model, vocab = build("decoder", "sparse")
    ids = torch.randint(0, vocab, (2, 12))
    lm_loss(model, ids).backward()
    want = [g * 0.25 for g in all_grads(model)]
    model.zero_grad(set_to_none=True)
    dnn.set_loss_scale(model, 0.25)  # e.g. gradient accumulation over 4 micro-batches
    (lm_loss(model, ids) * 0.25).backward()
    assert_grads_equal(all_grads(model), want)


def test_warmup_freezing_trains_only_the_indexers():
    m, vocab = build("decoder", "warmup")
    trainable = dnn.freeze_for_warmup(m)
    assert {id(p) for p in trainable} == {id(p) for p in dnn.indexer_parameters(m)}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        lm_loss(m, torch.randint(0, vocab, (2, 14))).backward()
        opt.step()
        opt.zero_grad()
    idx_names = {n for n, _ in m.named_parameters() if ".indexer." in n}
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) != (n in idx_names), n
    dnn.unfreeze(m)
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="no DSAAttention"):
        dnn.set_mode(small_decoder(), "sparse")


def test_param_groups_cover_each_trainable_parameter_once():
    m = decoder.convert(small_decoder(), dsa_cfg())
    groups = dnn.param_groups(m, lr=1e-3, indexer_lr=5e-3, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["indexer"]["params"]} == {id(p) for p in dnn.indexer_parameters(m)}
    assert by_name["indexer"]["lr"] == 5e-3 and by_name["indexer"]["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in by_name["model"]["params"])
    dnn.freeze_for_warmup(m)
    assert [g["name"] for g in dnn.param_groups(m, lr=1e-3)] == ["indexer"]


def test_attach_indexer_loss_is_the_identity_with_a_gradient_for_the_loss():
    out = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = (torch.randn(5, dtype=torch.float64, requires_grad=True) ** 2).sum()
    y = dnn.AttachIndexerLoss.apply(out, loss, 0.3)
    assert torch.equal(y, out)
    g = torch.randn(3, 4, dtype=torch.float64)
    got = torch.autograd.grad(y, (out, loss), g)
    assert torch.equal(got[0], g) and got[1].item() == pytest.approx(0.3)
