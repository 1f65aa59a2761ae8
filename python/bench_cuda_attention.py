"""Benchmark of the CUDA sparse_attention forward and backward against dense causal attention.

Shapes (bfloat16):
  mla  DeepSeek-V3.2 prefill: B=1, T=4096 queries at the end of S=32768 keys, H=128 query heads
       on one latent kv head (Dqk=576, v = kv[..., :512]), k=2048
  gqa  B=1, T=S=32768, H=32, Hkv=8, D=128, k=2048

FLOP conventions (docs/DESIGN.md, "Cost model"): sparse forward 2*B*T*k*H*(Dqk+Dv), backward
2*B*T*k*H*(2*Dv+3*Dqk); dense causal the same with k replaced by the number of visible keys.
Bytes: every (token, kv head) gathers k rows of K (and V unless v is a prefix of k) in bf16, and
reads q / writes out; the backward gathers them again, reads q, dO and writes dq, and adds
dk/dv into float32 (4 bytes per element per gathered row). TB/s is that count over the time,
against the ~4.3 TB/s copy bandwidth measured on the H200: a shape whose FLOP/byte ratio is far
below the GPU's (~200) is bound by these gathers, not by the tensor cores. GQA with 4 heads per
kv head does 2*4*(Dqk+Dv)/(2*(Dqk+Dv)) = 4 FLOP per gathered byte; MLA (128 heads on one
576-wide latent) about 240.
Indices (--indices, both by default), ascending and -1 padded, k per query:
  random  k random causal positions per query: neighbouring queries share almost nothing, every
          gather misses L2 once K/V outgrow it (the worst case)
  local   the k/4 most recent keys plus 3k/4 drawn from a pool of 9k/8 earlier positions shared
          by each block of 64 consecutive queries: neighbours share about three quarters of their
          keys (the overlap column), a stand-in for real indexers' overlapping selections

Usage: python python/bench_cuda_attention.py [--shapes mla gqa] [--iters N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import cli  # python/ (this file's folder) is on sys.path
import dsa_ext  # noqa: F401  (registers torch.ops.dsa)

H200_BF16_TFLOPS = 790.0  # dense bf16 GEMM measured on the device machine

SHAPES = {
    "mla": dict(B=1, T=4096, S=32768, H=128, Hkv=1, Dqk=576, Dv=512, k=2048, v_in_k=True),
    "gqa": dict(B=1, T=32768, S=32768, H=32, Hkv=8, Dqk=128, Dv=128, k=2048, v_in_k=False),
}


def causal_topk_indices(B, T, S, k, device, rows_per_chunk=2048):
    """[B, T, k] int32: k random positions among the keys each query sees (s <= t + S - T),
    ascending, -1 padded when fewer are visible."""
    out = torch.full((B, T, k), -1, dtype=torch.int32, device=device)
    kk = min(k, S)  # k > S: every visible key, then padding
    s = torch.arange(S, device=device)
    for t0 in range(0, T, rows_per_chunk):
        t = torch.arange(t0, min(T, t0 + rows_per_chunk), device=device)
        visible = s[None, :] <= (t[:, None] + S - T)
        for b in range(B):
            scores = torch.rand(len(t), S, device=device).masked_fill(~visible, -1.0)
            val, pos = scores.topk(kk, dim=-1)
            pos = torch.where(val >= 0, pos, torch.full_like(pos, S)).sort(dim=-1).values
            out[b, t0:t0 + len(t), :kk] = torch.where(pos == S, torch.full_like(pos, -1), pos).to(torch.int32)
    return out


def local_topk_indices(B, T, S, k, device, block=64):
    """[B, T, k] int32: the k // 4 most recent visible keys plus m = k - k // 4 drawn from a pool of
    1.5 * m earlier positions that the block's queries share; blocks whose first query sees too
    few keys for that take random causal positions."""
    w = k // 4
    m = k - w
    out = causal_topk_indices(B, T, S, k, device)  # fallback rows
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        n0 = t0 + S - T + 1  # keys visible to the block's first query
        pool_n = (3 * m) // 2
        if n0 - w < pool_n:
            continue
        t = torch.arange(t0, t1, device=device)
        window = (t + S - T + 1)[:, None] - w + torch.arange(w, device=device)[None, :]  # [rows, w]
        for b in range(B):
            pool = torch.rand(n0 - w, device=device).topk(pool_n).indices  # in [0, n0 - w): before every window
            pick = pool[torch.rand(t1 - t0, pool_n, device=device).topk(m, dim=-1).indices]
            out[b, t0:t1] = torch.cat([pick, window], dim=-1).sort(dim=-1).values.to(torch.int32)
    return out


def neighbour_overlap(idx, rows=256):
    """Mean share of a query's valid indices that the next query also selected (first batch)."""
    T = idx.shape[1]
    t = torch.linspace(0, T - 2, steps=min(rows, T - 1), device=idx.device).long()
    a, b = idx[0, t].long(), idx[0, t + 1].long()
    S = int(max(a.max(), b.max())) + 2
    mark = torch.zeros(len(t), S, dtype=torch.bool, device=idx.device)
    mark.scatter_(1, b.clamp_min(0), b >= 0)
    shared = (mark.gather(1, a.clamp_min(0)) & (a >= 0)).sum(1).float()
    return (shared / (a >= 0).sum(1).clamp_min(1)).mean().item()


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def dense_pairs(T, S):
    """(query, key) pairs of bottom-right causal attention."""
    return T * (S - T) + T * (T + 1) // 2


