"""Helpers a training loop needs around the DSA cores: modes, warm-up freezing, optimizer groups,
the indexer loss's logged value and scale."""
from __future__ import annotations

from typing import Iterator, List, Optional

import torch
from torch import Tensor, nn

from .attention import dsa_modules

__all__ = ["set_mode", "indexer_loss", "set_loss_scale", "freeze_for_warmup", "unfreeze",
           "indexer_parameters", "param_groups"]


def set_mode(model: nn.Module, mode: str) -> None:
    """Put every DSA core in ``mode`` (dense, warmup or sparse)."""
    mods = dsa_modules(model)
    if not mods:
        raise ValueError("set_mode: the model has no DSAAttention module (convert it first)")
    for m in mods:
        m.mode = mode


def indexer_loss(model: nn.Module) -> Tensor:
    """The logged indexer loss: the sum over layers of each layer's KL loss (mean over tokens)
    from its latest training forward, detached. For logging only: the gradient is already
    attached to the attention outputs, so adding this to the training loss changes nothing.
    A zero tensor before the first training forward (or in dense mode)."""
    values = [m.last_loss for m in dsa_modules(model) if m.last_loss is not None]
    if not values:
        p = next(model.parameters())
        return torch.zeros((), device=p.device)
    return torch.stack([v.to(values[0].device, torch.float64) for v in values]).sum().to(values[0].dtype)


def set_loss_scale(model: nn.Module, scale: float) -> None:
    """Multiply every layer's injected indexer-loss gradient by ``scale`` (default 1): set it to
    whatever the training loop multiplies its loss by before ``backward`` (1 / accumulation
    steps, an AMP GradScaler's current scale), so that the indexer loss is scaled like the LM loss.
    """
    for m in dsa_modules(model):
        m.loss_scale = float(scale)


def indexer_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    for m in dsa_modules(model):
        if m.indexer is not None:
            yield from m.indexer.parameters()


def freeze_for_warmup(model: nn.Module) -> List[nn.Parameter]:
    """Dense warm-up: every parameter frozen except the indexers'. Returns the trainable ones.

    Backpropagating the LM loss then trains the indexers on their KL loss alone (the loss
    attached to each attention output; the indexers read their inputs detached). With reentrant
    activation checkpointing (``use_reentrant=True``) the checkpointed blocks' inputs must require
    grad for the backward to reach them (transformers: ``model.enable_input_require_grads()``)."""
    idx = {id(p) for p in indexer_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in idx)
    return [p for p in model.parameters() if p.requires_grad]


def unfreeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def param_groups(model: nn.Module, lr: float, indexer_lr: Optional[float] = None,
                 weight_decay: float = 0.0) -> List[dict]:
    """Optimizer groups over the trainable parameters: the host model's matrices (with weight
    decay), its vectors (norms, biases: no decay), and the indexers (own lr, no decay). Empty
    groups are left out."""
    idx = {id(p) for p in indexer_parameters(model)}
    decay, no_decay, indexer = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in idx:
            indexer.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "model"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "model_no_decay"},
        {"params": indexer, "lr": lr if indexer_lr is None else indexer_lr, "weight_decay": 0.0,
         "name": "indexer"},
    ]
    return [g for g in groups if g["params"]]
