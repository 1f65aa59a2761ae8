// Deterministic block-wide top-k selection, shared by topk_indices and the fused indexer_topk.
//
// Scores become 32-bit keys whose unsigned order is the float order (score_key). A radix select
// over 8-bit digits (most significant first) finds the k-th best key K and how many elements
// equal to K are needed; an ordered pass then emits, in position order, every element with key
// > K and the first `ties` elements with key == K. Ties therefore go to the lower position and
// the output comes out ascending, exactly like the CPU operator; no sort is ever needed.
// Every routine here is called by all threads of the block together (it synchronises).
#pragma once

#include <cstdint>

namespace dsa {
namespace cuda {
namespace indexer {

// Order-preserving key of a float score: a larger score gives a larger unsigned key. -0 and +0
// share a key (they tie, as in the CPU operator's comparisons). NaN and -inf give 0, which
// marks "never selectable"; every other score has a key >= 1. Integer-only: exact under
// --use_fast_math (no denormal flush in a comparison).
__device__ __forceinline__ uint32_t score_key(float x) {
  uint32_t bits = __float_as_uint(x);
  const uint32_t mag = bits & 0x7fffffffu;
  if (mag > 0x7f800000u || bits == 0xff800000u) return 0u;  // NaN, -inf
  if (mag == 0u) bits = 0u;                                 // -0 -> +0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Outcome of a selection: take every key > kth, plus the first `ties` keys == kth in position
// order; `count` elements in all (min(k, selectable)). kth == 0, ties == 0 takes every
// selectable element (there were at most k of them).
struct Threshold {
  uint32_t kth;
  int ties;
  int count;
};

// One element handed to the ordered pass: its key and what gets written for it (a position).
struct Keyed {
  uint32_t key;
  int32_t payload;
};

template <int kThreads>
struct SelectShared {
  static_assert(kThreads % 32 == 0 && kThreads >= 64 && kThreads <= 1024, "block of whole warps");
  int hist[256];
  uint32_t warp_sums[2][kThreads / 32];  // double-buffered: one barrier per scan
  int digit, need, total, gathered;
};

namespace detail {

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// Warp 0 only: finds the digit d whose bin holds the `need`-th largest key of the histogram
// (bins above d hold fewer than `need`, bins from d up hold at least `need`); stores d, the
// number still needed inside bin d, and the histogram total.
template <int kThreads>
__device__ void find_digit(SelectShared<kThreads>& sh, int need) {
  const int lane = lane_id();
  int h[8];
  int local = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    h[i] = sh.hist[8 * lane + i];
    local += h[i];
  }
  int suffix = local;  // keys in bins >= 8 * lane
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_down_sync(0xffffffffu, suffix, off);
    if (lane + off < 32) suffix += v;
  }
  if (lane == 0) sh.total = suffix;
  int above = suffix - local;  // keys in bins >= 8 * lane + 8
  if (above < need && need <= suffix) {
#pragma unroll
    for (int i = 7; i >= 0; --i) {
      if (above + h[i] >= need) {
        sh.digit = 8 * lane + i;
        sh.need = need - above;
        break;
      }
      above += h[i];
    }
  }
}

// Exclusive block-wide prefix sum of `v`; `total` receives the sum over the block. `round`
// alternates the scratch buffer so that one barrier suffices per call.
template <int kThreads>
__device__ uint32_t block_exclusive_sum(uint32_t v, SelectShared<kThreads>& sh, int round, uint32_t& total) {
  const int lane = lane_id(), warp = threadIdx.x >> 5;
  uint32_t inclusive = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t u = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += u;
  }
  uint32_t* sums = sh.warp_sums[round & 1];
  if (lane == 31) sums[warp] = inclusive;
  __syncthreads();
  uint32_t before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    const uint32_t s = sums[w];
    before += w < warp ? s : 0u;
    all += s;
  }
  total = all;
  return before + inclusive - v;
}

}  // namespace detail

