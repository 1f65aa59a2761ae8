// Per-query key ranges in the ATen paths of the CUDA backend (aten/indexer_backward_float.h,
// aten/indexer_kl_loss_streamed.h): the keys each query sees as [B, T] tensors (for masks), and
// the chunks of queries those paths process together, each with the keys its rows see, so that
// the GEMMs cover the key tiles inside the ranges and not the whole [T, S] square (a packed
// sequence costs about what its documents cost). Device-agnostic.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "host.h"

namespace dsa {
namespace aten {

// [B, T] int64 tensors on the inputs' device: query (b, t) sees the keys [lo, hi). The tensor form
// of params.h's given_key_range (causal = false) or key_range (causal = true): the given ranges
// clamped to [0, S] (absent: 0 and S), the end cut by the causal bound t + S - T + 1.
struct RowRanges {
  at::Tensor lo, hi;
};
inline RowRanges row_ranges(const IndexerParams& p, const KeyRanges& given, bool causal, const at::Device& device) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  RowRanges r;
  r.lo = given.start.defined() ? given.start.to(at::kLong).clamp(0, p.S) : at::zeros({p.B, p.T}, opts);
  r.hi = given.end.defined() ? given.end.to(at::kLong).clamp(0, p.S) : at::full({p.B, p.T}, p.S, opts);
  if (causal) r.hi = at::minimum(r.hi, (at::arange(p.T, opts) + (p.causal_offset + 1)).view({1, p.T}));
  return r;
}

// Queries [t0, t0 + tc) of every batch row, processed together; s0 <= s1 bound the keys any of
// them sees (s0 = s1 when none sees any).
struct QueryChunk {
  int64_t t0, tc, s0, s1;
};

// Splits the T queries into consecutive chunks of at most max_rows queries. A chunk takes in the
// next query while B * rows * (keys in the chunk's hull) stays within max_pairs (the caller's
// memory budget) and within twice the (query, key) pairs its rows see plus 64 keys per row (so a
// chunk stops at a document boundary instead of paying for the keys between documents). Reads
// the given ranges on the host: one copy from the device (a synchronisation) when ranges are
// given; none otherwise.
inline std::vector<QueryChunk> plan_query_chunks(const IndexerParams& p, const KeyRanges& given, bool causal,
                                                 int64_t max_rows, int64_t max_pairs) {
  const at::Tensor start = given.start.defined() ? given.start.to(at::kCPU).contiguous() : at::Tensor();
  const at::Tensor end = given.end.defined() ? given.end.to(at::kCPU).contiguous() : at::Tensor();
  IndexerParams hp = p;  // key_range on host copies of the ranges
  hp.causal = causal;
  hp.key_start = start.defined() ? start.data_ptr<int32_t>() : nullptr;
  hp.key_end = end.defined() ? end.data_ptr<int32_t>() : nullptr;
  constexpr int64_t kSlackKeys = 64;
  std::vector<QueryChunk> chunks;
  for (int64_t t0 = 0; t0 < p.T;) {
    KeyRange hull{0, 0};
    int64_t tc = 0, seen = 0;
    for (; t0 + tc < p.T && tc < max_rows; ++tc) {
      KeyRange h = hull;
      int64_t row_seen = 0;
      for (int64_t b = 0; b < p.B; ++b) {
        const KeyRange r = key_range(hp, b, t0 + tc);
        if (r.empty()) continue;
        row_seen += r.size();
        h = h.empty() ? r : KeyRange{std::min(h.begin, r.begin), std::max(h.end, r.end)};
      }
      const int64_t pairs = p.B * (tc + 1) * h.size();
      if (tc > 0 && (pairs > max_pairs || pairs > 2 * (seen + row_seen) + p.B * (tc + 1) * kSlackKeys)) break;
      hull = h;
      seen += row_seen;
    }
    chunks.push_back({t0, tc, hull.begin, std::max(hull.begin, hull.end)});
    t0 += tc;
  }
  return chunks;
}

}  // namespace aten
}  // namespace dsa
