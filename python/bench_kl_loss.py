"""Peak memory and time of the fused indexer KL loss against the naive reference on the CPU.

The fused operator (dsa_ext.indexer_kl_loss) streams over keys and keeps per-row statistics, so
its extra memory should grow linearly in T; the reference (dsa_ext.reference.indexer_kl_loss)
builds the [B, H, T, S] attention probabilities and [B, T, Hi, S] indexer dots, so it grows with
T * S. Dense warm-up form (every causal key), T = S, B=1, H=8 (MHA), Hi=4, Dqk=Di=64, float32.

How peak memory is measured: every (implementation, T, pass) case runs in a fresh subprocess.
The child builds its inputs, runs the implementation once on tiny inputs (loads the code, starts
the thread pool), then resets the Linux kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs
resets VmHWM) and reads VmRSS. After the measured call it reads VmHWM: peak extra memory =
VmHWM - VmRSS before the call, i.e. every page the call (and autograd, for "fwd+bwd") touched
above what the inputs already held, including the outputs, gradients, the autograd graph's saved
tensors and scratch, whether allocated by torch or by the kernel's own std::vector buffers. Where
clear_refs is unavailable the child falls back to ru_maxrss (a fresh process's high-water mark)
minus the RSS before the call. The child runs with MALLOC_MMAP_THRESHOLD_=16384 so that
glibc maps every block of 16 KiB or more afresh (and unmaps it on free): a call's buffers cannot
hide in heap pages an earlier allocation left resident. Smaller blocks, page granularity and
Linux's batched per-thread RSS counters still leave a few hundred KiB of noise, which is why the table also gives the slope between
sizes, not only bytes per token.

Time: wall-clock and process CPU time (all threads) of the same single call; the CPU time is the
steadier figure on a shared machine. The table is printed with the machine (CPU flags, threads,
the build, the measured matmul ceilings: python/cpu_info.py).

Usage: python python/bench_kl_loss.py [--sizes 2048 4096 8192] [--passes fwd fwd+bwd]
                                      [--ref-max-T 8192] [--out out/bench]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time

import cli  # python/ (this file's folder) is on sys.path

SHAPE = dict(B=1, H=8, Hkv=8, Hi=4, Di=64, Dqk=64)
IMPLS = ("fused", "reference")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_case(impl: str, T: int, passes: str) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    import dsa_ext
    from dsa_ext import reference

    torch.manual_seed(0)
    fn = dsa_ext.indexer_kl_loss if impl == "fused" else reference.indexer_kl_loss
    B, H, Hkv, Hi, Di, Dqk = (SHAPE[k] for k in ("B", "H", "Hkv", "Hi", "Di", "Dqk"))

    def inputs(T):
        S = T
        q_idx = torch.randn(B, T, Hi, Di, requires_grad=True)
        k_idx = torch.randn(B, S, Di, requires_grad=True)
        w = torch.randn(B, T, Hi, requires_grad=True)
        return q_idx, k_idx, w, torch.randn(B, T, H, Dqk), torch.randn(B, S, Hkv, Dqk)

    def call(args):
        loss = fn(*args)
        if passes == "fwd+bwd":
            loss.sum().backward()
        return loss

    call(inputs(64))  # warm-up: code loaded, thread pool started
    args = inputs(T)
    exact = _reset_peak()
    rss_before = _status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c0, t0 = time.process_time(), time.perf_counter()
    loss = call(args)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "impl": impl, "T": T, "S": T, "pass": passes, **SHAPE, "dtype": "float32",
        "threads": torch.get_num_threads(), "wall_s": wall, "cpu_s": cpu,
        "peak_extra_bytes": (peak_kib - rss_before) * 1024,
        "method": "VmHWM reset via clear_refs" if exact else "ru_maxrss delta",
        "rss_before_bytes": rss_before * 1024, "maxrss_before_bytes": maxrss_before * 1024,
        "loss_sum": float(loss.sum()),
    }


def spawn(impl: str, T: int, passes: str) -> dict:
    # glibc serves blocks >= 16 KiB from fresh mmaps and unmaps them on free (a fixed threshold,
    # not the adaptive one): a call's buffers cannot hide in heap pages freed before it.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", impl, str(T), passes],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(rows: list[dict]) -> float | None:
    """Least-squares bytes per extra token between the sizes measured."""
    if len(rows) < 2:
        return None
    xs = [r["T"] for r in rows]
    ys = [r["peak_extra_bytes"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def fused_bytes_per_token(passes: str, threads: int) -> int:
    """What the fused operator allocates per token (float32), beside O(threads) tile scratch:
    loss, idx_lse and attn_lse [H]; with the backward also the gradients of q_idx [Hi, Di],
    k_idx [Di] and w [Hi], the [S, Di] dk_idx sum and one [S, Di] chunk buffer per thread
    (csrc/cpu/chunked_sum.h)."""
    H, Hi, Di = SHAPE["H"], SHAPE["Hi"], SHAPE["Di"]
    fwd = 4 * (2 + H)
    return fwd if passes == "fwd" else fwd + 4 * (Hi * Di + Di + Hi) + 4 * Di * (1 + threads)


def mib(x: float) -> str:
    return f"{x / 2**20:10.1f}"


def print_table(rows: list[dict], summary: dict, machine_header: str) -> None:
    print(f"\nindexer_kl_loss, dense warm-up form, T=S, {SHAPE}, float32\n{machine_header}")
    print(f"peak extra memory measured by {rows[0]['method']} in a fresh process per case\n")
    head = (f"{'pass':>8} {'T':>6} | {'fused MiB':>10} {'B/token':>9} {'wall s':>7} {'cpu s':>7} | "
            f"{'ref MiB':>10} {'B/token':>9} {'wall s':>7} {'cpu s':>7} | {'mem ratio':>9}")
    print(head)
    print("-" * len(head))
    for passes in summary:
        for T in summary[passes]["sizes"]:
            f = next(r for r in rows if r["impl"] == "fused" and r["T"] == T and r["pass"] == passes)
            ref = next((r for r in rows if r["impl"] == "reference" and r["T"] == T and r["pass"] == passes), None)
            line = (f"{passes:>8} {T:>6} | {mib(f['peak_extra_bytes'])} {f['peak_extra_bytes'] / T:>9.0f} "
                    f"{f['wall_s']:>7.2f} {f['cpu_s']:>7.2f} | ")
            if ref:
                line += (f"{mib(ref['peak_extra_bytes'])} {ref['peak_extra_bytes'] / T:>9.0f} {ref['wall_s']:>7.2f} "
                         f"{ref['cpu_s']:>7.2f} | {ref['peak_extra_bytes'] / max(f['peak_extra_bytes'], 1):>8.0f}x")
            else:
                line += f"{'skipped':>10}"
            print(line)
        s = summary[passes]
        print(f"{passes:>8} slope between sizes: fused {s['fused_bytes_per_token_slope']:.0f} B/token "
              f"(allocated: {s['fused_allocated_bytes_per_token']} B/token + per-thread tiles); reference "
              + (f"{s['reference_bytes_per_token_slope']:.0f} B/token (grows with T*S)"
                 if s["reference_bytes_per_token_slope"] is not None else "n/a"))
    print("mem ratio = reference peak extra / fused peak extra, same T")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(run_case(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192], help="sequence lengths T = S")
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"],
                        help="what is measured: the forward alone, and forward with backward")
    parser.add_argument("--ref-max-T", type=int, default=8192, help="skip the reference above this T")
    parser.add_argument("--out", default="out/bench", help="directory of bench_kl_loss.json")
    args = parser.parse_args()

    rows, summary = [], {}
    for passes in args.passes:
        for T in args.sizes:
            for impl in IMPLS:
                if impl == "reference" and T > args.ref_max_T:
                    continue
                r = spawn(impl, T, passes)
                rows.append(r)
                print(f"{passes:>8} T={T:>5} {impl:>9}: peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB, "
                      f"{r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s cpu", flush=True)
        fused = [r for r in rows if r["impl"] == "fused" and r["pass"] == passes]
        ref = [r for r in rows if r["impl"] == "reference" and r["pass"] == passes]
        largest = max(args.sizes)
        f_big = next(r for r in fused if r["T"] == largest)
        r_big = next((r for r in ref if r["T"] == largest), None)
        summary[passes] = {
            "sizes": args.sizes,
            "fused_bytes_per_token_slope": slope(fused),
            "fused_allocated_bytes_per_token": fused_bytes_per_token(passes, f_big["threads"]),
            "reference_bytes_per_token_slope": slope(ref),
            "memory_ratio_at_largest_T": r_big["peak_extra_bytes"] / f_big["peak_extra_bytes"] if r_big else None,
        }
    from cpu_info import header, machine  # here, not at the top: the children stay as they were

    info = machine()
    print_table(rows, summary, header(info))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_kl_loss.json")
    with open(path, "w") as f:
        json.dump({"shape": SHAPE, "machine": info, "rows": rows, "summary": summary}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
