// CUDA indexer_topk: the fused indexer + top-k (indexer_topk_kernels.cuh). The scores come from
// the same tiles as indexer_logits, so the result equals topk_indices(indexer_logits(...))
// exactly, ties included, while the [B, T, S] logits never exist. Few query rows (decoding) split
// each row's keys over many blocks and merge their candidates (indexer_topk_merge.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "host.h"
#include "cuda/indexer/indexer_cuda.h"
#include "cuda/indexer/indexer_topk_kernels.cuh"

namespace dsa {
namespace cuda {
namespace indexer {
namespace {

// DSA_EXT_CUDA_TOPK_MAX_SPLITS caps the key splits of a row (1: one block per row), to time the
// split-and-merge path against it on a GPU; read on every call.
int max_key_splits() {
  const char* env = std::getenv("DSA_EXT_CUDA_TOPK_MAX_SPLITS");
  return env != nullptr ? std::clamp(std::atoi(env), 1, kMaxKeySplits) : kMaxKeySplits;
}

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

  const TopkPlan plan = plan_indexer_topk(c.p, c.topk, TopkLimits{sm_count(), kWorkspaceBudget, max_key_splits()});
  const MergeTree& tree = plan.tree;
  const int64_t slots = topk_workspace_slots(c.p, plan);
  const auto int_opts = c.q.options().dtype(at::kInt);
  const at::Tensor keys = at::empty({slots * plan.capacity}, int_opts);
  const at::Tensor pos = at::empty({slots * plan.capacity}, int_opts);
  const at::Tensor counts = at::empty({slots}, int_opts);
  // the merge tree's two buffer sets, for the rows of one launch
  const int64_t tree_rows = tree.levels > 0 ? c.p.B * plan.t_chunk : 0;
  const at::Tensor tree_buf = at::empty({2, 2, tree_rows * tree.most_entries}, int_opts);
  const at::Tensor tree_counts = at::empty({2, tree_rows * tree.n[1]}, int_opts);
  const auto tree_set = [&](int i) {
    return CandidateSet{reinterpret_cast<uint32_t*>(tree_buf[i][0].data_ptr<int32_t>()),
                        tree_buf[i][1].data_ptr<int32_t>(), tree_counts[i].data_ptr<int32_t>()};
  };
  const int final_cand_cap = merge_select_candidates(tree.n[tree.levels], tree.cap[tree.levels]);

  with_score_engine(op, c.p, c.q.scalar_type(), c.q, c.k, [&]<class Tile>(const IndexerParams& p, bool vec16) {
    const auto L = Tile::layout(p, vec16);
    const auto partial = indexer_topk_partial_kernel<Tile, decltype(L)>;
    const auto merge = merge_level_kernel<>;
    allow_smem(partial, L.bytes, kStaticSmemReserve);
    for (int64_t t_begin = 0; t_begin < p.T; t_begin += plan.t_chunk) {
      const TopkWorkspace ws = topk_workspace(p, plan, reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>()),
                                              pos.data_ptr<int32_t>(), counts.data_ptr<int32_t>(), t_begin);
      const int64_t blocks = p.B * ws.q_tiles * plan.splits;
      check_grid(op, blocks);
      check_grid(op, p.B * ws.t_count * (tree.levels > 0 ? tree.n[1] : 1));  // merge and selection blocks
      partial<<<static_cast<unsigned>(blocks), kThreads, L.bytes, stream>>>(p, L, ws);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const CandidateSet last = run_merge_tree(
          tree, p.B * ws.t_count, CandidateSet{ws.keys, ws.pos, ws.counts}, tree_set(0), tree_set(1),
          [&](const MergeLevel& m, int64_t level_blocks, int cand_cap) {
            merge<<<static_cast<unsigned>(level_blocks), kSelectThreads, cand_cap * sizeof(uint32_t), stream>>>(m,
                                                                                                       cand_cap);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
      const SplitRows rows{final_buffers(ws, tree, last), p.T};
      select_rows_kernel<SplitRows><<<static_cast<unsigned>(p.B * ws.t_count), kSelectThreads,
                                      final_cand_cap * sizeof(uint32_t), stream>>>(
          rows, plan.k, c.topk, c.out.data_ptr<int32_t>(), final_cand_cap);
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
