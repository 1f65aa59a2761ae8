// CUDA indexer_logits (forward). The kernel is in indexer_logits_kernels.cuh, the score tiles
// in indexer_tile.cuh; this file picks the engine, sizes the launch and registers the op.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "host.h"
#include "cuda/indexer/indexer_cuda.h"
#include "cuda/indexer/indexer_logits_kernels.cuh"

namespace dsa {
namespace cuda {
namespace indexer {
namespace {

at::Tensor indexer_logits_cuda(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                               std::optional<double> scale, bool causal, const std::optional<at::Tensor>& k_scale,
                               const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end) {
  const char* op = "dsa.indexer_logits";
  auto c = prepare_indexer_logits(q_idx, k_idx, w, scale, causal, k_scale, key_start, key_end);
  check_cuda_dtype(op, "q_idx", c.q);
  if (c.logits.numel() == 0) return c.logits;
  const c10::cuda::CUDAGuard guard(q_idx.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* out = c.logits.data_ptr<float>();
  with_score_engine(op, c.p, c.q.scalar_type(), c.q, c.k, [&]<class Tile>(const IndexerParams& p, bool vec16) {
    const auto L = Tile::layout(p, vec16);
    const LogitsGrid grid = logits_grid(p);
    check_grid(op, grid.blocks);
    const auto kernel = indexer_logits_kernel<Tile, decltype(L)>;
    allow_smem(kernel, L.bytes, kStaticSmemReserve);
    kernel<<<static_cast<unsigned>(grid.blocks), kThreads, L.bytes, stream>>>(p, L, grid, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.logits;
}

}  // namespace
}  // namespace indexer
}  // namespace cuda
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) { m.impl("indexer_logits", &dsa::cuda::indexer::indexer_logits_cuda); }
