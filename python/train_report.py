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


def progress_table(rows: Dict[str, Dict]) -> str:
    """One row per stage: steps done of planned, tokens, tokens/s (training steps only), the
    stage's wall time when done or the estimated time left while it runs."""
    lines = ["| stage | steps | tokens | tokens/s | time | state |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        if r["time_s"] is None:
            time = "-"
        else:
            time = f"{r['time_s']:.0f} s" + (" left" if r["state"] == "running" else "")
        lines.append(f"| {name} | {r['steps']} / {r['total']} | {r['tokens']:,} | {tps} | {time} | {r['state']} |")
    return "\n".join(lines)


def run_label(r: Dict) -> str:
    """The run's configuration in one line (the figure's title)."""
    c = r["config"]
    steps = "/".join(str(c[f"{s}_steps"]) if s in r["history"] else "-" for s in ("pretrain", "warmup", "sparse"))
    return (f"{r['arch']}, {c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} heads; S = {r['seq_len']}, "
            f"k = {r['k']}; indexer {c['indexer_heads']} x {c['indexer_dim']}; batch {c['batch_size']}; "
            f"steps pretrain/warm-up/sparse {steps}; data {r['data']}; {r['world_size']} x {r['device']}")


def plot(r: Dict, path: str) -> None:
    """Three panels over training tokens (millions): the dense model's pretraining loss, the
    indexer's recall through warm-up and sparse training, and the validation loss of DSA against
    the dense baseline continued on the same tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = r["history"]
    mtok = lambda pts, offset=0: [(offset + e["tokens"]) / 1e6 for e in pts]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    pre = h.get("pretrain") or []
    if pre:
        ax.plot(mtok(pre), [e["val_loss"] for e in pre], "o-", ms=3, color="0.3", label="dense model")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "started from a checkpoint (--init)", ha="center", transform=ax.transAxes)
    ax.set(title="1. dense pretraining", xlabel="training tokens (M)", ylabel="validation loss (nats/token)")

    ax = axes[1]
    warm = h.get("warmup") or []
    sparse = [e for e in h.get("sparse") or [] if "recall" in e]
    end = warm[-1]["tokens"] if warm else 0
    ax.plot(mtok(warm), [e["recall"] for e in warm], "o-", ms=3, color="tab:green",
            label="warm-up (dense attention, indexer trains)")
    if sparse:
        ax.plot(mtok(sparse, end), [e["recall"] for e in sparse], "o-", ms=3, color="tab:orange",
                label="sparse training (top-k attention)")
    else:  # runs from before recall was measured during sparse training: its end point only
        ax.plot([(end + r["tokens"]["sparse"]) / 1e6], [r["recall_final"]], "o", color="tab:orange",
                label="after sparse training")
    ax.axhline(r["recall_oracle"], color="0.5", ls="--", label="best possible: the dense attention's own top-k")
    ax.set(title=f"2. indexer recall, k/S = 1/{r['seq_len'] // r['k']}",
           xlabel="training tokens since the warm-up began (M)",
           ylabel="dense attention mass in the top-k", ylim=(0, 1.02))
    ax.legend(loc="lower right")

    ax = axes[2]
    for name, label, color in (("dense_baseline", "dense attention (baseline)", "tab:blue"),
                               ("sparse", f"DSA, top-{r['k']} of {r['seq_len']}", "tab:orange")):
        pts = h.get(name) or []
        ax.plot(mtok(pts), [e["val_loss"] for e in pts], "o-", ms=3, color=color, label=label)
    ax.set(title="3. continued pretraining, the same tokens", xlabel="training tokens since the checkpoint (M)",
           ylabel="validation loss (nats/token)")
    ax.legend()
    fig.suptitle(run_label(r), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
