// The merge side of the fused indexer_topk when one query row's keys are split over many blocks
// (decoding: a few queries over a long cache, where one block per row would leave the GPU idle).
//
// The partial kernel (indexer_topk_kernels.cuh) leaves, per (row, key split), a buffer of at most
// `capacity` (key, position) candidates in position order; splits cover ascending, disjoint key
// ranges, so a row's buffers read one after the other form one position-ordered list
// (CandidateBuffers). Selecting the k best of that list with radix_select + emit_selected picks,
// on equal keys, the lower positions, exactly as one selection over all keys would: the k best
// under the order (key descending, position ascending) of a union are the k best of the union of
// each part's k best.
//
// Few splits: one select_rows_kernel block per row reads all of them (SplitRows). Many splits: a
// tree of merge_level_kernel launches first, each block merging kMergeFanIn neighbouring buffers
// of one row into one buffer of its best min(k, their capacity) candidates (still in position
// order), until at most kMergeFanIn buffers per row remain. The tree spreads a row's merge over
// many blocks instead of one block reading every split's candidates.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/common/ceil_div.cuh"
#include "cuda/indexer/radix_select.cuh"
#include "cuda/indexer/select_rows.cuh"

namespace dsa {
namespace cuda {
namespace indexer {

constexpr int kMergeFanIn = 8;     // buffers one merge block reads (and the most the final select reads)
constexpr int kMaxMergeLevels = 4; // kMergeFanIn^4 splits at least: more than kMaxKeySplits

// `buffers` consecutive candidate buffers of `capacity` entries, buffer j holding start[j + 1] -
// start[j] valid entries, read as one list of n candidates.
struct CandidateBuffers {
  const uint32_t* keys;
  const int32_t* pos;
  const int* start;  // shared memory, buffers + 1 entries: first list index of each buffer; start[buffers] = n
  int buffers, capacity, n;
  __device__ int64_t at(int i) const {  // buffer offset of candidate i: the last buffer starting <= i
    int lo = 0, hi = buffers - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (start[mid] <= i)
        lo = mid;
      else
        hi = mid - 1;
    }
    return int64_t{lo} * capacity + (i - start[lo]);
  }
  __device__ uint32_t key(int i) const { return keys[at(i)]; }
  __device__ int32_t position(int i) const { return pos[at(i)]; }
};

// The list of buffers first .. first + buffers - 1 (their counts in counts[first ..]); start must
// hold buffers + 1 ints of shared memory. Called by every thread of the block (it synchronises).
__device__ inline CandidateBuffers candidate_buffers(const uint32_t* keys, const int32_t* pos, const int32_t* counts,
                                                     int64_t first, int buffers, int capacity, int* start) {
  if (threadIdx.x == 0) {
    int total = 0;
    for (int j = 0; j < buffers; ++j) {
      start[j] = total;
      total += counts[first + j];
    }
    start[buffers] = total;
  }
  __syncthreads();
  return CandidateBuffers{keys + first * capacity, pos + first * capacity, start, buffers, capacity, start[buffers]};
}

// Candidate buffers in global memory: keys and positions [rows, buffers, capacity], counts [rows, buffers].
struct CandidateSet {
  uint32_t* keys;
  int32_t* pos;
  int32_t* counts;
};

// One level of the merge tree: in [rows, n_in, in_cap] -> out [rows, n_out, out_cap] with
// n_out = ceil(n_in / kMergeFanIn) and out_cap = min(k, min(kMergeFanIn, n_in) * in_cap).
struct MergeLevel {
  CandidateSet in, out;
  int n_in, in_cap, n_out, out_cap;
};

// The buffer sizes of a whole tree (host side): level 0 is the partial kernel's output.
struct MergeTree {
  int levels;  // merge launches
  int n[kMaxMergeLevels + 1], cap[kMaxMergeLevels + 1];
  int64_t most_entries;  // the largest level output per row, entries (0 without levels)
};

static_assert(int64_t{kMergeFanIn} * kMergeFanIn * kMergeFanIn * kMergeFanIn >= 1024,
              "kMaxMergeLevels levels bring kMaxKeySplits buffers down to kMergeFanIn");

inline MergeTree plan_merge_tree(int splits, int capacity, int k) {
  MergeTree t{};
  t.n[0] = splits;
  t.cap[0] = capacity;
  while (t.n[t.levels] > kMergeFanIn && t.levels < kMaxMergeLevels) {
    const int l = t.levels++;
    t.n[l + 1] = static_cast<int>(ceil_div(t.n[l], kMergeFanIn));
    t.cap[l + 1] = static_cast<int>(std::min<int64_t>(k, int64_t{std::min(kMergeFanIn, t.n[l])} * t.cap[l]));
    t.most_entries = std::max(t.most_entries, int64_t{t.n[l + 1]} * t.cap[l + 1]);
  }
  // the final select holds one start per remaining buffer in kMergeFanIn + 1 slots
  if (t.n[t.levels] > kMergeFanIn) {
    throw std::invalid_argument("dsa.indexer_topk: " + std::to_string(splits) + " key splits need more than " +
                                std::to_string(kMaxMergeLevels) + " merge levels");
  }
  return t;
}

// Bytes per row of the tree's two ping-pong buffer sets (none without levels).
inline int64_t merge_tree_row_bytes(const MergeTree& t) {
  return t.levels == 0 ? 0 : 2 * (t.most_entries * 8 + int64_t{t.n[1]} * 4);
}

// Shared-memory candidates of a block that merges `buffers` buffers of `capacity` entries.
inline int merge_select_candidates(int buffers, int capacity) {
  return static_cast<int>(std::min<int64_t>(kSelectCandidates, int64_t{buffers} * capacity));
}

// Block (row, g), g < n_out: the best out_cap of buffers g * kMergeFanIn .. of the row, in
// position order, to output buffer (row, g), and their count. (A template only so that the
// header may be included by more than one translation unit.)
template <int = 0>
__global__ void __launch_bounds__(kSelectThreads) merge_level_kernel(const MergeLevel m, int cand_cap) {
  extern __shared__ uint32_t cand[];  // cand_cap keys
  __shared__ SelectShared<kSelectThreads> sh;
  __shared__ int start[kMergeFanIn + 1];
  const int64_t block = blockIdx.x;  // row * n_out + g
  const int g = static_cast<int>(block % m.n_out);
  const int64_t first = (block / m.n_out) * m.n_in + int64_t{g} * kMergeFanIn;
  const int buffers = min(kMergeFanIn, m.n_in - g * kMergeFanIn);
  const CandidateBuffers in = candidate_buffers(m.in.keys, m.in.pos, m.in.counts, first, buffers, m.in_cap, start);
  const Threshold th = radix_select<kSelectThreads>([&](int i) { return in.key(i); }, in.n, m.out_cap, sh,
                                                    cand_cap > 0 ? cand : nullptr, cand_cap);
  uint32_t* keys = m.out.keys + block * m.out_cap;
  int32_t* pos = m.out.pos + block * m.out_cap;
  emit_selected<kSelectThreads, kSelectItems>(
      [&](int i) { return Keyed{in.key(i), in.position(i)}; }, in.n, th,
      [&](int slot, const Keyed& e) {
        keys[slot] = e.key;
        pos[slot] = e.payload;
      },
      sh);
  if (threadIdx.x == 0) m.out.counts[block] = th.count;
}

// Runs the tree's levels over `rows` rows (host side): level 0 reads `partial` (the partial
// kernel's buffers), level l writes set l % 2 of (a, b), each sized rows * most_entries (counts:
// rows * n[1]). launch(level, blocks, cand_cap) launches merge_level_kernel (a CUDA stream, or the
// emulator). Returns the buffers the final selection reads: t.n[levels] per row of t.cap[levels].
template <class Launch>
CandidateSet run_merge_tree(const MergeTree& t, int64_t rows, CandidateSet partial, CandidateSet a, CandidateSet b,
                            const Launch& launch) {
  CandidateSet in = partial;
  for (int l = 0; l < t.levels; ++l) {
    const CandidateSet out = l % 2 == 0 ? a : b;
    launch(MergeLevel{in, out, t.n[l], t.cap[l], t.n[l + 1], t.cap[l + 1]}, rows * t.n[l + 1],
           merge_select_candidates(std::min(kMergeFanIn, t.n[l]), t.cap[l]));
    in = out;
  }
  return in;
}

}  // namespace indexer
}  // namespace cuda
}  // namespace dsa
