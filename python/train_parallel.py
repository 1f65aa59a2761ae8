"""Processes of python/train.py: data parallelism x context parallelism under torchrun, with DDP
or FSDP2 (``--fsdp``), and the whole-model state dicts that checkpoints and stage hand-overs need.

world = dp x cp. Ranks d*cp .. d*cp+cp-1 form context-parallel group d: they share every
sequence of data-parallel rank d's batch (each holds its zigzag share of the tokens,
dsa_ext.context_parallel). Parameters are replicated (DDP) or sharded (FSDP2) over all world
ranks, as Megatron-LM's DP x CP group and torchtitan's dp_shard_cp mesh do: a context-parallel
rank's gradients are only part of its sequences' gradients. DDP and FSDP2 average over the
world, so each rank's loss is its share of its dp rank's mean loss times cp (and the DSA layers'
injected indexer-loss gradients are scaled by cp the same way: dsa_ext.nn.set_loss_scale).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from dsa_ext.context_parallel import ContextParallel


@dataclass
class Env:
    rank: int
    world: int
    device: torch.device
    cp: Optional[ContextParallel] = None  # this rank's context-parallel group (None: whole sequences)
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cp_size(self) -> int:
        return 1 if self.cp is None else self.cp.size

    @property
    def dp_size(self) -> int:
        return self.world // self.cp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp_size

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def cp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's context-parallel group (a loss's shares -> the loss)."""
        if self.cp is not None:
            t = t.detach().clone()
            dist.all_reduce(t, group=self.cp.group)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_env(device_arg: str, cp: int = 1, fsdp: bool = False) -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    env = Env(rank, world, device, fsdp=fsdp)
    if cp > 1:
        groups = [dist.new_group(list(range(d * cp, (d + 1) * cp))) for d in range(world // cp)]  # every rank makes every group
        env.cp = ContextParallel(groups[rank // cp])
    return env


def wrap(model: nn.Module, env: Env, find_unused: bool = False) -> nn.Module:
    """The module a stage trains through: DDP over the world (the model itself when alone).
    Under FSDP2 the model was sharded when built (:func:`shard`) and is its own wrapper.
    ``find_unused``: some parameters may get no gradient in a step (MoE experts no token chose,
    an indexer that does not run in dense stages), which DDP must then look for."""
    if env.world == 1 or env.fsdp:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
        find_unused_parameters=find_unused)


def shard(model: nn.Module, layers, env: Env) -> nn.Module:
    """FSDP2 over all ranks: fully_shard every DSA indexer (a unit of its own: it trains while
    the rest is frozen in the warm-up), every layer, then the root. In place, before any
    optimizer is made over the parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dsa_ext.nn import dsa_modules

    mesh = init_device_mesh(env.device.type, (env.world,))
    for core in dsa_modules(model):
        if core.indexer is not None:
            fully_shard(core.indexer, mesh=mesh)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module, env: Env) -> None:
    """FSDP2 keeps the root's parameters unsharded after a forward that no backward follows (an
    evaluation): put every unit back in its sharded state, so that ``parameters()`` (an optimizer
    made next) and state dicts see the sharded parameters, not the transient unsharded ones."""
    if env.fsdp:
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def full_state(model: nn.Module, env: Env) -> Dict[str, torch.Tensor]:
    """The model's whole state dict on every rank (FSDP2: gathered, a collective), cloned."""
    if env.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: Env) -> Dict:
    """Model and optimizer state to save (whole tensors; FSDP2: gathered, a collective)."""
    if env.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        return {"model": model_sd, "optimizer": optim_sd}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def load_checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: Dict, env: Env) -> None:
    if env.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
