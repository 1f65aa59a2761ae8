// Host-side preparation shared by every backend (CPU, CUDA) and the LibTorch library: validate the
// arguments (checks.h), resolve the defaults the schemas leave as None, bring the last dimensions
// to stride 1, allocate the outputs and fill the params block (params.h). A backend's operator is
// then "auto c = prepare_<op>(...); run its kernel on c.p; return c's outputs".
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"
#include "params.h"

namespace dsa {

// The default scales, resolved here and nowhere else in C++: the indexer's (Hi * Di) ** -0.5
// (for raw head weights w; a module that folds Hi ** -0.5 into w passes Di ** -0.5) and the
// attention's Dqk ** -0.5.
double indexer_scale(const IndexerDims& d, std::optional<double> scale);
double attention_scale(int64_t Dqk, std::optional<double> scale);

// The indexer part of a params block over q_idx, k_idx (stride-1 last dims) and w (score_weights);
// no key scale (see with_key_scale).
IndexerParams indexer_params(const IndexerDims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                             double scale, bool causal);

// k_scale, when given, as a contiguous [B, S] float32 tensor whose pointer goes into p.k_scale
// (the returned tensor keeps it alive); an undefined tensor otherwise.
at::Tensor with_key_scale(IndexerParams& p, const std::optional<at::Tensor>& k_scale);

// key_start / key_end (already checked by check_key_ranges), when given, as contiguous [B, T] int32
// tensors whose pointers go into p.key_start / p.key_end (the returned tensors keep them alive;
// undefined where absent), after the value check (check_key_range_values).
struct KeyRanges {
  at::Tensor start, end;
};
KeyRanges with_key_ranges(const char* op, IndexerParams& p, const std::optional<at::Tensor>& key_start,
                          const std::optional<at::Tensor>& key_end);

// w in the score dtype, contiguous: it is small ([B, T, Hi]) and every kernel reads it per row.
at::Tensor score_weights(const at::Tensor& w, const at::Tensor& q_idx);

// What every indexer forward scores with: q, k with stride-1 last dims, w in the score dtype,
// k's FP8 scales and the key ranges (each undefined where absent), and the params block over them.
struct IndexerScoring {
  at::Tensor q, k, w, k_scale;
  KeyRanges ranges;
  IndexerParams p;
};

struct IndexerLogitsCall : IndexerScoring {
  at::Tensor logits;
};
IndexerLogitsCall prepare_indexer_logits(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                         std::optional<double> scale, bool causal,
                                         const std::optional<at::Tensor>& k_scale,
                                         const std::optional<at::Tensor>& key_start,
                                         const std::optional<at::Tensor>& key_end);

struct IndexerLogitsBwdCall {
  at::Tensor q, k, w, grad_logits, grad_q, grad_k, grad_w;
  KeyRanges ranges;
  IndexerBwdParams p;
};
IndexerLogitsBwdCall prepare_indexer_logits_backward(const at::Tensor& grad_logits, const at::Tensor& q_idx,
                                                     const at::Tensor& k_idx, const at::Tensor& w,
                                                     std::optional<double> scale, bool causal,
                                                     const std::optional<at::Tensor>& key_start,
                                                     const std::optional<at::Tensor>& key_end);

struct TopkCall {
  at::Tensor logits, out;
  TopkParams p;
};
TopkCall prepare_topk(const at::Tensor& logits, int64_t topk);

struct IndexerTopkCall : IndexerScoring {
  at::Tensor out;
  int64_t topk;
};
IndexerTopkCall prepare_indexer_topk(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                     int64_t topk, std::optional<double> scale, bool causal,
                                     const std::optional<at::Tensor>& k_scale,
                                     const std::optional<at::Tensor>& key_start,
                                     const std::optional<at::Tensor>& key_end);

struct SparseAttentionCall {
  at::Tensor q, k, v, indices, out, lse;
  SparseAttentionParams p;
};
SparseAttentionCall prepare_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& indices, std::optional<double> scale);

struct SparseAttentionBwdCall {
  SparseAttentionCall fwd;
  at::Tensor grad_out, grad_lse, grad_q, grad_k, grad_v;
  SparseAttentionBwdParams p;
};
SparseAttentionBwdCall prepare_sparse_attention_backward(const at::Tensor& grad_out,
                                                         const std::optional<at::Tensor>& grad_lse,
                                                         const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& indices,
                                                         const at::Tensor& out, const at::Tensor& lse,
                                                         std::optional<double> scale);

struct IndexerKlLossCall {
  at::Tensor q_idx, k_idx, w, q, k, indices;  // inputs as the kernel reads them
  KeyRanges ranges;
  at::Tensor loss, idx_lse, attn_lse;         // outputs
  IndexerKlLossParams p;
};
IndexerKlLossCall prepare_indexer_kl_loss(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                          const at::Tensor& q, const at::Tensor& k,
                                          const std::optional<at::Tensor>& indices, std::optional<double> idx_scale,
                                          std::optional<double> attn_scale, bool causal,
                                          const std::optional<at::Tensor>& attn_lse,
                                          const std::optional<at::Tensor>& key_start,
                                          const std::optional<at::Tensor>& key_end);

struct IndexerKlLossBwdCall {
  IndexerKlLossCall fwd;
  at::Tensor grad_loss, grad_q_idx, grad_k_idx, grad_w;
  IndexerKlLossBwdParams p;
};
IndexerKlLossBwdCall prepare_indexer_kl_loss_backward(const at::Tensor& grad_loss, const at::Tensor& q_idx,
                                                      const at::Tensor& k_idx, const at::Tensor& w,
                                                      const at::Tensor& q, const at::Tensor& k,
                                                      const std::optional<at::Tensor>& indices,
                                                      const at::Tensor& idx_lse, const at::Tensor& attn_lse,
                                                      std::optional<double> idx_scale,
                                                      std::optional<double> attn_scale, bool causal,
                                                      const std::optional<at::Tensor>& key_start,
                                                      const std::optional<at::Tensor>& key_end);

// grad_w in the dtype w came in (the kernels write the score dtype).
at::Tensor finish_grad_w(const at::Tensor& grad_w, const at::Tensor& w);

}  // namespace dsa
