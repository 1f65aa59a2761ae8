"""Continued pretraining with DeepSeek Sparse Attention, compared against dense attention.

One command runs four stages (the DeepSeek-V3.2 recipe on a small scale):
  1. pretrain        train a dense causal LM (or load one: --init)
  2. warmup          add a lightning indexer per layer; main model frozen, attention dense, the
                     indexers learn KL(main attention || indexer) only
  3. sparse          top-k sparse attention; LM loss for the model + the top-k KL for the
                     indexers (the indexer's inputs are detached: neither loss leaks into the other)
  4. dense_baseline  the same dense checkpoint continued with dense attention on the same tokens

It reports validation loss (dense vs DSA), indexer recall (share of the dense head-mean attention
mass that falls in the indexer's top-k, per layer) and tokens/s of each stage. Everything goes to
--out: results.json, results.md (while the run goes: steps, tokens/s and time left per stage;
at the end: the table), curves.png, ckpt/ (resumable with --resume), and for Hugging Face models
dsa_model/ (hf.save_pretrained of the converted model).

  python python/train.py                                  # the demo: see --preset cpu below
  python python/train.py --preset tiny --out /tmp/x       # every stage in seconds (a smoke test)
  python python/train.py --preset gpu --out runs/gpu      # real sizes on a GPU
  torchrun --nproc_per_node 2 python/train.py ...         # DDP (gloo on CPU, nccl on GPU)
  torchrun --nproc_per_node 4 python/train.py --cp 2      # each sequence over 2 ranks x 2 data-parallel
  python python/train.py --data my_texts/ --tokenizer path/to/hf_tokenizer --arch llama
  python python/train.py --arch llama --init path/to/hf_checkpoint   # start from a dense model
  python python/train.py --pack                           # packed documents: attention stays in each file
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # noqa: E402
import train_data  # noqa: E402
import train_parallel  # noqa: E402
import train_report  # noqa: E402
from train_parallel import Env  # noqa: E402

from dsa_ext import context_parallel  # noqa: E402
from dsa_ext import nn as dsa_nn  # noqa: E402
from dsa_ext import decoder as dsa_decoder  # noqa: E402

PRESETS: Dict[str, Dict] = {
    # 2-core CPU, < 10 minutes: 2-layer byte-level model, S = 512, k = 64 (k/S = 1/8)
    "cpu": dict(arch="decoder", d_model=128, n_layers=2, n_heads=4, seq_len=512, topk=64,
                batch_size=8, pretrain_steps=700, warmup_steps=200, sparse_steps=150,
                lr=3e-3, continue_lr=5e-4, warmup_lr=3e-3, weight_decay=0.0, indexer_heads=4,
                indexer_dim=32, rope_dim=16, eval_every=25, val_windows=16, recall_windows=8,
                ckpt_every=100),
    # one GPU (or torchrun on several): 8 layers, S = 4096, k = 512
    "gpu": dict(arch="decoder", d_model=512, n_layers=8, n_heads=8, seq_len=4096, topk=512,
                batch_size=16, pretrain_steps=3000, warmup_steps=500, sparse_steps=1000,
                lr=1e-3, continue_lr=3e-4, warmup_lr=1e-3, weight_decay=0.1, indexer_heads=8,
                indexer_dim=64, rope_dim=32, eval_every=100, val_windows=64, recall_windows=16,
                ckpt_every=250),
    # tests: seconds
    "tiny": dict(arch="decoder", d_model=32, n_layers=2, n_heads=2, seq_len=128, topk=16,
                 batch_size=2, pretrain_steps=3, warmup_steps=3, sparse_steps=3,
                 lr=3e-3, continue_lr=5e-4, warmup_lr=3e-3, weight_decay=0.0, indexer_heads=2,
                 indexer_dim=16, rope_dim=8, eval_every=2, val_windows=2, recall_windows=2,
                 ckpt_every=2),
}
# What each preset is for and what it needs (shown by --help and at the start of a run).
PRESET_NOTES: Dict[str, str] = {
    "cpu": "the demo (2-layer byte-level decoder, S=512, k=64), about 7 minutes on an idle 2-core CPU",
    "gpu": "8 layers, S=4096, k=512 on one GPU or torchrun (its time not yet measured)",
    "tiny": "a smoke test, seconds",
}
STAGES = ("pretrain", "warmup", "sparse", "dense_baseline")
# data stream of each stage: the baseline reads exactly the sparse stage's batches
STAGE_DATA = {"pretrain": 1, "warmup": 2, "sparse": 3, "dense_baseline": 3}


# The options every preset sets, with their help text (the preset's values are appended to it).
PRESET_OPTIONS = (
    ("d_model", int, "model width"),
    ("n_layers", int, "Transformer layers"),
    ("n_heads", int, "attention heads (the head width --d-model / --n-heads must be even: RoPE)"),
    ("seq_len", int, "tokens per training sequence, S"),
    ("topk", int, "keys each query keeps in sparse attention, k (< --seq-len)"),
    ("batch_size", int, "sequences per step, over all processes"),
    ("pretrain_steps", int, "steps of stage 1, dense pretraining (skipped with --init)"),
    ("warmup_steps", int, "steps of stage 2, the indexer warm-up"),
    ("sparse_steps", int, "steps of stage 3, sparse training, and of stage 4, the dense baseline"),
    ("lr", float, "peak learning rate of pretraining (cosine schedule)"),
    ("continue_lr", float, "learning rate of the model in sparse training and the dense baseline"),
    ("warmup_lr", float, "peak learning rate of the indexers in the warm-up (cosine schedule)"),
    ("weight_decay", float, "AdamW weight decay of pretraining"),
    ("indexer_heads", int, "indexer heads per layer, Hi"),
    ("indexer_dim", int, "indexer head width, Di"),
    ("rope_dim", int, "leading indexer dims that get RoPE (even, <= --indexer-dim)"),
    ("eval_every", int, "steps between evaluations (the points of the curves)"),
    ("val_windows", int, "validation sequences for the loss"),
    ("recall_windows", int, "validation sequences for the indexer recall"),
    ("ckpt_every", int, "steps between checkpoints (what --resume continues from)"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="sizes and step counts: " + "; ".join(f"{k}: {v}" for k, v in PRESET_NOTES.items())
                   + ". The options below override single values")
    p.add_argument("--out", default="runs/dsa", help="directory for everything the run writes")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--data", nargs="+", default=argparse.SUPPRESS,
                   help="text files or directories (every .txt, .md, .py, .rst, .json file under them); "
                        "default: the Python standard library's sources")
    p.add_argument("--tokenizer", default=argparse.SUPPRESS,
                   help="local Hugging Face tokenizer directory; default: bytes (vocabulary 256)")
    p.add_argument("--init", default=argparse.SUPPRESS,
                   help="dense checkpoint to start from instead of stage 1: a .pt "
                        "written by this script, or a Hugging Face model directory; default: none, "
                        "stage 1 trains one")
    p.add_argument("--arch", choices=["decoder", "llama", "qwen2", "qwen3", "deepseek_v32", "glm_moe_dsa"],
                   default=argparse.SUPPRESS,
                   help="decoder: dsa_ext.decoder; others: a transformers model built from a config "
                        "(deepseek_v32, glm_moe_dsa: MLA and MoE with their own indexer, which the "
                        "conversion keeps); default: decoder")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when a GPU is visible, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--cp", type=int, default=1,
                   help="context parallelism: processes that share each sequence (dsa_ext.context_parallel); "
                        "under torchrun the processes form data-parallel groups of --cp (world = dp x cp)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 (fully_shard of every layer, indexers included) over all "
                        "processes instead of replicating it with DDP")
    for name, typ, text in PRESET_OPTIONS:
        values = ", ".join(f"{preset} {PRESETS[preset][name]}" for preset in PRESETS)
        p.add_argument("--" + name.replace("_", "-"), type=typ, dest=name, default=argparse.SUPPRESS,
                       help=f"{text}; default by preset: {values}")
    p.add_argument("--indexer-lr", type=float, default=argparse.SUPPRESS,
                   help="learning rate of the indexers in sparse training; default: --warmup-lr")
    p.add_argument("--kl-weight", type=float, default=1.0,
                   help="weight of each layer's indexer KL loss (DSAConfig.loss_coeff)")
    p.add_argument("--pack", action="store_true",
                   help="packed documents: every file of the data is a document, a window may hold several, "
                        "and attention (dense, indexer, sparse, the KL target) stays inside each one, with "
                        "positions restarting per document and no loss on a document's first token; "
                        "default: windows are plain token streams that attend across files")
    args = p.parse_args(argv)
    for k, v in dict(PRESETS[args.preset], data=None, tokenizer=None, init=None).items():
        if not hasattr(args, k):
            setattr(args, k, v)
    if not hasattr(args, "indexer_lr"):
        args.indexer_lr = args.warmup_lr
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject combinations that cannot run, or would measure nothing, before any work starts."""
    positive = ("d_model", "n_layers", "n_heads", "seq_len", "topk", "batch_size", "indexer_heads",
                "indexer_dim", "eval_every", "val_windows", "recall_windows", "ckpt_every")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    for name in ("pretrain_steps", "warmup_steps", "sparse_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")
    if args.topk >= args.seq_len:
        p.error(f"--topk {args.topk} must be smaller than --seq-len {args.seq_len}: with k >= S every query "
                f"keeps all its keys, so sparse attention equals dense and the comparison measures nothing")
    if args.d_model % args.n_heads or (args.d_model // args.n_heads) % 2:
        p.error(f"--d-model {args.d_model} / --n-heads {args.n_heads} must be an even whole number "
                f"(the attention head width, whose dims RoPE rotates in pairs)")
    if args.rope_dim % 2 or not 0 <= args.rope_dim <= args.indexer_dim:
        p.error(f"--rope-dim {args.rope_dim}: expected an even number in [0, --indexer-dim {args.indexer_dim}]")
    if args.init and not os.path.exists(args.init):
        p.error(f"--init: no such file or directory: {args.init}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.cp < 1 or world % args.cp:
        p.error(f"--cp {args.cp}: expected a divisor of the number of processes ({world}; world = dp x cp)")
    if args.seq_len < 2 * args.cp:
        p.error(f"--seq-len {args.seq_len}: context parallelism over --cp {args.cp} needs >= {2 * args.cp} tokens")
    if args.fsdp and world == 1:
        p.error("--fsdp shards the model over processes: run under torchrun with 2 or more")
    dp = world // args.cp
    if args.fsdp and (args.val_windows % dp or args.recall_windows % dp):
        p.error(f"--fsdp: --val-windows {args.val_windows} and --recall-windows {args.recall_windows} must be "
                f"multiples of the data-parallel size {dp} (every process runs every forward of a sharded model)")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class HFCausalLM(nn.Module):
    """A transformers causal LM as ``(ids, position_ids=None) -> logits``; position ids that restart
    per document make transformers keep attention inside the documents (and dsa_ext.hf the DSA modes)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """position_ids [T] or [B, T]: restarting ones mark packed documents; under context
        parallelism the global positions of this rank's tokens."""
        if position_ids is not None and position_ids.dim() == 1:
            position_ids = position_ids[None]
        return self.hf(input_ids=ids, position_ids=position_ids, use_cache=False).logits


def _is_hf_dir(path: Optional[str]) -> bool:
    return bool(path) and os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def build_dense(args, vocab_size: int) -> nn.Module:
    if _is_hf_dir(args.init):
        from transformers import AutoModelForCausalLM

        return HFCausalLM(AutoModelForCausalLM.from_pretrained(args.init, attn_implementation="sdpa"))
    if args.arch == "decoder":
        return dsa_decoder.Decoder(dsa_decoder.DecoderConfig(
            vocab_size=vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads))
    if args.arch in ("deepseek_v32", "glm_moe_dsa"):
        return HFCausalLM(build_hf_dsa_model(args, vocab_size))
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}[args.arch]
    cfg = config_cls(vocab_size=vocab_size, hidden_size=args.d_model, num_hidden_layers=args.n_layers,
                     num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
                     intermediate_size=32 * -(-8 * args.d_model // 3 // 32),
                     max_position_embeddings=max(args.seq_len, 2048), tie_word_embeddings=True,
                     attn_implementation="sdpa")
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "qwen3": transformers.Qwen3ForCausalLM}[args.arch]
    return HFCausalLM(model_cls(cfg))


def build_hf_dsa_model(args, vocab_size: int) -> nn.Module:
    """A small DeepSeek-V3.2 or GLM-5 from a config: MLA (query and kv latents of d_model/2, heads
    of d_model/n_heads plus rope_dim RoPE dims), its own indexer (indexer_heads x indexer_dim), a
    dense MLP then MoE layers (4 experts, 2 active, 1 shared). index_topk = seq_len selects every
    key: the dense model of stages 1 and 4; the conversion keeps these indexer weights."""
    import transformers

    config_cls, model_cls = {
        "deepseek_v32": (transformers.DeepseekV32Config, transformers.DeepseekV32ForCausalLM),
        "glm_moe_dsa": (transformers.GlmMoeDsaConfig, transformers.GlmMoeDsaForCausalLM)}[args.arch]
    head = args.d_model // args.n_heads
    cfg = config_cls(vocab_size=vocab_size, hidden_size=args.d_model, num_hidden_layers=args.n_layers,
                     num_attention_heads=args.n_heads, num_key_value_heads=args.n_heads,
                     intermediate_size=32 * -(-8 * args.d_model // 3 // 32), moe_intermediate_size=args.d_model,
                     q_lora_rank=args.d_model // 2, kv_lora_rank=args.d_model // 2, qk_nope_head_dim=head,
                     qk_rope_head_dim=args.rope_dim, v_head_dim=head, n_routed_experts=4,
                     num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                     index_topk=args.seq_len, index_n_heads=args.indexer_heads, index_head_dim=args.indexer_dim,
                     max_position_embeddings=max(args.seq_len, 2048), tie_word_embeddings=True,
                     attn_implementation="sdpa")
    return model_cls(cfg)


def _has_own_indexer(model: nn.Module) -> bool:
    """A transformers DSA model (DeepSeek-V3.2, GLM-5), which has indexers of its own (and MoE
    layers)."""
    from dsa_ext import hf_mla

    return isinstance(model, HFCausalLM) and model.hf.config.model_type in hf_mla.MODEL_TYPES


def unconverted_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict under the unconverted model's names (a converted DeepSeek-V3.2 / GLM-5 keeps
    its indexer weights under ``self_attn.dsa.indexer``; other models: unchanged)."""
    from dsa_ext import hf_mla

    return hf_mla.checkpoint_state_dict(state)


def dsa_config(args, mode: str) -> dsa_nn.DSAConfig:
    return dsa_nn.DSAConfig(n_heads=args.indexer_heads, head_dim=args.indexer_dim,
                            rope_dim=args.rope_dim, topk=args.topk, mode=mode, loss_coeff=args.kl_weight)


def convert(model: nn.Module, args, mode: str) -> nn.Module:
    if isinstance(model, HFCausalLM):
        from dsa_ext import hf

        hf.convert(model.hf, dsa_config(args, mode))
    else:
        dsa_decoder.convert(model, dsa_config(args, mode))
    return model


# ---------------------------------------------------------------------------------------------
# Losses, evaluation
# ---------------------------------------------------------------------------------------------


def logits_of(net: nn.Module, batch: train_data.Batch, env: Env) -> torch.Tensor:
    """The model's logits for the batch's inputs (the windows but their last token): all of them,
    or under context parallelism this rank's share (at their global positions); packed
    documents: with their positions, which restart per document (both model kinds then keep
    attention inside each document)."""
    ids = batch.ids[:, :-1]
    if env.cp is not None:  # the rank's share of the tokens, and of their positions when packed
        local = env.cp.shard(ids)
        positions = env.cp.positions(ids.device) if batch.positions is None else env.cp.shard(batch.positions[:, :-1])
        return net(local, positions)
    if batch.positions is None:
        return net(ids)
    return net(ids, batch.positions[:, :-1])


def lm_targets(batch: train_data.Batch) -> torch.Tensor:
    """The next tokens [B, S]; packed documents: -100 (no target) at a document's first token,
    which the previous document cannot predict."""
    targets = batch.ids[:, 1:]
    if batch.positions is not None:
        targets = targets.masked_fill(batch.positions[:, 1:] == 0, -100)
    return targets


def lm_loss(logits: torch.Tensor, batch: train_data.Batch) -> torch.Tensor:
    """Next-token cross entropy over the batch's targets."""
    return F.cross_entropy(logits.flatten(0, 1).float(), lm_targets(batch).flatten(), ignore_index=-100)


def lm_forward(net: nn.Module, batch: train_data.Batch, env: Env) -> torch.Tensor:
    """The mean next-token loss of the batch; under context parallelism this rank's share of it
    (its tokens' losses over all the batch's targets: the shares add up to the loss)."""
    logits = logits_of(net, batch, env)
    if env.cp is None:
        return lm_loss(logits, batch)
    targets = lm_targets(batch)
    local = env.cp.shard(targets).flatten()
    total = (targets != -100).sum().clamp_min(1)
    return F.cross_entropy(logits.flatten(0, 1).float(), local, ignore_index=-100, reduction="sum") / total


def autocast(env: Env):
    if env.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def val_loss(model: nn.Module, windows: train_data.Batch, env: Env) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for w in windows.rows(env.dp_rank, env.dp_size):
        with autocast(env):
            loss = lm_forward(model, w.to(env.device), env)
        total += torch.tensor([loss.item(), 1.0 / env.cp_size], dtype=torch.float64)
    total = env.all_sum(total)
    model.train()
    train_parallel.reshard(model, env)
    return float(total[0] / total[1])


@torch.no_grad()
def recall(model: nn.Module, windows: train_data.Batch, env: Env) -> Dict[str, List[float]]:
    """Per-layer indexer recall against the dense model's attention (modes set to dense for the
    measurement, restored after)."""
    model.eval()
    modes = [m.mode for m in dsa_nn.dsa_modules(model)]
    dsa_nn.set_mode(model, "dense")
    with dsa_nn.recall_stats(model) as stats:
        for w in windows.rows(env.dp_rank, env.dp_size):
            with autocast(env):
                logits_of(model, w.to(env.device), env)
    for m, mode in zip(dsa_nn.dsa_modules(model), modes):
        m.mode = mode
    model.train()
    train_parallel.reshard(model, env)
    return stats.result(env.all_sum(stats.tensor()))


def mean(xs: List[float]) -> float:
    return sum(xs) / len(xs)


# ---------------------------------------------------------------------------------------------
# One training stage: loop, checkpoints, progress
# ---------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    model: nn.Module  # the module itself (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    steps: int
    loss: Callable[[nn.Module, nn.Module, torch.Tensor], Dict[str, torch.Tensor]]
    schedule: Callable[[int], float]  # lr multiplier of step
    evaluate: Callable[[], Dict[str, float]]


class Progress:
    """results.md while the run goes: one row per stage (steps done, tokens/s, time left),
    rewritten at every evaluation, so that a run on a slow or busy machine shows where it is."""

    def __init__(self, path: str, plan: Dict[str, int], enabled: bool):
        self.path, self.enabled = path, enabled
        self.rows = {name: {"steps": 0, "total": steps, "tokens": 0, "tokens_per_s": None, "time_s": None,
                            "state": "pending"} for name, steps in plan.items()}
        self.write()

    def update(self, name: str, rec: Dict, steps_run: int, run_s: float) -> None:
        """rec: the stage's record; this process ran steps_run of its steps in run_s seconds
        (evaluations and checkpoints included), which gives the time left."""
        row = self.rows[name]
        left = row["total"] - rec["step"]
        row.update(steps=rec["step"], tokens=rec["tokens"],
                   tokens_per_s=rec["tokens"] / rec["train_time_s"] if rec["train_time_s"] > 0 else None,
                   state="done" if rec["done"] else "running",
                   time_s=rec.get("wall_s") if rec["done"] else (run_s / steps_run * left if steps_run else None))
        self.write()

    def table(self) -> str:
        return train_report.progress_table(self.rows)

    def write(self, head: str = "") -> None:
        if self.enabled:
            with open(self.path, "w") as f:
                f.write(head + self.table() + "\n")


def run_stage(st: Stage, args, env: Env, corpus: train_data.Corpus, progress: Progress) -> Dict:
    from tqdm import tqdm

    path = os.path.join(args.out, "ckpt", f"{st.name}.pt")
    rec = {"step": 0, "tokens": 0, "train_time_s": 0.0, "history": [], "done": False}
    if args.resume and os.path.exists(path):
        saved = load_checkpoint(path, env.device)
        train_parallel.load_checkpoint_state(st.model, st.optimizer, saved, env)
        rec = saved["record"]
    if rec["done"]:
        progress.update(st.name, rec, 0, 0.0)
        return rec
    if not rec["history"]:
        rec["history"].append({"step": 0, "tokens": 0, **st.evaluate()})
    trainable = [p for p in st.model.parameters() if p.requires_grad]
    net = train_parallel.wrap(st.model, env, find_unused=_has_own_indexer(st.model))
    # DDP/FSDP average over all ranks; a context-parallel rank's losses are shares of its sequences'
    dsa_nn.set_loss_scale(st.model, env.cp_size)
    for g in st.optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    per_rank = max(1, args.batch_size // env.dp_size)
    bar = tqdm(total=st.steps, initial=rec["step"], desc=f"{st.name:>14}", disable=not env.main,
               dynamic_ncols=True, leave=True)
    first_step, t_stage, wall_before = rec["step"], time.perf_counter(), rec.get("wall_s", 0.0)
    progress.update(st.name, rec, 0, 0.0)
    while rec["step"] < st.steps:
        step = rec["step"]
        for g in st.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * st.schedule(step)
        batch = train_data.train_batch(corpus.train, per_rank, args.seq_len, args.seed, STAGE_DATA[st.name],
                                       step, env.dp_rank, corpus.train_docs if args.pack else None).to(env.device)
        t0 = time.perf_counter()
        with autocast(env):
            losses = st.loss(net, st.model, batch)
        st.optimizer.zero_grad(set_to_none=True)
        (losses["loss"] * env.cp_size).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        st.optimizer.step()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        rec["train_time_s"] += time.perf_counter() - t0
        rec["tokens"] += per_rank * env.dp_size * args.seq_len
        rec["step"] = step + 1
        # the step's logged losses: one collective and one device sync for all of them
        logs = dict(zip(losses, env.cp_sum(torch.stack([v.detach().float() for v in losses.values()])).tolist()))
        rec["done"] = rec["step"] == st.steps
        evaluated = rec["step"] % args.eval_every == 0 or rec["done"]
        if evaluated:
            rec["history"].append({"step": rec["step"], "tokens": rec["tokens"], **logs, **st.evaluate()})
        rec["wall_s"] = wall_before + time.perf_counter() - t_stage
        if evaluated:
            progress.update(st.name, rec, rec["step"] - first_step, time.perf_counter() - t_stage)
        if rec["step"] % args.ckpt_every == 0 or rec["done"]:
            save(path, {**train_parallel.checkpoint_state(st.model, st.optimizer, env), "record": rec}, env)
        bar.set_postfix({**{k: f"{v:.3f}" for k, v in logs.items()},
                         "tok/s": f"{rec['tokens'] / max(rec['train_time_s'], 1e-9):.0f}"})
        bar.update(1)
    bar.close()
    return rec


def load_checkpoint(path: str, device) -> Dict:
    """A checkpoint written by this program (or any file of tensors and plain containers), read
    with torch.load(weights_only=True): a file that would need arbitrary pickled objects (which
    can run code on load) is refused with a clear error instead of being executed."""
    import pickle

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"train.py: refusing to load {path}: it holds pickled objects other than tensors "
                         f"and plain containers, and loading those could run arbitrary code. Checkpoints "
                         f"written by train.py never do; re-save the weights as a state dict of tensors.\n"
                         f"(torch: {str(e).splitlines()[0]})") from None


def save(path: str, obj: Dict, env: Env) -> None:
    if env.main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    env.barrier()


def cosine(total: int, warm: int = 10, floor: float = 0.1) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        x = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, x)))
    return f


