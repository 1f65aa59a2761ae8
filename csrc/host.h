// Host-side preparation shared by every backend: validate the arguments (checks.h), bring the
// last dimensions to stride 1, allocate the outputs and fill the params block. A backend's
// operator is then "prepare, launch its kernel, return the call's outputs".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "checks.h"
#include "params.h"

namespace dsa {

// The indexer part of a params block over q_idx, k_idx (stride-1 last dims) and w (score_weights);
// no key scale (see with_key_scale).
IndexerParams indexer_params(const IndexerDims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                             double scale, bool causal);

// k_scale, when given, as a contiguous [B, S] float32 tensor whose pointer goes into p.k_scale
// (the returned tensor keeps it alive); an undefined tensor otherwise.
at::Tensor with_key_scale(IndexerParams& p, const c10::optional<at::Tensor>& k_scale);

// w in the score dtype, contiguous: it is small ([B, T, Hi]) and every kernel reads it per row.
at::Tensor score_weights(const at::Tensor& w, const at::Tensor& q_idx);

struct IndexerLogitsCall {
  at::Tensor q, k, w, k_scale, logits;
  IndexerParams p;
};
IndexerLogitsCall prepare_indexer_logits(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                         double scale, bool causal, const c10::optional<at::Tensor>& k_scale);

struct IndexerLogitsBwdCall {
  at::Tensor q, k, w, grad_logits, grad_q, grad_k, grad_w;
  IndexerBwdParams p;
};
IndexerLogitsBwdCall prepare_indexer_logits_backward(const at::Tensor& grad_logits, const at::Tensor& q_idx,
                                                     const at::Tensor& k_idx, const at::Tensor& w, double scale,
                                                     bool causal);
// grad_w in the dtype w came in (the kernels write the score dtype)
at::Tensor finish_grad_w(const IndexerLogitsBwdCall& call, const at::Tensor& w);

struct TopkCall {
  at::Tensor logits, out;
  TopkParams p;
};
TopkCall prepare_topk(const at::Tensor& logits, int64_t k);

struct IndexerTopkCall {
  at::Tensor q, k, w, k_scale, out;
  IndexerParams p;
  int64_t topk;
};
IndexerTopkCall prepare_indexer_topk(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                     int64_t topk, double scale, bool causal,
                                     const c10::optional<at::Tensor>& k_scale);

struct SparseAttentionCall {
  at::Tensor q, k, v, indices, out, lse;
  SparseAttentionParams p;
};
SparseAttentionCall prepare_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& indices, double scale);

struct SparseAttentionBwdCall {
  SparseAttentionCall fwd;
  at::Tensor grad_out, grad_lse, grad_q, grad_k, grad_v;
  SparseAttentionBwdParams p;
};
SparseAttentionBwdCall prepare_sparse_attention_backward(const at::Tensor& grad_out,
                                                         const c10::optional<at::Tensor>& grad_lse,
                                                         const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& indices,
                                                         const at::Tensor& out, const at::Tensor& lse,
                                                         double scale);

}  // namespace dsa