// Threshold of the k best among n keys, key_at(i) for i in [0, n) (any order, read repeatedly).
// When `cand` is given, the keys that can still decide the threshold are gathered into it
// (shared memory, capacity cand_cap) as soon as they fit, and later passes read only those.
template <int kThreads, class KeyAt>
__device__ Threshold radix_select(const KeyAt& key_at, int n, int k, SelectShared<kThreads>& sh,
                                  uint32_t* cand = nullptr, int cand_cap = 0) {
  uint32_t prefix = 0;  // the kth key's digits found so far
  int need = k;         // how many keys of the current prefix group still belong to the top k
  int src_n = n;
  bool from_cand = false;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) sh.hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < src_n; i += kThreads) {
      const uint32_t key = from_cand ? cand[i] : key_at(i);
      if (key != 0u && (shift == 24 || (key >> (shift + 8)) == prefix)) atomicAdd(&sh.hist[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) detail::find_digit(sh, need);
    __syncthreads();
    if (shift == 24 && sh.total <= k) {
      const int total = sh.total;
      __syncthreads();  // sh is reused by the caller's next step
      return Threshold{0u, 0, total};
    }
    const int digit = sh.digit;
    const int in_group = sh.hist[digit];
    need = sh.need;
    prefix = (prefix << 8) | static_cast<uint32_t>(digit);
    __syncthreads();  // everyone has read sh before the next pass clears it
    if (shift > 0 && !from_cand && cand != nullptr && in_group <= cand_cap) {
      // Unordered warp-aggregated append of the keys of the new prefix group.
      if (threadIdx.x == 0) sh.gathered = 0;
      __syncthreads();
      const int lane = detail::lane_id();
      for (int base = 0; base < n; base += kThreads) {
        const int i = base + static_cast<int>(threadIdx.x);
        const uint32_t key = i < n ? key_at(i) : 0u;
        const bool match = key != 0u && (key >> shift) == prefix;
        const uint32_t ballot = __ballot_sync(0xffffffffu, match);
        int slot = 0;
        if (lane == 0 && ballot != 0u) slot = atomicAdd(&sh.gathered, __popc(ballot));
        slot = __shfl_sync(0xffffffffu, slot, 0);
        if (match) cand[slot + __popc(ballot & ((1u << lane) - 1u))] = key;
      }
      __syncthreads();
      from_cand = true;
      src_n = in_group;
    }
  }
  return Threshold{prefix, need, k};
}

// The ordered pass: visits elements 0..n-1 in order (load(i) -> Keyed) and calls
// emit(slot, element) for each selected one, slot = its rank among the selected (so slots come
// out in position order). Stops early once all th.count elements are out. Every element of a
// round is loaded before any is emitted, and an element never moves to a higher index, so
// emit may compact the loaded sequence in place.
template <int kThreads, int kItems, class Load, class Emit>
__device__ void emit_selected(const Load& load, int n, const Threshold& th, const Emit& emit,
                              SelectShared<kThreads>& sh) {
  static_assert(kThreads * kItems < 65536, "per-round counts are packed into 16 bits");
  int gt_run = 0, eq_run = 0;  // keys > kth and == kth seen before this round
  for (int base = 0, round = 0; base < n && gt_run + min(eq_run, th.ties) < th.count;
       base += kThreads * kItems, ++round) {
    Keyed item[kItems];
    bool gt[kItems], eq[kItems];
    uint32_t mine = 0;  // (eq count << 16) | gt count of this thread's items
    const int first = base + static_cast<int>(threadIdx.x) * kItems;
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      item[u] = first + u < n ? load(first + u) : Keyed{0u, -1};
      gt[u] = item[u].key > th.kth;
      eq[u] = item[u].key == th.kth && item[u].key != 0u;
      mine += (eq[u] ? 0x10000u : 0u) + (gt[u] ? 1u : 0u);
    }
    uint32_t total;
    const uint32_t before = detail::block_exclusive_sum(mine, sh, round, total);
    int gt_before = gt_run + static_cast<int>(before & 0xffffu);
    int eq_before = eq_run + static_cast<int>(before >> 16);
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      if (gt[u]) {
        emit(gt_before + min(eq_before, th.ties), item[u]);
        ++gt_before;
      } else if (eq[u]) {
        if (eq_before < th.ties) emit(gt_before + eq_before, item[u]);
        ++eq_before;
      }
    }
    gt_run += static_cast<int>(total & 0xffffu);
    eq_run += static_cast<int>(total >> 16);
  }
  __syncthreads();  // emitted data and sh are visible / free for whatever follows
}

}  // namespace indexer
}  // namespace cuda
}  // namespace dsa
