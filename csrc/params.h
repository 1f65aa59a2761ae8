// Plain-data parameter blocks between the host API (host.h: prepare_*) and the kernels of every
// backend, one per operator and direction. Pointers are untyped: each kernel casts them to the
// dtype it was dispatched for. Strides are in elements and named like flash-attn's
// (<tensor>_batch_stride, _row_stride, _head_stride); the last dimension of every tensor is
// contiguous (stride 1). `topk` is the number of index slots per query row.
#pragma once

#include <cstdint>

// Helpers below are callable from CUDA kernels too.
#ifdef __CUDACC__
#define DSA_HOST_DEVICE __host__ __device__
#else
#define DSA_HOST_DEVICE
#endif

namespace dsa {

struct IndexerParams {
  const void* q;  // [B, T, Hi, Di]
  const void* k;  // [B, S, Di]
  const void* w;  // [B, T, Hi], dtype: float32 (float64 for float64 inputs), contiguous
  const float* k_scale;  // [B, S] contiguous: multiplies every score of key s (FP8 inputs), or nullptr
  // Per-query key ranges [key_start, key_end) ([B, T] contiguous, or nullptr for 0 and S): query
  // (b, t) sees key s only if key_start[b,t] <= s < key_end[b,t]. Kernels clamp the values to
  // [0, S] (key_range), so unchecked values never address memory out of bounds.
  const int32_t* key_start;
  const int32_t* key_end;
  int64_t B, T, S, Hi, Di;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride;
  double scale;  // double so that float64 inputs keep full precision; kernels cast to their acc type
  bool causal;
  int64_t causal_offset;  // S - T: query t sees keys s <= t + causal_offset
};

// Number of keys the causal mask leaves to query t (all S when not causal).
DSA_HOST_DEVICE inline int64_t visible_keys(const IndexerParams& p, int64_t t) {
  return p.causal ? t + p.causal_offset + 1 : p.S;
}

// Keys [begin, end); empty when begin >= end.
struct KeyRange {
  int64_t begin, end;
  DSA_HOST_DEVICE bool empty() const { return begin >= end; }
  DSA_HOST_DEVICE int64_t size() const { return begin < end ? end - begin : 0; }
};

DSA_HOST_DEVICE inline int64_t clamp_key(int64_t s, int64_t S) { return s < 0 ? 0 : (s > S ? S : s); }

// The key range given for query (b, t), clamped to [0, S]; [0, S) where none is given.
DSA_HOST_DEVICE inline KeyRange given_key_range(const IndexerParams& p, int64_t b, int64_t t) {
  return KeyRange{p.key_start != nullptr ? clamp_key(p.key_start[b * p.T + t], p.S) : 0,
                  p.key_end != nullptr ? clamp_key(p.key_end[b * p.T + t], p.S) : p.S};
}

// The keys query (b, t) sees: its given key range cut by the causal mask.
DSA_HOST_DEVICE inline KeyRange key_range(const IndexerParams& p, int64_t b, int64_t t) {
  KeyRange r = given_key_range(p, b, t);
  const int64_t causal_end = visible_keys(p, t);
  r.end = causal_end < r.end ? causal_end : r.end;
  return r;
}

// The smallest range holding the keys of queries [t0, t0 + n) of batch b (empty rows add
// nothing): the key tiles a block of these queries visits.
DSA_HOST_DEVICE inline KeyRange key_range_hull(const IndexerParams& p, int64_t b, int64_t t0, int64_t n) {
  KeyRange hull{0, 0};
  for (int64_t t = t0; t < t0 + n; ++t) {
    const KeyRange r = key_range(p, b, t);
    if (r.empty()) continue;
    if (hull.empty()) {
      hull = r;
    } else {
      hull.begin = r.begin < hull.begin ? r.begin : hull.begin;
      hull.end = r.end > hull.end ? r.end : hull.end;
    }
  }
  return hull;
}

struct IndexerBwdParams {
  IndexerParams fwd;
  const void* grad_logits;  // [B, T, S] score dtype
  int64_t grad_batch_stride, grad_row_stride;
  void* grad_q;  // [B, T, Hi, Di] contiguous, input dtype
  void* grad_k;  // [B, S, Di] contiguous, input dtype
  void* grad_w;  // [B, T, Hi] contiguous, w's dtype
};

struct TopkParams {
  const void* logits;  // [B, T, S]
  int64_t B, T, S, topk;
  int64_t logits_batch_stride, logits_row_stride;
  int32_t* out;  // [B, T, topk] contiguous
};

struct SparseAttentionParams {
  const void* q;             // [B, T, H, Dqk]
  const void* k;             // [B, S, Hkv, Dqk]
  const void* v;             // [B, S, Hkv, Dv]
  const int32_t* indices;    // [B, T, topk] or [B, T, Hkv, topk]
  void* out;                 // [B, T, H, Dv] contiguous, input dtype
  void* lse;                 // [B, T, H] contiguous, score dtype
  int64_t B, T, S, H, Hkv, Dqk, Dv, topk;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t idx_batch_stride, idx_row_stride;
  int64_t idx_head_stride;   // 0 when one index row serves every kv head
  double scale;  // double so that float64 inputs keep full precision; kernels cast to their acc type
};

struct SparseAttentionBwdParams {
  SparseAttentionParams fwd;  // out and lse are read, not written
  const void* grad_out;       // [B, T, H, Dv]
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  const void* grad_lse;       // [B, T, H] contiguous score dtype, or nullptr
  void* grad_q;               // [B, T, H, Dqk] contiguous, input dtype
  void* grad_k;               // [B, S, Hkv, Dqk] contiguous, input dtype
  void* grad_v;               // [B, S, Hkv, Dv] contiguous, input dtype
};

// indexer_kl_loss. For each query row (b, t) with support U_t (every key the row sees, key_range,
// when indices is nullptr; else the valid entries of indices[b, t] inside the row's key range
// [key_start, key_end), one support element per occurrence, no causal mask on top):
//   I(s)   = idx_scale * sum_j w[t,j] * relu(q_idx[t,j] . k_idx[s])               (indexer logits)
//   a_h(s) = attn_scale * q[t,h] . k[s, h / (H / Hkv)]                           (attention logits)
//   p(s)   = mean_h exp(a_h(s) - attn_lse[t,h]),  attn_lse[t,h] = lse_{s in U_t} a_h(s)
//   loss[t] = KL(p || softmax_{U_t} I) = sum_s p(s) * (log p(s) - I(s)) + idx_lse[t]
// An empty row has loss 0 and both lse -inf. q_idx, k_idx, q and k share one dtype.
struct IndexerKlLossParams {
  IndexerParams idx;        // q_idx, k_idx, w (score dtype), idx_scale, the key ranges and the dense form's causal mask
  const void* q;            // [B, T, H, Dqk]
  const void* k;            // [B, S, Hkv, Dqk]
  const int32_t* indices;   // [B, T, topk], entries -1 or in [0, S); nullptr: dense (every visible key)
  void* loss;               // [B, T] score dtype, contiguous
  void* idx_lse;            // [B, T] score dtype, contiguous
  void* attn_lse;           // [B, T, H] score dtype, contiguous; written unless attn_lse_given
  bool attn_lse_given;      // attn_lse already holds the caller's lse: the kernel only reads it
  int64_t H, Hkv, Dqk, topk;  // topk = 0 in the dense form
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t idx_batch_stride, idx_row_stride;
  double attn_scale;
};

struct IndexerKlLossBwdParams {
  IndexerKlLossParams fwd;  // loss unused; idx_lse and attn_lse are read (attn_lse_given is true)
  const void* grad_loss;    // [B, T] score dtype, contiguous
  void* grad_q_idx;         // [B, T, Hi, Di] contiguous, input dtype
  void* grad_k_idx;         // [B, S, Di] contiguous, input dtype
  void* grad_w;             // [B, T, Hi] contiguous, score dtype (the op converts it to w's dtype)
};

}  // namespace dsa
