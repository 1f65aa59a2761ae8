// Indexer score tiles on the GPU, shared by indexer_logits and the fused indexer_topk so that
// both produce bit-identical scores (the fused top-k then equals topk_indices(indexer_logits)).
//
// A block of kThreads threads scores kQueries queries against tiles of kKeys keys:
//   scores[qi][s] = scale * sum_j w[t0+qi, j] * relu(q_idx[t0+qi, j] . k_idx[s0+s])
// written to a float [kQueries][kKeys] array in shared memory, unmasked (callers apply the
// causal mask and the end of the key range; keys past S score on zero rows).
//
// With FP8 inputs every score is also multiplied by its key's scale (p.k_scale), after the head sum.
//
// Two engines with one interface:
//   MmaTile<T> (bfloat16, float16; float8 e4m3 on sm_89+ with m16n8k32): tensor cores (mma.sync,
//     fp32 accumulation). The block's queries (all Hi heads, zero-padded to 16) stay in shared
//     memory; key tiles are double-buffered with cp.async. Warp w computes query w/2 against keys 32*(w%2)..+31: the
//     dot products of up to 64 heads at a time sit in registers, ReLU and the weighted head sum
//     happen there, and a butterfly over the 8 lanes that share a column finishes the sum.
//   SimtTile (float32): CUDA cores, chunks of 16 heads x 64 dims through shared memory; every
//     shape fits. bfloat16/float16 shapes too large for the tensor-core path are converted to
//     float32 on the host and take this engine.
// Kernels walk the key tiles with for_each_score_tile (end of this file), the same loop for both
// engines: load the queries and the first key tile, then per tile start the next tile's loads,
// score this one into shared memory and hand it to the kernel.
#pragma once

#include <cstdint>

#include "cuda/common/device_types.cuh"
#include "params.h"
#include "cuda/common/tensor_core.cuh"

namespace dsa {
namespace cuda {
namespace indexer {

constexpr int kQueries = 2;   // queries per block
constexpr int kKeys = 64;     // keys per tile
constexpr int kThreads = 128;
constexpr int kTileBlocksPerSm = 3;  // register budget of the tile kernels: <= 170 per thread
constexpr int kMaxMmaDim = 256;  // largest (padded) head dim of the tensor-core path

__host__ __device__ inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Consecutive 16-byte aligned regions of dynamic shared memory.
struct SmemPlan {
  int end = 0;
  __host__ __device__ int take(int bytes) {
    const int at = end;
    end += round_up(bytes, 16);
    return at;
  }
};

__device__ __forceinline__ float relu(float x) { return x < 0.f ? 0.f : x; }  // NaN stays NaN

// Row pointers into the indexer inputs.
__device__ __forceinline__ int64_t q_row(const IndexerParams& p, int64_t b, int64_t t, int64_t j) {
  return b * p.q_batch_stride + t * p.q_row_stride + j * p.q_head_stride;
}
__device__ __forceinline__ int64_t k_row(const IndexerParams& p, int64_t b, int64_t s) {
  return b * p.k_batch_stride + s * p.k_row_stride;
}

// ------------------------------------------------------------------------------------------
// Tensor-core engine
// ------------------------------------------------------------------------------------------

struct MmaLayout {
  int hp, dp, ld;  // heads rounded up to 16, head dim to one mma k-step; shared row stride (elements)
  bool vec16;      // rows can be copied in 16-byte pieces (16-byte Di, aligned strides and pointers)
  int q, k, k_stage, w, scores, bytes;  // byte offsets into dynamic shared memory (key stage i at
                                        // k + i * k_stage), total size
};

// The score of a key in the epilogue: times its FP8 scale when there is one (keys past S: 0).
__device__ __forceinline__ float key_scaled(const IndexerParams& p, int64_t b, int64_t s, float score) {
  if (p.k_scale == nullptr) return score;
  return s < p.S ? score * p.k_scale[b * p.S + s] : 0.f;
}

template <typename T>
struct MmaTile {
  // Elements per 16-bit fragment slot: ldmatrix and the mma fragments count 16-bit units, and an
  // e4m3 slot holds two consecutive values along the head dim (cuda/common/tensor_core.cuh). One mma k-step
  // is 16 * kPack elements, one 16-byte row piece 8 * kPack.
  static constexpr int kPack = 2 / static_cast<int>(sizeof(T));

