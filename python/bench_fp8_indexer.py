"""Accuracy of the FP8 (e4m3) lightning indexer against bfloat16 and the exact scores.

For each input distribution the program scores the same queries and keys four ways: exactly
(float64 reference on the float32 inputs), in bfloat16 (q_idx, k_idx cast, float32
accumulation), in FP8 (dsa_ext.fp8: per-row e4m3 with float32 scales), and in FP8 after an
orthonormal Hadamard rotation of q_idx and k_idx (exact scores unchanged; the rotation spreads
outlier channels before the cast, as DeepSeek-V3.2 does). It reports the scores' error relative
to the largest exact score, and the recall of the exact top-k set (rows with more than k visible
keys; shorter rows are dense and trivially exact).

Distributions (B=1, T=S, causal):
  gaussian   q_idx, k_idx ~ N(0, 1)
  outliers   the same with 4 channels scaled by 20 (activation outliers)
  planted    every query is built from 64 random earlier keys plus noise: a clear top-k, the
             case selection is for

Usage: python python/bench_fp8_indexer.py [--device cpu|cuda] [--T 2048] [--k 256] [--Hi 64] [--Di 128]
       [--json out/bench/bench_fp8_indexer.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import cli  # python/ (this file's folder) is on sys.path
import dsa_ext
from dsa_ext import fp8, reference
from dsa_ext.nn import hadamard_matrix


def make_inputs(kind: str, T: int, Hi: int, Di: int, device, gen: torch.Generator):
    k = torch.randn(1, T, Di, generator=gen).to(device)
    if kind == "planted":
        # 64 earlier keys per query, mixed with positive weights, plus noise of the same size
        t = torch.arange(T)[:, None]
        src = (torch.rand(T, 64, generator=gen) * (t + 1)).long()  # positions <= t
        mix = torch.rand(T, Hi, 64, generator=gen).to(device)
        q = torch.einsum("thm,tmd->thd", mix, k[0, src.to(device)]) / 8
        q = (q + torch.randn(T, Hi, Di, generator=gen).to(device))[None]
    else:
        q = torch.randn(1, T, Hi, Di, generator=gen).to(device)
        if kind == "outliers":
            q[..., :4] *= 20
            k[..., :4] *= 20
    w = (torch.randn(1, T, Hi, generator=gen) * Hi ** -0.5).to(device)
    return q, k, w


def exact_logits(q, k, w, chunk=128):
    """float64 scores on the CPU, a chunk of queries at a time ([chunk, Hi, S] temporaries)."""
    q, k, w = q.double().cpu(), k.double().cpu(), w.double().cpu()
    T, S = q.shape[1], k.shape[1]
    out = torch.empty(1, T, S, dtype=torch.float64)
    scale = (q.shape[2] * q.shape[3]) ** -0.5
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        dots = torch.einsum("thd,sd->ths", q[0, t0:t1], k[0]).relu_()
        out[0, t0:t1] = scale * torch.einsum("th,ths->ts", w[0, t0:t1], dots)
    mask = reference.causal_mask(T, S)
    return out.masked_fill(~mask, float("-inf"))


def recall(indices, exact_indices, rows):
    """Mean |selected & exact| / k over the given rows."""
    a, b = indices[0, rows].long(), exact_indices[0, rows].long()
    S = int(max(a.max(), b.max())) + 2
    hit = torch.zeros(len(rows), S, dtype=torch.bool)
    hit.scatter_(1, b.clamp_min(0), True)
    found = hit.gather(1, a.clamp_min(0)) & (a >= 0)
    return (found.sum(1).double() / (b >= 0).sum(1)).mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() and dsa_ext.built_with_cuda else "cpu",
                    help="cuda when a GPU and a CUDA build of dsa_ext are present, else cpu")
    ap.add_argument("--T", type=int, default=2048, help="queries = keys (causal)")
    ap.add_argument("--k", type=int, default=256, help="keys selected per query (< --T)")
    ap.add_argument("--Hi", type=int, default=64, help="indexer heads")
    ap.add_argument("--Di", type=int, default=128, help="indexer head width (a power of two: Hadamard rotation)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "out/bench"), "bench_fp8_indexer.json"),
                    help="where the results go")
    args = ap.parse_args(argv)
    dev, T, k = args.device, args.T, args.k
    rot = hadamard_matrix(args.Di, device=dev)
    rows = torch.arange(k, T)  # rows with more than k visible keys
    results = []
    start = time.time()
    for kind in ("gaussian", "outliers", "planted"):
        gen = torch.Generator().manual_seed(args.seed)
        q, k_idx, w = make_inputs(kind, T, args.Hi, args.Di, dev, gen)
        exact = exact_logits(q, k_idx, w)
        exact_top = dsa_ext.topk_indices(exact, k)
        peak = exact[torch.isfinite(exact)].abs().max().item()
        variants = {
            "bfloat16": lambda: dsa_ext.indexer_logits(q.bfloat16(), k_idx.bfloat16(), w),
            "fp8 e4m3": lambda: fp8.indexer_logits(q, k_idx, w),
            "fp8 e4m3 + hadamard": lambda: fp8.indexer_logits(q @ rot, k_idx @ rot, w),
        }
        for name, fn in variants.items():
            got = fn().double().cpu()
            finite = torch.isfinite(exact)
            err = (got - exact)[finite].abs()
            results.append(dict(
                inputs=kind, dtype=name, max_err_rel=err.max().item() / peak, rms_err_rel=err.pow(2).mean().sqrt().item() / peak,
                topk_recall=recall(dsa_ext.topk_indices(got.float(), k), exact_top, rows)))
    print(f"\nFP8 indexer accuracy on {dev} (T=S={T}, Hi={args.Hi}, Di={args.Di}, k={k}; recall over rows "
          f"t >= k; errors relative to the largest exact score) in {time.time() - start:.1f} s")
    head = f"{'inputs':<10} {'scores':<20} {'max err':>9} {'rms err':>9} {'top-k recall':>13}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['inputs']:<10} {r['dtype']:<20} {r['max_err_rel']:>9.2e} {r['rms_err_rel']:>9.2e} "
              f"{r['topk_recall']:>13.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(device=dev, T=T, k=k, Hi=args.Hi, Di=args.Di, rows=results), f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
