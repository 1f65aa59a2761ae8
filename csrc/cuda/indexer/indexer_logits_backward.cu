// CUDA indexer_logits_backward. bfloat16/float16 with a padded head dim <= 128 run the
// tensor-core kernels of indexer_backward_kernels.cuh. float32 inputs (and bfloat16/float16
// shapes beyond those kernels) take the simple path (aten/indexer_backward_float.h): the same
// formulas in float32 with ATen batched GEMMs over chunks of queries, so no more than
// kFloatPathBudget bytes of [.., Hi, S] temporaries exist at a time. Both are deterministic.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "host.h"
#include "aten/indexer_backward_float.h"
#include "cuda/common/dispatch.h"
#include "cuda/indexer/indexer_backward_kernels.cuh"
#include "cuda/indexer/indexer_cuda.h"

namespace dsa {
namespace cuda {
namespace indexer {
namespace {

template <typename T>
void launch_mma_backward(const char* op, const IndexerBwdParams& bp, cudaStream_t stream) {
  const BwdLayout L = bwd_layout<T>(bp.fwd, rows_16b_aligned(bp.fwd, sizeof(T)));
  const IndexerBwdGrid grid = bwd_grid(bp.fwd);
  check_grid(op, grid.dq_blocks);
  check_grid(op, grid.dk_blocks);
  allow_smem(indexer_dq_kernel<T>, L.bytes, kStaticSmemReserve);
  allow_smem(indexer_dk_kernel<T>, L.bytes, kStaticSmemReserve);
  indexer_dq_kernel<T><<<static_cast<unsigned>(grid.dq_blocks), kThreads, L.bytes, stream>>>(bp, L, grid);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  indexer_dk_kernel<T><<<static_cast<unsigned>(grid.dk_blocks), kThreads, L.bytes, stream>>>(bp, L, grid);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_logits_backward_cuda(const at::Tensor& grad_logits,
                                                                            const at::Tensor& q_idx,
                                                                            const at::Tensor& k_idx,
                                                                            const at::Tensor& w,
                                                                            std::optional<double> scale, bool causal,
                                                                            const std::optional<at::Tensor>& key_start,
                                                                            const std::optional<at::Tensor>& key_end) {
  const char* op = "dsa.indexer_logits_backward";
  auto c = prepare_indexer_logits_backward(grad_logits, q_idx, k_idx, w, scale, causal, key_start, key_end);
  check_cuda_dtype(op, "q_idx", c.q);
  const c10::cuda::CUDAGuard guard(q_idx.device());
  const IndexerParams& p = c.p.fwd;
  if (p.B == 0 || p.T == 0 || p.S == 0) {  // no (query, key) pair: every gradient is zero
    c.grad_q.zero_();
    c.grad_k.zero_();
    c.grad_w.zero_();
  } else if (c.q.scalar_type() != at::kFloat && bwd_mma_fits(p, dynamic_smem_limit())) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    DSA_DISPATCH_CUDA(c.q.scalar_type(), op, (at::kHalf, at::kBFloat16),
                      [&] { launch_mma_backward<scalar_t>(op, c.p, stream); });
  } else {
    aten::indexer_backward_float32(c);
  }
  return {c.grad_q, c.grad_k, finish_grad_w(c.grad_w, w)};
}

}  // namespace
}  // namespace indexer
}  // namespace cuda
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) {
  m.impl("indexer_logits_backward", &dsa::cuda::indexer::indexer_logits_backward_cuda);
}
