"""The ranks of the context-parallel tests (tests/test_context_parallel.py): each spawned process
computes every case once in one process (the reference, on the whole sequence) and once
context-parallel over the group (its zigzag share of the sequence), and checks that the two agree:
the same top-k indices, outputs, losses and gradients (summed over the ranks) within 1e-10 in
float64. Packed cases: documents (key ranges) that the zigzag chunks cut, shorter than topk,
of one token, and padding-like empty ranges, against the same documents in one process."""
import os
import traceback
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F

import models
from dsa_ext import context_parallel, decoder, ranges
from dsa_ext.context_parallel import ContextParallel
from dsa_ext.nn import DSAAttention, DSAConfig, LightningIndexer, recall_stats

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


def packed_positions(B, T, seed):
    """Position ids [B, T] of packed documents: random lengths 1..T//2 (so chunk boundaries cut
    documents and some are shorter than topk), the first document of a row continued from an
    earlier window (its ids start at 5), and one document past the middle that restarts at 3."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        pos, restarted_at_3 = list(range(5, 5 + int(torch.randint(1, T // 2, (1,), generator=g)))), False
        while len(pos) < T:
            begin = 3 if len(pos) > T // 2 and not restarted_at_3 and pos[-1] != 2 else 0
            restarted_at_3 |= begin == 3
            pos += list(range(begin, begin + int(torch.randint(1, T // 2, (1,), generator=g))))
        rows.append(pos[:T])
    return torch.tensor(rows)


def core_case(cp, mode, T=37, topk=12, B=2, layout=None):
    """DSAAttention alone: q, k, v, hidden states as leaves; objective <out, g> + the attached KL;
    the top-k indices and recall sums of a measured forward too. T=37 is not a multiple of 2N;
    topk=12 is larger than a rank's chunks (37 / 2N tokens). ``layout`` "packed": documents of
    restarting position ids (key ranges; the ranges found from the local position ids must be
    the whole sequence's), "padded": those with padding-like empty ranges (queries that are not
    real). Bytes moved: the formula of docs/context_parallel.md."""
    torch.manual_seed(1)
    H, Hkv, D, hid = 4, 2, 8, 16
    core = DSAAttention(LightningIndexer(hid, 2, 8, 4), topk, mode).double().train()
    pos, kw = None, {}
    if layout is not None:
        pos = packed_positions(B, T, seed=5)
        key_ranges = ranges.from_position_ids(pos)
        if layout == "padded":  # right padding of row 0, left padding of row 1
            mask = torch.ones(B, T, dtype=torch.bool)
            mask[0, -7:] = False
            mask[1, :4] = False
            key_ranges = ranges.intersect(key_ranges, ranges.from_padding_mask(mask))
        kw = {"key_ranges": key_ranges}
    leaves = {"q": torch.randn(B, T, H, D), "k": torch.randn(B, T, Hkv, D), "v": torch.randn(B, T, Hkv, D),
              "x": torch.randn(B, T, hid)}
    leaves = {n: t.double().requires_grad_() for n, t in leaves.items()}
    g = torch.randn(B, T, H, D, dtype=torch.float64)
    with torch.no_grad(), recall_stats(core) as ref_recall:
        ref_idx = core.select(leaves["x"], pos, **kw).indices
        core(leaves["q"], leaves["k"], leaves["v"], leaves["x"], pos, **kw)
    ref_out = core(leaves["q"], leaves["k"], leaves["v"], leaves["x"], pos, **kw)
    (ref_out * g).sum().backward()
    ref_loss = core.last_loss
    ref_grads = {n: t.grad.clone() for n, t in leaves.items() if t.grad is not None}
    ref_grads.update({n: p.grad.clone() for n, p in core.named_parameters()})
    for t in [*leaves.values(), *core.parameters()]:
        t.grad = None

    context_parallel.enable(core, cp)
    local = {n: cp.shard(t) for n, t in leaves.items()}
    local_pos = cp.positions() if layout is None else cp.shard(pos)
    if layout is not None:
        kw = {"key_ranges": tuple(cp.shard(r) for r in kw["key_ranges"])}
    if layout == "packed":
        found = cp.key_ranges(local_pos, B)
        assert all(torch.equal(a, b) for a, b in zip(found, kw["key_ranges"])), "documents from local position ids"
    with torch.no_grad(), recall_stats(core) as got_recall:
        idx = core.select(local["x"], local_pos, **kw).indices
        core(local["q"], local["k"], local["v"], local["x"], local_pos, **kw)
    assert torch.equal(idx, cp.shard(ref_idx)), f"{mode}: top-k indices differ"
    close(f"{mode}: recall sums", summed(got_recall.tensor()), ref_recall.tensor())
    bytes_before = cp.bytes_moved
    out = core(local["q"], local["k"], local["v"], local["x"], local_pos, **kw)
    (out * cp.shard(g)).sum().backward()
    row = (8 + Hkv * 2 * D) * 8  # a token's indexer key (Di 8), k and v, in float64
    count = 0 if layout is None else 8  # the int64 all-reduce of the real queries' count (caller-built ranges)
    assert cp.bytes_moved - bytes_before == (cp.size - 1) * (2 * B * cp.layout.max_len * row + count), \
        f"{mode}: bytes moved {cp.bytes_moved - bytes_before}"
    close(f"{mode}: output", out, cp.shard(ref_out))
    close(f"{mode}: indexer loss", summed(core.last_loss), ref_loss)
    check_grads([*leaves.items(), *core.named_parameters()], ref_grads)
    context_parallel.disable(core)


def documents_case(cp, T=23):
    """cp.key_ranges: the whole sequence's documents for the local position ids; kept for the
    same tensor (no second gather), found anew when the tensor is refilled in place; none, and no
    gather, for cp.positions() (one document)."""
    pos = packed_positions(1, T, seed=7)
    local = cp.shard(pos).clone()
    before = cp.bytes_moved
    assert cp.key_ranges(cp.positions()) is None and cp.key_ranges(cp.positions()[None], 3) is None
    assert cp.bytes_moved == before, "cp.positions() needs no gather"

    def expect(p, got):
        want = [cp.shard(r).expand(2, -1) for r in ranges.from_position_ids(p)]
        assert got is not None and all(torch.equal(a, b) for a, b in zip(got, want)), f"documents of {p.tolist()}"

    got = cp.key_ranges(local, 2)
    expect(pos, got)
    moved = cp.bytes_moved
    assert cp.key_ranges(local, 2) is got and cp.bytes_moved == moved, "kept for the same tensor"
    other = packed_positions(1, T, seed=8)
    local.copy_(cp.shard(other))
    expect(other, cp.key_ranges(local, 2))


def lm_share(logits, targets, seq_len):
    """This rank's share of the mean next-token loss over the batch's B * seq_len tokens."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / (targets.shape[0] * seq_len)


