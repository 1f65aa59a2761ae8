// CUDA indexer_topk: the fused indexer + top-k (indexer_topk_kernels.cuh). The scores come from
// the same tiles as indexer_logits, so the result equals topk_indices(indexer_logits(...))
// exactly, ties included, while the [B, T, S] logits never exist.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "host.h"
#include "cuda/indexer/indexer_cuda.h"
#include "cuda/indexer/indexer_topk_kernels.cuh"

namespace dsa {
namespace cuda {
namespace indexer {
namespace {

at::Tensor indexer_topk_cuda(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, int64_t topk,
                             std::optional<double> scale, bool causal, const std::optional<at::Tensor>& k_scale,
                             const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end) {
  const char* op = "dsa.indexer_topk";
  auto c = prepare_indexer_topk(q_idx, k_idx, w, topk, scale, causal, k_scale, key_start, key_end);
  check_cuda_dtype(op, "q_idx", c.q);
  if (c.out.numel() == 0) return c.out;
  const c10::cuda::CUDAGuard guard(q_idx.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (c.p.S == 0) return c.out.fill_(-1);

  const TopkPlan plan = plan_indexer_topk(c.p, c.topk, sm_count());
  const int64_t slots = topk_workspace_slots(c.p, plan);
  const auto int_opts = c.q.options().dtype(at::kInt);
  const at::Tensor keys = at::empty({slots * plan.capacity}, int_opts);
  const at::Tensor pos = at::empty({slots * plan.capacity}, int_opts);
  const at::Tensor counts = at::empty({slots}, int_opts);
  const int cand_cap = topk_select_candidates(plan);

  with_score_engine(op, c.p, c.q.scalar_type(), c.q, c.k, [&]<class Tile>(const IndexerParams& p, bool vec16) {
    const auto L = Tile::layout(p, vec16);
    const auto partial = indexer_topk_partial_kernel<Tile, decltype(L)>;
    allow_smem(partial, L.bytes, kStaticSmemReserve);
    for (int64_t t_begin = 0; t_begin < p.T; t_begin += plan.t_chunk) {
      const TopkWorkspace ws = topk_workspace(p, plan, reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()),
                                              pos.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), t_begin);
      const int64_t blocks = p.B * ws.q_tiles * plan.splits;
      check_grid(op, blocks);
      check_grid(op, p.B * ws.t_count);
      partial<<<static_cast<unsigned>(blocks), kThreads, L.bytes, stream>>>(p, L, ws);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      select_rows_kernel<SplitRows><<<static_cast<unsigned>(p.B * ws.t_count), kSelectThreads,
                                      cand_cap * sizeof(uint32_t), stream>>>(SplitRows{ws, p.T}, plan.k, c.topk,
                                                                            c.out.data_ptr<int32_t>(), cand_cap);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return c.out;
}

}  // namespace
}  // namespace indexer
}  // namespace cuda
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) { m.impl("indexer_topk", &dsa::cuda::indexer::indexer_topk_cuda); }
