"""Benchmarks of dsa_ext against dense attention measured in the same run.

CPU (default): sparse_attention forward and forward+backward against dense
F.scaled_dot_product_attention(is_causal=True) on the same CPU, T = S in {2048, 4096, 8192},
H=8, Hkv=2, D=128, k=256, bfloat16 and float32. Indices are the top-k of random causal scores:
a uniformly random causal subset per query, the least cache-friendly case.

FLOPs (docs/DESIGN.md, "Cost model"): sparse forward 2*T*k*H*(Dqk+Dv), backward
2*T*k*H*(2*Dv+3*Dqk); dense causal forward 2*T*S*H*(Dqk+Dv)/2, backward 2.5x forward. The
machine's ceiling is a large float32 matmul measured in the same run.

CUDA: `python python/bench.py --device cuda [args...]` runs the GPU suites instead
(python/bench_cuda_attention.py: TFLOP/s of the tensor-core sparse attention against dense
flash SDPA, the remaining arguments go to it; then python/bench_cuda_indexer.py: indexer TFLOP/s,
top-k against torch.topk, fused against unfused indexer top-k).

Usage: python python/bench.py [--sizes 2048 4096 8192] [--dtypes bfloat16 float32] [--out DIR]
       python python/bench.py --device cuda [--shapes mla gqa] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import cli  # python/ (this file's folder) is on sys.path
import dsa_ext
from dsa_ext import reference


def timeit(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_ceiling(reps: int = 3) -> float:
    """float32 GEMM rate on this machine, FLOP/s: the practical ceiling for attention math."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    return 2 * 4096**3 / timeit(lambda: a @ b, reps)


def random_causal_topk(T: int, S: int, k: int) -> torch.Tensor:
    scores = torch.rand(1, T, S).masked_fill(~reference.causal_mask(T, S), float("-inf"))
    return dsa_ext.topk_indices(scores, k)


def bench_attention_cpu(T: int, dtype: torch.dtype, H=8, Hkv=2, D=128, k=256, reps=3):
    q = torch.randn(1, T, H, D, dtype=dtype, requires_grad=True)
    kk = torch.randn(1, T, Hkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(1, T, Hkv, D, dtype=dtype, requires_grad=True)
    idx = random_causal_topk(T, T, k)
    grad = torch.randn(1, T, H, D, dtype=dtype)
    qd, kd, vd = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, kk, v))
    grad_d = grad.transpose(1, 2).contiguous()

    def sparse_fwd():
        with torch.no_grad():
            dsa_ext.sparse_attention(q, kk, v, idx)

    def sparse_fwd_bwd():
        torch.autograd.backward(dsa_ext.sparse_attention(q, kk, v, idx), grad)

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
        "T": T, "S": T, "H": H, "Hkv": Hkv, "D": D, "k": k, "dtype": str(dtype).replace("torch.", ""),
        **{f"{n}_s": v for n, v in t.items()},
        "ratio_fwd": t["dense_fwd"] / t["sparse_fwd"],
        "ratio_fwd_bwd": t["dense_fwd_bwd"] / t["sparse_fwd_bwd"],
        "flop_ratio": dense_flops_fwd / sparse_flops_fwd,
        "sparse_fwd_tflops": sparse_flops_fwd / t["sparse_fwd"] / 1e12,
        "sparse_fwd_bwd_tflops": (sparse_flops_fwd + sparse_flops_bwd) / t["sparse_fwd_bwd"] / 1e12,
        "dense_fwd_tflops": dense_flops_fwd / t["dense_fwd"] / 1e12,
        "dense_fwd_bwd_tflops": 3.5 * dense_flops_fwd / t["dense_fwd_bwd"] / 1e12,
    }


def print_table(rows, ceiling):
    print(f"\nsparse_attention vs dense SDPA(is_causal=True), CPU x{torch.get_num_threads()} threads, "
          f"float32 matmul ceiling {ceiling / 1e12:.3f} TFLOP/s")
    head = (f"{'dtype':>9} {'T=S':>6} {'k':>4} | {'sparse fwd':>10} {'dense fwd':>10} {'ratio':>6} | "
            f"{'sparse f+b':>10} {'dense f+b':>10} {'ratio':>6} | {'sparse TF/s':>11} {'dense TF/s':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['dtype']:>9} {r['T']:>6} {r['k']:>4} | {r['sparse_fwd_s']:>9.3f}s {r['dense_fwd_s']:>9.3f}s "
              f"{r['ratio_fwd']:>5.1f}x | {r['sparse_fwd_bwd_s']:>9.3f}s {r['dense_fwd_bwd_s']:>9.3f}s "
              f"{r['ratio_fwd_bwd']:>5.1f}x | {r['sparse_fwd_bwd_tflops']:>11.3f} {r['dense_fwd_bwd_tflops']:>10.3f}")
    print("ratio = dense time / sparse time (same run); causal FLOP ratio = T/(2k); TF/s over fwd+bwd")


CPU_DEFAULTS = {"sizes": [2048, 4096, 8192], "dtypes": ["bfloat16", "float32"], "k": 256, "reps": 3}


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
    parser.add_argument("--out", default="out/bench", help="directory of bench_cpu.json")
    args, rest = parser.parse_known_args(argv)
    cpu_only = [f"--{name}" for name in CPU_DEFAULTS if name in vars(args)]
    if args.device == "cuda":
        if cpu_only:
            parser.error(f"{' '.join(cpu_only)}: options of the CPU benchmark; --device cuda runs "
                         f"python/bench_cuda_attention.py's shapes (see its --help)")
        return args, rest
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (--shapes, --indices and the other options of "
                     f"python/bench_cuda_attention.py apply with --device cuda only; the CPU benchmark "
                     f"takes --sizes, --dtypes, --k, --reps)")
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
    ceiling = matmul_ceiling()
    rows = []
    for dtype in args.dtypes:
        for T in args.sizes:
            rows.append(bench_attention_cpu(T, getattr(torch, dtype), k=args.k, reps=args.reps))
            r = rows[-1]
            print(f"{r['dtype']} T={T}: fwd+bwd ratio {r['ratio_fwd_bwd']:.1f}x", flush=True)
    print_table(rows, ceiling)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_cpu.json")
    with open(path, "w") as f:
        json.dump({"device": "cpu", "threads": torch.get_num_threads(), "matmul_ceiling_flops": ceiling,
                   "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