def model_step_case(cp, build, call, T=29, B=2, packed=False):
    """One training step of a whole model: the LM loss (and the indexer KL attached to the
    attention outputs), losses and every parameter's gradient (summed over ranks). ``packed``:
    the tokens are packed documents, given by position ids that restart (each rank gets its
    share of them)."""
    torch.manual_seed(2)
    model, vocab = build()
    model.train()
    ids = torch.randint(0, vocab, (B, T + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    pos = packed_positions(B, T, seed=6) if packed else None
    ref_logits = call(model, inputs, pos)
    ref_loss = lm_share(ref_logits, targets, T)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref_kl = [m.last_loss for m in model.modules() if isinstance(m, DSAAttention)]
    model.zero_grad(set_to_none=True)

    context_parallel.enable(model, cp)
    local_in, local_tg = cp.shard(inputs), cp.shard(targets)
    logits = call(model, local_in, cp.shard(pos) if packed else cp.positions())
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
    kw = {} if positions is None else {"position_ids": positions if positions.dim() == 2 else positions[None]}
    return model(input_ids=ids, use_cache=False, **kw).logits


def call_hf_cu_seq_lens(model, ids, positions):
    """Packed documents given twice, as DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    does: position ids (the rank's share) and the whole sequence's cu_seq_lens."""
    cp = getattr(model, "_dsa_cp", None)
    seq_len = positions.shape[-1] if cp is None else cp.layout.seq_len
    cu = packed_cu_seq_lens(seq_len)
    return model(input_ids=ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 max_length_q=seq_len, max_length_k=seq_len).logits


def packed_cu_seq_lens(seq_len):
    """The cumulative document lengths of packed_positions(1, seq_len, seed=6)."""
    begins = ranges.from_position_ids(packed_positions(1, seq_len, seed=6))[0][0].unique()
    return torch.cat([begins, torch.tensor([seq_len], dtype=begins.dtype)])


def cu_seq_lens_mismatch_case(cp, T=29):
    """cu_seq_lens that disagree with the position ids raise the same ValueError on every rank
    (both are whole-sequence data after the gather: no rank is left waiting in a collective)."""
    model, vocab = hf_model("llama", "sparse")()
    context_parallel.enable(model, cp)
    ids = cp.shard(torch.randint(0, vocab, (1, T)))
    cu = torch.tensor([0, 10, T], dtype=torch.int32)
    try:
        model(input_ids=ids, position_ids=cp.shard(packed_positions(1, T, seed=6)), use_cache=False,
              cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    except ValueError as e:
        assert "describe different documents" in str(e), e
    else:
        raise AssertionError("mismatching cu_seq_lens were accepted")
    context_parallel.disable(model)


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


def padding_refused_case(cp, T=29):
    """A padding mask that only rank 0's share holds is refused on every rank alike (a rank-local
    refusal would leave the others waiting in the first all-gather)."""
    model, vocab = hf_model("llama", "sparse")()
    context_parallel.enable(model, cp)
    ids = cp.shard(torch.randint(0, vocab, (1, T)))
    mask = torch.ones_like(ids)
    if cp.rank == 0:
        mask[0, 0] = 0
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=cp.positions()[None], use_cache=False)
    except NotImplementedError as e:
        assert "without padding" in str(e), e
    else:
        raise AssertionError("a padding mask was accepted")
    model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=cp.positions()[None], use_cache=False)
    context_parallel.disable(model)


def step(build, call, **kw):
    return partial(model_step_case, build=build, call=call, **kw)


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
    "documents of the position ids": documents_case,
    "core warmup, packed": partial(core_case, mode="warmup", layout="packed"),
    "core sparse, packed": partial(core_case, mode="sparse", layout="packed"),
    "core sparse, packed and padded ranges": partial(core_case, mode="sparse", layout="padded"),
    "core warmup, packed and padded ranges": partial(core_case, mode="warmup", layout="padded"),
    "decoder unconverted, packed": step(decoder_model("unconverted"), call_decoder, packed=True),
    "decoder warmup, packed": step(decoder_model("warmup"), call_decoder, packed=True),
    "decoder sparse, packed": step(decoder_model("sparse"), call_decoder, packed=True),
    "llama unconverted, packed": step(hf_model("llama", "unconverted"), call_hf, B=1, packed=True),
    "llama warmup, packed, activation checkpointing": step(hf_model("llama", "warmup", checkpointing=True),
                                                           call_hf, B=1, packed=True),
    "llama sparse, packed, cu_seq_lens": step(hf_model("llama", "sparse"), call_hf_cu_seq_lens, B=1, packed=True),
    "llama, mismatching cu_seq_lens": cu_seq_lens_mismatch_case,
    "llama, padding on one rank": padding_refused_case,
    "deepseek_v32 sparse, packed": step(hf_model("deepseek_v32", "sparse"), call_hf, B=1, packed=True),
    "glm_moe_dsa warmup, packed, activation checkpointing": step(
        hf_model("glm_moe_dsa", "warmup", checkpointing=True), call_hf, B=1, packed=True),
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
