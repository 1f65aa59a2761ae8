"""Long context on the CPU: every operator at T = S = 131072 (B = 1, small heads) in memory that
grows as O(T * topk), never O(T * S) (one [T, S] float32 tensor would be 64 GiB here).

Cases, each in a fresh process (peak_memory.py: VmHWM after a reset, MALLOC_MMAP_THRESHOLD_):
  indexer_topk            fused indexer scoring + selection, forward only
  sparse_attention        forward + backward over topk indices per query
  indexer_kl_loss dense   forward + backward, the warm-up form (every causal key)
  indexer_kl_loss sparse  forward + backward over the topk indices (the sparse stage)
Printed per case: time, peak extra memory, bytes per token, and the bytes per token the outputs,
gradients and saved tensors account for (what O(T * topk) predicts), against what [T, S] would take.

Usage: python python/bench_long_context.py [--T 131072] [--topk 256] [--cases ...] [--out out/bench]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import cli  # python/ (this file's folder) is on sys.path
import peak_memory

SHAPE = dict(B=1, H=4, Hkv=1, D=32, Hi=4, Di=32)
CASES = ("indexer_topk", "sparse_attention", "kl_dense", "kl_sparse")


def causal_indices(T: int, topk: int, torch):
    """[1, T, topk] int32: for query t, topk distinct positions among its t + 1 visible keys
    (the most recent half and a strided spread over the rest), -1 padding where t + 1 < topk."""
    t = torch.arange(T)[:, None]
    j = torch.arange(topk)[None, :]
    recent = t - j  # t, t-1, ...
    spread = (j - topk // 2) * torch.clamp(t // topk, min=1)
    idx = torch.where(j < topk // 2, recent, spread)
    return torch.where((idx >= 0) & (idx <= t), idx, -1).to(torch.int32)[None]


def expected_bytes_per_token(case: str, topk: int) -> int:
    """What the call must hold per token: outputs, gradients and saved tensors (float32, int32)."""
    H, Hkv, D, Hi, Di = (SHAPE[k] for k in ("H", "Hkv", "D", "Hi", "Di"))
    if case == "indexer_topk":
        return 4 * topk
    if case == "sparse_attention":  # out, lse, then dq, dk, dv and the grad of out
        return 4 * (H * D + H) + 4 * (H * D + 2 * Hkv * D) + 4 * H * D
    grads = 4 * (Hi * Di + Di + Hi)  # loss and lses, then d q_idx, k_idx, w
    return 4 * (2 + H) + grads


def run_case(case: str, T: int, topk: int) -> dict:
    import torch

    import dsa_ext

    torch.manual_seed(0)
    B, H, Hkv, D, Hi, Di = (SHAPE[k] for k in ("B", "H", "Hkv", "D", "Hi", "Di"))

    def make(T):
        g = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
        return dict(q_idx=g(B, T, Hi, Di), k_idx=g(B, T, Di), w=g(B, T, Hi), q=g(B, T, H, D),
                    k=g(B, T, Hkv, D), v=g(B, T, Hkv, D), idx=causal_indices(T, min(topk, T), torch))

    def call(x):
        if case == "indexer_topk":
            return dsa_ext.indexer_topk(x["q_idx"].detach(), x["k_idx"].detach(), x["w"].detach(), topk)
        if case == "sparse_attention":
            out = dsa_ext.sparse_attention(x["q"], x["k"], x["v"], x["idx"])
            out.backward(torch.ones_like(out))
            return out
        idx = x["idx"] if case == "kl_sparse" else None
        loss = dsa_ext.indexer_kl_loss(x["q_idx"], x["k_idx"], x["w"], x["q"], x["k"], idx)
        loss.sum().backward()
        return loss

    call(make(512))  # warm-up: code loaded, thread pool started
    x = make(T)
    r = peak_memory.measure(lambda: call(x))
    return {"case": case, "T": T, "S": T, "topk": topk, **SHAPE, "dtype": "float32",
            "threads": torch.get_num_threads(), **r}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run_case(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--T", type=int, default=131072, help="sequence length T = S")
    parser.add_argument("--topk", type=int, default=256, help="keys per query")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="operators to run")
    parser.add_argument("--out", default="out/bench", help="directory of the JSON")
    args = parser.parse_args()
    import torch

    print(f"CPU: {torch.get_num_threads()} threads; shape {SHAPE}, T = S = {args.T}, topk = {args.topk}, float32")
    print(f"one [T, S] float32 tensor would be {4 * args.T * args.T / 2**30:.1f} GiB\n")
    head = f"{'case':>17} | {'time s':>8} {'cpu s':>8} | {'peak extra MiB':>14} {'B/token':>8} {'expected B/token':>16}"
    print(head + "\n" + "-" * len(head), flush=True)
    rows = []
    for case in args.cases:
        r = peak_memory.spawn(__file__, case, str(args.T), str(args.topk))
        r["expected_bytes_per_token"] = expected_bytes_per_token(case, args.topk)
        rows.append(r)
        print(f"{case:>17} | {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} | {r['peak_extra_bytes'] / 2**20:>14.1f} "
              f"{r['peak_extra_bytes'] / args.T:>8.0f} {r['expected_bytes_per_token']:>16}", flush=True)
    from cpu_info import header, machine  # here, not at the top: the children stay as they were

    info = machine()
    print("\n" + header(info))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_long_context.json")
    with open(path, "w") as f:
        json.dump({"shape": SHAPE, "T": args.T, "topk": args.topk, "machine": info, "rows": rows}, f, indent=2)
    print(f"\npeak extra = memory above the inputs during the call ({rows[0]['method']}); wrote {path}")


if __name__ == "__main__":
    main()
