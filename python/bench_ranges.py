"""What a packed sequence costs with per-query key ranges, CPU.

One packed sequence of D documents x L tokens (B = 1, T = S = D * L, key ranges from cu_seqlens)
against the same documents as a batch (B = D, T = S = L, no ranges), measured in the same run:
the kernels skip the key tiles outside every query's range, so the packed call should cost
about what the batch costs (the bound checked here: at most 1.5x). For contrast, the packed
sequence without ranges (one long causal sequence: what the ranges save, and wrong across
documents).

  indexer_topk: Hi=4, Di=64, topk=256 (the project's defaults), float32.
  indexer_kl_loss forward + backward, dense warm-up form: the same indexer, main attention H=8,
  Hkv=2, Dqk=128, float32.

Each figure is the fastest of --reps calls (the contrast: one call, it is the slow one). Prints
the CPU, its vector flags, the thread count and the float32 matmul ceiling of this run.

Usage: python python/bench_ranges.py [--docs 64] [--doc-len 1024] [--reps 3] [--no-contrast]
                                     [--out out/bench]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import dsa_ext
from bench import matmul_ceiling  # python/ is on sys.path when this file runs
from dsa_ext import ranges

INDEXER = dict(Hi=4, Di=64, topk=256)
ATTENTION = dict(H=8, Hkv=2, Dqk=128)
BOUND = 1.5


def cpu_description() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model}; flags: {' '.join(vector) or 'n/a'}; torch threads: {torch.get_num_threads()}"


def fastest(fn, reps: int, warmup: int = 1) -> float:
    """Seconds of the fastest of `reps` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_inputs(docs: int, L: int):
    """The batch [docs, L, ...] and the same tensors viewed as one packed sequence [1, docs * L, ...]."""
    Hi, Di = INDEXER["Hi"], INDEXER["Di"]
    H, Hkv, Dqk = ATTENTION["H"], ATTENTION["Hkv"], ATTENTION["Dqk"]
    batch = dict(q_idx=torch.randn(docs, L, Hi, Di), k_idx=torch.randn(docs, L, Di), w=torch.randn(docs, L, Hi),
                 q=torch.randn(docs, L, H, Dqk), k=torch.randn(docs, L, Hkv, Dqk))
    packed = {n: t.reshape(1, docs * L, *t.shape[2:]) for n, t in batch.items()}
    key_start, key_end = ranges.from_cu_seqlens(torch.arange(docs + 1) * L)
    return batch, packed, dict(key_start=key_start, key_end=key_end)


def topk_case(batch, packed, rng, reps, contrast):
    topk = INDEXER["topk"]
    run = lambda x, **r: dsa_ext.indexer_topk(x["q_idx"], x["k_idx"], x["w"], topk, **r)  # noqa: E731
    docs, L = batch["w"].shape[:2]
    # the packed selection is the batch's, shifted to each document's offset
    want = run(batch)
    want = torch.where(want >= 0, want + (torch.arange(docs) * L).view(docs, 1, 1), want).reshape(1, docs * L, topk)
    same = torch.equal(run(packed, **rng), want)
    r = {"batch_s": fastest(lambda: run(batch), reps), "packed_ranges_s": fastest(lambda: run(packed, **rng), reps),
         "same_indices": same}
    if contrast:
        r["packed_no_ranges_s"] = fastest(lambda: run(packed), 1, warmup=0)
    return r


def kl_case(batch, packed, rng, reps, contrast):
    def run(x, **r):
        leaves = [x[n].detach().requires_grad_() for n in ("q_idx", "k_idx", "w")]
        loss = dsa_ext.indexer_kl_loss(*leaves, x["q"], x["k"], **r)
        loss.sum().backward()
        return loss.detach(), leaves[1].grad

    docs, L = batch["w"].shape[:2]
    (lb, gb), (lp, gp) = run(batch), run(packed, **rng)
    agree = max((lb.reshape(1, -1) - lp).abs().max().item(), (gb.reshape(1, docs * L, -1) - gp).abs().max().item())
    r = {"batch_s": fastest(lambda: run(batch), reps), "packed_ranges_s": fastest(lambda: run(packed, **rng), reps),
         "max_abs_diff_loss_and_grad_k_idx": agree}
    if contrast:
        r["packed_no_ranges_s"] = fastest(lambda: run(packed), 1, warmup=0)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--doc-len", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-contrast", action="store_true", help="skip the packed sequence without ranges")
    parser.add_argument("--out", default="out/bench")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {cpu_description()}")
    ceiling = matmul_ceiling()
    print(f"float32 matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s")
    batch, packed, rng = make_inputs(args.docs, args.doc_len)
    print(f"{args.docs} documents x {args.doc_len} tokens: batch B={args.docs}, T=S={args.doc_len} without ranges | "
          f"packed B=1, T=S={args.docs * args.doc_len} with ranges from cu_seqlens; float32\n", flush=True)
    results = {}
    for name, case, what in (("indexer_topk", topk_case, f"indexer_topk {INDEXER}"),
                             ("indexer_kl_loss", kl_case, f"indexer_kl_loss fwd+bwd, dense form, {INDEXER} {ATTENTION}")):
        r = case(batch, packed, rng, args.reps, not args.no_contrast)
        r["ratio"] = r["packed_ranges_s"] / r["batch_s"]
        results[name] = r
        check = {k: v for k, v in r.items() if k in ("same_indices", "max_abs_diff_loss_and_grad_k_idx")}
        print(f"{what}\n  batch            {r['batch_s']:8.3f} s\n  packed + ranges  {r['packed_ranges_s']:8.3f} s"
              f"   ratio {r['ratio']:.2f}x (bound {BOUND}x: {'ok' if r['ratio'] <= BOUND else 'EXCEEDED'}); {check}")
        if "packed_no_ranges_s" in r:
            print(f"  packed, no ranges {r['packed_no_ranges_s']:7.3f} s   "
                  f"{r['packed_no_ranges_s'] / r['batch_s']:.1f}x the batch (one causal sequence across documents)")
        print(flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_ranges.json")
    with open(path, "w") as f:
        json.dump({"cpu": cpu_description(), "matmul_ceiling_flops": ceiling, "docs": args.docs,
                   "doc_len": args.doc_len, "reps": args.reps, "indexer": INDEXER, "attention": ATTENTION,
                   "results": results}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
