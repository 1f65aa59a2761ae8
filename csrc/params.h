// Plain-data parameter blocks between the host API (csrc/*_host.cpp) and the kernels of every
// backend. Pointers are untyped: each kernel casts them to the dtype it was dispatched for.
// Strides are in elements; the last dimension of every tensor is contiguous (stride 1).
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
  int64_t q_sb, q_st, q_sh;
  int64_t k_sb, k_ss;
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
  int64_t g_sb, g_st;
  void* grad_q;  // [B, T, Hi, Di] contiguous, input dtype
  void* grad_k;  // [B, S, Di] contiguous, input dtype
  void* grad_w;  // [B, T, Hi] contiguous, w's dtype
};

struct TopkParams {
  const void* logits;  // [B, T, S]
  int64_t B, T, S, k;
  int64_t l_sb, l_st;
  int32_t* out;  // [B, T, k] contiguous
};

struct SparseAttentionParams {
  const void* q;             // [B, T, H, Dqk]
  const void* k;             // [B, S, Hkv, Dqk]
  const void* v;             // [B, S, Hkv, Dv]
  const int32_t* indices;    // [B, T, K] or [B, T, Hkv, K]
  void* out;                 // [B, T, H, Dv] contiguous, input dtype
  void* lse;                 // [B, T, H] contiguous, score dtype
  int64_t B, T, S, H, Hkv, Dqk, Dv, K;
  int64_t q_sb, q_st, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int64_t i_sb, i_st, i_sh;  // i_sh == 0 when one index row serves every kv head
  double scale;  // double so that float64 inputs keep full precision; kernels cast to their acc type
};

struct SparseAttentionBwdParams {
  SparseAttentionParams fwd;  // out and lse are read, not written
  const void* grad_out;       // [B, T, H, Dv]
  int64_t do_sb, do_st, do_sh;
  const void* grad_lse;       // [B, T, H] contiguous score dtype, or nullptr
  void* grad_q;               // [B, T, H, Dqk] contiguous, input dtype
  void* grad_k;               // [B, S, Hkv, Dqk] contiguous, input dtype
  void* grad_v;               // [B, S, Hkv, Dv] contiguous, input dtype
};

}  // namespace dsa
