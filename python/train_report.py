"""Output of python/train.py: the summary table (Markdown) and the PNG plot of the curves."""
from __future__ import annotations

from typing import Dict


def table(r: Dict) -> str:
    tps = r["tokens_per_s"]
    rows = [
        ("sequence length S / top-k k", f"{r['seq_len']} / {r['k']} (k/S = 1/{r['seq_len'] // r['k']})"),
        ("indexer recall, untrained (mean over layers)", f"{r['recall_init']:.3f}"),
        ("indexer recall, after warm-up", f"{r['recall_warmup']:.3f}"),
        ("indexer recall, after sparse training", f"{r['recall_final']:.3f}"),
        ("best possible recall of any top-k (dense model)", f"{r['recall_oracle']:.3f}"),
        ("val loss, dense checkpoint", f"{r['val_loss_pretrained']:.4f}"),
        ("val loss, DSA right after warm-up (no sparse training)", f"{r['val_loss_dsa_after_warmup']:.4f}"),
        ("val loss, dense baseline continued", f"{r['val_loss_dense']:.4f}"),
        ("val loss, DSA continued (sparse)", f"{r['val_loss_dsa']:.4f}"),
        ("DSA vs dense", f"{100 * r['val_loss_gap_rel']:+.2f}%"),
        ("tokens/s pretrain / warm-up / sparse / dense baseline",
         " / ".join(f"{tps[s]:.0f}" if tps.get(s) else "-"
                    for s in ("pretrain", "warmup", "sparse", "dense_baseline"))),
        ("wall time", f"{r['wall_time_s']:.0f} s ({r['world_size']} process(es), {r['device']})"),
    ]
    width = max(len(a) for a, _ in rows)
    lines = [f"| {'':{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {a:{width}} | {b} |" for a, b in rows]
    return "\n".join(lines)


def plot(r: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = r["history"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    pre = h.get("pretrain") or []
    if pre:
        ax.plot([e["tokens"] / 1e6 for e in pre], [e["val_loss"] for e in pre], color="0.3")
    ax.set(title="1. dense pretraining", xlabel="tokens (M)", ylabel="validation loss (nats/token)")

    ax = axes[1]
    pts = h.get("warmup") or []
    ax.plot([e["step"] for e in pts], [e["recall"] for e in pts], "o-", color="tab:green",
            label="indexer top-k recall (val)")
    ax.axhline(r["recall_oracle"], color="0.5", ls="--", label="best possible top-k")
    ax.axhline(0.9, color="tab:red", ls=":", label="0.9")
    ax.set(title=f"2. indexer warm-up (k/S = 1/{r['seq_len'] // r['k']})", xlabel="step",
           ylabel="attention mass in top-k", ylim=(0, 1.02))
    ax.legend(loc="lower right")

    ax = axes[2]
    for name, label, color in (("dense_baseline", "dense attention", "tab:blue"),
                               ("sparse", f"DSA, top-{r['k']} of {r['seq_len']}", "tab:orange")):
        pts = h.get(name) or []
        ax.plot([e["tokens"] / 1e6 for e in pts], [e["val_loss"] for e in pts], "o-", ms=3,
                color=color, label=label)
    ax.set(title="3. continued pretraining", xlabel="tokens (M)", ylabel="validation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
