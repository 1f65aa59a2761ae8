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
  int64_t B, T, S, Hi, Di;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride;
  double scale;  // double so that float64 inputs keep full precision; kernels cast to their acc type
  bool causal;
  int64_t causal_offset;  // S - T: query t sees keys s <= t + causal_offset
};

// Number of keys visible to query t (all S when not causal).
DSA_HOST_DEVICE inline int64_t visible_keys(const IndexerParams& p, int64_t t) {
  return p.causal ? t + p.causal_offset + 1 : p.S;
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

// indexer_kl_loss. For each query row (b, t) with support U_t (every causal key when indices is
// nullptr, else the valid entries of indices[b, t], one support element per occurrence, no causal
// mask on top):
//   I(s)   = idx_scale * sum_j w[t,j] * relu(q_idx[t,j] . k_idx[s])               (indexer logits)
//   a_h(s) = attn_scale * q[t,h] . k[s, h / (H / Hkv)]                           (attention logits)
//   p(s)   = mean_h exp(a_h(s) - attn_lse[t,h]),  attn_lse[t,h] = lse_{s in U_t} a_h(s)
//   loss[t] = KL(p || softmax_{U_t} I) = sum_s p(s) * (log p(s) - I(s)) + idx_lse[t]
// An empty row has loss 0 and both lse -inf. q_idx, k_idx, q and k share one dtype.
struct IndexerKlLossParams {
  IndexerParams idx;        // q_idx, k_idx, w (score dtype), idx_scale, and the dense form's causal mask
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
