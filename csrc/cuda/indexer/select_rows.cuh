// One block per row: radix select, then the ordered pass writes the row's selected positions
// ascending and pads with -1. The row source says where keys come from: a dense logits row
// (topk_indices) or the per-split candidate buffers of the fused indexer_topk.
//
// A Rows type provides
//   struct Shared;                                  per-block scratch it needs (shared memory)
//   Row row(int64_t r, Shared&) const;              called by every thread; may fill Shared
//   int64_t out_row(int64_t r) const;               output row of block r
// and its Row: int n; uint32_t key(int i) const; int32_t position(int i) const.
#pragma once

#include <cstdint>

#include "cuda/common/device_types.cuh"
#include "cuda/indexer/radix_select.cuh"

namespace dsa {
namespace cuda {
namespace indexer {

constexpr int kSelectThreads = 256;
constexpr int kSelectItems = 4;         // consecutive elements per thread in the ordered pass
constexpr int kSelectCandidates = 8192; // shared-memory keys (32 KiB) once the threshold group fits

template <class Rows>
__global__ void __launch_bounds__(kSelectThreads)
    select_rows_kernel(const Rows rows, int k, int64_t out_k, int32_t* __restrict__ out, int cand_cap) {
  extern __shared__ uint32_t cand[];  // cand_cap keys
  __shared__ SelectShared<kSelectThreads> sh;
  __shared__ typename Rows::Shared row_shared;
  const int64_t r = blockIdx.x;
  const auto row = rows.row(r, row_shared);
  const Threshold th = radix_select<kSelectThreads>([&](int i) { return row.key(i); }, row.n, k, sh,
                                                    cand_cap > 0 ? cand : nullptr, cand_cap);
  int32_t* dst = out + rows.out_row(r) * out_k;
  emit_selected<kSelectThreads, kSelectItems>(
      [&](int i) { return Keyed{row.key(i), row.position(i)}; }, row.n, th,
      [&](int slot, const Keyed& e) { dst[slot] = e.payload; }, sh);
  for (int64_t i = th.count + static_cast<int64_t>(threadIdx.x); i < out_k; i += kSelectThreads) dst[i] = -1;
}

// Rows of a [B, T, S] logits tensor (last dim contiguous); position = column.
template <typename T>
struct DenseRows {
  const T* logits;
  int64_t T_len, sb, st;
  int n;  // S
  struct Shared {};
  struct Row {
    const T* x;
    int n;
    __device__ uint32_t key(int i) const { return score_key(to_float(__ldg(x + i))); }
    __device__ int32_t position(int i) const { return i; }
  };
  __device__ Row row(int64_t r, Shared&) const {
    return Row{logits + (r / T_len) * sb + (r % T_len) * st, n};
  }
  __device__ int64_t out_row(int64_t r) const { return r; }
};

}  // namespace indexer
}  // namespace cuda
}  // namespace dsa
