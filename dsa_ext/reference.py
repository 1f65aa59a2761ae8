"""Pure-PyTorch semantics of every dsa_ext operator: the test oracle.

Written for clarity, not speed: each function materialises what the fused operators stream
(full [B, T, S] logits, gathered [.., k, D] keys). Every function accepts float64 and then
computes in float64; other dtypes compute in float32. The signatures match ``dsa_ext.*``.
All edge cases of docs/DESIGN.md are pinned here: bottom-right causal alignment, per-query key
ranges (dsa_ext.ranges.visible_mask), -1 padding, duplicate indices, rows with no valid key
(output 0, lse -inf, finite gradients), deterministic top-k (ties to the lower position,
ascending rows).
"""
from __future__ import annotations

import torch

from .conventions import causal_mask, default_attention_scale, default_indexer_scale
from .ranges import visible_mask

__all__ = ["indexer_logits", "topk_indices", "indexer_topk", "sparse_attention", "indexer_kl_loss"]


def _acc(dtype: torch.dtype, upcast: bool = True) -> torch.dtype:
    """The dtype of the products: float64 stays, others compute in float32. upcast=False keeps
    the input dtype for the products (every matmul's output rounded to it) while softmax,
    log-sum-exp and losses still run in float32: attention as plain PyTorch evaluates it in that
    dtype, the low-precision baseline the tests bound kernel errors against (flash-attention's
    rule)."""
    if not upcast:
        return dtype
    return _stats(dtype)


