// Sums that many work items add into (dk and dv of sparse attention, dk_idx of the KL loss),
// bit-identical for any number of threads. The items are cut into a fixed number of chunks
// chosen from the problem alone (fixed_chunks, never the thread count); chunk c adds its
// items, in item order, into a buffer that starts at zero, and
//   out = ((c_0 + c_1) + c_2) + ...   element by element, in chunk order.
// Chunks run in waves of P = min(threads, chunks), one buffer each (memory: P copies of out,
// not one per chunk, each zeroed by the thread that first fills it); after a wave its buffers
// are added into out in chunk order, then zeroed, over the range each chunk reached only.
// Chunk 0 accumulates into out directly (out starts at zero and a sum that starts at +0 is
// never -0, so 0 + c_0 == c_0 bit for bit): one chunk costs no buffer and no fold.
#pragma once

#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace dsa::cpu {

// A chunk's reach in its buffer: it added into elements [lo, hi) only.
struct Reach {
  int64_t lo = 0, hi = 0;
};

// The number of chunks for items that gather `work` rows in all and fold `fold_rows` rows per
// chunk (the buffer rows a chunk reaches): at most kMaxChunks (the parallelism of the sum) and
// few enough that the folds, one streaming pass per chunk over its rows, stay a small share of
// the random row traffic of the work (kWorkPerFold gathered rows per folded row).
inline int64_t fixed_chunks(int64_t items, int64_t work, int64_t fold_rows) {
  constexpr int64_t kMaxChunks = 64, kWorkPerFold = 16;
  const int64_t by_cost = work / std::max<int64_t>(1, kWorkPerFold * fold_rows);
  return std::clamp<int64_t>(std::min(by_cost, kMaxChunks), 1, std::max<int64_t>(1, items));
}

// out[0:size] (zeroed by the caller) = the chunk-ordered sum of compute(c, buffer) over
// c < chunks, where compute adds chunk c's contributions into the zeroed buffer and returns
// their Reach.
template <typename acc_t, typename Compute>
void chunked_sum(int64_t chunks, int64_t size, acc_t* out, const Compute& compute) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t P = std::clamp<int64_t>(at::get_num_threads(), 1, chunks);
  std::vector<std::vector<acc_t>> buffers(P);
  std::vector<Reach> reach(P);
  for (int64_t first = 0; first < chunks; first += P) {
    const int64_t n = std::min(P, chunks - first);
    auto buffer = [&](int64_t i) { return first + i == 0 ? out : buffers[i].data(); };
    parallel_items(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (first + i > 0 && buffers[i].empty()) buffers[i].assign(size, acc_t(0));
        reach[i] = compute(first + i, buffer(i));
      }
    });
    // fold: each element takes the wave's chunks in order; threads split the elements
    parallel_items(0, size, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = first == 0 ? 1 : 0; i < n; ++i) {
        acc_t* buf = buffer(i);
        const int64_t lo = std::max(b, reach[i].lo), hi = std::min(e, reach[i].hi);
        if (lo >= hi) continue;
        at::vec::map2([](Vec o, Vec x) { return o + x; }, out + lo, out + lo, buf + lo, hi - lo);
        std::fill(buf + lo, buf + hi, acc_t(0));
      }
    });
  }
}

}  // namespace dsa::cpu