def constant(warm: int = 5) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / warm)


def adamw(groups, lr) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> Dict:
    args = parse_args(argv)
    env = train_parallel.setup_env(args.device, args.cp, args.fsdp)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    if env.main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    corpus = train_data.load_corpus(args.data, args.tokenizer)
    val_docs = corpus.val_docs if args.pack else None
    val = train_data.val_windows(corpus.val, args.val_windows, args.seq_len, val_docs)
    rec_windows = train_data.val_windows(corpus.val, args.recall_windows, args.seq_len, val_docs)
    if env.main:
        print(f"data: {corpus.source}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens; "
              f"S={args.seq_len}, k={args.topk}, {env.world} process(es) on {env.device} (data parallel "
              f"{env.dp_size} x context parallel {env.cp_size}{', FSDP2' if env.fsdp else ''})", flush=True)
    plan = {name: steps for name, steps in zip(STAGES, (args.pretrain_steps, args.warmup_steps,
                                                        args.sparse_steps, args.sparse_steps))
            if name != "pretrain" or not args.init}
    progress = Progress(os.path.join(args.out, "results.md"), plan, env.main)
    if env.main:
        print(f"plan: {', '.join(f'{name} {steps}' for name, steps in plan.items())} steps of "
              f"{args.batch_size} x {args.seq_len} tokens; preset {args.preset}: {PRESET_NOTES[args.preset]} "
              f"(more when other jobs share the machine). Progress per stage: {progress.path}", flush=True)

    def lm_step(net, model, batch):
        loss = lm_forward(net, batch, env)
        return {"loss": loss, "lm": loss.detach()}

    def eval_loss(model):
        return lambda: {"val_loss": val_loss(model, val, env)}

    def prepare(model, state=None, mode=None):
        """A stage's model: loaded from state, converted to DSA in mode, context-parallel, sharded.
        Context parallelism splits the attention of DSA cores, so transformers' own DSA models run
        their dense stages converted in mode dense (the same attention: their indexer selects
        every key there)."""
        if state is not None:  # (a dense checkpoint of such a model written under --cp: converted names)
            model.load_state_dict(unconverted_names(state))
        if mode is None and env.cp is not None and _has_own_indexer(model):
            mode = "dense"
        if mode is not None:
            convert(model, args, mode)
        if env.cp is not None:
            context_parallel.enable(model, env.cp)
        if env.fsdp:
            train_parallel.shard(model, model.blocks if isinstance(model, dsa_decoder.Decoder) else
                                 model.hf.model.layers, env)
        return model

    # 1. dense model: pretrain or load
    dense = build_dense(args, corpus.vocab_size).to(env.device)
    stages: Dict[str, Dict] = {}
    init_state = load_checkpoint(args.init, env.device)["model"] if args.init and not _is_hf_dir(args.init) else None
    dense = prepare(dense, init_state)
    if not args.init:
        stages["pretrain"] = run_stage(Stage(
            "pretrain", dense, adamw(dsa_nn.param_groups(dense, args.lr, weight_decay=args.weight_decay), args.lr),
            args.pretrain_steps, lm_step, cosine(args.pretrain_steps), eval_loss(dense)), args, env, corpus, progress)
    dense_state = unconverted_names(train_parallel.full_state(dense, env))
    val_pretrained = val_loss(dense, val, env)
    del dense

    # 2. indexer warm-up: dense attention, main model frozen, KL only
    dsa = prepare(build_dense(args, corpus.vocab_size).to(env.device), dense_state, "warmup")
    trainable = dsa_nn.freeze_for_warmup(dsa)
    recall_init = recall(dsa, rec_windows, env)

    # The indexer's KL loss rides on the attention outputs' autograd graph (dsa_ext.nn.DSAAttention):
    # backpropagating the LM loss of the frozen model trains the indexers on their KL alone.
    def warmup_step(net, model, batch):
        lm = lm_forward(net, batch, env)
        return {"loss": lm, "kl": dsa_nn.indexer_loss(model), "lm": lm.detach()}

    def eval_recall():
        r = recall(dsa, rec_windows, env)
        return {"recall": mean(r["all"]), "recall_hard": mean(r["hard"])}

    stages["warmup"] = run_stage(Stage(
        "warmup", dsa, adamw([{"params": trainable}], args.warmup_lr), args.warmup_steps,
        warmup_step, cosine(args.warmup_steps), eval_recall), args, env, corpus, progress)
    recall_warmup = recall(dsa, rec_windows, env)

    # 3. sparse training: top-k attention, LM loss + KL (indexer inputs detached)
    dsa_nn.unfreeze(dsa)
    dsa_nn.set_mode(dsa, "sparse")
    val_dsa_after_warmup = val_loss(dsa, val, env)

    def sparse_step(net, model, batch):
        lm = lm_forward(net, batch, env)
        return {"loss": lm, "lm": lm.detach(), "kl": dsa_nn.indexer_loss(model)}

    stages["sparse"] = run_stage(Stage(
        "sparse", dsa, adamw(dsa_nn.param_groups(dsa, args.continue_lr, args.indexer_lr), args.continue_lr),
        args.sparse_steps, sparse_step, constant(), lambda: {**eval_loss(dsa)(), **eval_recall()}),
        args, env, corpus, progress)
    recall_final = recall(dsa, rec_windows, env)

    # 4. dense baseline: the same checkpoint, the same batches, dense attention
    base = prepare(build_dense(args, corpus.vocab_size).to(env.device), dense_state)
    stages["dense_baseline"] = run_stage(Stage(
        "dense_baseline", base, adamw(dsa_nn.param_groups(base, args.continue_lr), args.continue_lr),
        args.sparse_steps, lm_step, constant(), eval_loss(base)), args, env, corpus, progress)

    result = summarise(args, env, corpus, stages, val_pretrained, val_dsa_after_warmup,
                       recall_init, recall_warmup, recall_final, time.perf_counter() - t_start, layout(val))
    if env.main:
        write_outputs(args, result, dsa, progress)
    env.barrier()
    if env.world > 1:
        dist.destroy_process_group()
    return result


