// CUDA topk_indices: one block per row of the logits, radix select then an ordered pass
// (select_rows.cuh). Deterministic and bit-identical to the CPU operator: the selection only
// compares exact 32-bit keys of the scores.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "host.h"
#include "cuda/common/dispatch.h"
#include "cuda/indexer/indexer_cuda.h"
#include "cuda/indexer/select_rows.cuh"

namespace dsa {
namespace cuda {
namespace indexer {
namespace {

template <typename T>
void launch_topk_rows(const TopkParams& p, cudaStream_t stream) {
  const DenseRows<T> rows{static_cast<const T*>(p.logits), p.T, p.logits_batch_stride, p.logits_row_stride, static_cast<int>(p.S)};
  const int k = static_cast<int>(std::min(p.topk, p.S));  // a row never has more than S to give
  const int cand_cap = static_cast<int>(std::min<int64_t>(p.S, kSelectCandidates));
  select_rows_kernel<DenseRows<T>><<<static_cast<unsigned>(p.B * p.T), kSelectThreads,
                                      cand_cap * sizeof(uint32_t), stream>>>(rows, k, p.topk, p.out, cand_cap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor topk_indices_cuda(const at::Tensor& logits, int64_t topk) {
  const char* op = "dsa.topk_indices";
  auto c = prepare_topk(logits, topk);
  check_cuda_dtype(op, "logits", logits);
  check_grid(op, c.p.B * c.p.T);
  if (c.out.numel() == 0) return c.out;
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DSA_DISPATCH_CUDA(c.logits.scalar_type(), op, (at::kFloat, at::kHalf, at::kBFloat16),
                    [&] { launch_topk_rows<scalar_t>(c.p, stream); });
  return c.out;
}

}  // namespace
}  // namespace indexer
}  // namespace cuda
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) { m.impl("topk_indices", &dsa::cuda::indexer::topk_indices_cuda); }
