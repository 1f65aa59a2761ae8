"""Generation with a model that python/train.py trained: the DSA model (after sparse training)
against dense attention, with the KV and indexer-key caches (dsa_ext.generation).

From a run directory (--run, what train.py wrote: config.json, ckpt/sparse.pt and
ckpt/dense_baseline.pt) it loads the DSA model and the dense baseline, then on held-out text
(the run's validation stream):
1. perplexity at the training context (--seq-len windows): the DSA model in sparse mode, the same
   weights in dense mode, and the dense baseline;
2. greedy generation of --tokens tokens after --prompts prompts of --prompt-len tokens (at most
   topk), one batch: the DSA model in sparse mode against the same weights in dense mode. While
   the context holds at most topk tokens every key is selected, so the tokens must be identical;
   beyond, it counts the generated tokens that agree (position by position), the length of the
   common prefix, and teacher-forced agreement (the next-token argmax of both modes on the dense
   mode's sequence, positions past topk).
Everything runs in float64 (ties cannot flip a token through rounding); prints and writes
--run/generation.json.

  python python/eval_generation.py --run out/train
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # noqa: E402
import train  # noqa: E402
import train_data  # noqa: E402

from dsa_ext import generation  # noqa: E402
from dsa_ext import nn as dsa_nn  # noqa: E402


def load_models(run: str, vocab_size: int):
    with open(os.path.join(run, "config.json")) as f:
        args = SimpleNamespace(**json.load(f))
    if args.arch != "decoder" or args.init:
        raise SystemExit(f"--run {run}: a run of the plain decoder (--arch decoder, no --init); this one has "
                         f"arch {args.arch!r}, init {args.init!r}")
    dsa = train.convert(train.build_dense(args, vocab_size), args, "sparse")
    dsa.load_state_dict(train.load_checkpoint(os.path.join(run, "ckpt", "sparse.pt"), "cpu")["model"])
    base = train.build_dense(args, vocab_size)
    base.load_state_dict(train.load_checkpoint(os.path.join(run, "ckpt", "dense_baseline.pt"), "cpu")["model"])
    return args, dsa.double().eval(), base.double().eval()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    losses = [F.cross_entropy(model(w[None, :-1])[0], w[1:]).item() for w in windows]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def greedy_agreement(model, prompts: torch.Tensor, tokens: int, topk: int) -> dict:
    """The DSA model's greedy tokens in sparse mode against its dense mode (same weights)."""
    P = prompts.shape[1]
    dsa_nn.set_mode(model, "sparse")
    sparse = generation.generate(model, prompts, tokens)[:, P:]
    dsa_nn.set_mode(model, "dense")
    dense_seq = generation.generate(model, prompts, tokens)
    dense = dense_seq[:, P:]
    # generated token j is predicted from a context of P + j tokens
    within = topk - P + 1  # tokens generated from contexts of at most topk tokens
    same = sparse == dense
    prefix = [int(row.long().cumprod(0).sum()) for row in same]
    # teacher forcing on the dense mode's sequence: next-token argmax of both modes, contexts > topk
    want = model(dense_seq[:, :-1]).argmax(-1)
    dsa_nn.set_mode(model, "sparse")
    got = model(dense_seq[:, :-1]).argmax(-1)
    beyond_tf = (got == want)[:, topk:]
    return {
        "prompts": prompts.shape[0], "prompt_len": P, "tokens": tokens, "topk": topk,
        "within_topk_tokens": within, "within_topk_identical": bool(same[:, :within].all()),
        "beyond_topk_agree": int(same[:, within:].sum()), "beyond_topk_total": int(same[:, within:].numel()),
        "agree_of_all_generated_per_prompt": same.sum(1).tolist(), "common_prefix_per_prompt": prefix,
        "teacher_forced_agree_beyond_topk": float(beyond_tf.double().mean()),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--run", default="out/train", help="the directory python/train.py wrote (its --out)")
    p.add_argument("--tokens", type=int, default=256, help="greedy tokens generated per prompt")
    p.add_argument("--prompts", type=int, default=8, help="prompts (one batch), from the validation text")
    p.add_argument("--prompt-len", type=int, default=0, help="tokens per prompt; 0: topk / 2")
    p.add_argument("--windows", type=int, default=32, help="validation windows for the perplexity")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    opts = parse_args(argv)
    with open(os.path.join(opts.run, "config.json")) as f:
        saved = json.load(f)
    corpus = train_data.load_corpus(saved.get("data"), saved.get("tokenizer"))
    args, dsa, base = load_models(opts.run, corpus.vocab_size)
    windows = train_data.val_windows(corpus.val, opts.windows, args.seq_len).ids  # one document per window
    dsa_nn.set_mode(dsa, "sparse")
    ppl = {"dsa_sparse": perplexity(dsa, windows)}
    dsa_nn.set_mode(dsa, "dense")
    ppl["dsa_weights_dense_mode"] = perplexity(dsa, windows)
    ppl["dense_baseline"] = perplexity(base, windows)
    P = opts.prompt_len or args.topk // 2
    if P > args.topk:
        raise SystemExit(f"--prompt-len: at most topk ({args.topk}), got {P}")
    starts = torch.linspace(0, len(corpus.val) - P - 1, opts.prompts).long()
    prompts = torch.stack([torch.from_numpy(corpus.val[s:s + P].astype("int64")) for s in starts.tolist()])
    agree = greedy_agreement(dsa, prompts, opts.tokens, args.topk)
    result = {"run": opts.run, "seq_len": args.seq_len, "topk": args.topk, "preset": args.preset,
              "perplexity": ppl, "perplexity_windows": opts.windows, "generation": agree}
    print(f"run {opts.run} (preset {args.preset}): S={args.seq_len}, topk={args.topk}, float64")
    print(f"perplexity on {opts.windows} held-out windows of {args.seq_len} tokens: DSA (sparse) "
          f"{ppl['dsa_sparse']:.4f}, same weights dense {ppl['dsa_weights_dense_mode']:.4f}, dense baseline "
          f"{ppl['dense_baseline']:.4f}")
    print(f"greedy, {agree['prompts']} prompts of {P} tokens, {opts.tokens} tokens each, sparse vs dense mode: "
          f"contexts <= topk ({agree['within_topk_tokens']} tokens per prompt) identical: "
          f"{agree['within_topk_identical']}; beyond: {agree['beyond_topk_agree']} of "
          f"{agree['beyond_topk_total']} tokens agree; common prefix per prompt {agree['common_prefix_per_prompt']}; "
          f"teacher-forced next-token agreement past topk {agree['teacher_forced_agree_beyond_topk']:.4f}")
    with open(os.path.join(opts.run, "generation.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {opts.run}/generation.json")
    return result


if __name__ == "__main__":
    main()