  static MmaLayout layout(const IndexerParams& p, bool vec16) {
    MmaLayout L{};
    L.hp = round_up(static_cast<int>(p.Hi), 16);
    L.dp = round_up(static_cast<int>(p.Di), 16 * kPack);
    L.ld = L.dp + 8 * kPack;  // 16 bytes of padding: the 8 rows of an ldmatrix hit distinct banks
    L.vec16 = vec16;
    SmemPlan s;
    L.q = s.take(kQueries * L.hp * L.ld * static_cast<int>(sizeof(T)));
    L.k_stage = kKeys * L.ld * static_cast<int>(sizeof(T));  // a multiple of 16
    L.k = s.take(2 * L.k_stage);
    L.w = s.take(kQueries * L.hp * static_cast<int>(sizeof(float)));
    L.scores = s.take(kQueries * kKeys * static_cast<int>(sizeof(float)));
    L.bytes = s.end;
    return L;
  }

  const IndexerParams& p;  // the kernel's __grid_constant__ parameters
  const MmaLayout& L;
  uint8_t* smem;
  int64_t b, t0;

  __device__ T* q_s() const { return reinterpret_cast<T*>(smem + L.q); }
  __device__ T* k_s(int stage) const { return reinterpret_cast<T*>(smem + L.k + stage * L.k_stage); }
  __device__ float* w_s() const { return reinterpret_cast<float*>(smem + L.w); }

  // rows x dp elements into shared rows of stride ld; row_src(r) is the global offset of row r
  // or -1 for a zero row; columns past Di are zero.
  template <class RowSrc>
  __device__ void copy_rows(T* dst, const T* base, int rows, const RowSrc& row_src) const {
    const int Di = static_cast<int>(p.Di);
    if (L.vec16) {
      const int chunks = L.dp / (8 * kPack);
      for (int c = threadIdx.x; c < rows * chunks; c += kThreads) {
        const int r = c / chunks, col = (c % chunks) * 8 * kPack;
        const int64_t off = row_src(r);
        const bool valid = off >= 0 && col < Di;
        cp_async_16(smem_addr(dst + r * L.ld + col), valid ? base + off + col : base, valid);
      }
    } else {
      for (int e = threadIdx.x; e < rows * L.dp; e += kThreads) {
        const int r = e / L.dp, col = e % L.dp;
        const int64_t off = row_src(r);
        dst[r * L.ld + col] = off >= 0 && col < Di ? base[off + col] : from_float<T>(0.f);
      }
    }
  }

  // The block's queries (async) and their head weights (plain stores).
  __device__ void load_queries() const {
    const T* q = static_cast<const T*>(p.q);
    const int hp = L.hp;
    copy_rows(q_s(), q, kQueries * hp, [&](int r) -> int64_t {
      const int64_t t = t0 + r / hp, j = r % hp;
      return t < p.T && j < p.Hi ? q_row(p, b, t, j) : -1;
    });
    const float* w = static_cast<const float*>(p.w);
    for (int r = threadIdx.x; r < kQueries * hp; r += kThreads) {
      const int64_t t = t0 + r / hp, j = r % hp;
      w_s()[r] = t < p.T && j < p.Hi ? w[(b * p.T + t) * p.Hi + j] : 0.f;
    }
  }

  // Keys s0 .. s0 + kKeys - 1 into stage `stage` (async); keys >= S are zero rows.
  __device__ void load_keys(int stage, int64_t s0) const {
    copy_rows(k_s(stage), static_cast<const T*>(p.k), kKeys,
              [&](int r) -> int64_t { return s0 + r < p.S ? k_row(p, b, s0 + r) : -1; });
  }

  __device__ void score(int stage, int64_t s0, float* out) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int qi = warp >> 1, key0 = (warp & 1) * 32;
    const int grp = lane >> 2, quad = lane & 3;
    const T* qs = q_s() + qi * L.hp * L.ld;
    const T* ks = k_s(stage) + key0 * L.ld;
    const float* w = w_s() + qi * L.hp;
    // ldmatrix row addresses: A (16 heads x one k-step) and B (2 x 8 keys x one k-step) per x4 load.
    const int a_row = lane & 15, a_col = (lane >> 4) * 8 * kPack;
    const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8 * kPack;

