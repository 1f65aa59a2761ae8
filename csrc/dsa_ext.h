// The C++ API of the dsa:: operators for LibTorch programs: typed calls through the dispatcher
// (so CPU and CUDA tensors reach their kernels, and autocast/profiling wrappers apply), with the
// schemas' defaults as C++ default arguments. Link libdsa_ext (it registers the operators).
// What each operator computes: docs/DESIGN.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace dsa {

namespace detail {
template <typename Signature>
const c10::TypedOperatorHandle<Signature>& op(const char* name) {
  // one lookup per operator and signature, on first use
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  return handle;
}
using OptTensor = std::optional<at::Tensor>;
}  // namespace detail

// logits [B, T, S] float32 (float64 for float64 inputs), -inf where masked.
// scale: default (Hi * Di) ** -0.5. key_start, key_end: int32 [B, T] per-query key ranges
// [key_start, key_end) (default 0 and S), on top of the causal mask.
inline at::Tensor indexer_logits(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                 std::optional<double> scale = std::nullopt, bool causal = true,
                                 const detail::OptTensor& k_scale = std::nullopt,
                                 const detail::OptTensor& key_start = std::nullopt,
                                 const detail::OptTensor& key_end = std::nullopt) {
  return detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, std::optional<double>,
                               bool, const detail::OptTensor&, const detail::OptTensor&,
                               const detail::OptTensor&)>("dsa::indexer_logits")
      .call(q_idx, k_idx, w, scale, causal, k_scale, key_start, key_end);
}

// indices [B, T, topk] int32: ascending positions, ties to the lower position, -1 padding.
inline at::Tensor topk_indices(const at::Tensor& logits, int64_t topk) {
  return detail::op<at::Tensor(const at::Tensor&, int64_t)>("dsa::topk_indices").call(logits, topk);
}

// topk_indices(indexer_logits(...), topk) without the [B, T, S] logits.
inline at::Tensor indexer_topk(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, int64_t topk,
                               std::optional<double> scale = std::nullopt, bool causal = true,
                               const detail::OptTensor& k_scale = std::nullopt,
                               const detail::OptTensor& key_start = std::nullopt,
                               const detail::OptTensor& key_end = std::nullopt) {
  return detail::op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                               std::optional<double>, bool, const detail::OptTensor&, const detail::OptTensor&,
                               const detail::OptTensor&)>("dsa::indexer_topk")
      .call(q_idx, k_idx, w, topk, scale, causal, k_scale, key_start, key_end);
}

// (out [B, T, H, Dv], lse [B, T, H]) of attention over indices [B, T, topk] or [B, T, Hkv, topk].
// scale: default Dqk ** -0.5.
inline std::tuple<at::Tensor, at::Tensor> sparse_attention(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& indices,
                                                           std::optional<double> scale = std::nullopt) {
  return detail::op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, std::optional<double>)>(
             "dsa::sparse_attention")
      .call(q, k, v, indices, scale);
}

// (loss [B, T], idx_lse [B, T], attn_lse [B, T, H]): the indexer's KL loss per query token.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss(
    const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q, const at::Tensor& k,
    const detail::OptTensor& indices = std::nullopt, std::optional<double> idx_scale = std::nullopt,
    std::optional<double> attn_scale = std::nullopt, bool causal = true,
    const detail::OptTensor& attn_lse = std::nullopt, const detail::OptTensor& key_start = std::nullopt,
    const detail::OptTensor& key_end = std::nullopt) {
  return detail::op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
             const detail::OptTensor&, std::optional<double>, std::optional<double>, bool,
             const detail::OptTensor&, const detail::OptTensor&, const detail::OptTensor&)>("dsa::indexer_kl_loss")
      .call(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, attn_lse, key_start, key_end);
}

}  // namespace dsa
