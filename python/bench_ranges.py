"""What a packed sequence costs with per-query key ranges, CPU.

One packed sequence of D documents x L tokens (B = 1, T = S = D * L, key ranges from
dsa_ext.ranges.from_cu_seqlens) against the same documents as a batch (B = D, T = S = L, no
ranges), measured in the same run. The kernels skip the key tiles outside every query's range,
so the packed call should cost about what the batch costs: the bound is ratio <= 1.5.

  indexer_topk: Hi=4, Di=64, topk=256 (the project's defaults), float32.
  indexer_kl_loss forward + backward, dense warm-up form: the same indexer and a main attention
  of H=8, Hkv=2, Dqk=128, float32.

Each time is the fastest of --reps calls after one untimed call; the batch and the packed calls
alternate, so that a change of load on a shared machine reaches both.
Before timing, the packed results are checked against the batch's (the same top-k indices
shifted by each document's offset; the KL loss and the gradient of k_idx, max abs difference).
For contrast, --contrast also times indexer_topk over the packed sequence without ranges (one
causal sequence across documents: D times the work, and wrong); one call. The table comes with
the machine: CPU flags, threads, build and measured matmul ceilings (python/cpu_info.py).

Usage: python python/bench_ranges.py [--docs 64] [--doc-len 1024] [--reps 3] [--contrast]
                                     [--out out/bench]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import cli  # python/ (this file's folder) is on sys.path
import dsa_ext
from cpu_info import header, machine, timeit
from dsa_ext import ranges

INDEXER = dict(Hi=4, Di=64, topk=256)
ATTENTION = dict(H=8, Hkv=2, Dqk=128)
BOUND = 1.5


def fastest_alternating(batch_fn, packed_fn, reps: int) -> tuple[float, float]:
    """Seconds of the fastest batch and packed calls: one untimed call each, then reps timed
    calls of each in turns."""
    batch_fn(), packed_fn()
    times = [(timeit(batch_fn, 1, warmup=0), timeit(packed_fn, 1, warmup=0)) for _ in range(reps)]
    return min(t[0] for t in times), min(t[1] for t in times)


def make_inputs(docs: int, L: int):
    """The batch [docs, L, ...], the same tensors viewed as one packed sequence [1, docs * L, ...],
    and the packed sequence's key ranges."""
    Hi, Di = INDEXER["Hi"], INDEXER["Di"]
    H, Hkv, Dqk = ATTENTION["H"], ATTENTION["Hkv"], ATTENTION["Dqk"]
    batch = dict(q_idx=torch.randn(docs, L, Hi, Di), k_idx=torch.randn(docs, L, Di), w=torch.randn(docs, L, Hi),
                 q=torch.randn(docs, L, H, Dqk), k=torch.randn(docs, L, Hkv, Dqk))
    packed = {n: t.reshape(1, docs * L, *t.shape[2:]) for n, t in batch.items()}
    key_start, key_end = ranges.from_cu_seqlens(torch.arange(docs + 1) * L)
    return batch, packed, dict(key_start=key_start, key_end=key_end)


def topk_case(batch, packed, rng, reps, contrast):
    topk = INDEXER["topk"]

    def run(x, **r):
        return dsa_ext.indexer_topk(x["q_idx"], x["k_idx"], x["w"], topk, **r)

    docs, L = batch["w"].shape[:2]
    # the packed selection is the batch's, shifted to each document's offset
    want = run(batch)
    want = torch.where(want >= 0, want + (torch.arange(docs) * L).view(docs, 1, 1), want).reshape(1, docs * L, topk)
    r = {"same_indices": torch.equal(run(packed, **rng), want)}
    r["batch_s"], r["packed_ranges_s"] = fastest_alternating(lambda: run(batch), lambda: run(packed, **rng), reps)
    if contrast:
        r["packed_no_ranges_s"] = timeit(lambda: run(packed), 1, warmup=0)
    return r


def kl_case(batch, packed, rng, reps):
    def run(x, **r):
        leaves = [x[n].detach().requires_grad_() for n in ("q_idx", "k_idx", "w")]
        loss = dsa_ext.indexer_kl_loss(*leaves, x["q"], x["k"], **r)
        loss.sum().backward()
        return loss.detach(), leaves[1].grad

    docs, L = batch["w"].shape[:2]
    (lb, gb), (lp, gp) = run(batch), run(packed, **rng)
    diff = max((lb.reshape(1, -1) - lp).abs().max().item(), (gb.reshape(1, docs * L, -1) - gp).abs().max().item())
    r = {"max_abs_diff_loss_and_grad_k_idx": diff}
    r["batch_s"], r["packed_ranges_s"] = fastest_alternating(lambda: run(batch), lambda: run(packed, **rng), reps)
    return r


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--docs", type=int, default=64, help="documents D in the packed sequence (the batch size)")
    parser.add_argument("--doc-len", type=int, default=1024, help="tokens L per document")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per case, the fastest is taken")
    parser.add_argument("--contrast", action="store_true",
                        help="also time indexer_topk over the packed sequence without ranges (D times the work)")
    parser.add_argument("--out", default="out/bench", help="directory of bench_ranges.json")
    args = parser.parse_args(argv)
    if min(args.docs, args.doc_len, args.reps) < 1:
        parser.error(f"--docs, --doc-len, --reps: expected >= 1, got {args.docs}, {args.doc_len}, {args.reps}")
    torch.manual_seed(0)
    info = machine()
    print(header(info), flush=True)
    batch, packed, rng = make_inputs(args.docs, args.doc_len)
    print(f"\n{args.docs} documents x {args.doc_len} tokens, float32: batch B={args.docs}, T=S={args.doc_len}, no "
          f"ranges | packed B=1, T=S={args.docs * args.doc_len}, ranges from cu_seqlens\n", flush=True)
    results = {}
    for name, what, run in (
            ("indexer_topk", f"indexer_topk {INDEXER}",
             lambda: topk_case(batch, packed, rng, args.reps, args.contrast)),
            ("indexer_kl_loss", f"indexer_kl_loss fwd+bwd, dense form, {INDEXER} {ATTENTION}",
             lambda: kl_case(batch, packed, rng, args.reps))):
        r = run()
        r["ratio"] = r["packed_ranges_s"] / r["batch_s"]
        results[name] = r
        check = {k: v for k, v in r.items() if k in ("same_indices", "max_abs_diff_loss_and_grad_k_idx")}
        print(f"{what}\n  batch            {r['batch_s']:8.3f} s\n  packed + ranges  {r['packed_ranges_s']:8.3f} s"
              f"   ratio {r['ratio']:.2f}x (bound {BOUND}x: {'ok' if r['ratio'] <= BOUND else 'EXCEEDED'}); {check}")
        if "packed_no_ranges_s" in r:
            print(f"  packed, no ranges {r['packed_no_ranges_s']:7.3f} s   "
                  f"{r['packed_no_ranges_s'] / r['batch_s']:.1f}x the batch (one causal sequence across documents)")
        print(flush=True)
    print("ratio = packed + ranges / batch, " + ", ".join(f"{n} {r['ratio']:.2f}x" for n, r in results.items()))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_ranges.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "docs": args.docs, "doc_len": args.doc_len, "reps": args.reps,
                   "indexer": INDEXER, "attention": ATTENTION, "bound": BOUND, "results": results}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
