"""Benchmark of the CUDA lightning indexer, deterministic top-k and fused indexer top-k.

For each shape (causal, queries aligned to the last keys):
  * indexer_logits time and TFLOP/s, counting 2 * Hi * Di FLOPs per visible (query, key) pair
  * indexer_logits_backward time and TFLOP/s (useful FLOPs: the dq and dk products, twice the
    forward's; the kernels also recompute the dot products twice)
  * topk_indices on those logits vs torch.topk(sorted=False) on the same GPU
  * fused indexer_topk vs indexer_logits followed by topk_indices: time and peak memory, and
    whether both return the same indices (they must: same score tiles)
  * the same logits and fused top-k on FP8 (e4m3) inputs (dsa_ext.fp8; quantised once, untimed)
Shapes: S in {8K, 32K, 128K} with Hi=64, Di=128, k=2048 and the small head shape Hi=8, Di=64;
T = min(S, --max-t). The run is time-bounded (--max-seconds); anything not measured is
reported as skipped. Prints a table and writes JSON (--json).

Usage: python python/bench_cuda_indexer.py [--quick] [--json out/bench_cuda_indexer.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import cli  # python/ (this file's folder) is on sys.path
import dsa_ext


def causal_pairs(T: int, S: int) -> int:
    """Visible (query, key) pairs with bottom-right causal alignment (query t sees t + S - T + 1 keys)."""
    return T * (S - T) + T * (T + 1) // 2


def time_ms(fn, budget_s: float, min_reps: int = 3, max_reps: int = 20) -> float:
    """Median time of fn in ms (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    t0 = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - t0 < budget_s):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bytes(fn) -> int:
    """Peak memory allocated by fn beyond what was allocated before it (its result included)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def bench_shape(B, T, S, Hi, Di, k, dtype, budget_s, with_backward):
    r = dict(B=B, T=T, S=S, Hi=Hi, Di=Di, k=k, dtype=str(dtype).replace("torch.", ""))
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, T, Hi, Di, device="cuda", dtype=dtype, generator=g)
    kk = torch.randn(B, S, Di, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(B, T, Hi, device="cuda", generator=g) * Hi ** -0.5
    flops = 2 * Hi * Di * causal_pairs(T, S) * B

    fused = lambda: dsa_ext.indexer_topk(q, kk, w, k)  # noqa: E731
    r["fused_ms"] = time_ms(fused, budget_s)
    r["fused_tflops"] = flops / r["fused_ms"] / 1e9
    r["fused_peak_mb"] = peak_bytes(fused) / 2**20
    q8, k8, w8, ks = dsa_ext.fp8.indexer_inputs(q, kk, w)
    r["fp8_fused_ms"] = time_ms(lambda: dsa_ext.indexer_topk(q8, k8, w8, k, k_scale=ks), budget_s)

    logits_bytes = B * T * S * 4
    free, _ = torch.cuda.mem_get_info()
    if 2.5 * logits_bytes > free:
        r["skipped"] = f"unfused path needs {2.5 * logits_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        return r
    logits_fn = lambda: dsa_ext.indexer_logits(q, kk, w)  # noqa: E731
    r["logits_ms"] = time_ms(logits_fn, budget_s)
    r["logits_tflops"] = flops / r["logits_ms"] / 1e9
    r["fp8_logits_ms"] = time_ms(lambda: dsa_ext.indexer_logits(q8, k8, w8, k_scale=ks), budget_s)
    r["fp8_logits_tflops"] = flops / r["fp8_logits_ms"] / 1e9
    logits = logits_fn()
    r["topk_ms"] = time_ms(lambda: dsa_ext.topk_indices(logits, k), budget_s)
    r["torch_topk_ms"] = time_ms(lambda: torch.topk(logits, k, dim=-1, sorted=False), budget_s)
    unfused = lambda: dsa_ext.topk_indices(dsa_ext.indexer_logits(q, kk, w), k)  # noqa: E731
    r["unfused_ms"] = time_ms(unfused, budget_s)
    del logits
    r["unfused_peak_mb"] = peak_bytes(unfused) / 2**20
    r["fused_equals_unfused"] = bool(torch.equal(fused(), unfused()))
    if with_backward:
        grad = torch.randn(B, T, S, device="cuda", generator=g)
        bwd = lambda: torch.ops.dsa.indexer_logits_backward(grad, q, kk, w, (Hi * Di) ** -0.5, True)  # noqa: E731
        r["backward_ms"] = time_ms(bwd, budget_s)
        r["backward_tflops"] = 2 * flops / r["backward_ms"] / 1e9
        del grad
    return r


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def print_table(rows):
    cols = [("shape", None), ("logits ms", ".2f"), ("TFLOP/s", ".0f"), ("bwd ms", ".2f"), ("bwd TF/s", ".0f"),
            ("topk ms", ".2f"), ("torch.topk", ".2f"), ("fused ms", ".2f"), ("unfused ms", ".2f"),
            ("fused MiB", ".0f"), ("unfused MiB", ".0f"), ("same", None), ("fp8 TF/s", ".0f"),
            ("fp8 fused ms", ".2f")]
    keys = [None, "logits_ms", "logits_tflops", "backward_ms", "backward_tflops", "topk_ms", "torch_topk_ms",
            "fused_ms", "unfused_ms", "fused_peak_mb", "unfused_peak_mb", "fused_equals_unfused",
            "fp8_logits_tflops", "fp8_fused_ms"]
    lines = [[name for name, _ in cols]]
    for r in rows:
        shape = f"T={r['T']} S={r['S']} Hi={r['Hi']} Di={r['Di']} k={r['k']}"
        line = [shape]
        for (name, spec), key in zip(cols[1:], keys[1:]):
            v = r.get(key)
            line.append(str(v) if spec is None and v is not None else fmt(v, spec) if spec else "-")
        lines.append(line)
    widths = [max(len(l[i]) for l in lines) for i in range(len(cols))]
    for l in lines:
        print("  ".join(c.rjust(wd) for c, wd in zip(l, widths)))
    for r in rows:
        if "skipped" in r:
            print(f"  T={r['T']} S={r['S']} Hi={r['Hi']}: {r['skipped']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    ap.add_argument("--json", default=os.path.join("out", "bench_cuda_indexer.json"), help="where the results go")
    ap.add_argument("--max-t", type=int, default=8192, help="queries per shape: T = min(S, max_t)")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="stop starting new shapes after this")
    ap.add_argument("--per-op-seconds", type=float, default=0.5, help="timing budget of one measurement")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"], help="indexer input dtype")
    ap.add_argument("--no-backward", action="store_true", help="skip indexer_logits_backward")
    ap.add_argument("--quick", action="store_true", help="S in {8K, 32K} only, T <= 4096")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not dsa_ext.built_with_cuda:
        print("bench_cuda_indexer: needs a CUDA device and a CUDA build of dsa_ext", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    seqs = [8192, 32768] if args.quick else [8192, 32768, 131072]
    max_t = min(args.max_t, 4096) if args.quick else args.max_t
    shapes = [(1, min(S, max_t), S, 64, 128, 2048) for S in seqs]
    shapes += [(1, min(S, max_t), S, 8, 64, 2048) for S in seqs]
    rows, t_start = [], time.perf_counter()
    for B, T, S, Hi, Di, k in shapes:
        if time.perf_counter() - t_start > args.max_seconds:
            rows.append(dict(B=B, T=T, S=S, Hi=Hi, Di=Di, k=k, skipped="time budget spent"))
            continue
        rows.append(bench_shape(B, T, S, Hi, Di, k, dtype, args.per_op_seconds, not args.no_backward))
        torch.cuda.empty_cache()
    print(f"dsa_ext CUDA indexer on {torch.cuda.get_device_name()} ({args.dtype}, causal, k=2048)")
    print_table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), dtype=args.dtype, rows=rows), f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
