"""Benchmark of the CUDA kernels at decoding shapes: one query per sequence (T = 1) over a long
cache, batch 1 and 64, bfloat16.

  indexer_topk   Hi=64, Di=128, k=2048 (DeepSeek-V3.2's indexer) over S = 32K and 128K cached
                 keys. The fused kernel splits each row's keys over many blocks and merges their
                 candidates when B * T rows are too few to fill the GPU; the `1 block/row` column
                 is the same call under DSA_EXT_CUDA_TOPK_MAX_SPLITS=1 (one block per row, the
                 many-rows path). GB/s counts the bytes every call must read: the B * S indexer
                 keys (2 bytes each), the queries and head weights.
  sparse_attn    k=2048 selected rows per query; MLA (H=128 on one 576-wide latent, v = kv[..., :512])
                 and GQA (H=32, Hkv=8, D=128), S = 32K. The tensor-core forward splits each row's
                 index slots when the blocks are too few; `1 block/row` is DSA_EXT_CUDA_ATTN_MAX_SPLITS=1.
                 GB/s counts the gathered K (and V unless in K) rows, q and out.

Both paths must agree: the top-k indices exactly (same scores, same tie rule), the attention
output within bfloat16 rounding. Times are medians of --reps CUDA-event timings after a warm-up.

Usage: python python/bench_cuda_decode.py [--json out/decode_bench.json] [--reps N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import cli  # python/ (this file's folder) is on sys.path
import dsa_ext
from bench_cuda_indexer import time_ms

TOPK = 2048
SPLIT_ENV = {"indexer_topk": "DSA_EXT_CUDA_TOPK_MAX_SPLITS", "sparse_attn": "DSA_EXT_CUDA_ATTN_MAX_SPLITS"}


def split_and_single(op: str, fn, reps: int):
    """(ms with splits, ms with one block per row, both results): the env var is read per call."""
    var = SPLIT_ENV[op]
    old = os.environ.pop(var, None)
    try:
        split_ms, split_out = time_ms(fn, 0.0, reps, reps), fn()
        os.environ[var] = "1"
        single_ms, single_out = time_ms(fn, 0.0, reps, reps), fn()
    finally:
        os.environ.pop(var, None)
        if old is not None:
            os.environ[var] = old
    return split_ms, single_ms, split_out, single_out


def bench_indexer(B: int, S: int, reps: int) -> dict:
    Hi, Di = 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, 1, Hi, Di, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, S, Di, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(B, 1, Hi, device="cuda", generator=g) * Hi ** -0.5
    split_ms, single_ms, a, b = split_and_single("indexer_topk", lambda: dsa_ext.indexer_topk(q, k, w, TOPK), reps)
    nbytes = k.numel() * 2 + q.numel() * 2 + w.numel() * 4 + B * TOPK * 4
    return dict(op="indexer_topk", shape=f"B={B} S={S // 1024}K", B=B, T=1, S=S, Hi=Hi, Di=Di, k=TOPK,
                ms=split_ms, single_ms=single_ms, gbps=nbytes / split_ms / 1e6, same=bool(torch.equal(a, b)))


def bench_attention(name: str, B: int, reps: int, S: int = 32768) -> dict:
    H, Hkv, Dqk, Dv, v_in_k = (128, 1, 576, 512, True) if name == "mla" else (32, 8, 128, 128, False)
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(B, 1, H, Dqk, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, S, Hkv, Dqk, device="cuda", dtype=torch.bfloat16, generator=g)
    v = k[..., :Dv] if v_in_k else torch.randn(B, S, Hkv, Dv, device="cuda", dtype=torch.bfloat16, generator=g)
    # k distinct random positions per sequence, ascending (as indexer_topk returns them)
    idx = torch.rand(B, 1, S, device="cuda", generator=g).topk(TOPK, dim=-1).indices.sort(dim=-1).values
    idx = idx.to(torch.int32)
    fn = lambda: dsa_ext.sparse_attention(q, k, v, idx)  # noqa: E731
    split_ms, single_ms, a, b = split_and_single("sparse_attn", fn, reps)
    gathered = B * Hkv * TOPK * 2 * (Dqk + (0 if v_in_k else Dv))
    nbytes = gathered + B * H * 2 * (Dqk + Dv) + idx.numel() * 4
    err = (a.float() - b.float()).abs().max().item()
    return dict(op="sparse_attn", shape=f"{name} B={B}", B=B, T=1, S=S, H=H, Hkv=Hkv, Dqk=Dqk, Dv=Dv, k=TOPK,
                ms=split_ms, single_ms=single_ms, gbps=nbytes / split_ms / 1e6, max_diff=err,
                same=bool(err <= 2 ** -6 * b.float().abs().max().item()))  # a few bf16 ulps of the largest


def print_table(rows):
    print(f"{'op':<13} {'shape':<13} {'ms':>8} {'GB/s':>7} {'1 block/row ms':>15} {'speedup':>8} {'agree':>6}")
    for r in rows:
        print(f"{r['op']:<13} {r['shape']:<13} {r['ms']:>8.3f} {r['gbps']:>7.0f} {r['single_ms']:>15.3f} "
              f"{r['single_ms'] / r['ms']:>7.2f}x {str(r['same']):>6}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    ap.add_argument("--json", default=os.path.join("out", "decode_bench.json"), help="where the results go")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per measurement (their median)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not dsa_ext.built_with_cuda:
        print("bench_cuda_decode: needs a CUDA device and a CUDA build of dsa_ext", file=sys.stderr)
        return 1
    rows = []
    for S in (32768, 131072):
        for B in (1, 64):
            rows.append(bench_indexer(B, S, args.reps))
            torch.cuda.empty_cache()
    for name in ("mla", "gqa"):
        for B in (1, 64):
            rows.append(bench_attention(name, B, args.reps))
            torch.cuda.empty_cache()
    print(f"decoding shapes (T = 1, bfloat16, k = {TOPK}) on {torch.cuda.get_device_name()}")
    print_table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    print(f"wrote {args.json}")
    return 0 if all(r["same"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
