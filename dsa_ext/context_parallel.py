"""Context parallelism for DSA: one sequence split over the ranks of a ``torch.distributed`` group.

Layout (:class:`ZigzagLayout`): the T tokens are cut into 2N chunks of floor/ceil(T / 2N) tokens
and rank r holds chunks r and 2N-1-r (in that order), so every rank gets one early and one late
chunk and the causal work (keys per query) is the same on every rank; any T >= 2N works.

Per attention layer each rank (:class:`ContextParallel`):
- runs its indexer on its own tokens at their global positions, then all-gathers the indexer keys
  (one Di-vector per token) and selects its queries' top-k over the global prefix each chunk may
  see (global key positions, so indices are global);
- all-gathers the layer's K and V (every row, not only the selected ones: see
  docs/context_parallel.md for the bytes) and runs sparse (or, in modes dense/warmup, dense)
  attention and the indexer KL loss for its own queries;
- in backward, the gradients of the gathered keys and values go back to their owners by a
  reduce-scatter (summed over the ranks whose queries used them).

Every operator call sees a chunk of queries whose keys are the prefix [0, chunk end) of the
sequence, which is the operators' bottom-right causal alignment: no mask is built and no
operator changes. Packed documents (key ranges, DESIGN.md section 7) are the local queries'
``(key_start, key_end)`` in global key positions, sliced per chunk like the queries;
:meth:`ContextParallel.key_ranges` makes them from the local tokens' position ids. Losses are
shares: each rank's indexer loss is the sum of its real tokens' KL over the real tokens of the
whole batch (B * T without key ranges), so the shares add up over the group to the loss one
process would compute; the training loop sums parameter gradients over the group (or averages
them over a data-parallel group that includes it, with the loss scaled by the group size).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import fp8, ops, ranges
from .nn.attention import Selection, _range_args, dense_causal_attention
from .nn.key_ranges import real_queries

if TYPE_CHECKING:
    from .nn.attention import DSAAttention
    from .nn.key_ranges import KeyRanges

__all__ = ["ZigzagLayout", "ContextParallel", "enable", "disable", "group_of"]


# torch 2.14 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn); both
# concatenate the ranks' blocks along dim 0 and run on gloo and nccl
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ZigzagLayout:
    """Which tokens of a T-token sequence rank ``rank`` of ``size`` holds: chunks ``rank`` and
    ``2*size-1-rank`` of 2*size contiguous chunks, in that order. Rank r holds T // size tokens
    (one more for the first T % size ranks), split evenly over its two chunks, so chunk sizes
    differ by at most one token and the ranks' lengths by at most one."""

    def __init__(self, seq_len: int, size: int, rank: int):
        if seq_len < 2 * size:
            raise ValueError(f"context parallelism over {size} ranks needs a sequence of at least "
                             f"{2 * size} tokens (two chunks per rank), got {seq_len}")
        self.seq_len, self.size, self.rank = seq_len, size, rank
        # rank r holds T // N tokens (one more for the first T % N ranks), half in each chunk
        self.lengths = [seq_len // size + (r < seq_len % size) for r in range(size)]
        sizes = [0] * (2 * size)
        for r, n in enumerate(self.lengths):
            sizes[r], sizes[2 * size - 1 - r] = n // 2, n - n // 2
        bounds = [sum(sizes[:i]) for i in range(2 * size + 1)]
        self.ranges: List[List[Tuple[int, int]]] = [
            [(bounds[r], bounds[r + 1]), (bounds[2 * size - 1 - r], bounds[2 * size - r])] for r in range(size)]
        self.max_len = max(self.lengths)
        self._rows = {}  # gather_index per device
        self._positions = {}  # positions per device

    @property
    def local_len(self) -> int:
        return self.lengths[self.rank]

    def chunks(self) -> List[Tuple[int, int, int]]:
        """This rank's chunks as (first local row, end local row, end global position): the
        queries of rows [a, b) see the keys [0, end) of the gathered sequence."""
        out, row = [], 0
        for s, e in self.ranges[self.rank]:
            out.append((row, row + e - s, e))
            row += e - s
        return out

    def positions(self, device=None) -> Tensor:
        """The global positions of this rank's tokens, int64 [local_len] (one tensor per device,
        shared: read it, do not write it)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if device not in self._positions:
            self._positions[device] = torch.cat([torch.arange(s, e, device=device) for s, e in self.ranges[self.rank]])
        return self._positions[device]

    def take(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's tokens of the full-sequence tensor ``x`` (length seq_len along ``dim``)."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"ZigzagLayout.take: expected {self.seq_len} tokens along dim {dim}, "
                             f"got shape {tuple(x.shape)}")
        return torch.cat([x.narrow(dim, s, e - s) for s, e in self.ranges[self.rank]], dim)

    def gather_index(self, device=None) -> Tensor:
        """For each global position, its row in the all-gathered buffer of size*max_len rows
        (rank r's rows start at r*max_len; ranks shorter than max_len are padded at the end)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if device not in self._rows:
            rows = torch.empty(self.seq_len, dtype=torch.long)
            for r, rr in enumerate(self.ranges):
                row = r * self.max_len
                for s, e in rr:
                    rows[s:e] = torch.arange(row, row + e - s)
                    row += e - s
            self._rows[device] = rows.to(device)
        return self._rows[device]


class _GatherSequence(torch.autograd.Function):
    """[B, L, *F] local rows -> [B, T, *F] the whole sequence in global order; backward sums each
    row's gradient over the ranks and hands it to the row's owner (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, cp: "ContextParallel", lay: ZigzagLayout) -> Tensor:
        ctx.cp, ctx.lay = cp, lay
        return cp._gather(x, lay)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.cp._scatter_sum(grad, ctx.lay), None, None


class ContextParallel:
    """A context-parallel group for DSA (see the module docstring).

    ``cp = ContextParallel(group)``; per sequence ``x_local = cp.shard(x)`` (sets the layout of the
    sequence length of x; shard every per-token tensor, inputs and targets alike, with it) and
    ``cp.positions()`` the global positions of the local tokens, which the model must use for its
    RoPE and hand to its DSA cores. :func:`enable` attaches the group to a model's attention cores.

    Packed documents: pass the local tokens' position ids (``cp.shard(position_ids)``, restarting
    per document) to the model instead; :meth:`key_ranges` turns them into the local queries'
    key ranges, which the DSA cores then take (``key_ranges=``), like the key ranges of one
    process but in global key positions.

    ``bytes_moved`` counts, per rank, the bytes each collective receives from the other ranks
    (all-gather: (N-1) * max_len rows; reduce-scatter: the same): the communication of a step.
    """

    _REMEMBERED = 8  # forwards whose documents (and counts of real queries) are kept

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.layout: Optional[ZigzagLayout] = None
        self.bytes_moved = 0
        # by tensor identity and version (the tensor is held, so its id cannot be reused): a
        # forward's documents per position-ids tensor and sequence, and the number of real queries
        # per key_start tensor; every rank runs the same calls, so every rank misses (and runs
        # the collective) alike
        self._documents: List[tuple] = []
        self._real_counts: List[Tuple[Tensor, int, Tensor]] = []

    # -- the sequence --------------------------------------------------------------------------

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's tokens of ``x``; makes x's sequence length the current layout."""
        if self.layout is None or self.layout.seq_len != x.shape[dim]:
            self.layout = ZigzagLayout(x.shape[dim], self.size, self.rank)
        return self.layout.take(x, dim)

    def positions(self, device=None) -> Tensor:
        return self._current().positions(device)

    def key_ranges(self, position_ids: Tensor, batch: Optional[int] = None,
                   cu_seq_lens: Optional[Tensor] = None) -> Optional["KeyRanges"]:
        """The packed documents of the local tokens: their key ranges ``(key_start, key_end)``,
        int32 ``[batch, L]`` in global key positions, from their position ids ``[L]`` or
        ``[B or 1, L]`` (``cp.shard`` of the sequence's; a document begins wherever the position
        does not continue the previous one, as :func:`dsa_ext.ranges.from_position_ids` says for
        the whole sequence). None when every row is one document (nothing to confine), at once
        for :meth:`positions` itself (or a view of it).

        Where a document begins can depend on the token before a chunk, which another rank holds,
        so other position ids are all-gathered (8 bytes per token): once per forward, the result
        being kept for the same tensor, unmodified, and sequence (every layer of a forward, and a
        recomputation under activation checkpointing, pass the same one). A collective: every
        rank of the group calls it alike. ``cu_seq_lens`` (flash-attn's cumulative document
        lengths of the whole sequence, as transformers' packed batches carry them), when given,
        must describe the same documents and cover the sequence (ValueError otherwise, on every
        rank alike: both sides are the whole sequence's)."""
        pos = position_ids if position_ids.dim() == 2 else position_ids[None]
        batch = pos.shape[0] if batch is None else batch
        lay = self._current(pos.shape[1])
        if _is_view_of(position_ids, lay.positions(position_ids.device)):  # one document
            if cu_seq_lens is not None:
                _check_same_documents(cu_seq_lens, torch.zeros(1, lay.seq_len, dtype=torch.int32,
                                                                device=position_ids.device))
            return None
        found, start = self._documents_of(position_ids, pos, batch, lay)
        if cu_seq_lens is not None:
            _check_same_documents(cu_seq_lens, start)
        return found

    def _documents_of(self, position_ids: Tensor, pos: Tensor, batch: int, lay: ZigzagLayout):
        """key_ranges' answer and the whole sequence's document starts [B or 1, T], gathered or
        kept."""
        key = (lay, batch, position_ids._version)
        for held, held_key, found, start in self._documents:
            if held is position_ids and held_key == key:
                return found, start
        every = self._gather(pos.long().contiguous(), lay)  # [B or 1, T]
        start, end = ranges.from_position_ids(every)
        found = None
        if bool(start.any()):  # a document begins after a row's first token
            found = tuple(lay.take(r).expand(batch, -1).contiguous() for r in (start, end))
            # every query of a document is real: the group holds batch * T of them
            self._remember(self._real_counts, (found[0], found[0]._version, batch * lay.seq_len))
        self._remember(self._documents, (position_ids, key, found, start))
        return found, start

    def any_rank(self, flag: Tensor) -> bool:
        """Whether ``flag`` (a bool scalar tensor) is true on some rank of the group (one 4-byte
        all-reduce): for a decision that every rank must take alike."""
        t = flag.to(torch.int32).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        self.bytes_moved += (self.size - 1) * t.element_size()
        return bool(t.item())

    def _remember(self, memory: list, entry: tuple) -> None:
        memory.append(entry)
        del memory[:-self._REMEMBERED]

    def _current(self, local_len: Optional[int] = None) -> ZigzagLayout:
        if self.layout is None:
            raise RuntimeError("ContextParallel: no sequence sharded yet (call cp.shard(tokens) first)")
        if local_len is not None and local_len != self.layout.local_len:
            raise RuntimeError(f"ContextParallel: this rank holds {self.layout.local_len} tokens of the "
                               f"current {self.layout.seq_len}-token sequence, got a tensor of {local_len}")
        return self.layout

    # -- collectives ---------------------------------------------------------------------------

    def gather(self, x: Tensor) -> Tensor:
        """The whole sequence [B, T, *F] from every rank's rows x [B, L, *F] (autograd: the
        gradient goes back to the owners)."""
        return _GatherSequence.apply(x, self, self._current(x.shape[1]))

    def _gather(self, x: Tensor, lay: ZigzagLayout) -> Tensor:
        B, L, feat = x.shape[0], x.shape[1], x.shape[2:]
        if L == lay.max_len:
            pad = x.contiguous()
        else:
            pad = x.new_zeros(B, lay.max_len, *feat)
            pad[:, :L] = x
        buf = x.new_empty(lay.size * B, lay.max_len, *feat)  # rank r's rows: buf[r*B:(r+1)*B]
        _all_gather(buf, pad, group=self.group)
        self.bytes_moved += (lay.size - 1) * pad.numel() * pad.element_size()
        rows = buf.view(lay.size, B, lay.max_len, *feat).movedim(0, 1).reshape(B, lay.size * lay.max_len, *feat)
        return rows.index_select(1, lay.gather_index(x.device))

    def _scatter_sum(self, grad: Tensor, lay: ZigzagLayout) -> Tensor:
        B, feat = grad.shape[0], grad.shape[2:]
        rows = grad.new_zeros(B, lay.size * lay.max_len, *feat)
        rows.index_copy_(1, lay.gather_index(grad.device), grad)
        blocks = rows.view(B, lay.size, lay.max_len, *feat).movedim(1, 0).reshape(lay.size * B, lay.max_len, *feat)
        out = grad.new_empty(B, lay.max_len, *feat)
        _reduce_scatter(out, blocks, op=dist.ReduceOp.SUM, group=self.group)
        self.bytes_moved += (lay.size - 1) * out.numel() * out.element_size()
        return out[:, :lay.local_len]

    def gather_kv(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Gathered k [B,T,Hkv,Dqk] and v [B,T,Hkv,Dv]: one collective for both; when v is a
        column prefix of k's storage (MLA's latent: v = k[..., :Dv]) only k travels."""
        if (v.data_ptr() == k.data_ptr() and v.shape[:-1] == k.shape[:-1] and v.stride() == k.stride()
                and v.shape[-1] <= k.shape[-1]):
            k_full = self.gather(k)
            return k_full, k_full[..., :v.shape[-1]]
        dk = k.shape[-1]
        kv = self.gather(torch.cat((k, v), dim=-1))
        return kv[..., :dk], kv[..., dk:]

    # -- the attention core under context parallelism -----------------------------------------

    def select(self, core: "DSAAttention", q_idx: Tensor, k_idx: Tensor, w: Tensor,
               key_ranges: Optional["KeyRanges"] = None) -> "Selection":
        """DSAAttention.select for local indexer outputs (at global positions): the gathered
        indexer keys and, where the mode needs it, each local query's top-k over its global prefix
        (within ``key_ranges``, the local queries' ranges in global key positions)."""
        lay = self._current(q_idx.shape[1])
        k_full = self.gather(k_idx)
        indices = None
        if core.mode == "sparse" or core.recall is not None:
            pick = fp8.indexer_topk if core.fp8_topk else ops.indexer_topk
            with torch.no_grad():
                qd, kd, wd = q_idx.detach(), k_full.detach(), w.detach()
                indices = self._per_chunk(lay, lambda a, b, end: pick(
                    qd[:, a:b], kd[:, :end], wd[:, a:b], core.topk, core.indexer.scale,
                    **_range_args(_chunk_key_ranges(key_ranges, a, b, end))))
        return Selection(q_idx, k_full, w, indices)

    def dense_attention(self, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                        key_ranges: Optional["KeyRanges"] = None) -> Tensor:
        """Causal dense attention of the local queries over the gathered sequence (within
        ``key_ranges``, as :meth:`select`)."""
        lay = self._current(q.shape[1])
        k_full, v_full = self.gather_kv(k, v)
        return self._dense_chunks(lay, q, k_full, v_full, scale, key_ranges)

    def attend(self, core: "DSAAttention", q: Tensor, k: Tensor, v: Tensor,
               selection: Optional["Selection"], scale: float, key_ranges: Optional["KeyRanges"] = None) -> Tensor:
        """DSAAttention.attend for local q, k, v [B, L, ...]: modes as the core's, attention over
        the gathered keys and values (within ``key_ranges``, as :meth:`select`), the KL loss share
        of the local real queries attached."""
        lay = self._current(q.shape[1])
        k_full, v_full = self.gather_kv(k, v)
        own = selection is not None and selection.q_idx is not None
        indices = None if selection is None else selection.indices
        if indices is None and (core.mode == "sparse" or core.recall is not None):
            raise ValueError(f"DSAAttention in mode {core.mode!r}: no top-k selection to attend over")
        want_loss = own and core.training and core.mode != "dense" and torch.is_grad_enabled()
        if core.recall is not None:
            for a, b, end in lay.chunks():
                core.recall.add(q[:, a:b], k_full[:, :end], scale, indices[:, a:b], core.topk,
                                _chunk_key_ranges(key_ranges, a, b, end))
        if core.mode == "sparse":
            out, lse = ops.sparse_attention(q, k_full, v_full, indices, scale, return_lse=True)
            if want_loss:  # the indices carry causality and the ranges: one call over every local query
                per_token = ops.indexer_kl_loss(selection.q_idx, selection.k_idx, selection.w, q.detach(),
                                                k_full.detach(), indices, core.indexer.scale, scale, True,
                                                lse.detach(), **_range_args(key_ranges))
        else:
            out = self._dense_chunks(lay, q, k_full, v_full, scale, key_ranges)
            if want_loss:
                kd = k_full.detach()
                per_token = self._per_chunk(lay, lambda a, b, end: ops.indexer_kl_loss(
                    selection.q_idx[:, a:b], selection.k_idx[:, :end], selection.w[:, a:b], q[:, a:b].detach(),
                    kd[:, :end], None, core.indexer.scale, scale, True, None,
                    **_range_args(_chunk_key_ranges(key_ranges, a, b, end))))
        if want_loss:
            out = core._attach_loss(out, self._loss_share(per_token, key_ranges, lay))
        return out

    def _loss_share(self, per_token: Tensor, key_ranges: Optional["KeyRanges"], lay: ZigzagLayout) -> Tensor:
        """This rank's share of the mean of ``per_token`` [B, L] over the real queries of the
        whole batch (all B * T of them without key ranges)."""
        if key_ranges is None:
            return per_token.sum() / (per_token.shape[0] * lay.seq_len)
        real = real_queries(key_ranges, lay.local_len, lay.seq_len, lay.positions(key_ranges[0].device))
        return (per_token * real).sum() / self._real_count(key_ranges[0], real)

    def _real_count(self, start: Tensor, real: Tensor):
        """The number of real queries over the group, at least 1: known for the documents of
        :meth:`key_ranges` (an int), else summed over the ranks (one all-reduce per key_start
        tensor; a tensor on real's device)."""
        for held, version, count in self._real_counts:
            if held is start and version == start._version:
                return count
        count = real.sum().to(torch.int64)
        dist.all_reduce(count, group=self.group)
        self.bytes_moved += (self.size - 1) * count.element_size()
        count = count.clamp_min(1)
        self._remember(self._real_counts, (start, start._version, count))
        return count

    def _dense_chunks(self, lay: ZigzagLayout, q: Tensor, k_full: Tensor, v_full: Tensor, scale: Optional[float],
                      key_ranges: Optional["KeyRanges"]) -> Tensor:
        """Dense causal attention of each local chunk over its key prefix (within its ranges)."""
        return self._per_chunk(lay, lambda a, b, end: dense_causal_attention(
            q[:, a:b], k_full[:, :end], v_full[:, :end], scale, _chunk_key_ranges(key_ranges, a, b, end)))

    @staticmethod
    def _per_chunk(lay: ZigzagLayout, fn) -> Tensor:
        return torch.cat([fn(a, b, end) for a, b, end in lay.chunks()], dim=1)


def _chunk_key_ranges(key_ranges: Optional["KeyRanges"], a: int, b: int, end: int) -> Optional["KeyRanges"]:
    """The key ranges of the local rows [a, b), whose queries see the key prefix [0, end): global
    key positions cut at ``end`` (the operators take ranges within their keys; the causal mask
    cuts them there anyway)."""
    if key_ranges is None:
        return None
    return tuple(r[:, a:b].clamp_max(end).contiguous() for r in key_ranges)


def _is_view_of(t: Tensor, base: Tensor) -> bool:
    return t is base or (t._base is base and t.numel() and t.data_ptr() == base.data_ptr()
                         and t.shape[-1] == base.shape[0] and t.stride(-1) == 1)


def _check_same_documents(cu_seq_lens: Tensor, start: Tensor) -> None:
    """cu_seq_lens [D + 1] against the documents' first tokens ``start`` [B, T] found from the
    position ids."""
    T = start.shape[1]
    if int(cu_seq_lens[-1]) != T or not torch.equal(ranges.from_cu_seqlens(cu_seq_lens, total=T)[0].to(start.device)
                                                     .expand_as(start), start):
        raise ValueError(f"context parallelism: cu_seq_lens {cu_seq_lens.tolist()} and the position ids describe "
                         f"different documents of the {T}-token sequence (pass the whole sequence's cu_seq_lens "
                         f"and each rank's share of its position ids, cp.shard(position_ids))")


def group_of(model: torch.nn.Module) -> Optional[ContextParallel]:
    """The context-parallel group :func:`enable` attached to ``model``'s attention, or None."""
    return next((m.context_parallel for m in model.modules() if getattr(m, "context_parallel", None) is not None),
                None)


def _cores(model: torch.nn.Module):
    from .decoder import DenseCore
    from .nn.attention import DSAAttention

    return [m for m in model.modules() if isinstance(m, (DSAAttention, DenseCore))]


def _hf_model(model: torch.nn.Module):
    """The outermost transformers model in ``model`` (itself, or one it wraps), or None."""
    return next((m for m in model.modules() if hasattr(m, "config") and hasattr(m, "set_attn_implementation")),
                None)


def enable(model: torch.nn.Module, cp: ContextParallel) -> ContextParallel:
    """Run ``model``'s attention context-parallel over ``cp``: its DSA cores (and a plain
    :class:`dsa_ext.decoder.Decoder`'s dense cores), or a transformers model, converted or not
    (:mod:`dsa_ext.hf_context_parallel`). The model must then be called on ``cp.shard``-ed tokens
    with ``cp.positions()``. Returns cp."""
    hf_model = _hf_model(model)
    if hf_model is not None:
        from . import hf_context_parallel

        hf_context_parallel.enable(hf_model, cp)
    cores = _cores(model)
    if not cores and hf_model is None:
        raise ValueError("context_parallel.enable: found no DSAAttention, DenseCore or transformers model")
    for m in cores:
        m.context_parallel = cp
    return cp


def disable(model: torch.nn.Module) -> None:
    """Undo :func:`enable` (the model runs on whole sequences again)."""
    hf_model = _hf_model(model)
    if hf_model is not None:
        from . import hf_context_parallel

        hf_context_parallel.disable(hf_model)
    for m in _cores(model):
        m.context_parallel = None
