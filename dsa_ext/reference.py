"""Pure-PyTorch semantics of every dsa_ext operator: the test oracle.

Written for clarity, not speed: each function materialises what the fused operators stream
(full [B, T, S] logits, gathered [.., k, D] keys). Every function accepts float64 and then
computes in float64; other dtypes compute in float32. The signatures match ``dsa_ext.*``.
All edge cases of shared/DESIGN.md are pinned here: bottom-right causal alignment, -1 padding,
duplicate indices, rows with no valid key (output 0, lse -inf, finite gradients), deterministic
top-k (ties to the lower position, ascending rows).
"""
from __future__ import annotations

import torch

__all__ = ["indexer_logits", "topk_indices", "indexer_topk", "sparse_attention", "causal_mask"]


def _acc(dtype: torch.dtype, upcast: bool = True) -> torch.dtype:
    """The compute dtype: float64 stays, others compute in float32; upcast=False computes in the
    input dtype itself (the low-precision baseline tests bound kernel errors against)."""
    if not upcast:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """[T, S] bool, True where query t may see key s: s <= t + S - T (bottom-right aligned)."""
    t = torch.arange(T, device=device)[:, None]
    s = torch.arange(S, device=device)[None, :]
    return s <= t + (S - T)


def indexer_logits(q_idx, k_idx, w, scale=None, causal=True, upcast=True):
    """logits[b,t,s] = scale * sum_j w[b,t,j] * relu(q_idx[b,t,j] . k_idx[b,s]); -inf if masked.

    q_idx [B,T,Hi,Di], k_idx [B,S,Di], w [B,T,Hi] -> [B,T,S] float32 (float64 for float64 input).
    upcast=False computes in the input dtype throughout (a low-precision baseline).
    """
    B, T, Hi, Di = q_idx.shape
    S = k_idx.shape[1]
    if scale is None:
        scale = (Hi * Di) ** -0.5
    acc = _acc(q_idx.dtype, upcast)
    dots = torch.einsum("bthd,bsd->bths", q_idx.to(acc), k_idx.to(acc))
    logits = scale * torch.einsum("bth,bths->bts", w.to(acc), dots.relu())
    if causal:
        if S < T:
            raise RuntimeError(f"causal attention needs S >= T, got T={T}, S={S}")
        logits = logits.masked_fill(~causal_mask(T, S, logits.device), float("-inf"))
    return logits.to(_acc(q_idx.dtype))


def topk_indices(logits, k):
    """The k highest finite scores of each row: ties to the lower position, positions ascending,
    -1 padding when fewer than k are valid (-inf and NaN are never selected).

    logits [B,T,S] -> [B,T,k] int32.
    """
    if k < 1:
        raise ValueError(f"expected k >= 1, got k={k}")
    B, T, S = logits.shape
    valid = ~(torch.isnan(logits) | (logits == float("-inf")))
    scores = torch.where(valid, logits, torch.full_like(logits, float("-inf")))
    # A stable descending sort keeps equal scores in position order: ties go to the lower position.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    chosen_valid = valid.gather(-1, order)
    order = torch.where(chosen_valid, order, torch.full_like(order, S))
    order = torch.sort(order, dim=-1).values
    out = torch.full((B, T, k), -1, dtype=torch.int32, device=logits.device)
    n = order.shape[-1]
    out[..., :n] = torch.where(order == S, torch.full_like(order, -1), order).to(torch.int32)
    return out


def indexer_topk(q_idx, k_idx, w, k, scale=None, causal=True):
    """topk_indices(indexer_logits(...), k): [B,T,k] int32."""
    return topk_indices(indexer_logits(q_idx, k_idx, w, scale, causal), k)


def sparse_attention(q, k, v, indices, scale=None, return_lse=False, upcast=True):
    """Attention of each query over its gathered keys only; no mask of its own.

    q [B,T,H,Dqk], k [B,S,Hkv,Dqk], v [B,S,Hkv,Dv], indices [B,T,K] or [B,T,Hkv,K] int32
    (-1 = empty slot, duplicates count once per occurrence). Query head h reads kv head
    h // (H // Hkv). Returns out [B,T,H,Dv] in q's dtype and, with return_lse, the natural-log
    lse [B,T,H] float32 (float64 for float64 input); a row with no valid index gets out 0 and
    lse -inf. upcast=False computes in the input dtype throughout (a low-precision baseline).
    """
    B, T, H, Dqk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = H // Hkv
    if scale is None:
        scale = Dqk ** -0.5
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
    scores = scale * torch.einsum("btngd,btnkd->btngk", qg, kg)
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
    out = torch.einsum("btngk,btnkd->btngd", p, vg).reshape(B, T, H, Dv).to(q.dtype)
    lse = lse.reshape(B, T, H).to(_acc(q.dtype))
    return (out, lse) if return_lse else out
