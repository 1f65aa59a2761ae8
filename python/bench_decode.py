"""The cost per token of DSA inference against dense attention, as DeepSeek-V3.2's report draws
it: time per token against token position, for prefill and for decode, on one CPU in one run.

Prefill: a chunk of --chunk (512) new tokens at position P (P tokens already cached); its time
divided by the chunk. Decode: one new token at position P. Positions P = 1K, 2K, 4K, ... up to
--max-position (64K).

1. One attention layer (H=8, Hkv=2, D=128, Hi=4, Di=64, topk=256, float32) over caches of
   random contents: DSA = indexer_topk of the new queries over all P + T cached indexer keys
   (bottom-right causal alignment) + sparse_attention over the cached K/V rows it selects;
   dense = F.scaled_dot_product_attention over the same K/V (in the head-major layout SDPA and
   transformers' caches use; with enable_gqa, or the queries of a kv head grouped as one head's
   queries, or for decode plain matrix products, whichever is fastest: the baseline at its
   fastest).
2. A whole converted model (a small transformers Llama, float32, --model-* sizes) run through
   transformers' DynamicCache: chunked prefill from position 0 (every chunk timed), and at each P
   one decode step (the cache cropped back after it). The same weights in mode dense
   (transformers' SDPA) and mode sparse (DSA; the indexer keys ride in the cache).

Prints the CPU, its flags and the measured matmul ceilings (python/cpu_info.py), the memory per
token of each cache, the tables and the ratios dense/DSA; writes --out/bench_decode.json and
--plot (docs/cost_curve.png). Both sides run on all threads; every figure is the fastest of
--reps (decode) or --prefill-reps (prefill) runs (the model's prefill chunks between the
positions run once).

  python python/bench_decode.py                       # the full curve, layer and model to 64K
  python python/bench_decode.py --threads 1 --reps 30 --prefill-reps 2 --model-max-position 8192 \
      --ceiling-n 2048                                # docs/cost_curve.png (2 min on a shared 2-core CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import cli  # python/ (this file's folder) is on sys.path
import dsa_ext
from cpu_info import header, machine, timeit
from dsa_ext import hf
from dsa_ext import nn as dsa_nn
from dsa_ext.conventions import causal_mask

LAYER = dict(H=8, Hkv=2, D=128, Hi=4, Di=64, topk=256)


def positions_up_to(first: int, last: int):
    out = [first]
    while out[-1] * 2 <= last:
        out.append(out[-1] * 2)
    return out


def cache_bytes_per_token(Hkv: int, D: int, Di: int, layers: int, dtype_bytes: int) -> dict:
    """Bytes one token adds to each cache: K and V, and DSA's indexer key (full precision, or the
    e4m3 values plus a float32 scale with FP8 selection)."""
    return {"kv": layers * 2 * Hkv * D * dtype_bytes, "indexer": layers * Di * dtype_bytes,
            "indexer_fp8": layers * (Di + 4)}


# ---------------------------------------------------------------------------------------- layer

def dense_calls(q, Kd, Vd, mask):
    """The dense candidates over one cache: q [1, T, H, D]; Kd, Vd [1, Hkv, S, D] (head-major);
    mask the [T, S] bottom-right causal mask or None (T = 1: the query sees every key)."""
    T, H, D = q.shape[1:]
    Hkv = Kd.shape[1]
    G = H // Hkv
    qh = q.transpose(1, 2)
    # query heads of one kv head side by side as G*T queries of that head: no K/V repeat
    qg = qh.reshape(1, Hkv, G * T, D)
    mg = None if mask is None else mask.repeat(G, 1)
    calls = {
        "enable_gqa": lambda: F.scaled_dot_product_attention(qh, Kd, Vd, attn_mask=mask, enable_gqa=True),
        "grouped": lambda: F.scaled_dot_product_attention(qg, Kd, Vd, attn_mask=mg),
    }
    if T == 1:  # two matrix-vector products per kv head (a prefill chunk would build [G*T, S] scores)
        calls["matmul"] = lambda: torch.softmax(qg @ Kd.transpose(-1, -2) * D ** -0.5, dim=-1) @ Vd
    return calls


def bench_layer_point(P: int, T: int, reps: int) -> dict:
    """One layer at position P with T new tokens: times of DSA (and its two operators) and of
    the fastest dense candidate."""
    H, Hkv, D, Hi, Di, topk = (LAYER[n] for n in ("H", "Hkv", "D", "Hi", "Di", "topk"))
    S = P + T  # the new tokens are appended to the caches before attention runs
    K, V = torch.randn(1, S, Hkv, D), torch.randn(1, S, Hkv, D)
    k_idx = torch.randn(1, S, Di)
    q, q_idx, w = torch.randn(1, T, H, D), torch.randn(1, T, Hi, Di), torch.randn(1, T, Hi)
    Kd, Vd = K.transpose(1, 2).contiguous(), V.transpose(1, 2).contiguous()
    mask = None if T == 1 else causal_mask(T, S)
    idx = dsa_ext.indexer_topk(q_idx, k_idx, w, topk)
    warm = 1 if T == 1 else 0  # a prefill chunk is long enough to need no warm-up run
    with torch.no_grad():
        t = {
            "indexer_topk": timeit(lambda: dsa_ext.indexer_topk(q_idx, k_idx, w, topk), reps, warm),
            "sparse_attention": timeit(lambda: dsa_ext.sparse_attention(q, K, V, idx), reps, warm),
            "dsa": timeit(lambda: dsa_ext.sparse_attention(q, K, V, dsa_ext.indexer_topk(q_idx, k_idx, w, topk)),
                          reps, warm),
        }
        dense = {name: timeit(fn, reps, warm) for name, fn in dense_calls(q, Kd, Vd, mask).items()}
    best = min(dense, key=dense.get)
    return {"position": P, "T": T, "S": S, **{f"{n}_s": v for n, v in t.items()}, "dense_s": dense[best],
            "dense_variant": best, "dense_candidates_s": dense, "ratio": dense[best] / t["dsa"]}


def bench_layer(positions, chunk: int, reps: int, prefill_reps: int):
    rows = {"prefill": [], "decode": []}
    for P in positions:
        for kind, T in (("decode", 1), ("prefill", chunk)):
            r = bench_layer_point(P, T, reps if T == 1 else prefill_reps)
            rows[kind].append(r)
            print(f"layer {kind:>7} P={P:>6}: DSA {1e3 * r['dsa_s'] / T:8.4f} ms/token "
                  f"(indexer_topk {1e3 * r['indexer_topk_s']:.3f} ms, sparse_attention "
                  f"{1e3 * r['sparse_attention_s']:.3f} ms per call), dense {1e3 * r['dense_s'] / T:8.4f} ms/token "
                  f"({r['dense_variant']}): {r['ratio']:.2f}x", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- model

def build_model(args, max_len: int):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=args.model_vocab, hidden_size=args.model_hidden,
                                   intermediate_size=2 * args.model_hidden, num_hidden_layers=args.model_layers,
                                   num_attention_heads=args.model_heads, num_key_value_heads=args.model_kv_heads,
                                   max_position_embeddings=max_len, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).eval()
    dsa = dsa_nn.DSAConfig(n_heads=LAYER["Hi"], head_dim=LAYER["Di"], rope_dim=LAYER["Di"] // 2,
                           topk=LAYER["topk"], mode="sparse")
    return hf.convert(model, dsa)


def bench_model(model, mode: str, positions, chunk: int, reps: int):
    """Chunked prefill from 0 to the last position (each chunk timed; at the positions, the fastest
    of ``reps`` runs of the chunk, the cache cropped back in between) and a decode step at each
    position."""
    import transformers

    dsa_nn.set_mode(model, mode)
    last = positions[-1]
    ids = torch.randint(0, model.config.vocab_size, (1, last + chunk + 1))
    cache = transformers.DynamicCache(config=model.config)
    chunks, decode = [], []

    def run(part):
        model(part, cache=cache, use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        for start in range(0, last + 1, chunk):
            if start in positions:
                def step():
                    run(ids[:, start:start + 1])
                    cache.crop(-1)
                decode.append({"position": start, "s": timeit(step, reps, warmup=1)})
            part = ids[:, start:start + chunk]
            n = reps if start in positions else 1
            times = []
            for i in range(n):
                t0 = time.perf_counter()
                run(part)
                times.append(time.perf_counter() - t0)
                if i < n - 1:
                    cache.crop(-chunk)
            chunks.append({"position": start, "s": min(times)})
            if start in positions:
                print(f"model {mode:>6} P={start:>6}: prefill {1e3 * chunks[-1]['s'] / chunk:8.4f} ms/token, "
                      f"decode {1e3 * decode[-1]['s']:8.3f} ms/token", flush=True)
    return {"prefill": chunks, "decode": decode}


# ---------------------------------------------------------------------------------------- report

def print_table(title, dense_rows, dsa_rows, chunk, dense_key="s", dsa_key="s"):
    print(f"\n{title}")
    head = f"{'position':>8} | {'dense ms/token':>14} {'DSA ms/token':>13} {'dense/DSA':>9}"
    print(head)
    print("-" * len(head))
    for d, s in zip(dense_rows, dsa_rows):
        print(f"{d['position']:>8} | {1e3 * d[dense_key] / chunk:>14.4f} {1e3 * s[dsa_key] / chunk:>13.4f} "
              f"{d[dense_key] / s[dsa_key]:>8.2f}x")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunk = result["config"]["chunk"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, kind, per in ((axes[0], "prefill", chunk), (axes[1], "decode", 1)):
        layer = result["layer"][kind]
        xs = [r["position"] for r in layer]
        ax.plot(xs, [1e3 * r["dense_s"] / per for r in layer], "o-", color="C0", label="dense SDPA, one layer")
        ax.plot(xs, [1e3 * r["dsa_s"] / per for r in layer], "o-", color="C1", label="DSA, one layer")
        if result.get("model"):
            for mode, color, name in (("dense", "C0", "dense"), ("sparse", "C1", "DSA")):
                rows = [r for r in result["model"][mode][kind] if r["position"] >= xs[0]]
                ax.plot([r["position"] for r in rows], [1e3 * r["s"] / per for r in rows], "--", color=color,
                        marker="." if kind == "prefill" else "s", label=f"{name}, whole model")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [f"{x // 1024}K" for x in xs])
        ax.set_xlabel("token position (tokens already in the cache)")
        ax.set_ylabel("time per token (ms)")
        ax.set_title(f"{kind}" + (f" (chunks of {chunk} tokens)" if kind == "prefill" else " (one token)"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    c = result["config"]
    m = result["machine"]
    fig.suptitle(f"DSA vs dense attention per token, CPU ({m['threads']} threads, {m['vector_isa']}), float32. "
                 f"Layer: H={LAYER['H']}, Hkv={LAYER['Hkv']}, D={LAYER['D']}, Hi={LAYER['Hi']}, Di={LAYER['Di']}, "
                 f"topk={LAYER['topk']}; model: {c['model_desc']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--first-position", type=int, default=1024, help="the first position P (then doubled)")
    p.add_argument("--max-position", type=int, default=65536, help="the last position P of the layer curve")
    p.add_argument("--model-max-position", type=int, default=65536,
                   help="the last position P of the whole-model curve (0: no model curve)")
    p.add_argument("--chunk", type=int, default=512, help="new tokens per prefill chunk")
    p.add_argument("--reps", type=int, default=5, help="timed runs per decode figure")
    p.add_argument("--prefill-reps", type=int, default=2, help="timed runs per prefill figure")
    p.add_argument("--model-hidden", type=int, default=512, help="the model's hidden size")
    p.add_argument("--model-layers", type=int, default=2, help="the model's layers")
    p.add_argument("--model-heads", type=int, default=8, help="the model's query heads")
    p.add_argument("--model-kv-heads", type=int, default=2, help="the model's kv heads")
    p.add_argument("--model-vocab", type=int, default=1024, help="the model's vocabulary")
    p.add_argument("--ceiling-n", type=int, default=4096, help="size n of the n x n x n matmuls that measure the ceiling")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for both sides (0: torch's default, all cores); on a loaded machine one "
                        "thread avoids the waits of parallel regions for a descheduled thread")
    p.add_argument("--out", default="out/bench", help="directory of bench_decode.json")
    p.add_argument("--plot", default="docs/cost_curve.png", help="the figure")
    args = p.parse_args(argv)
    if min(args.first_position, args.chunk, args.reps, args.prefill_reps) < 1:
        p.error("--first-position, --chunk, --reps and --prefill-reps: expected >= 1")
    if args.max_position < args.first_position:
        p.error(f"--max-position: expected >= --first-position ({args.first_position}), got {args.max_position}")
    if args.model_max_position and args.model_max_position % args.chunk:
        p.error(f"--model-max-position: a multiple of --chunk ({args.chunk}), got {args.model_max_position}")
    if args.first_position % args.chunk and args.model_max_position:
        p.error(f"--first-position: a multiple of --chunk ({args.chunk}) for the model curve, got {args.first_position}")
    if args.model_hidden % args.model_heads or args.model_heads % args.model_kv_heads:
        p.error("--model-hidden must be a multiple of --model-heads, and --model-heads of --model-kv-heads")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine(size=args.ceiling_n)
    print(header(info), flush=True)
    positions = positions_up_to(args.first_position, args.max_position)
    head_dim = args.model_hidden // args.model_heads
    model_desc = (f"Llama {args.model_layers} layers, hidden {args.model_hidden}, H={args.model_heads}, "
                  f"Hkv={args.model_kv_heads}, D={head_dim}, same indexer and topk")
    memory = {"layer": cache_bytes_per_token(LAYER["Hkv"], LAYER["D"], LAYER["Di"], 1, 4),
              "model": cache_bytes_per_token(args.model_kv_heads, head_dim, LAYER["Di"], args.model_layers, 4)}
    for what, m in memory.items():
        print(f"cache memory per token ({what}, float32): K+V {m['kv']} B, indexer keys {m['indexer']} B "
              f"(+{100 * m['indexer'] / m['kv']:.1f}%; FP8 selection: {m['indexer_fp8']} B)")
    result = {"machine": info, "config": {**LAYER, "chunk": args.chunk, "reps": args.reps,
                                          "prefill_reps": args.prefill_reps, "dtype": "float32",
                                          "positions": positions, "model_desc": model_desc},
              "memory_bytes_per_token": memory}
    result["layer"] = bench_layer(positions, args.chunk, args.reps, args.prefill_reps)
    if args.model_max_position:
        mpos = [P for P in positions if P <= args.model_max_position]
        model = build_model(args, mpos[-1] + args.chunk + 1)
        result["model"] = {mode: bench_model(model, mode, mpos, args.chunk, args.prefill_reps)
                           for mode in ("dense", "sparse")}

    print(f"\n{header(info)}")
    print(f"one layer: {LAYER}, float32; dense = SDPA at its fastest over the same K/V cache")
    for kind, per in (("prefill", args.chunk), ("decode", 1)):
        rows = result["layer"][kind]
        print_table(f"one layer, {kind} ({per} new token{'s' if per > 1 else ''} per call)", rows, rows, per,
                    "dense_s", "dsa_s")
    if "model" in result:
        print(f"\nwhole model: {model_desc}; transformers DynamicCache")
        for kind in ("prefill", "decode"):
            per = args.chunk if kind == "prefill" else 1
            dense, dsa = result["model"]["dense"][kind], result["model"]["sparse"][kind]
            at = set(mpos)
            print_table(f"whole model, {kind}", [r for r in dense if r["position"] in at],
                        [r for r in dsa if r["position"] in at], per)
    by_pos = {kind: {r["position"]: r["ratio"] for r in result["layer"][kind]} for kind in ("prefill", "decode")}
    for P in (32768, 65536):
        if P in by_pos["decode"]:
            print(f"one layer, decode step at {P // 1024}K: DSA {by_pos['decode'][P]:.2f}x faster than dense SDPA")
    last = positions[-1]
    print(f"one layer, prefill chunk at {last // 1024}K: DSA {by_pos['prefill'][last]:.2f}x faster than dense SDPA")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_decode.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.plot)
    print(f"wrote {path} and {args.plot}")
    return result


if __name__ == "__main__":
    main()
