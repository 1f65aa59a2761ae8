"""Benchmarks of dsa_ext against dense attention measured in the same run.

CPU (default), after the machine: the CPU, its flags (AVX-512, AVX512-BF16, AMX), the build
(OpenMP, the bfloat16 micro-kernels in use) and the matmul ceilings in float32 and bfloat16 at
all threads and at one (python/cpu_info.py), printed with every table.
1. Scaling: each operator at 1 thread and at all threads, the speedup and the parallel
   efficiency (speedup / threads), at T = S = --scaling-T (8192), H=8, Hkv=2, D=128, Hi=4,
   Di=64, k=256, float32 and bfloat16.
2. sparse_attention forward and forward+backward against dense
   F.scaled_dot_product_attention(is_causal=True) on the same CPU at all threads, T = S in
   --sizes (4096, 8192, 16384), same shape. Indices are the top-k of random causal scores: a
   uniformly random causal subset per query, the least cache-friendly case.

FLOPs (docs/DESIGN.md, "Cost model"): sparse forward 2*T*k*H*(Dqk+Dv), backward
2*T*k*H*(2*Dv+3*Dqk); dense causal forward 2*T*S*H*(Dqk+Dv)/2, backward 2.5x forward.

CUDA: `python python/bench.py --device cuda [args...]` runs the GPU suites instead
(python/bench_cuda_attention.py: TFLOP/s of the tensor-core sparse attention against dense
flash SDPA, the remaining arguments go to it; then python/bench_cuda_indexer.py: indexer TFLOP/s,
top-k against torch.topk, fused against unfused indexer top-k).

Usage: python python/bench.py [--sizes 4096 8192 16384] [--dtypes bfloat16 float32]
                              [--scaling-T 8192] [--out DIR]
       python python/bench.py --device cuda [--shapes mla gqa] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

import cli  # python/ (this file's folder) is on sys.path
import dsa_ext
from cpu_info import header, machine, threads, timeit
from dsa_ext import reference

SHAPE = dict(H=8, Hkv=2, D=128, Hi=4, Di=64)


def random_causal_topk(T: int, S: int, k: int) -> torch.Tensor:
    scores = torch.rand(1, T, S).masked_fill(~reference.causal_mask(T, S), float("-inf"))
    return dsa_ext.topk_indices(scores, k)


def attention_inputs(T: int, dtype: torch.dtype, k: int):
    H, Hkv, D = SHAPE["H"], SHAPE["Hkv"], SHAPE["D"]
    q = torch.randn(1, T, H, D, dtype=dtype, requires_grad=True)
    kk = torch.randn(1, T, Hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(1, T, Hkv, D, dtype=dtype, requires_grad=True)
    return q, kk, v, random_causal_topk(T, T, k), torch.randn(1, T, H, D, dtype=dtype)


def sparse_calls(q, kk, v, idx, grad):
    def fwd():
        with torch.no_grad():
            dsa_ext.sparse_attention(q, kk, v, idx)

    def fwd_bwd():
        torch.autograd.backward(dsa_ext.sparse_attention(q, kk, v, idx), grad)

    return fwd, fwd_bwd


def bench_scaling(T: int, dtype: torch.dtype, k: int, all_threads: int, reps: int):
    """Each operator at 1 thread and at all threads (same inputs)."""
    H, Hkv, D, Hi, Di = (SHAPE[n] for n in ("H", "Hkv", "D", "Hi", "Di"))
    q_idx, k_idx, w = (torch.randn(*s, dtype=dtype, requires_grad=True) for s in ((1, T, Hi, Di), (1, T, Di), (1, T, Hi)))
    kl_q, kl_k = torch.randn(1, T, H, D, dtype=dtype), torch.randn(1, T, Hkv, D, dtype=dtype)
    q, kk, v, idx, grad = attention_inputs(T, dtype, k)
    sparse_fwd, sparse_fwd_bwd = sparse_calls(q, kk, v, idx, grad)

    def no_grad(fn):
        def call():
            with torch.no_grad():
                fn()
        return call

    ops = {
        "indexer_logits": no_grad(lambda: dsa_ext.indexer_logits(q_idx, k_idx, w)),
        "indexer_topk": no_grad(lambda: dsa_ext.indexer_topk(q_idx, k_idx, w, k)),
        "sparse_attention fwd": sparse_fwd,
        "sparse_attention fwd+bwd": sparse_fwd_bwd,
        "indexer_kl_loss top-k fwd+bwd": lambda: dsa_ext.indexer_kl_loss(q_idx, k_idx, w, kl_q, kl_k, idx).sum().backward(),
    }
    rows = []
    for name, fn in ops.items():
        t = {}
        for n in (1, all_threads):
            with threads(n):
                t[n] = timeit(fn, reps)
        speedup = t[1] / t[all_threads]
        rows.append({"op": name, "dtype": str(dtype)[6:], "T": T, **SHAPE, "k": k, "t1_s": t[1], "tN_s": t[all_threads],
                     "threads": all_threads, "speedup": speedup, "efficiency": speedup / all_threads})
        print(f"{name} {rows[-1]['dtype']}: {t[1]:.3f} s -> {t[all_threads]:.3f} s ({speedup:.2f}x)", flush=True)
    return rows


def print_scaling(rows, info):
    n = rows[0]["threads"]
    print(f"\nscaling, T=S={rows[0]['T']}, {SHAPE}, k={rows[0]['k']}, random causal top-k indices\n{header(info)}")
    head = f"{'op':>30} {'dtype':>9} | {'1 thread':>9} {f'{n} threads':>10} | {'speedup':>7} {'efficiency':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['op']:>30} {r['dtype']:>9} | {r['t1_s']:>8.3f}s {r['tN_s']:>9.3f}s | {r['speedup']:>6.2f}x "
              f"{r['efficiency']:>9.0%}")
    print(f"speedup = time at 1 thread / time at {n}; efficiency = speedup / {n}")


def bench_attention_cpu(T: int, dtype: torch.dtype, k: int, reps: int):
    H, D = SHAPE["H"], SHAPE["D"]
    q, kk, v, idx, grad = attention_inputs(T, dtype, k)
    qd, kd, vd = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, kk, v))
    grad_d = grad.transpose(1, 2).contiguous()
    sparse_fwd, sparse_fwd_bwd = sparse_calls(q, kk, v, idx, grad)

    def dense_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)

    def dense_fwd_bwd():
        torch.autograd.backward(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True), grad_d)

    t = {name: timeit(fn, reps) for name, fn in [("sparse_fwd", sparse_fwd), ("dense_fwd", dense_fwd),
                                                   ("sparse_fwd_bwd", sparse_fwd_bwd),
                                                   ("dense_fwd_bwd", dense_fwd_bwd)]}
    sparse_flops_fwd = 2 * T * k * H * (D + D)
    sparse_flops_bwd = 2 * T * k * H * (2 * D + 3 * D)
    dense_flops_fwd = 2 * T * T * H * (D + D) / 2
    return {
        "T": T, "S": T, **SHAPE, "k": k, "dtype": str(dtype).replace("torch.", ""),
        **{f"{n}_s": v for n, v in t.items()},
        "ratio_fwd": t["dense_fwd"] / t["sparse_fwd"],
        "ratio_fwd_bwd": t["dense_fwd_bwd"] / t["sparse_fwd_bwd"],
        "flop_ratio": dense_flops_fwd / sparse_flops_fwd,
        "sparse_fwd_tflops": sparse_flops_fwd / t["sparse_fwd"] / 1e12,
        "sparse_fwd_bwd_tflops": (sparse_flops_fwd + sparse_flops_bwd) / t["sparse_fwd_bwd"] / 1e12,
        "dense_fwd_tflops": dense_flops_fwd / t["dense_fwd"] / 1e12,
        "dense_fwd_bwd_tflops": 3.5 * dense_flops_fwd / t["dense_fwd_bwd"] / 1e12,
    }


def print_table(rows, info):
    print(f"\nsparse_attention vs dense SDPA(is_causal=True), {SHAPE}\n{header(info)}")
    head = (f"{'dtype':>9} {'T=S':>6} {'k':>4} | {'sparse fwd':>10} {'dense fwd':>10} {'ratio':>6} | "
            f"{'sparse f+b':>10} {'dense f+b':>10} {'ratio':>6} | {'sparse TF/s':>11} {'dense TF/s':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['dtype']:>9} {r['T']:>6} {r['k']:>4} | {r['sparse_fwd_s']:>9.3f}s {r['dense_fwd_s']:>9.3f}s "
              f"{r['ratio_fwd']:>5.1f}x | {r['sparse_fwd_bwd_s']:>9.3f}s {r['dense_fwd_bwd_s']:>9.3f}s "
              f"{r['ratio_fwd_bwd']:>5.1f}x | {r['sparse_fwd_bwd_tflops']:>11.3f} {r['dense_fwd_bwd_tflops']:>10.3f}")
    print("ratio = dense time / sparse time (same run, all threads); causal FLOP ratio = T/(2k); TF/s over fwd+bwd")


CPU_DEFAULTS = {"sizes": [4096, 8192, 16384], "dtypes": ["bfloat16", "float32"], "k": 256, "reps": 3,
                "scaling_T": 8192}


def _default(name: str) -> str:
    value = CPU_DEFAULTS[name]
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: the CPU benchmark; cuda: the GPU suites, which take the "
                             "options of python/bench_cuda_attention.py (--shapes, --indices, ...)")
    # the CPU benchmark's options: absent unless given, so that --device cuda can reject them
    parser.add_argument("--sizes", type=int, nargs="+", default=argparse.SUPPRESS,
                        help=f"sequence lengths T = S, each > --k (default: {_default('sizes')})")
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32", "float64"], default=argparse.SUPPRESS,
                        help=f"input dtypes (default: {_default('dtypes')})")
    parser.add_argument("--k", type=int, default=argparse.SUPPRESS, help=f"keys per query, topk (default: {_default('k')})")
    parser.add_argument("--reps", type=int, default=argparse.SUPPRESS,
                        help=f"timed repetitions, the median is taken (default: {_default('reps')})")
    parser.add_argument("--scaling-T", type=int, default=argparse.SUPPRESS,
                        help=f"T = S of the 1-thread vs all-threads table, 0 skips it (default: {_default('scaling_T')})")
    parser.add_argument("--out", default="out/bench", help="directory of bench_cpu.json")
    args, rest = parser.parse_known_args(argv)
    cpu_only = [f"--{name.replace('_', '-')}" for name in CPU_DEFAULTS if name in vars(args)]
    if args.device == "cuda":
        if cpu_only:
            parser.error(f"{' '.join(cpu_only)}: options of the CPU benchmark; --device cuda runs "
                         f"python/bench_cuda_attention.py's shapes (see its --help)")
        return args, rest
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (--shapes, --indices and the other options of "
                     f"python/bench_cuda_attention.py apply with --device cuda only; the CPU benchmark "
                     f"takes --sizes, --dtypes, --k, --reps, --scaling-T)")
    for name, value in CPU_DEFAULTS.items():
        vars(args).setdefault(name, value)
    if args.k < 1 or args.reps < 1:
        parser.error(f"--k and --reps: expected >= 1, got {args.k} and {args.reps}")
    short = [T for T in args.sizes if T <= args.k]
    if short:
        parser.error(f"--sizes {' '.join(map(str, short))}: each T must exceed --k {args.k}; with T <= k every "
                     f"query keeps all its keys, so sparse and dense attention do the same work and the ratio "
                     f"measures nothing")
    return args, rest


def main(argv=None):
    args, rest = parse_args(argv)
    if args.device == "cuda":
        import bench_cuda_attention  # python/ is on sys.path when this file runs
        import bench_cuda_indexer

        bench_cuda_attention.main(rest)
        return bench_cuda_indexer.main([])
    torch.manual_seed(0)
    info = machine()
    print(header(info), flush=True)
    scaling = []
    for dtype in args.dtypes if args.scaling_T else []:
        scaling += bench_scaling(args.scaling_T, getattr(torch, dtype), args.k, info["threads"], args.reps)
    rows = []
    for dtype in args.dtypes:
        for T in args.sizes:
            rows.append(bench_attention_cpu(T, getattr(torch, dtype), args.k, args.reps))
            r = rows[-1]
            print(f"{r['dtype']} T={T}: fwd+bwd ratio {r['ratio_fwd_bwd']:.1f}x", flush=True)
    if scaling:
        print_scaling(scaling, info)
    print_table(rows, info)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_cpu.json")
    with open(path, "w") as f:
        json.dump({"device": "cpu", "machine": info, "scaling": scaling, "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
