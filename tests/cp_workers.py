"""The ranks of the context-parallel tests (tests/test_context_parallel.py): each spawned process
computes every case once in one process (the reference, on the whole sequence) and once
context-parallel over the group (its zigzag share of the sequence), and checks that the two agree:
the same top-k indices, outputs, losses and gradients (summed over the ranks) within 1e-10 in
float64."""
import os
import traceback
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

import models
from dsa_ext import context_parallel, decoder
from dsa_ext.context_parallel import ContextParallel
from dsa_ext.nn import DSAAttention, DSAConfig, LightningIndexer

TOL = 1e-10


def close(what, got, want, tol=TOL):
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert got.shape == want.shape and err <= tol, f"{what}: max error {err:.3e} (shapes {tuple(got.shape)}, " \
                                                   f"{tuple(want.shape)})"


def summed(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def check_grads(named_params, ref_grads):
    for name, p in named_params:
        if name in ref_grads:
            assert p.grad is not None, f"no gradient for {name}"
            close(f"grad {name}", summed(p.grad), ref_grads[name])


def core_case(cp, mode, T=37, topk=12, B=2):
    """DSAAttention alone: q, k, v, hidden states as leaves; objective <out, g> + the attached KL.
    T=37 is not a multiple of 2N; topk=12 is larger than a rank's chunks (37 / 2N tokens)."""
    torch.manual_seed(1)
    H, Hkv, D, hid = 4, 2, 8, 16
    core = DSAAttention(LightningIndexer(hid, 2, 8, 4), topk, mode).double().train()
    leaves = {"q": torch.randn(B, T, H, D), "k": torch.randn(B, T, Hkv, D), "v": torch.randn(B, T, Hkv, D),
              "x": torch.randn(B, T, hid)}
    leaves = {n: t.double().requires_grad_() for n, t in leaves.items()}
    g = torch.randn(B, T, H, D, dtype=torch.float64)
    with torch.no_grad():
        ref_idx = core.select(leaves["x"]).indices if mode == "sparse" else None
    ref_out = core(leaves["q"], leaves["k"], leaves["v"], leaves["x"])
    (ref_out * g).sum().backward()
    ref_loss = core.last_loss
    ref_grads = {n: t.grad.clone() for n, t in leaves.items() if t.grad is not None}
    ref_grads.update({n: p.grad.clone() for n, p in core.named_parameters()})
    for t in [*leaves.values(), *core.parameters()]:
        t.grad = None

    context_parallel.enable(core, cp)
    local = {n: cp.shard(t) for n, t in leaves.items()}
    pos = cp.positions()
    if mode == "sparse":
        with torch.no_grad():
            idx = core.select(local["x"], pos).indices
        assert torch.equal(idx, cp.shard(ref_idx)), f"{mode}: top-k indices differ"
    bytes_before = cp.bytes_moved
    out = core(local["q"], local["k"], local["v"], local["x"], pos)
    (out * cp.shard(g)).sum().backward()
    lay = cp.layout
    row = (8 + Hkv * 2 * D) * 8  # a token's indexer key (Di 8), k and v, in float64
    assert cp.bytes_moved - bytes_before == 2 * (cp.size - 1) * B * lay.max_len * row, \
        f"{mode}: bytes moved {cp.bytes_moved - bytes_before}"
    close(f"{mode}: output", out, cp.shard(ref_out))
    close(f"{mode}: indexer loss", summed(core.last_loss), ref_loss)
    check_grads([*leaves.items(), *core.named_parameters()], ref_grads)
    context_parallel.disable(core)


def lm_share(logits, targets, seq_len):
    """This rank's share of the mean next-token loss over the batch's B * seq_len tokens."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / (targets.shape[0] * seq_len)


def model_step_case(cp, build, call, T=29, B=2):
    """One training step of a whole model: the LM loss (and the indexer KL attached to the
    attention outputs), losses and every parameter's gradient (summed over ranks)."""
    torch.manual_seed(2)
    model, vocab = build()
    model.train()
    ids = torch.randint(0, vocab, (B, T + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    ref_logits = call(model, inputs, None)
    ref_loss = lm_share(ref_logits, targets, T)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref_kl = [m.last_loss for m in model.modules() if isinstance(m, DSAAttention)]
    model.zero_grad(set_to_none=True)

    context_parallel.enable(model, cp)
    local_in, local_tg = cp.shard(inputs), cp.shard(targets)
    logits = call(model, local_in, cp.positions())
    loss = lm_share(logits, local_tg, T)
    loss.backward()
    close("logits", logits, cp.shard(ref_logits))
    close("loss", summed(loss), ref_loss)
    kl = [m.last_loss for m in model.modules() if isinstance(m, DSAAttention)]
    for i, (a, b) in enumerate(zip(kl, ref_kl)):  # None: a layer without an indexer (GLM-5's shared ones)
        assert (a is None) == (b is None), f"layer {i}: indexer loss {a} vs {b}"
        if b is not None:
            close(f"layer {i} indexer loss", summed(a), b)
    check_grads(list(model.named_parameters()), ref_grads)
    assert set(ref_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    context_parallel.disable(model)


def decoder_model(mode):
    """tests/models.py's decoder (GQA), converted to DSA unless mode is "unconverted"."""
    def build():
        m = models.small_decoder()
        if mode != "unconverted":
            decoder.convert(m, models.dsa_cfg(topk=9, mode=mode))
        return m, models.VOCAB
    return build


def call_decoder(model, ids, positions):
    return model(ids, positions)


def hf_model(family, mode, checkpointing=False):
    """tests/models.py's tiny transformers model of family (Llama: GQA; DeepSeek-V3.2, GLM-5: MLA
    with their own indexers), converted unless mode is "unconverted"."""
    def build():
        from dsa_ext import hf

        # no MoE layer: transformers' router scores in float32, whose rounding depends on the rows per call
        m = models.tiny_hf(family) if family == "llama" else models.tiny_hf_dsa(family, index_topk=9, moe=False)
        if mode != "unconverted":  # DeepSeek-V3.2 and GLM-5 keep their own indexers' geometry
            hf.convert(m, models.dsa_cfg(topk=9, mode=mode) if family == "llama" else DSAConfig(topk=9, mode=mode))
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m, models.HF_VOCAB
    return build


def call_hf(model, ids, positions):
    kw = {} if positions is None else {"position_ids": positions[None]}
    return model(input_ids=ids, use_cache=False, **kw).logits


def fsdp_case(cp, T=29, B=2):
    """FSDP2 (fully_shard of every block and the root, over the group) on a context-parallel,
    converted decoder in sparse mode: one SGD step gives the parameters of the unsharded step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(3)
    build = decoder_model("sparse")
    ref, vocab = build()
    model, _ = build()
    model.load_state_dict(ref.state_dict())
    ref.train(), model.train()
    ids = torch.randint(0, vocab, (B, T + 1))
    lm_share(ref(ids[:, :-1]), ids[:, 1:], T).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()

    mesh = init_device_mesh("cpu", (cp.size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    context_parallel.enable(model, cp)
    for m in model.modules():
        if isinstance(m, DSAAttention):
            m.loss_scale = cp.size  # FSDP averages gradients over the ranks: scale the shares back to a sum
    loss = lm_share(model(cp.shard(ids[:, :-1]), cp.positions()), cp.shard(ids[:, 1:]), T) * cp.size
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    want = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        close(f"fsdp: parameter {name} after one step", p.full_tensor(), want[name].detach())


def step(build, call):
    return partial(model_step_case, build=build, call=call)


CASES = {
    "core warmup": partial(core_case, mode="warmup"),
    "core sparse": partial(core_case, mode="sparse"),
    "core sparse, tiny chunks": lambda cp: core_case(cp, "sparse", T=2 * cp.size + 1, topk=3, B=1),
    "decoder unconverted": step(decoder_model("unconverted"), call_decoder),
    "decoder warmup": step(decoder_model("warmup"), call_decoder),
    "decoder sparse": step(decoder_model("sparse"), call_decoder),
    "llama unconverted": step(hf_model("llama", "unconverted"), call_hf),
    "llama warmup, activation checkpointing": step(hf_model("llama", "warmup", checkpointing=True), call_hf),
    "llama sparse": step(hf_model("llama", "sparse"), call_hf),
    "deepseek_v32 warmup": step(hf_model("deepseek_v32", "warmup"), call_hf),
    "deepseek_v32 sparse": step(hf_model("deepseek_v32", "sparse"), call_hf),
    "glm_moe_dsa sparse, activation checkpointing": step(hf_model("glm_moe_dsa", "sparse", checkpointing=True),
                                                         call_hf),
    "fsdp2": fsdp_case,
}


def run(rank, world, init_file, names):
    """mp.spawn entry point: runs the named cases on a gloo group of ``world`` processes."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cp = ContextParallel(dist.new_group(list(range(world))))
        for name in names:
            try:
                CASES[name](cp)
            except Exception as e:
                raise AssertionError(f"[{world} ranks, rank {rank}] case {name!r}: {e}\n{traceback.format_exc()}") from e
    finally:
        dist.destroy_process_group()
