// indexer_kl_loss and its backward in ATen operations, for the CUDA backend
// (cuda/indexer/indexer_kl_loss.cu), streamed: query chunks of tc rows meet
// key blocks of n keys (dense: consecutive keys over the keys the chunk's rows see, planned by
// aten/key_ranges.h so that a packed sequence costs about what its documents cost, which reads
// given key ranges on the host: one synchronisation per call; sparse: n slots of each row's index
// list, gathered), and only per-row statistics survive a block, as in the CPU kernel
// (csrc/cpu/indexer_kl_loss.cpp): extra memory is O(B*T*(H+Hi)) plus one block's temporaries,
// which kKlBudget bounds (never [B, T, S]). The tile products are ATen batched GEMMs in float32
// (cuBLAS on CUDA; TF32 follows torch's global matmul setting), so this code is device-agnostic
// and the emulation tests run it on CPU tensors. Deterministic: blocks are visited in a fixed
// order, and the sparse dk scatter uses index_put_(accumulate=true), which on CUDA always takes
// ATen's sort-based (deterministic) path.
//
// Per row t with support U_t (semantics: IndexerKlLossParams in params.h):
//   forward  pass A (unless attn_lse is given): online lse_h over U_t of a_h(s);
//            pass B: I(s), p(s) = mean_h exp(a_h(s) - lse_h), online: m = max I, lI = sum exp(I - m),
//            A1 = sum p log p, A2 = sum p (I - m), P = sum p; idx_lse = m + log lI,
//            loss = A1 - A2 + P log lI (0 and lse -inf for an empty row).
//   backward dI(s) = g (exp(I(s) - idx_lse) - p(s)) on U_t, then the indexer's chain rule as in
//            indexer_logits_backward: dw = idx_scale sum dI relu(d), dq = idx_scale w sum (dI [d>0]) k_idx,
//            dk_idx[s] += sum_{t,j} (dI [d>0] idx_scale w) q_idx (once per occurrence of s).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "aten/key_ranges.h"
#include "host.h"

namespace dsa {
namespace aten {

constexpr int64_t kKlBudget = int64_t{256} << 20;  // bytes of one block's temporaries
constexpr int64_t kKlBlockKeys = 512;               // keys (or index slots) per block at most

namespace kl {

// The inputs in float32 (views when they already are), and the shape of the problem.
struct Inputs {
  at::Tensor q_idx, k_idx, w, q, k, indices;
  int64_t B, T, S, Hi, Di, H, Hkv, Dqk, topk;  // topk = 0 in the dense form
  double idx_scale, attn_scale;
  RowRanges rows;  // dense: the keys each query sees; sparse: the keys its index entries may name

  explicit Inputs(const IndexerKlLossCall& c) {
    const IndexerKlLossParams& p = c.p;
    q_idx = c.q_idx.to(at::kFloat), k_idx = c.k_idx.to(at::kFloat), w = c.w.to(at::kFloat);
    q = c.q.to(at::kFloat), k = c.k.to(at::kFloat), indices = c.indices;
    B = p.idx.B, T = p.idx.T, S = p.idx.S, Hi = p.idx.Hi, Di = p.idx.Di;
    H = p.H, Hkv = p.Hkv, Dqk = p.Dqk, topk = p.indices ? p.topk : 0;
    idx_scale = p.idx.scale, attn_scale = p.attn_scale;
    rows = row_ranges(p.idx, c.ranges, !sparse() && p.idx.causal, q_idx.device());  // no causal mask on indices
  }
  bool sparse() const { return indices.defined(); }
};

// Block and chunk sizes: n keys per block, tc query rows per chunk (at most), within kKlBudget.
struct Sizes {
  int64_t n, tc;
};
inline Sizes sizes(const Inputs& x, bool backward, int64_t budget, int64_t block_keys) {
  const int64_t keys = x.sparse() ? x.topk : x.S;
  Sizes z;
  z.n = std::max<int64_t>(1, std::min(keys, block_keys));
  // float32 per (row, key) pair: dots and their transforms (Hi each), attention logits and
  // their exponentials (H each), gathered keys in the sparse form, a few [.., n] rows
  int64_t per_pair = 4 * (2 * x.H + (backward ? 4 : 2) * x.Hi + 8);
  if (x.sparse()) per_pair += 4 * (x.Di + x.Hkv * x.Dqk);
  z.tc = std::clamp<int64_t>(budget / (per_pair * z.n * std::max<int64_t>(1, x.B)), 1, std::max<int64_t>(1, x.T));
  return z;
}

// One key block for the query rows [t0, t0 + tc).
struct Block {
  at::Tensor valid;  // [B, tc, n] bool: the pair is in the row's support
  at::Tensor dots;   // [B, tc, Hi, n]: q_idx . k_idx
  at::Tensor attn;   // [B, tc, H, n]: attn_scale * q . k
  at::Tensor keys;   // dense: [B, n, Di] k_idx rows s0..; sparse: [B*tc, n, Di] gathered k_idx
  at::Tensor key;    // sparse only: [B, tc, n] long, the key of each slot (0 where invalid)
  int64_t s0 = 0;    // dense only: first key
};

// The query chunks of a call: dense, planned over the keys their rows see; sparse, tc rows each.
inline std::vector<QueryChunk> chunks(const IndexerKlLossCall& c, const Inputs& x, const Sizes& z) {
  if (!x.sparse()) return plan_query_chunks(c.p.idx, c.ranges, c.p.idx.causal, z.tc, std::numeric_limits<int64_t>::max());
  std::vector<QueryChunk> out;
  for (int64_t t0 = 0; t0 < x.T; t0 += z.tc) out.push_back({t0, std::min(z.tc, x.T - t0), 0, x.topk});
  return out;
}

// The key blocks of a query chunk, in order: dense, consecutive keys over [s0, s1) of the chunk;
// sparse, consecutive slots of the index rows.
class Blocks {
 public:
  Blocks(const Inputs& x, const QueryChunk& ch, int64_t n)
      : x_(x), t0_(ch.t0), tc_(ch.tc), n_(n), end_(ch.s1), cursor_(ch.s0) {
    q_idx_ = x.q_idx.narrow(1, t0_, tc_);
    q_ = x.q.narrow(1, t0_, tc_);
    lo_ = x.rows.lo.narrow(1, t0_, tc_).unsqueeze(-1);  // [B, tc, 1]
    hi_ = x.rows.hi.narrow(1, t0_, tc_).unsqueeze(-1);
  }

