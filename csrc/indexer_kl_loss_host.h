// Host side of dsa::indexer_kl_loss and its backward, shared by the CPU and CUDA backends:
// argument checks, the parameter blocks the kernels read, and prepare_* functions that validate,
// allocate the outputs and fill the parameters. A backend's operator is
// "auto c = prepare_indexer_kl_loss(...); run its kernel on c.p; return c's outputs".
//
// What is computed (shared/DESIGN.md): for each query row (b, t) with support U_t (every causal
// key when indices is absent, else the valid entries of indices[b, t], one support element per
// occurrence, no causal mask on top),
//   I(s)   = idx_scale * sum_j w[t,j] * relu(q_idx[t,j] . k_idx[s])               (indexer logits)
//   a_h(s) = attn_scale * q[t,h] . k[s, h / (H / Hkv)]                           (attention logits)
//   p(s)   = mean_h exp(a_h(s) - attn_lse[t,h]),  attn_lse[t,h] = lse_{s in U_t} a_h(s)
//   loss[t] = KL(p || softmax_{U_t} I) = sum_s p(s) * (log p(s) - I(s)) + idx_lse[t]
// An empty row has loss 0 and both lse -inf.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "params.h"

namespace dsa {

// Pointers are untyped (each kernel casts them to the dtype it was dispatched for); strides are in
// elements; the last dimension of every tensor is contiguous. q_idx, k_idx, q and k share one dtype.
struct IndexerKlLossParams {
  IndexerParams idx;        // q_idx, k_idx, w (score dtype), idx_scale, and the dense form's causal mask
  const void* q;            // [B, T, H, Dqk]
  const void* k;            // [B, S, Hkv, Dqk]
  const int32_t* indices;   // [B, T, K], entries -1 or in [0, S); nullptr: dense (every visible key)
  void* loss;               // [B, T] score dtype, contiguous
  void* idx_lse;            // [B, T] score dtype, contiguous
  void* attn_lse;           // [B, T, H] score dtype, contiguous; written unless attn_lse_given
  bool attn_lse_given;      // attn_lse already holds the caller's lse: the kernel only reads it
  int64_t H, Hkv, Dqk, K;   // K = 0 in the dense form
  int64_t q_sb, q_st, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t i_sb, i_st;
  double attn_scale;
};

struct IndexerKlLossBwdParams {
  IndexerKlLossParams fwd;  // loss unused; idx_lse and attn_lse are read (attn_lse_given is true)
  const void* grad_loss;    // [B, T] score dtype, contiguous
  void* grad_q_idx;         // [B, T, Hi, Di] contiguous, input dtype
  void* grad_k_idx;         // [B, S, Di] contiguous, input dtype
  void* grad_w;             // [B, T, Hi] contiguous, score dtype (the op converts it to w's dtype)
};

struct IndexerKlLossCall {
  at::Tensor q_idx, k_idx, w, q, k, indices;  // inputs as the kernel reads them
  at::Tensor loss, idx_lse, attn_lse;         // outputs
  IndexerKlLossParams p;
};
IndexerKlLossCall prepare_indexer_kl_loss(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                          const at::Tensor& q, const at::Tensor& k,
                                          const c10::optional<at::Tensor>& indices, double idx_scale,
                                          double attn_scale, bool causal,
                                          const c10::optional<at::Tensor>& attn_lse);

struct IndexerKlLossBwdCall {
  IndexerKlLossCall fwd;
  at::Tensor grad_loss, grad_q_idx, grad_k_idx, grad_w;
  IndexerKlLossBwdParams p;
};
IndexerKlLossBwdCall prepare_indexer_kl_loss_backward(const at::Tensor& grad_loss, const at::Tensor& q_idx,
                                                      const at::Tensor& k_idx, const at::Tensor& w,
                                                      const at::Tensor& q, const at::Tensor& k,
                                                      const c10::optional<at::Tensor>& indices,
                                                      const at::Tensor& idx_lse, const at::Tensor& attn_lse,
                                                      double idx_scale, double attn_scale, bool causal);
// grad_w in the dtype w came in (the kernels write the score dtype).
at::Tensor finish_grad_w(const IndexerKlLossBwdCall& call, const at::Tensor& w);

}  // namespace dsa
