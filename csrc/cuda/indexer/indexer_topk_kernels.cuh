// Fused indexer_topk: score tiles feed a running selection per query; [B, T, S] never exists.
//
// Two kernels per launch of query rows [t_begin, t_begin + t_count):
// 1. indexer_topk_partial_kernel, one block per (batch, query tile, key split); it scores only the
//    tiles of its split between the first and last key its queries see (key_range_hull). Warp qi
//    appends every key in its query's range whose score key beats the query's floor to a candidate buffer
//    (global memory, `capacity` entries, kept in position order). When the next tile might not
//    fit, the block compacts the buffer to its best k (radix select + in-place ordered pass)
//    and raises the floor to the k-th best key: a later key equal to it sits at a higher
//    position than every kept one, so it could never win, and is dropped at once. With more
//    than one split, a split also compacts after its last tile, so it hands at most k on.
// 2. select_rows_kernel over SplitRows, one block per query row: the row's split buffers, each
//    in position order, concatenate into one position-ordered candidate list; the same
//    selection as topk_indices writes the final ascending positions and the -1 padding.
//    More than kMergeFanIn splits go through a merge tree first (indexer_topk_merge.cuh).
// Splits exist to fill the GPU when there are few query rows (decoding: B * T rows of one to a
// few queries over a long cache); with many rows there is one split. The buffers hold
// B * t_count * splits * capacity (key, position) pairs, plus the merge tree's; t_count is
// chosen on the host to keep them under a fixed budget.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/indexer/indexer_logits_kernels.cuh"
#include "cuda/indexer/indexer_tile.cuh"
#include "cuda/indexer/indexer_topk_merge.cuh"
#include "cuda/indexer/radix_select.cuh"
#include "cuda/indexer/select_rows.cuh"