  bool next(Block& blk, bool with_dots, bool with_attn) {
    if (cursor_ >= end_) return false;
    const int64_t n = std::min(n_, end_ - cursor_);
    const int64_t B = x_.B, tc = tc_, G = x_.H / x_.Hkv;
    at::Tensor k_rows, kv_rows;  // [batch', n, Di], [batch', n, Hkv, Dqk]
    if (x_.sparse()) {
      const at::Tensor slots = x_.indices.narrow(1, t0_, tc).narrow(2, cursor_, n).to(at::kLong);
      // entries outside the row's range (hence also -1 and out-of-range entries) are not in the support
      blk.valid = slots.ge(lo_).logical_and_(slots.lt(hi_));
      blk.key = at::where(blk.valid, slots, at::zeros({}, slots.options()));
      const at::Tensor rows =
          (blk.key + at::arange(B, slots.options()).mul_(x_.S).view({B, 1, 1})).reshape({-1});
      k_rows = x_.k_idx.reshape({B * x_.S, x_.Di}).index_select(0, rows).view({B * tc, n, x_.Di});
      kv_rows = x_.k.reshape({B * x_.S, x_.Hkv * x_.Dqk}).index_select(0, rows).view({B * tc, n, x_.Hkv, x_.Dqk});
    } else {
      blk.s0 = cursor_;
      const at::Tensor s = at::arange(cursor_, cursor_ + n, lo_.options()).view({1, 1, n});
      blk.valid = s.ge(lo_).logical_and_(s.lt(hi_));  // [B, tc, n]
      k_rows = x_.k_idx.narrow(1, cursor_, n);   // [B, n, Di]
      kv_rows = x_.k.narrow(1, cursor_, n);      // [B, n, Hkv, Dqk]
    }
    blk.keys = k_rows;
    if (with_dots) {
      const at::Tensor qi = x_.sparse() ? q_idx_.reshape({B * tc, x_.Hi, x_.Di}) : q_idx_.reshape({B, tc * x_.Hi, x_.Di});
      blk.dots = at::matmul(qi, k_rows.transpose(1, 2)).view({B, tc, x_.Hi, n});
    }
    if (with_attn) {
      if (x_.sparse()) {  // per row: [Hkv, G, Dqk] x [Hkv, Dqk, n]
        const at::Tensor qg = q_.reshape({B * tc, x_.Hkv, G, x_.Dqk});
        blk.attn = at::matmul(qg, kv_rows.permute({0, 2, 3, 1})).view({B, tc, x_.H, n});
      } else {  // per kv head: [tc * G, Dqk] x [Dqk, n]
        const at::Tensor qg = q_.reshape({B, tc, x_.Hkv, G, x_.Dqk}).permute({0, 2, 1, 3, 4}).reshape({B, x_.Hkv, tc * G, x_.Dqk});
        blk.attn = at::matmul(qg, kv_rows.permute({0, 2, 3, 1}))
                       .view({B, x_.Hkv, tc, G, n})
                       .permute({0, 2, 1, 3, 4})
                       .reshape({B, tc, x_.H, n});
      }
      blk.attn.mul_(x_.attn_scale);
    }
    cursor_ += n;
    return true;
  }