    float part[4][2] = {};  // this lane's share of the head sum for its 8 key columns
    for (int h0 = 0; h0 < L.hp; h0 += 64) {
      const int mtiles = min(4, (L.hp - h0) / 16);
      float acc[4][4][4] = {};
      const auto k_step = [&](int d0) {
        uint32_t a[4][4], bk[2][4];
#pragma unroll
        for (int m = 0; m < 4; ++m)
          if (m < mtiles) ldsm_x4(smem_addr(qs + (h0 + 16 * m + a_row) * L.ld + d0 + a_col), a[m]);
#pragma unroll
        for (int np = 0; np < 2; ++np) ldsm_x4(smem_addr(ks + (16 * np + b_row) * L.ld + d0 + b_col), bk[np]);
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          if (m >= mtiles) continue;
#pragma unroll
          for (int n = 0; n < 4; ++n) Mma<T>::run(acc[m][n], a[m], bk[n >> 1][(n & 1) * 2], bk[n >> 1][(n & 1) * 2 + 1]);
        }
      };
      if constexpr (kPack == 2) {
        // e4m3: not unrolled; unrolling made ptxas spill at the 168-register budget (sm_90)
#pragma unroll 1
        for (int d0 = 0; d0 < L.dp; d0 += 16 * kPack) k_step(d0);
      } else {
        for (int d0 = 0; d0 < L.dp; d0 += 16 * kPack) k_step(d0);
      }
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        if (m >= mtiles) continue;
        const float w_lo = w[h0 + 16 * m + grp], w_hi = w[h0 + 16 * m + grp + 8];
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            part[n][e] = fmaf(w_lo, relu(acc[m][n][e]), part[n][e]);
            part[n][e] = fmaf(w_hi, relu(acc[m][n][2 + e]), part[n][e]);
          }
      }
    }
    // Sum over the 8 lanes (heads grp, grp + 8 of every m-tile) holding the same columns.
    const float scale = static_cast<float>(p.scale);
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = part[n][e];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        const int key = key0 + 8 * n + 2 * quad + e;
        if (grp == 0) out[qi * kKeys + key] = key_scaled(p, b, s0 + key, v * scale);
      }
  }
};

// ------------------------------------------------------------------------------------------
// CUDA-core engine (float32)
// ------------------------------------------------------------------------------------------

constexpr int kSimtHeads = 16;  // heads per chunk (16 accumulators per thread)
constexpr int kSimtDims = 64;   // head dims per chunk

struct SimtLayout {
  int q, k, scores, bytes;
};

struct SimtTile {
  static SimtLayout layout(const IndexerParams&, bool) {
    SimtLayout L{};
    SmemPlan s;
    L.q = s.take(kQueries * kSimtDims * kSimtHeads * static_cast<int>(sizeof(float)));  // [qi][d][j]
    L.k = s.take(kKeys * (kSimtDims + 1) * static_cast<int>(sizeof(float)));            // [s][d], +1 pad
    L.scores = s.take(kQueries * kKeys * static_cast<int>(sizeof(float)));
    L.bytes = s.end;
    return L;
  }

  const IndexerParams& p;
  const SimtLayout& L;
  uint8_t* smem;
  int64_t b, t0;

  __device__ void load_queries() const {}
  __device__ void load_keys(int, int64_t) const {}

  // Thread (qi, s) = (tid / 64, tid % 64) accumulates 16 heads of query qi against key s per
  // chunk; queries come in as broadcasts, keys from a padded (conflict-free) shared row.
  __device__ void score(int, int64_t s0, float* out) const {
    static_assert(kThreads == kQueries * kKeys, "one thread per (query, key) pair");
    float* qc = reinterpret_cast<float*>(smem + L.q);
    float* kc = reinterpret_cast<float*>(smem + L.k);
    const float* q = static_cast<const float*>(p.q);
    const float* kg = static_cast<const float*>(p.k);
    const float* w = static_cast<const float*>(p.w);
    const int qi = threadIdx.x / kKeys, s = threadIdx.x % kKeys;
    const int64_t t = t0 + qi;
    float total = 0.f;
    for (int64_t h0 = 0; h0 < p.Hi; h0 += kSimtHeads) {
      float acc[kSimtHeads] = {};
      for (int64_t d0 = 0; d0 < p.Di; d0 += kSimtDims) {
        __syncthreads();  // the previous chunk has been consumed
        for (int e = threadIdx.x; e < kQueries * kSimtHeads * kSimtDims; e += kThreads) {
          const int qq = e / (kSimtHeads * kSimtDims), j = (e / kSimtDims) % kSimtHeads, d = e % kSimtDims;
          const int64_t tt = t0 + qq, jj = h0 + j, dd = d0 + d;
          qc[(qq * kSimtDims + d) * kSimtHeads + j] =
              tt < p.T && jj < p.Hi && dd < p.Di ? q[q_row(p, b, tt, jj) + dd] : 0.f;
        }
        for (int e = threadIdx.x; e < kKeys * kSimtDims; e += kThreads) {
          const int r = e / kSimtDims, d = e % kSimtDims;
          const int64_t ss = s0 + r, dd = d0 + d;
          kc[r * (kSimtDims + 1) + d] = ss < p.S && dd < p.Di ? kg[k_row(p, b, ss) + dd] : 0.f;
        }
        __syncthreads();
        const float* qrow = qc + qi * kSimtDims * kSimtHeads;
        const float* krow = kc + s * (kSimtDims + 1);
#pragma unroll 4
        for (int d = 0; d < kSimtDims; ++d) {
          const float kv = krow[d];
          const float4* qv = reinterpret_cast<const float4*>(qrow + d * kSimtHeads);
#pragma unroll
          for (int j4 = 0; j4 < kSimtHeads / 4; ++j4) {
            const float4 x = qv[j4];
            acc[4 * j4 + 0] = fmaf(x.x, kv, acc[4 * j4 + 0]);
            acc[4 * j4 + 1] = fmaf(x.y, kv, acc[4 * j4 + 1]);
            acc[4 * j4 + 2] = fmaf(x.z, kv, acc[4 * j4 + 2]);
            acc[4 * j4 + 3] = fmaf(x.w, kv, acc[4 * j4 + 3]);
          }
        }
      }
      if (t < p.T) {
#pragma unroll
        for (int j = 0; j < kSimtHeads; ++j)
          if (h0 + j < p.Hi) total = fmaf(w[(b * p.T + t) * p.Hi + h0 + j], relu(acc[j]), total);
      }
    }
    out[qi * kKeys + s] = key_scaled(p, b, s0 + s, total * static_cast<float>(p.scale));
  }
};

