"""Token streams for python/train.py: a corpus of text files split by file into train and
validation, tokenised to one flat int32 array each, and reproducible random windows over it.
Every file is a document: the corpus records where each begins, so that packed training
(``--pack``) keeps attention inside documents (:func:`document_positions`).

Default corpus: the Python standard library's own source files (real text, present wherever
Python is; test suites and site-packages left out), byte-level tokens (vocabulary 256). A user
passes files or directories (every *.txt, *.md, *.py, *.rst, *.json file under them) and
optionally a local Hugging Face tokenizer.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".c", ".h", ".html")
VAL_EVERY = 20  # every 20th file (sorted by path) is validation text


def stdlib_files() -> List[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "__pycache__", "idlelib")
                             and not d.startswith("test"))
        out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(out)


def user_files(paths: Sequence[str]) -> List[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                out += [os.path.join(dirpath, f) for f in filenames if f.endswith(TEXT_SUFFIXES)]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"--data: no such file or directory: {p}")
    if not out:
        raise ValueError(f"--data: found no text files ({', '.join(TEXT_SUFFIXES)}) under {list(paths)}")
    return sorted(out)


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


class HFTokenizer:
    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False), dtype=np.int32)


@dataclass
class Corpus:
    train: np.ndarray  # int32 tokens
    val: np.ndarray
    vocab_size: int
    source: str
    train_docs: np.ndarray  # int64 offsets in train where a document (a file) begins, ascending, from 0
    val_docs: np.ndarray


class Batch(NamedTuple):
    """Token windows ``ids`` [n, seq_len + 1] and, for packed documents, ``positions`` [n, seq_len + 1]:
    each token's position in its document (0 where a document begins, and at the window's start),
    or None (the windows are plain token streams)."""
    ids: torch.Tensor
    positions: Optional[torch.Tensor] = None

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device), None if self.positions is None else self.positions.to(device))

    def rows(self, first: int, step: int) -> Iterator["Batch"]:
        """Batches of one window: rows first, first + step, ..."""
        for i in range(first, self.ids.shape[0], step):
            yield Batch(self.ids[i:i + 1], None if self.positions is None else self.positions[i:i + 1])


def load_corpus(data: Optional[Sequence[str]] = None, tokenizer: Optional[str] = None,
                max_bytes: int = 64 << 20) -> Corpus:
    """Read, split and tokenise: every VAL_EVERY-th file is validation text (with fewer files,
    the last 1/VAL_EVERY of the text). max_bytes caps the text read (in file order)."""
    files = user_files(data) if data else stdlib_files()
    tok = HFTokenizer(tokenizer) if tokenizer else ByteTokenizer()
    parts = {"train": [], "val": []}
    total = 0
    for i, path in enumerate(files):
        if total >= max_bytes:
            break
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        total += len(text)
        parts["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"].append(tok.encode(text + "\n\n"))
    arrays = {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in parts.items()}
    docs = {k: np.cumsum([0] + [len(a) for a in v[:-1]]).astype(np.int64) for k, v in parts.items()}
    if not parts["val"]:  # fewer files than VAL_EVERY: the last 1/VAL_EVERY of the text instead
        cut = len(arrays["train"]) - len(arrays["train"]) // VAL_EVERY
        arrays = {"train": arrays["train"][:cut], "val": arrays["train"][cut:]}
        starts = docs["train"]
        docs = {"train": starts[starts < cut], "val": np.concatenate([[0], starts[starts > cut] - cut])}
    source = ("python stdlib sources" if not data else ", ".join(data)) + \
        (f" ({len(files)} files, {'tokenizer ' + tokenizer if tokenizer else 'bytes'})")
    return Corpus(arrays["train"], arrays["val"], tok.vocab_size, source, docs["train"], docs["val"])


def document_positions(doc_starts: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """[n, length] int64: the position of each token of the windows ``tokens[s : s + length]``
    (s in ``starts``) in its document, counted from the window's start for the document the window
    begins inside; ``doc_starts``: the ascending document offsets, the first 0."""
    p = starts[:, None] + np.arange(length)[None]
    begin = doc_starts[np.searchsorted(doc_starts, p, side="right") - 1]
    return torch.from_numpy((p - np.maximum(begin, starts[:, None])).astype(np.int64))


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int, doc_starts: Optional[np.ndarray]) -> Batch:
    ids = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64))
    return Batch(ids, None if doc_starts is None else document_positions(doc_starts, starts, seq_len + 1))


def train_batch(tokens: np.ndarray, batch: int, seq_len: int, seed: int, stage: int, step: int,
                rank: int, doc_starts: Optional[np.ndarray] = None) -> Batch:
    """[batch, seq_len + 1] int64 windows at positions drawn from (seed, stage, step, rank): the
    same arguments give the same batch, so two stages given the same stage id see the same data.
    With ``doc_starts`` (packed documents) the batch carries each token's document position."""
    rng = np.random.default_rng([seed, stage, step, rank])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
    return _windows(tokens, starts, seq_len, doc_starts)


def val_windows(tokens: np.ndarray, n: int, seq_len: int, doc_starts: Optional[np.ndarray] = None) -> Batch:
    """n fixed windows [n, seq_len + 1] spread evenly over the validation stream (with
    ``doc_starts``, as :func:`train_batch`)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"validation text has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
    return _windows(tokens, starts, seq_len, doc_starts)