namespace dsa {
namespace cuda {
namespace indexer {

constexpr int kMaxKeySplits = 1024;   // splits of one row's keys (a merge tree of 4 levels at most)
constexpr int64_t kMinSplitKeys = 1024;  // keys per split at least: a split loads its queries once
constexpr int64_t kWorkspaceBudget = int64_t{256} << 20;   // bytes of candidate buffers per launch

struct TopkWorkspace {
  uint32_t* keys;   // [B, t_count, splits, capacity]
  int32_t* pos;     // same
  int32_t* counts;  // [B, t_count, splits]
  int k;            // min(k, S): a row never has more to give
  int capacity;
  int splits;
  int64_t split_len;  // keys per split, a multiple of kKeys
  int64_t t_begin, t_count;
  int64_t q_tiles;    // ceil(t_count / kQueries)
};

// Launch plan of one indexer_topk call (host side; the same for every chunk of query rows).
struct TopkPlan {
  int k, capacity, splits;
  int64_t split_len, t_chunk;
  MergeTree tree;  // of the splits' buffers (no levels for at most kMergeFanIn splits)
};

// What a plan may use. sm_count: the device's (launch.h). max_splits caps the splits of a row's
// keys (1: one block per row, as DSA_EXT_CUDA_TOPK_MAX_SPLITS=1 asks, to compare on a GPU);
// min_split_keys below kMinSplitKeys lets the emulator's tests split short rows many ways.
struct TopkLimits {
  int sm_count;
  int64_t workspace_budget = kWorkspaceBudget;
  int max_splits = kMaxKeySplits;
  int64_t min_split_keys = kMinSplitKeys;
};

// Splits: enough (batch, query tile, split) blocks for 4 per SM when the rows alone are fewer.
inline TopkPlan plan_indexer_topk(const IndexerParams& p, int64_t topk, const TopkLimits& lim) {
  TopkPlan plan{};
  plan.k = static_cast<int>(std::min(topk, p.S));
  const int64_t row_tiles = p.B * ceil_div(p.T, kQueries);
  const int64_t want_blocks = 4 * int64_t{lim.sm_count};
  int64_t splits = row_tiles >= want_blocks ? 1 : ceil_div(want_blocks, row_tiles);
  splits = std::min<int64_t>({splits, std::clamp(lim.max_splits, 1, kMaxKeySplits),
                              std::max<int64_t>(1, p.S / std::max<int64_t>(1, lim.min_split_keys))});
  plan.split_len = ceil_div(ceil_div(p.S, splits), kKeys) * kKeys;
  plan.splits = static_cast<int>(ceil_div(p.S, plan.split_len));
  // k kept + room for at least k (and at least one tile) more before a compaction is due.
  plan.capacity = static_cast<int>(
      std::min<int64_t>(plan.split_len, int64_t{plan.k} + std::max<int64_t>(plan.k, kKeys)));
  plan.tree = plan_merge_tree(plan.splits, plan.capacity, plan.k);
  const int64_t row_bytes = int64_t{plan.splits} * (int64_t{plan.capacity} * 8 + 4) + merge_tree_row_bytes(plan.tree);
  const int64_t rows = std::max<int64_t>(kQueries, lim.workspace_budget / std::max<int64_t>(1, p.B * row_bytes));
  plan.t_chunk = std::min(p.T, rows / kQueries * kQueries);
  return plan;
}

// Slots of a call's candidate buffers: B * t_chunk * splits (keys and pos hold capacity per slot).
inline int64_t topk_workspace_slots(const IndexerParams& p, const TopkPlan& plan) {
  return p.B * plan.t_chunk * plan.splits;
}

// The workspace of the launches for query rows [t_begin, t_begin + t_chunk) (the last chunk may
// be shorter), over buffers of topk_workspace_slots(p, plan) slots.
inline TopkWorkspace topk_workspace(const IndexerParams& p, const TopkPlan& plan, uint32_t* keys, int32_t* pos,
                                    int32_t* counts, int64_t t_begin) {
  TopkWorkspace ws{};
  ws.keys = keys;
  ws.pos = pos;
  ws.counts = counts;
  ws.k = plan.k;
  ws.capacity = plan.capacity;
  ws.splits = plan.splits;
  ws.split_len = plan.split_len;
  ws.t_begin = t_begin;
  ws.t_count = std::min(plan.t_chunk, p.T - t_begin);
  ws.q_tiles = ceil_div(ws.t_count, kQueries);
  return ws;
}

// The workspace the final selection reads after the merge tree: `last` (run_merge_tree's result),
// tree.n[levels] buffers per row of tree.cap[levels] entries; ws itself without levels.
inline TopkWorkspace final_buffers(TopkWorkspace ws, const MergeTree& tree, const CandidateSet& last) {
  ws.keys = last.keys;
  ws.pos = last.pos;
  ws.counts = last.counts;
  ws.splits = tree.n[tree.levels];
  ws.capacity = tree.cap[tree.levels];
  return ws;
}

template <class Tile, class Layout>
__global__ void __launch_bounds__(kThreads, kTileBlocksPerSm)
    indexer_topk_partial_kernel(const __grid_constant__ IndexerParams p, const Layout L, const TopkWorkspace ws) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ SelectShared<kThreads> sel;
  __shared__ int count[kQueries];          // candidates in each query's buffer
  __shared__ uint32_t floor_key[kQueries]; // a key must exceed this to enter
  int64_t item = blockIdx.x;
  const int split = static_cast<int>(item % ws.splits);
  item /= ws.splits;
  const int64_t row0 = (item % ws.q_tiles) * kQueries, b = item / ws.q_tiles;  // row = t - t_begin
  const int64_t t0 = ws.t_begin + row0;
  const int nq = static_cast<int>(min(int64_t{kQueries}, ws.t_count - row0));
  const KeyRange hull = key_range_hull(p, b, t0, nq);
  const int64_t s_begin = max(split * ws.split_len, hull.begin);
  const int64_t s_end = min(min(p.S, split * ws.split_len + ws.split_len), hull.end);
  const int tiles = s_end > s_begin ? static_cast<int>(ceil_div(s_end - s_begin, kKeys)) : 0;
  const auto buffer = [&](int qi) { return ((b * ws.t_count + row0 + qi) * ws.splits + split) * ws.capacity; };
  float* scores = reinterpret_cast<float*>(smem + L.scores);
  const Tile tile{p, L, smem, b, t0};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  if (threadIdx.x < kQueries) {
    count[threadIdx.x] = 0;
    floor_key[threadIdx.x] = 0u;
  }
  for_each_score_tile(tile, s_begin, tiles, scores, [&](int i, int64_t s0) {
    if (warp < nq) {  // append, in position order, the keys of the query's range above the floor
      const KeyRange r = key_range(p, b, t0 + warp);
      const int64_t first = max(s_begin, r.begin), visible = min(s_end, r.end);
      const uint32_t floor = floor_key[warp];
      uint32_t* keys = ws.keys + buffer(warp);
      int32_t* pos = ws.pos + buffer(warp);
      int n = count[warp];
#pragma unroll
      for (int c = 0; c < kKeys; c += 32) {
        const int64_t s = s0 + c + lane;
        const uint32_t key = s >= first && s < visible ? score_key(scores[warp * kKeys + c + lane]) : 0u;
        const bool take = key > floor;
        const uint32_t ballot = __ballot_sync(0xffffffffu, take);
        if (take) {
          const int at = n + __popc(ballot & ((1u << lane) - 1u));
          keys[at] = key;
          pos[at] = static_cast<int32_t>(s);
        }
        n += __popc(ballot);
      }
      if (lane == 0) count[warp] = n;
    }
    __syncthreads();
    const bool last = i + 1 == tiles;
    for (int qi = 0; qi < nq; ++qi) {
      // compact when the next tile might not fit; after the last one, down to k for the merge
      if (last ? (ws.splits == 1 || count[qi] <= ws.k) : count[qi] + kKeys <= ws.capacity) continue;
      uint32_t* keys = ws.keys + buffer(qi);
      int32_t* pos = ws.pos + buffer(qi);
      const int n = count[qi];
      const Threshold th = radix_select<kThreads>([&](int j) { return keys[j]; }, n, ws.k, sel);
      emit_selected<kThreads, 4>(
          [&](int j) { return Keyed{keys[j], pos[j]}; }, n, th,
          [&](int slot, const Keyed& e) {
            keys[slot] = e.key;
            pos[slot] = e.payload;
          },
          sel);
      if (threadIdx.x == 0) {
        count[qi] = th.count;
        floor_key[qi] = th.kth;
      }
      __syncthreads();
    }
  });
  __syncthreads();
  if (threadIdx.x < nq) ws.counts[buffer(threadIdx.x) / ws.capacity] = count[threadIdx.x];
}

// The rows of one launch as seen by select_rows_kernel: row r = (b, t - t_begin); its
// candidates are the splits' buffers one after the other.
struct SplitRows {
  TopkWorkspace ws;
  int64_t T_len;  // rows of the output
  struct Shared {
    int start[kMergeFanIn + 1];  // first candidate index of each split; start[splits] = total
  };
  using Row = CandidateBuffers;
  __device__ Row row(int64_t r, Shared& sh) const {  // r = b * t_count + (t - t_begin)
    return candidate_buffers(ws.keys, ws.pos, ws.counts, r * ws.splits, ws.splits, ws.capacity, sh.start);
  }
  __device__ int64_t out_row(int64_t r) const {
    return (r / ws.t_count) * T_len + ws.t_begin + r % ws.t_count;
  }
};

}  // namespace indexer
}  // namespace cuda
}  // namespace dsa