def _stats(dtype: torch.dtype) -> torch.dtype:
    """The dtype of scores, softmax statistics and losses: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_key_ranges(key_start, key_end, S):
    """Key-range values must lie in [0, S] (start >= end: an empty row)."""
    for name, r in (("key_start", key_start), ("key_end", key_end)):
        if r is not None and ((r < 0) | (r > S)).any():
            raise IndexError(f"expected every {name} to be in [0, S={S}]")


def _visible(T, S, causal, key_start, key_end, device):
    """[B or 1, T, S] bool: what each query sees (causal mask and key ranges)."""
    if causal and S < T:
        raise RuntimeError(f"causal attention needs S >= T, got T={T}, S={S}")
    if key_start is None and key_end is None:
        mask = causal_mask(T, S, device) if causal else torch.ones(T, S, dtype=torch.bool, device=device)
        return mask[None]
    _check_key_ranges(key_start, key_end, S)
    return visible_mask(key_start, key_end, S, causal)


def indexer_logits(q_idx, k_idx, w, scale=None, causal=True, k_scale=None, key_start=None, key_end=None,
                   upcast=True):
    """logits[b,t,s] = scale * sum_j w[b,t,j] * relu(q_idx[b,t,j] . k_idx[b,s]) (* k_scale[b,s]
    when given); -inf if masked: causal (s > t + S - T) or outside [key_start[b,t], key_end[b,t]).

    q_idx [B,T,Hi,Di], k_idx [B,S,Di], w [B,T,Hi] -> [B,T,S] float32 (float64 for float64 input).
    float8_e4m3fn inputs compute in float32 (pass them .double() for a float64 oracle).
    upcast=False rounds the dot products and the weighted sum to the input dtype (a low-precision
    baseline).
    """
    B, T, Hi, Di = q_idx.shape
    S = k_idx.shape[1]
    if scale is None:
        scale = default_indexer_scale(Hi, Di)
    acc = _acc(q_idx.dtype, upcast)
    dots = torch.einsum("bthd,bsd->bths", q_idx.to(acc), k_idx.to(acc))
    logits = (scale * torch.einsum("bth,bths->bts", w.to(acc), dots.relu())).to(_stats(q_idx.dtype))
    if k_scale is not None:
        logits = logits * k_scale.to(logits.dtype)[:, None, :]
    return logits.masked_fill(~_visible(T, S, causal, key_start, key_end, logits.device), float("-inf"))


def topk_indices(logits, topk):
    """The topk highest finite scores of each row: ties to the lower position, positions
    ascending, -1 padding when fewer than topk are valid (-inf and NaN are never selected).

    logits [B,T,S] -> [B,T,topk] int32.
    """
    if topk < 1:
        raise ValueError(f"expected topk >= 1, got topk={topk}")
    B, T, S = logits.shape
    valid = ~(torch.isnan(logits) | (logits == float("-inf")))
    scores = torch.where(valid, logits, torch.full_like(logits, float("-inf")))
    # A stable descending sort keeps equal scores in position order: ties go to the lower position.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen_valid = valid.gather(-1, order)
    order = torch.where(chosen_valid, order, torch.full_like(order, S))
    order = torch.sort(order, dim=-1).values
    out = torch.full((B, T, topk), -1, dtype=torch.int32, device=logits.device)
    n = order.shape[-1]
    out[..., :n] = torch.where(order == S, torch.full_like(order, -1), order).to(torch.int32)
    return out


def indexer_topk(q_idx, k_idx, w, topk, scale=None, causal=True, k_scale=None, key_start=None, key_end=None):
    """topk_indices(indexer_logits(...), topk): [B,T,topk] int32."""
    return topk_indices(indexer_logits(q_idx, k_idx, w, scale, causal, k_scale, key_start, key_end), topk)


def sparse_attention(q, k, v, indices, scale=None, return_lse=False, upcast=True):
    """Attention of each query over its gathered keys only; no mask of its own.

    q [B,T,H,Dqk], k [B,S,Hkv,Dqk], v [B,S,Hkv,Dv], indices [B,T,topk] or [B,T,Hkv,topk] int32
    (-1 = empty slot, duplicates count once per occurrence). Query head h reads kv head
    h // (H // Hkv). Returns out [B,T,H,Dv] in q's dtype and, with return_lse, the natural-log
    lse [B,T,H] float32 (float64 for float64 input); a row with no valid index gets out 0 and
    lse -inf. upcast=False rounds q.k and p.v to the input dtype and the probabilities to it
    before p.v, softmax and lse in float32 (a low-precision baseline).
    """
    B, T, H, Dqk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    if scale is None:
        scale = default_attention_scale(Dqk)
    acc = _acc(q.dtype, upcast)
    idx = indices if indices.dim() == 4 else indices[:, :, None, :].expand(B, T, Hkv, indices.shape[-1])
    if ((idx < -1) | (idx >= S)).any():
        raise IndexError(f"expected every index to be -1 or in [0, {S})")
    valid = idx >= 0
    safe = idx.clamp(min=0).long()
    b = torch.arange(B, device=q.device)[:, None, None, None]
    h = torch.arange(Hkv, device=q.device)[None, None, :, None]
    kg = k.to(acc)[b, safe, h]  # [B, T, Hkv, K, Dqk]
    vg = v.to(acc)[b, safe, h]  # [B, T, Hkv, K, Dv]
    qg = q.to(acc).reshape(B, T, Hkv, G, Dqk)
    scores = (scale * torch.einsum("btngd,btnkd->btngk", qg, kg)).to(_stats(q.dtype))
    scores = scores.masked_fill(~valid[:, :, :, None, :], float("-inf"))
    # log-sum-exp written out so that empty rows give -inf with finite (zero) gradients
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    e = torch.exp(scores - m)
    denom = e.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    safe_denom = torch.where(nonempty, denom, torch.ones_like(denom))
    p = e / safe_denom
    lse = torch.where(nonempty, torch.log(safe_denom) + m, torch.full_like(m, float("-inf")))
    out = torch.einsum("btngk,btnkd->btngd", p.to(acc), vg).reshape(B, T, H, Dv).to(q.dtype)
    lse = lse.reshape(B, T, H)
    return (out, lse) if return_lse else out


def _lse(x, dim=-1):
    """Log-sum-exp over dim, -inf for an all -inf slice, with finite gradients everywhere."""
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    total = torch.exp(x - m).sum(dim=dim, keepdim=True)
    nonempty = total > 0
    safe = torch.where(nonempty, total, torch.ones_like(total))
    return torch.where(nonempty, torch.log(safe) + m, torch.full_like(m, float("-inf")))


def indexer_kl_loss(q_idx, k_idx, w, q, k, indices=None, idx_scale=None, attn_scale=None, causal=True,
                    attn_lse=None, key_start=None, key_end=None, upcast=True):
    """Per-token KL(p_t || softmax_{U_t}(I[t])) with full [B, H, T, S] probabilities.

    p_t = mean over heads h of softmax_{U_t}(attn_scale * q[t,h] . k[s, h // (H // Hkv)]),
    I = indexer_logits(q_idx, k_idx, w, idx_scale). U_t: every key the query sees (indices None:
    causal keys, all S keys when causal is False, inside [key_start, key_end) when given) or the
    valid entries of indices[b,t] inside [key_start, key_end) (no causal mask on top), a key
    listed m times counting m times in both distributions (log m added to both logits). q, k and
    attn_lse are constants (no gradient). attn_lse [B,T,H], when given, replaces the per-head lse
    over U_t. Returns [B,T] float32 (float64 for float64 input); an empty row gives 0 with zero
    gradients. upcast=False rounds the attention and indexer products to the input dtype, softmax
    and KL in float32 (a low-precision baseline).
    """
    B, T, Hi, Di = q_idx.shape
    S, H, Hkv, Dqk = k_idx.shape[1], q.shape[2], k.shape[2], q.shape[3]
    if attn_scale is None:
        attn_scale = default_attention_scale(Dqk)
    acc = _acc(q_idx.dtype, upcast)
    sdt = _stats(q_idx.dtype)
    if indices is None:
        count = _visible(T, S, causal, key_start, key_end, q_idx.device).to(sdt).expand(B, T, S)
    else:
        if ((indices < -1) | (indices >= S)).any():
            raise IndexError(f"expected every index to be -1 or in [0, {S})")
        valid = indices >= 0
        if key_start is not None or key_end is not None:
            in_range = _visible(T, S, False, key_start, key_end, q_idx.device).expand(B, T, S)
            valid &= in_range.gather(-1, indices.clamp(min=0).long())
        count = torch.zeros(B, T, S, dtype=sdt, device=q_idx.device)
        count.scatter_add_(-1, indices.clamp(min=0).long(), valid.to(sdt))
    support = count > 0
    log_count = torch.log(count)  # 0 for a key listed once, -inf outside U_t
    with torch.no_grad():
        kh = k.to(acc).repeat_interleave(H // Hkv, dim=2)
        a = (attn_scale * torch.einsum("bthd,bshd->bhts", q.to(acc), kh)).to(sdt) + log_count[:, None]
        lse_a = _lse(a) if attn_lse is None else attn_lse.to(sdt).permute(0, 2, 1)[..., None]
        p = torch.where(support[:, None], torch.exp(a - lse_a), torch.zeros_like(a)).mean(dim=1)  # [B,T,S]
        log_p = torch.where(p > 0, torch.log(p), torch.zeros_like(p))
    logits = indexer_logits(q_idx, k_idx, w, idx_scale, causal=False, upcast=upcast) + log_count
    log_q = logits - _lse(logits)
    log_q = torch.where(support, log_q, torch.zeros_like(log_q))
    loss = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)
    return loss