// ------------------------------------------------------------------------------------------
// The key-tile loop of the score kernels
// ------------------------------------------------------------------------------------------

// Scores `tiles` key tiles from s_begin (tile i: keys s_begin + i * kKeys ..) into `scores`
// ([kQueries][kKeys] floats in shared memory) and calls consume(i, s0) for each, when every
// thread's scores are visible. The next tile's loads overlap this tile's math (two key stages);
// consume may read `scores` and use barriers of its own, and the loop's barrier before the next
// tile's scoring keeps them from racing.
template <class Tile, class Consume>
__device__ __forceinline__ void for_each_score_tile(const Tile& tile, int64_t s_begin, int tiles, float* scores,
                                                    const Consume& consume) {
  if (tiles > 0) {
    tile.load_queries();
    tile.load_keys(0, s_begin);
    cp_async_commit();
  }
  for (int i = 0; i < tiles; ++i) {
    const int64_t s0 = s_begin + int64_t{i} * kKeys;
    cp_async_wait_all();
    __syncthreads();  // tile i has landed; every thread is done with tile i - 1's buffers
    if (i + 1 < tiles) {
      tile.load_keys((i + 1) & 1, s0 + kKeys);
      cp_async_commit();
    }
    tile.score(i & 1, s0, scores);
    __syncthreads();
    consume(i, s0);
  }
}

// ------------------------------------------------------------------------------------------
// Host side: which engine a call takes
// ------------------------------------------------------------------------------------------

// A block's static shared memory (the selection scratch of the fused top-k and of
// select_rows_kernel, about 1 KiB) counts against the same per-block limit as the dynamic
// tiles: the host leaves this much of the limit to it (indexer_cuda.h).
constexpr int kStaticSmemReserve = 4096;

// 16-byte cp.async needs 16-byte aligned rows: Di and every row stride a multiple of 16 bytes.
inline bool rows_16b_aligned(const IndexerParams& p, int elem_bytes) {
  const int64_t n = 16 / elem_bytes;
  const auto ok = [n](int64_t stride) { return stride % n == 0; };
  return p.Di % n == 0 && ok(p.q_batch_stride) && ok(p.q_row_stride) && ok(p.q_head_stride) && ok(p.k_batch_stride) && ok(p.k_row_stride) &&
         reinterpret_cast<uintptr_t>(p.q) % 16 == 0 && reinterpret_cast<uintptr_t>(p.k) % 16 == 0;
}

// bfloat16/float16/e4m3 take the tensor cores when the padded head dim and the block's shared
// memory fit; otherwise their inputs are converted to float32 for the CUDA-core engine.
template <typename T>
bool mma_fits(const IndexerParams& p, int max_smem) {
  // int64 comparisons first: layout() narrows Hi and Di to int (Di = 2^32 + 8 would pass as 8)
  if (p.Hi > 1024 || p.Di > kMaxMmaDim) return false;
  const auto L = MmaTile<T>::layout(p, false);
  return L.dp <= kMaxMmaDim && L.bytes <= max_smem;
}

}  // namespace indexer
}  // namespace cuda
}  // namespace dsa