 private:
  const Inputs& x_;
  int64_t t0_, tc_, n_, end_, cursor_;
  at::Tensor q_idx_, q_, lo_, hi_;
};

inline at::Tensor neg_inf_like(const at::Tensor& t) {
  return at::full({}, -std::numeric_limits<float>::infinity(), t.options());
}

// I(s) = idx_scale * sum_j w_j relu(dots_j), -inf outside the support.
inline at::Tensor indexer_scores(const Inputs& x, const at::Tensor& w_c, const Block& blk) {
  const at::Tensor I = (blk.dots.clamp_min(0) * w_c.unsqueeze(-1)).sum(2).mul_(x.idx_scale);
  return at::where(blk.valid, I, neg_inf_like(I));
}

// p(s) = mean_h exp(a_h(s) - lse_h), 0 outside the support.
inline at::Tensor target(const Block& blk, const at::Tensor& lse_c) {
  const at::Tensor p = (blk.attn - lse_c.unsqueeze(-1)).exp_().mean(2);
  return at::where(blk.valid, p, at::zeros({}, p.options()));
}

// How far the running max moved, m_new - m_old; 0 while nothing has been seen (m_old = -inf,
// when the sums it rescales are still 0).
inline at::Tensor max_shift(const at::Tensor& m_new, const at::Tensor& m_old) {
  return at::where(m_old.isneginf(), at::zeros({}, m_new.options()), m_new - m_old);
}

}  // namespace kl

inline void indexer_kl_loss_streamed(const IndexerKlLossCall& c, int64_t budget = kKlBudget,
                                     int64_t block_keys = kKlBlockKeys) {
  const kl::Inputs x(c);
  if (x.B * x.T == 0) return;
  const auto opts = x.q_idx.options();
  at::Tensor attn_lse = c.attn_lse.view({x.B, x.T, x.H});  // float32 output (or the caller's copy)
  if (x.S == 0 || (x.sparse() && x.topk == 0)) {
    c.loss.zero_();
    c.idx_lse.fill_(-std::numeric_limits<double>::infinity());
    if (!c.p.attn_lse_given) attn_lse.fill_(-std::numeric_limits<double>::infinity());
    return;
  }
  const kl::Sizes z = kl::sizes(x, false, budget, block_keys);
  for (const QueryChunk& ch : kl::chunks(c, x, z)) {
    const int64_t t0 = ch.t0, tc = ch.tc;
    const at::Tensor w_c = x.w.narrow(1, t0, tc);
    at::Tensor lse_c = attn_lse.narrow(1, t0, tc);  // [B, tc, H]
    kl::Block blk;
    if (!c.p.attn_lse_given) {  // pass A: online per-head lse of the attention logits
      at::Tensor m = at::full({x.B, tc, x.H}, -std::numeric_limits<float>::infinity(), opts);
      at::Tensor l = at::zeros({x.B, tc, x.H}, opts);
      for (kl::Blocks blocks(x, ch, z.n); blocks.next(blk, false, true);) {
        const at::Tensor a = at::where(blk.valid.unsqueeze(2), blk.attn, kl::neg_inf_like(blk.attn));
        const at::Tensor m_new = at::maximum(m, a.amax(-1));
        const at::Tensor m_safe = at::where(m_new.isneginf(), at::zeros({}, opts), m_new);
        l = l * (m - m_safe).exp() + (a - m_safe.unsqueeze(-1)).exp().sum(-1);
        m = m_new;
      }
      lse_c.copy_(at::where(l.gt(0), m + l.log(), kl::neg_inf_like(m)));
    }
    // pass B: the KL sums, online in the indexer's running max
    at::Tensor m = at::full({x.B, tc}, -std::numeric_limits<float>::infinity(), opts);
    at::Tensor lI = at::zeros({x.B, tc}, opts), A1 = at::zeros_like(lI), A2 = at::zeros_like(lI),
               P = at::zeros_like(lI);
    const at::Tensor tiny = at::full({}, std::numeric_limits<float>::min(), opts);
    for (kl::Blocks blocks(x, ch, z.n); blocks.next(blk, true, true);) {
      const at::Tensor I = kl::indexer_scores(x, w_c, blk);  // -inf outside the support
      const at::Tensor p = kl::target(blk, lse_c);
      const at::Tensor m_new = at::maximum(m, I.amax(-1));
      const at::Tensor m_safe = at::where(m_new.isneginf(), at::zeros({}, opts), m_new);
      lI = lI * (m - m_safe).exp() + (I - m_safe.unsqueeze(-1)).exp().sum(-1);
      A2 = A2 - kl::max_shift(m_new, m) * P;
      const at::Tensor I_rel = at::where(blk.valid, I - m_safe.unsqueeze(-1), at::zeros({}, opts));
      A2 = A2 + (p * I_rel).sum(-1);
      A1 = A1 + (p * at::maximum(p, tiny).log()).sum(-1);
      P = P + p.sum(-1);
      m = m_new;
    }
    const at::Tensor has = lI.gt(0);
    c.idx_lse.narrow(1, t0, tc).copy_(at::where(has, m + lI.log(), kl::neg_inf_like(m)));
    c.loss.narrow(1, t0, tc).copy_(at::where(has, A1 - A2 + P * lI.log(), at::zeros({}, opts)));
  }
}

inline void indexer_kl_loss_backward_streamed(const IndexerKlLossBwdCall& c, int64_t budget = kKlBudget,
                                              int64_t block_keys = kKlBlockKeys) {
  const kl::Inputs x(c.fwd);
  const auto opts = x.q_idx.options();
  if (x.B * x.T == 0 || x.S == 0 || (x.sparse() && x.topk == 0)) {
    c.grad_q_idx.zero_();
    c.grad_k_idx.zero_();
    c.grad_w.zero_();
    return;
  }
  const at::Tensor g = c.grad_loss.to(at::kFloat), idx_lse = c.fwd.idx_lse.to(at::kFloat);
  const at::Tensor attn_lse = c.fwd.attn_lse.to(at::kFloat);
  at::Tensor dk = at::zeros({x.B, x.S, x.Di}, opts);
  const kl::Sizes z = kl::sizes(x, true, budget, block_keys);
  for (const QueryChunk& ch : kl::chunks(c.fwd, x, z)) {
    const int64_t t0 = ch.t0, tc = ch.tc;
    const at::Tensor w_c = x.w.narrow(1, t0, tc), sw = w_c.unsqueeze(-1) * x.idx_scale;  // [B, tc, Hi, 1]
    const at::Tensor q_idx_c = x.q_idx.narrow(1, t0, tc);
    const at::Tensor g_c = g.narrow(1, t0, tc).unsqueeze(-1), lse_i = idx_lse.narrow(1, t0, tc).unsqueeze(-1);
    const at::Tensor lse_a = attn_lse.narrow(1, t0, tc);
    at::Tensor dq = at::zeros({x.B, tc, x.Hi, x.Di}, opts), dw = at::zeros({x.B, tc, x.Hi}, opts);
    kl::Block blk;
    for (kl::Blocks blocks(x, ch, z.n); blocks.next(blk, true, true);) {
      const int64_t n = blk.valid.size(2);
      const at::Tensor I = kl::indexer_scores(x, w_c, blk);
      const at::Tensor p = kl::target(blk, lse_a);
      const at::Tensor dI = at::where(blk.valid, g_c * ((I - lse_i).exp() - p), at::zeros({}, opts));
      const at::Tensor on = blk.dots.gt(0).logical_and_(blk.valid.unsqueeze(2));  // [B, tc, Hi, n]
      const at::Tensor gm = at::where(on, dI.unsqueeze(2), at::zeros({}, opts));
      dw.add_(at::where(on, gm * blk.dots, at::zeros({}, opts)).sum(-1));
      const at::Tensor gw = gm * sw;  // dL/d(dots)
      if (x.sparse()) {
        dq.add_(at::matmul(gm.view({x.B * tc, x.Hi, n}), blk.keys).view({x.B, tc, x.Hi, x.Di}));
        const at::Tensor contrib = at::matmul(gw.view({x.B * tc, x.Hi, n}).transpose(1, 2),
                                              q_idx_c.reshape({x.B * tc, x.Hi, x.Di}));  // [B*tc, n, Di]
        const at::Tensor b = at::arange(x.B, blk.key.options()).view({x.B, 1, 1}).expand_as(blk.key);
        dk.index_put_({b.reshape({-1}), blk.key.reshape({-1})}, contrib.reshape({-1, x.Di}), /*accumulate=*/true);
      } else {
        dq.add_(at::matmul(gm.view({x.B, tc * x.Hi, n}), blk.keys).view({x.B, tc, x.Hi, x.Di}));
        dk.narrow(1, blk.s0, n)
            .add_(at::matmul(gw.view({x.B, tc * x.Hi, n}).transpose(1, 2), q_idx_c.reshape({x.B, tc * x.Hi, x.Di})));
      }
    }
    c.grad_q_idx.narrow(1, t0, tc).copy_(dq * sw);
    c.grad_w.narrow(1, t0, tc).copy_(dw.mul_(x.idx_scale));
  }
  c.grad_k_idx.copy_(dk);
}

}  // namespace aten
}  // namespace dsa
