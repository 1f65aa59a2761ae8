// CUDA indexer_kl_loss and indexer_kl_loss_backward: the streamed implementation of
// aten/indexer_kl_loss_streamed.h (cuBLAS batched GEMMs over query chunks x key blocks, per-row
// online statistics, bounded temporaries) on the shared host preparation (host.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "host.h"
#include "aten/indexer_kl_loss_streamed.h"

namespace dsa {
namespace cuda {
namespace indexer {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_cuda(
    const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q, const at::Tensor& k,
    const std::optional<at::Tensor>& indices, std::optional<double> idx_scale, std::optional<double> attn_scale,
    bool causal, const std::optional<at::Tensor>& attn_lse, const std::optional<at::Tensor>& key_start,
    const std::optional<at::Tensor>& key_end) {
  auto c = prepare_indexer_kl_loss(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, attn_lse, key_start,
                                   key_end);
  check_cuda_dtype("dsa.indexer_kl_loss", "q_idx", c.q_idx);
  const c10::cuda::CUDAGuard guard(q_idx.device());
  aten::indexer_kl_loss_streamed(c);
  return {c.loss, c.idx_lse, c.attn_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& indices, const at::Tensor& idx_lse,
    const at::Tensor& attn_lse, std::optional<double> idx_scale, std::optional<double> attn_scale, bool causal,
    const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end) {
  auto c = prepare_indexer_kl_loss_backward(grad_loss, q_idx, k_idx, w, q, k, indices, idx_lse, attn_lse, idx_scale,
                                            attn_scale, causal, key_start, key_end);
  check_cuda_dtype("dsa.indexer_kl_loss_backward", "q_idx", c.fwd.q_idx);
  const c10::cuda::CUDAGuard guard(q_idx.device());
  aten::indexer_kl_loss_backward_streamed(c);
  return {c.grad_q_idx, c.grad_k_idx, finish_grad_w(c.grad_w, w)};
}

}  // namespace
}  // namespace indexer
}  // namespace cuda
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) {
  m.impl("indexer_kl_loss", &dsa::cuda::indexer::indexer_kl_loss_cuda);
  m.impl("indexer_kl_loss_backward", &dsa::cuda::indexer::indexer_kl_loss_backward_cuda);
}
