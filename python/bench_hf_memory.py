"""Peak memory of one forward+backward of transformers' DeepSeek-V3.2 against the same model
converted to dsa_ext (dsa_ext.hf, sparse mode), on the CPU.

transformers scores its indexer into a [B, T, Hi, S] float32 tensor and attends through a dense
[B, 1, T, S] mask (its eager path also materialises the [B, H, T, S] attention weights); the
converted model streams the indexer top-k (dsa_ext.indexer_topk) and attends over the top-k only.

Each case runs in a fresh process: it builds the model, resets the kernel's peak-RSS counter
(/proc/self/clear_refs), runs the LM loss forward and backward on T random tokens (batch 1) and
reports the peak RSS (VmHWM) and its rise over the RSS before the forward (the memory the step
costs; the libraries and the model are the rest). Model: a tiny deepseek_v32 in float32 (hidden
64, 2 layers, 8 heads, latents 32, indexer 8 x 32, a dense MLP then a MoE layer), index_topk 256
for both sides. transformers' O(T^2) tensors grow with the heads and indexer heads (V3.2: 128
and 64), the converted model's memory does not: --heads/--indexer-heads set them.

Then the longest T whose transformers forward+backward fits --limit-gib: a quadratic fit of the
measured peaks, checked by runs at the predicted T and 256 tokens longer; where this machine
lacks the memory, the fit is checked the same way at half the memory available instead.

Usage: python python/bench_hf_memory.py [--sizes 1024 2048 4096] [--impl hf_eager] [--limit-gib 20]
                                        [--heads 8] [--indexer-heads 8]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys

GIB = 2 ** 30


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def build(topk: int, heads: int, indexer_heads: int):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DeepseekV32Config(
        vocab_size=256, hidden_size=64, intermediate_size=192, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, index_topk=topk, index_n_heads=indexer_heads, index_head_dim=32,
        max_position_embeddings=1 << 16)
    return transformers.DeepseekV32ForCausalLM(cfg)


def run_case(impl: str, T: int, topk: int, heads: int, indexer_heads: int) -> dict:
    """One forward+backward in this process; impl: hf_eager / hf_sdpa (transformers' own paths)
    or dsa_sparse (converted)."""
    import torch
    import torch.nn.functional as F

    model = build(topk, heads, indexer_heads)
    if impl == "dsa_sparse":
        from dsa_ext import hf

        hf.convert(model)
    else:
        model.set_attn_implementation(impl.removeprefix("hf_"))
    ids = torch.randint(0, 256, (1, T + 1))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS")
    logits = model(ids[:, :-1]).logits
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    peak = _status_kib("VmHWM")
    return {"impl": impl, "T": T, "rss_before_gib": before / 2 ** 20, "peak_gib": peak / 2 ** 20,
            "rise_gib": (peak - before) / 2 ** 20}


def measure(impl: str, T: int, args) -> dict:
    """run_case in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, str(T), "--topk", str(args.topk),
           "--heads", str(args.heads), "--indexer-heads", str(args.indexer_heads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{impl} T={T} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1)) / 2 ** 20


def fit_longest(points, limit_gib: float) -> int:
    """The largest T with a + b T + c T^2 <= limit, the quadratic least-squares fit of (T, peak)."""
    import torch

    T = torch.tensor([p["T"] for p in points], dtype=torch.float64)
    y = torch.tensor([p["peak_gib"] for p in points], dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(torch.stack([torch.ones_like(T), T, T * T], 1), y[:, None]).solution.flatten().tolist()
    return int((-b + math.sqrt(b * b - 4 * c * (a - limit_gib))) / (2 * c))


def row(r: dict) -> str:
    return f"| {r['impl']} | {r['T']} | {r['rss_before_gib']:.3f} | {r['peak_gib']:.3f} | {r['rise_gib']:.3f} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--impl", default="hf_eager", choices=["hf_eager", "hf_sdpa"], help="transformers' path")
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--heads", type=int, default=8, help="attention heads (V3.2: 128)")
    p.add_argument("--indexer-heads", type=int, default=8, help="indexer heads (V3.2: 64)")
    p.add_argument("--limit-gib", type=float, default=20.0)
    p.add_argument("--child", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child[0], int(args.child[1]), args.topk, args.heads, args.indexer_heads)))
        return
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{available_gib():.1f} GiB available; float32, batch 1, {args.heads} heads, "
          f"{args.indexer_heads} indexer heads, index_topk {args.topk}")
    print("| path | T | RSS before (GiB) | peak RSS (GiB) | rise (GiB) |\n|---|---|---|---|---|")
    hf_points = []
    for T in args.sizes:
        theirs, ours = measure(args.impl, T, args), measure("dsa_sparse", T, args)
        hf_points.append(theirs)
        print(row(theirs))
        print(row(ours))
        print(f"| ratio at T={T} | | | {theirs['peak_gib'] / ours['peak_gib']:.1f}x | "
              f"{theirs['rise_gib'] / ours['rise_gib']:.1f}x |", flush=True)
    if len(hf_points) < 3:
        return
    longest = fit_longest(hf_points, args.limit_gib) // 256 * 256
    print(f"\n{args.impl}: peak RSS fits {args.limit_gib:g} GiB up to T = {longest} (quadratic fit of the sizes above)")
    check = args.limit_gib
    if available_gib() < args.limit_gib * 1.1:  # not enough free here: check the fit where it can run
        check = math.floor(available_gib() / 2)
        print(f"only {available_gib():.1f} GiB available here: the fit checked at {check} GiB instead")
    T = fit_longest(hf_points, check) // 256 * 256
    for r in (measure(args.impl, T, args), measure(args.impl, T + 256, args), measure("dsa_sparse", T, args)):
        print(row(r) + f" ({'fits' if r['peak_gib'] <= check else 'does not fit'} in {check:g} GiB)")

if __name__ == "__main__":
    main()
