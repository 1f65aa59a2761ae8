// The merge of the tensor-core forward's splits over index slots (decoding shapes,
// attention_splits in sparse_attention_kernels.h): each split of a row has stored its own
// normalised output and lse in float32 (sparse_attention_mma_fwd.cuh), and combine_splits_kernel
// merges them as a softmax over the union would:
//   lse = ln sum_i exp(lse_i),  out = sum_i exp(lse_i - lse) * out_i.
// A split that saw no valid key has lse_i = -inf and out_i = 0 and weighs nothing; a row whose
// splits all saw none gets out = 0, lse = -inf, as the unsplit kernel gives it.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/attention/sparse_attention_rowwise.cuh"
#include "cuda/attention/sparse_attention_tiles.cuh"

namespace dsa {
namespace cuda {

inline int64_t combine_blocks(const CombineArgs& a) { return ceil_div(a.rows, kCombineWarps); }

constexpr int kCombineColumns = 8;  // output columns per lane per pass: 8 accumulators

// One warp per (b, t, h) row: the weights exp(lse_i - max) in the exp2 domain (as the
// tensor-core forward computes its softmax), then the weighted sum of the partial rows, 256
// columns per pass.
template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_splits_kernel(const CombineArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t{blockIdx.x} * kCombineWarps + (threadIdx.x >> 5);
  if (row >= a.rows) return;  // whole warps leave together
  const float* lse = a.part_lse + row * a.splits;
  float mx = -INFINITY;
  for (int i = lane; i < a.splits; i += 32) mx = fmaxf(mx, lse[i]);
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, m));
  const float base = mx == -INFINITY ? 0.f : mx;  // no valid key anywhere: every weight exp2(-inf) = 0
  float total = 0.f;
  for (int i = lane; i < a.splits; i += 32) total += exp2f((lse[i] - base) * kLog2e);
  total = rowwise::warp_sum(total);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(a.out) + row * a.Dv;
  const float* part = a.part_out + row * a.splits * a.Dv;
  for (int64_t d0 = 0; d0 < a.Dv; d0 += 32 * kCombineColumns) {
    float acc[kCombineColumns] = {};
    for (int i = 0; i < a.splits; ++i) {
      const float wgt = exp2f((lse[i] - base) * kLog2e) * inv;
      if (wgt == 0.f) continue;  // an empty split (its partial row holds zeros anyway)
      const float* src = part + int64_t{i} * a.Dv;
#pragma unroll
      for (int u = 0; u < kCombineColumns; ++u) {
        const int64_t d = d0 + lane + 32 * u;
        if (d < a.Dv) acc[u] = fmaf(wgt, src[d], acc[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kCombineColumns; ++u) {
      const int64_t d = d0 + lane + 32 * u;
      if (d < a.Dv) rowwise::store(out + d, acc[u]);
    }
  }
  if (lane == 0) a.lse[row] = total > 0.f ? base + log2f(total) * kLn2 : -INFINITY;
}

}  // namespace cuda
}  // namespace dsa