def bench_sparse(cfg, indices, warmup, iters):
    B, T, S, H, Hkv, Dqk, Dv, k = (cfg[x] for x in ("B", "T", "S", "H", "Hkv", "Dqk", "Dv", "k"))
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, Dqk, device=dev, dtype=dt)
    if cfg["v_in_k"]:
        kk = torch.randn(B, S, Hkv, Dqk, device=dev, dtype=dt)
        v = kk[..., :Dv]
    else:
        kk = torch.randn(B, S, Hkv, Dqk, device=dev, dtype=dt)
        v = torch.randn(B, S, Hkv, Dv, device=dev, dtype=dt)
    idx = (local_topk_indices if indices == "local" else causal_topk_indices)(B, T, S, k, dev)
    overlap = neighbour_overlap(idx)
    scale = Dqk ** -0.5
    out, lse = torch.ops.dsa.sparse_attention(q, kk, v, idx, scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "non-finite output"
    go = torch.randn_like(out)
    fwd = time_ms(lambda: torch.ops.dsa.sparse_attention(q, kk, v, idx, scale), warmup, iters)
    bwd = time_ms(lambda: torch.ops.dsa.sparse_attention_backward(go, None, q, kk, v, idx, out, lse, scale),
                  warmup, iters)
    pairs = B * T * k
    gathered = B * T * Hkv * k * 2 * (Dqk + (0 if cfg["v_in_k"] else Dv))  # bf16 rows
    rows = B * T * H * 2 * (Dqk + Dv)  # q in, out out
    fwd_bytes = gathered + rows
    bwd_bytes = gathered + B * T * Hkv * k * 4 * (Dqk + Dv) + rows + B * T * H * 2 * Dqk  # + fp32 dk/dv adds, dq
    return (fwd, bwd, 2 * pairs * H * (Dqk + Dv), 2 * pairs * H * (2 * Dv + 3 * Dqk), fwd_bytes, bwd_bytes,
            overlap)


def bench_dense(cfg, warmup, iters):
    """Dense causal SDPA (flash backend; others when flash cannot take the head dims), or the
    reason it could not run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T, S, H, Dqk, Dv = (cfg[x] for x in ("B", "T", "S", "H", "Dqk", "Dv"))
    dev, dt = "cuda", torch.bfloat16
    # kv heads repeated to H (the same FLOPs; not every backend takes enable_gqa)
    q = torch.randn(B, H, T, Dqk, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, H, S, Dqk, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, H, S, Dv, device=dev, dtype=dt, requires_grad=True)
    # is_causal is top-left aligned: exact for T == S; for T < S the queries see (nearly) every key,
    # timed as full attention (bottom-right causal has dense_pairs(T, S) / (T * S) of its work).
    causal = T == S
    errors = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                def fwd():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                out = fwd()
                go = torch.randn_like(out)
                torch.autograd.grad(out, (q, k, v), go)
                f_ms = time_ms(fwd, warmup, iters)
                out = fwd()
                b_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True), warmup, iters)
            pairs = B * (dense_pairs(T, S) if causal else T * S)
            return dict(backend=backend.name, fwd_ms=f_ms, bwd_ms=b_ms,
                        fwd_flop=2 * pairs * H * (Dqk + Dv), bwd_flop=2 * pairs * H * (2 * Dv + 3 * Dqk))
        except RuntimeError as e:  # backend cannot take these shapes
            errors.append(f"{backend.name}: {str(e).splitlines()[0][:120]}")
            torch.cuda.empty_cache()
    return dict(backend=None, error="; ".join(errors))


def result_row(name, cfg, mode, overlap, pass_, ms, flop, nbytes, dense):
    row = dict(shape=name, **cfg, indices=mode, overlap=overlap, pass_=pass_, ms=ms, tflops=flop / ms / 1e9,
               gbytes=nbytes / 1e9, tbps=nbytes / ms / 1e9, flop_per_byte=flop / nbytes)
    row["pct_of_peak"] = 100 * row["tflops"] / H200_BF16_TFLOPS
    if dense is not None and dense.get("backend"):
        d_ms = dense[f"{pass_}_ms"]
        row.update(dense_backend=dense["backend"], dense_ms=d_ms, dense_tflops=dense[f"{pass_}_flop"] / d_ms / 1e9,
                   speedup_vs_dense=d_ms / ms)
    elif dense is not None:
        row.update(dense_error=dense["error"])
    return row


def print_table(rows):
    head = (f"{'shape':<10} {'indices':<7} {'overlap':>7} {'pass':<4} {'ms':>9} {'TFLOP/s':>8} {'%peak':>6} {'GB':>7} "
            f"{'TB/s':>5} {'F/B':>5} {'dense ms':>9} {'dense TF/s':>10} {'speedup':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        dense_cols = (f"{r['dense_ms']:>9.2f} {r['dense_tflops']:>10.1f} {r['speedup_vs_dense']:>7.2f}x"
                      if "dense_ms" in r else f"{'n/a':>9} {'':>10} {'':>8}")
        print(f"{r['shape']:<10} {r['indices']:<7} {r['overlap']:>7.2f} {r['pass_']:<4} {r['ms']:>9.2f} "
              f"{r['tflops']:>8.1f} {r['pct_of_peak']:>5.1f}% {r['gbytes']:>7.1f} {r['tbps']:>5.2f} "
              f"{r['flop_per_byte']:>5.0f} {dense_cols}")
    for f, b in zip(rows[::2], rows[1::2]):  # fwd and bwd rows of one (shape, indices)
        if "dense_ms" in f:
            total = f["ms"] + b["ms"]
            print(f"  {f['shape']} {f['indices']}: fwd+bwd {total:.2f} ms vs dense {f['dense_ms'] + b['dense_ms']:.2f} ms "
                  f"= {(f['dense_ms'] + b['dense_ms']) / total:.2f}x")
        elif "dense_error" in f:
            print(f"  dense {f['shape']}: {f['dense_error']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                    help="shapes to time (above)")
    ap.add_argument("--indices", nargs="+", default=["random", "local"], choices=["random", "local"],
                    help="index sets to time (above)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per measurement (their mean)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense SDPA comparison")
    ap.add_argument("--tag", default="", help="appended to the shape names (to tell runs apart)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_cuda_attention.json"),
                    help="where the results go")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_attention: no CUDA device", file=sys.stderr)
        return 1

    rows = []
    for name in args.shapes:
        cfg = SHAPES[name]
        sparse = {mode: bench_sparse(cfg, mode, args.warmup, args.iters) for mode in args.indices}
        torch.cuda.empty_cache()
        dense = None if args.no_dense else bench_dense(cfg, args.warmup, args.iters)
        torch.cuda.empty_cache()
        for mode, (fwd, bwd, fwd_flop, bwd_flop, fwd_bytes, bwd_bytes, overlap) in sparse.items():
            for pass_, ms, flop, nbytes in (("fwd", fwd, fwd_flop, fwd_bytes), ("bwd", bwd, bwd_flop, bwd_bytes)):
                rows.append(result_row(name + args.tag, cfg, mode, overlap, pass_, ms, flop, nbytes, dense))

    print(f"\nsparse_attention on {torch.cuda.get_device_name()} (bf16 ceiling ~{H200_BF16_TFLOPS:.0f} TFLOP/s)")
    print_table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), peak_tflops=H200_BF16_TFLOPS, rows=rows), f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