def layout(windows: train_data.Batch) -> Dict:
    """How the windows hold the data: packed documents (with the mean number of documents, whole
    or cut, per validation window) or a plain token stream."""
    if windows.positions is None:
        return {"packed": False}
    return {"packed": True, "documents_per_window": float((windows.positions == 0).sum(1).double().mean())}


def summarise(args, env, corpus, stages, val_pretrained, val_dsa_after_warmup, recall_init,
              recall_warmup, recall_final, wall, data_layout: Dict) -> Dict:
    last = lambda name: stages[name]["history"][-1]["val_loss"]
    vd, vs = last("dense_baseline"), last("sparse")
    return {
        "seq_len": args.seq_len, "k": args.topk, "k_over_S": args.topk / args.seq_len,
        "n_layers": args.n_layers, "arch": args.arch if not args.init else f"init:{args.init}",
        "data": corpus.source, "vocab_size": corpus.vocab_size, "data_layout": data_layout,
        "val_loss_pretrained": val_pretrained, "val_loss_dsa_after_warmup": val_dsa_after_warmup,
        "val_loss_dense": vd, "val_loss_dsa": vs, "val_loss_gap_rel": (vs - vd) / vd,
        "recall_init": mean(recall_init["all"]), "recall_warmup": mean(recall_warmup["all"]),
        "recall_final": mean(recall_final["all"]), "recall_oracle": mean(recall_warmup["oracle"]),
        "recall_per_layer": {"init": recall_init, "warmup": recall_warmup, "final": recall_final},
        "tokens_per_s": {s: r["tokens"] / r["train_time_s"] for s, r in stages.items() if r["train_time_s"] > 0},
        "tokens": {s: r["tokens"] for s, r in stages.items()},
        "wall_time_s": wall, "world_size": env.world, "device": str(env.device.type),
        "data_parallel": env.dp_size, "context_parallel": env.cp_size, "fsdp": env.fsdp,
        "history": {s: r["history"] for s, r in stages.items()},
        "config": vars(args),
    }


def write_outputs(args, result: Dict, dsa: nn.Module, progress: Progress) -> None:
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = train_report.table(result)
    progress.write(head=text + "\n\n")
    train_report.plot(result, os.path.join(args.out, "curves.png"))
    if isinstance(dsa, HFCausalLM) and args.fsdp:
        print("dsa_model/ not written: the model is sharded (--fsdp); ckpt/sparse.pt holds its whole state dict")
    elif isinstance(dsa, HFCausalLM):
        from dsa_ext import hf

        context_parallel.disable(dsa)  # the saved model attends over whole sequences
        hf.save_pretrained(dsa.hf, os.path.join(args.out, "dsa_model"))
    print(text + "\n\n" + progress.table())
    print(f"wrote {args.out}/results.json, results.md, curves.png, ckpt/")


if __name__ == "__main__":
    main()
