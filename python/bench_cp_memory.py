"""Context-parallel DSA on the CPU: peak memory per rank of one training step on one long
sequence at 1, 2 and 4 ranks, and the bytes the ranks exchange, counted by
dsa_ext.context_parallel and compared with the formula of docs/context_parallel.md.

Each rank count runs in fresh processes (torch.multiprocessing spawn, gloo; 1 rank: the model
alone, no process group). Every rank builds the same model (dsa_ext.decoder converted to DSA in
sparse mode, float32, batch 1), shards the sequence (zigzag), resets its kernel peak-RSS counter
(/proc/self/clear_refs), runs the LM loss forward and backward and reports its peak RSS (VmHWM),
the rise over the RSS before the forward (the memory the step costs; libraries, model and data
are the rest) and the bytes its collectives received. glibc is told to serve every allocation
above 128 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the RSS at once and the
peak is that of live memory.

Communication formula (per rank and step, all-gather and reduce-scatter each receive N-1 blocks
of the padded rank length ceil(T/N)): layers * (N-1) * B * ceil(T/N) * (forward row + backward row),
forward row = Di + Hkv * (Dqk + Dv) elements (indexer key, k, v), backward row the same for the
rows whose gradient is needed (sparse stage: all of them; warm-up: the indexer key only).

Usage: python python/bench_cp_memory.py [--seq-len 16384] [--ranks 1 2 4] [--d-model 256] [--layers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

MIB = 2 ** 20
# the shapes of the design note's table: per token, bfloat16 (2 bytes)
SHAPES = {"MLA (576-dim latent, V = its first 512 dims)": 576, "GQA (Hkv 8, D 128: k and v)": 2 * 8 * 128}
INDEXER_KEY = 128  # Di of V3.2's indexer


def formula_bytes(seq_len: int, ranks: int, batch: int, layers: int, row_bytes: int) -> int:
    """Bytes one rank receives per step: every layer's collectives of row_bytes per token."""
    if ranks == 1:
        return 0
    return layers * (ranks - 1) * batch * -(-seq_len // ranks) * row_bytes


def worker(rank: int, world: int, init_file: str, args, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import peak_memory
    from dsa_ext import context_parallel, decoder
    from dsa_ext.nn import DSAConfig

    torch.set_num_threads(max(1, args.threads // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = decoder.DecoderConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                                n_kv_heads=args.kv_heads)
    model = decoder.convert(decoder.Decoder(cfg), DSAConfig(n_heads=args.indexer_heads, head_dim=args.indexer_dim,
                                                            rope_dim=16, topk=args.topk, mode="sparse"))
    ids = torch.randint(0, 256, (1, args.seq_len + 1))
    inputs, targets, cp = ids[:, :-1], ids[:, 1:], None
    if world > 1:  # the decoder's positions default to the rank's global ones
        cp = context_parallel.enable(model, context_parallel.ContextParallel())
        inputs, targets = cp.shard(inputs), cp.shard(targets)
        dist.barrier()
    def step():
        logits = model(inputs)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").div(args.seq_len).backward()

    m = peak_memory.measure(step)
    before, rise = m["rss_before_bytes"] / 1024, m["peak_extra_bytes"] / 1024
    row = (args.indexer_dim + 2 * args.kv_heads * (args.d_model // args.heads)) * 4  # float32
    result = {"rank": rank, "ranks": world, "local_tokens": inputs.shape[1], "rss_before_mib": before / 1024,
              "peak_mib": (before + rise) / 1024, "rise_mib": rise / 1024, "seconds": m["wall_s"],
              "bytes_counted": cp.bytes_moved if cp else 0,
              "bytes_formula": formula_bytes(args.seq_len, world, 1, args.layers, 2 * row)}
    with open(os.path.join(out_dir, f"{world}_{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args) -> list:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(world, os.path.join(d, "init"), args, d), nprocs=world)
        return [json.load(open(os.path.join(d, f"{world}_{r}.json"))) for r in range(world)]


def design_table(ranks: int = 8) -> str:
    """Bytes per token and per step of the design note (bfloat16, one layer, forward)."""
    lines = [f"| shape | row bytes (DSA: + indexer key {INDEXER_KEY * 2}) | T | DSA all-gather per rank, forward "
             f"| dense ring attention per rank, forward |", "|---|---|---|---|---|"]
    for name, dims in SHAPES.items():
        for T in (32 * 1024, 128 * 1024, 1024 * 1024):
            dsa = formula_bytes(T, ranks, 1, 1, (dims + INDEXER_KEY) * 2)
            ring = formula_bytes(T, ranks, 1, 1, dims * 2)
            lines.append(f"| {name} | {dims * 2} + {INDEXER_KEY * 2} | {T // 1024}K | {dsa / MIB:.1f} MiB "
                         f"| {ring / MIB:.1f} MiB |")
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cli

    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384, help="tokens of the one training sequence, T")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="context-parallel rank counts to measure")
    p.add_argument("--d-model", type=int, default=256, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--layers", type=int, default=2, help="Transformer layers")
    p.add_argument("--indexer-heads", type=int, default=4, help="indexer heads per layer, Hi")
    p.add_argument("--indexer-dim", type=int, default=32, help="indexer head width, Di")
    p.add_argument("--topk", type=int, default=256, help="keys each query keeps")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    args = p.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # glibc reads it at start: the spawned ranks do
    import torch

    import cpu_info

    print(cpu_info.header(cpu_info.machine()))
    print(f"# one training step (forward + backward), DSA decoder in sparse mode, float32, batch 1, T={args.seq_len}, "
          f"d_model {args.d_model}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, indexer "
          f"{args.indexer_heads} x {args.indexer_dim}, top-k {args.topk}; torch {torch.__version__}")
    print("| ranks | tokens per rank | peak RSS per rank (MiB, max) | step rise per rank (MiB, max) | rise vs 1 rank "
          "| bytes received per rank, counted | formula | step time (s) |\n|---|---|---|---|---|---|---|---|")
    base = None
    for world in args.ranks:
        res = run(world, args)
        rise = max(r["rise_mib"] for r in res)
        base = base or rise
        counted, formula = res[0]["bytes_counted"], res[0]["bytes_formula"]
        assert all(r["bytes_counted"] == r["bytes_formula"] for r in res), res
        print(f"| {world} | {max(r['local_tokens'] for r in res)} | {max(r['peak_mib'] for r in res):.0f} | "
              f"{rise:.0f} | {rise / base:.2f}x | {counted:,} | {formula:,} | {max(r['seconds'] for r in res):.1f} |",
              flush=True)
    print("\nDesign note, one layer's forward all-gather per rank at 8 ranks, bfloat16:\n" + design_table())


if __name__ == "__main__":
    main()
