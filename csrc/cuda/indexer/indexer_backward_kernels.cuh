// indexer_logits_backward on tensor cores (bfloat16, float16; padded head dim <= 128).
//
// With d[t,j,s] = q[t,j] . k[s] and m = (s visible to t) and (d > 0):
//   dw[t,j] = scale * sum_s g[t,s] m d[t,j,s]
//   dq[t,j] = scale * w[t,j] * sum_s (g[t,s] m) k[s]
//   dk[s]   = sum_{t,j} (g[t,s] m scale w[t,j]) q[t,j]
// Rows are (query, head) pairs with heads padded to hp = 16 * ceil(Hi / 16); an "m-tile" is 16
// rows of one query. Two kernels, each output element has exactly one writer (deterministic):
//   dq/dw: warp = one m-tile, keys streamed in tiles of 64: d recomputed in registers (mma),
//          turned into g*m in the registers that feed the second mma (the accumulator layout of
//          two n-tiles is the A-fragment layout of one k-step), dq accumulated over all keys.
//   dk:    block = 64 keys (warp = 16 of them), tiles of 4 m-tiles (64 rows) streamed, the same
//          recompute with keys as rows, dk accumulated over every query that sees the keys.
// The multiplier of the second mma (g*m, or g*m*scale*w) is rounded to the input dtype, as in
// any half-precision backward; the first mma and every sum are fp32.
#pragma once

#include <cstdint>

#include "cuda/indexer/indexer_logits_kernels.cuh"
#include "cuda/indexer/indexer_tile.cuh"

namespace dsa {
namespace cuda {
namespace indexer {

constexpr int kBwdMaxDim = 128;  // padded head dim: 16 n-tiles of fp32 accumulators per thread
constexpr int kBwdRows = 64;     // rows (4 m-tiles) per tile
constexpr int kBwdKeys = 64;     // keys per tile

struct BwdLayout {
  int hp, dp, ld;  // as in MmaLayout
  bool vec16;
  int fixed, tile, tile_stage, w, w_stage, bytes;  // byte offsets: the resident 64 rows, the two
                                                   // streamed tiles, their head weights (dk only)
};

template <typename T>
BwdLayout bwd_layout(const IndexerParams& p, bool vec16) {
  BwdLayout L{};
  L.hp = round_up(static_cast<int>(p.Hi), 16);
  L.dp = round_up(static_cast<int>(p.Di), 16);
  L.ld = L.dp + 8;
  L.vec16 = vec16;
  SmemPlan s;
  const int rows_bytes = 64 * L.ld * static_cast<int>(sizeof(T));
  L.fixed = s.take(rows_bytes);
  L.tile_stage = rows_bytes;
  L.tile = s.take(2 * rows_bytes);
  L.w_stage = kBwdRows * static_cast<int>(sizeof(float));
  L.w = s.take(2 * L.w_stage);
  L.bytes = s.end;
  return L;
}

inline bool bwd_mma_fits(const IndexerParams& p, int max_smem) {
  // int64 comparisons first: bwd_layout narrows Hi and Di to int
  return p.Hi <= 1024 && p.Di <= kBwdMaxDim && round_up(static_cast<int>(p.Di), 16) <= kBwdMaxDim &&
         bwd_layout<__half>(p, false).bytes <= max_smem;
}

struct IndexerBwdGrid {
  int64_t mtiles;        // per batch: T * hp / 16
  int64_t dq_blocks;     // B * ceil(mtiles / 4)
  int64_t dk_blocks;     // B * ceil(S / 64)
};
inline IndexerBwdGrid bwd_grid(const IndexerParams& p) {
  IndexerBwdGrid g;
  g.mtiles = p.T * (round_up(static_cast<int>(p.Hi), 16) / 16);
  g.dq_blocks = p.B * ceil_div(g.mtiles, 4);
  g.dk_blocks = p.B * ceil_div(p.S, kBwdKeys);
  return g;
}

// 64 rows of dp elements into shared rows of stride ld (row_src(r): global offset or -1 for a
// zero row; columns past Di are zero). Async when the rows allow 16-byte copies.
template <typename T, class RowSrc>
__device__ void copy_rows64(const BwdLayout& L, const IndexerParams& p, T* dst, const T* base, const RowSrc& row_src) {
  const int Di = static_cast<int>(p.Di);
  if (L.vec16) {
    const int chunks = L.dp / 8;
    for (int c = threadIdx.x; c < 64 * chunks; c += kThreads) {
      const int r = c / chunks, col = (c % chunks) * 8;
      const int64_t off = row_src(r);
      const bool valid = off >= 0 && col < Di;
      cp_async_16(smem_addr(dst + r * L.ld + col), valid ? base + off + col : base, valid);
    }
  } else {
    for (int e = threadIdx.x; e < 64 * L.dp; e += kThreads) {
      const int r = e / L.dp, col = e % L.dp;
      const int64_t off = row_src(r);
      dst[r * L.ld + col] = off >= 0 && col < Di ? base[off + col] : from_float<T>(0.f);
    }
  }
}

// acc[16 rows x 64 cols] = A[16 rows, dp] . B[64 rows, dp]^T, both row-major in shared memory.
template <typename T>
__device__ __forceinline__ void mma_rows_x64(const BwdLayout& L, const T* a_rows, const T* b_rows, float (&acc)[8][4]) {
  const int lane = threadIdx.x & 31;
  const int a_row = lane & 15, a_col = (lane >> 4) * 8;
  const int b_row = (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  for (int d0 = 0; d0 < L.dp; d0 += 16) {
    uint32_t a[4];
    ldsm_x4(smem_addr(a_rows + a_row * L.ld + d0 + a_col), a);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t bk[4];
      ldsm_x4(smem_addr(b_rows + (16 * np + b_row) * L.ld + d0 + b_col), bk);
      Mma<T>::run(acc[2 * np], a, bk[0], bk[1]);
      Mma<T>::run(acc[2 * np + 1], a, bk[2], bk[3]);
    }
  }
}

// out[16 x dp] += P[16 x 64] . V[64 rows, dp] with P given as the fp32 accumulators of
// mma_rows_x64 (already transformed) and V row-major in shared memory.
template <typename T>
__device__ __forceinline__ void mma_p_times_rows(const BwdLayout& L, const float (&pacc)[8][4], const T* v_rows,
                                                 float (&out)[kBwdMaxDim / 8][4]) {
  const int lane = threadIdx.x & 31;
  const int t_row = lane & 15, t_col = (lane >> 4) * 8;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    uint32_t a[4];
    a[0] = Mma<T>::pack(pacc[2 * kk][0], pacc[2 * kk][1]);
    a[1] = Mma<T>::pack(pacc[2 * kk][2], pacc[2 * kk][3]);
    a[2] = Mma<T>::pack(pacc[2 * kk + 1][0], pacc[2 * kk + 1][1]);
    a[3] = Mma<T>::pack(pacc[2 * kk + 1][2], pacc[2 * kk + 1][3]);
#pragma unroll
    for (int nd = 0; nd < kBwdMaxDim / 16; ++nd) {
      if (16 * nd >= L.dp) break;
      uint32_t bt[4];
      ldsm_x4_trans(smem_addr(v_rows + (16 * kk + t_row) * L.ld + 16 * nd + t_col), bt);
      Mma<T>::run(out[2 * nd], a, bt[0], bt[1]);
      Mma<T>::run(out[2 * nd + 1], a, bt[2], bt[3]);
    }
  }
}

// dq and dw. Block = 4 consecutive m-tiles of one batch (warp w: m-tile 4 * block + w).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    indexer_dq_kernel(const __grid_constant__ IndexerBwdParams bp, const BwdLayout L, const IndexerBwdGrid grid) {
  extern __shared__ __align__(16) uint8_t smem[];
  const IndexerParams& p = bp.fwd;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int grp = lane >> 2, quad = lane & 3;
  const int mq = L.hp / 16;  // m-tiles per query
  const int64_t blocks_per_batch = ceil_div(grid.mtiles, 4);
  const int64_t b = blockIdx.x / blocks_per_batch;
  const int64_t mt0 = (blockIdx.x % blocks_per_batch) * 4;
  const int64_t mt = mt0 + warp;
  const bool warp_valid = mt < grid.mtiles;
  const int64_t t = warp_valid ? mt / mq : 0;
  const int j0 = static_cast<int>(mt % mq) * 16;  // first head of this warp's rows
  const int64_t t_last = (min(mt0 + 4, grid.mtiles) - 1) / mq;
  const int64_t s_stop = min(p.S, visible_keys(p, t_last));  // keys any row of the block sees
  const int64_t my_stop = warp_valid ? min(p.S, visible_keys(p, t)) : 0;
  const int tiles = static_cast<int>(ceil_div(s_stop, kBwdKeys));

  T* q_s = reinterpret_cast<T*>(smem + L.fixed);
  const auto k_s = [&](int stage) { return reinterpret_cast<T*>(smem + L.tile + stage * L.tile_stage); };
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  copy_rows64(L, p, q_s, q, [&](int r) -> int64_t {
    const int64_t m = mt0 + r / 16;
    const int64_t tt = m / mq, j = (m % mq) * 16 + r % 16;
    return m < grid.mtiles && j < p.Hi ? tt * p.q_row_stride + j * p.q_head_stride + b * p.q_batch_stride : -1;
  });
  const auto load_keys = [&](int stage, int64_t s0) {
    copy_rows64(L, p, k_s(stage), k, [&](int r) -> int64_t { return s0 + r < p.S ? b * p.k_batch_stride + (s0 + r) * p.k_row_stride : -1; });
  };
  if (tiles > 0) load_keys(0, 0);
  cp_async_commit();

  const float* g = static_cast<const float*>(bp.grad_logits) + b * bp.grad_batch_stride + t * bp.grad_row_stride;
  float dq[kBwdMaxDim / 8][4] = {};
  float dw_lo = 0.f, dw_hi = 0.f;
  for (int i = 0; i < tiles; ++i) {
    const int64_t s0 = int64_t{i} * kBwdKeys;
    cp_async_wait_all();
    __syncthreads();
    if (i + 1 < tiles) {
      load_keys((i + 1) & 1, s0 + kBwdKeys);
      cp_async_commit();
    }
    if (s0 >= my_stop) continue;  // warp-uniform: nothing of this tile is visible to the warp
    float d[8][4];
    mma_rows_x64(L, q_s + warp * 16 * L.ld, k_s(i & 1), d);
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t s = s0 + 8 * n + 2 * quad + e;
        const bool visible = s < my_stop;
        const float gs = visible ? __ldg(g + s) : 0.f;
        const bool on_lo = visible && d[n][e] > 0.f, on_hi = visible && d[n][2 + e] > 0.f;
        dw_lo += on_lo ? gs * d[n][e] : 0.f;
        dw_hi += on_hi ? gs * d[n][2 + e] : 0.f;
        d[n][e] = on_lo ? gs : 0.f;
        d[n][2 + e] = on_hi ? gs : 0.f;
      }
    mma_p_times_rows(L, d, k_s(i & 1), dq);
  }
  cp_async_wait_all();      // nothing may still be landing when the block exits
  if (!warp_valid) return;  // no barrier follows

  const float scale = static_cast<float>(p.scale);
  const float* w = static_cast<const float*>(p.w) + (b * p.T + t) * p.Hi;
  T* gq = static_cast<T*>(bp.grad_q) + (b * p.T + t) * p.Hi * p.Di;
  float* gw = static_cast<float*>(bp.grad_w) + (b * p.T + t) * p.Hi;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int j = j0 + grp + 8 * h;
    if (j >= p.Hi) continue;
    const float f = scale * w[j];
#pragma unroll
    for (int n = 0; n < kBwdMaxDim / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int dcol = 8 * n + 2 * quad + e;
        if (dcol < p.Di) gq[j * p.Di + dcol] = from_float<T>(f * dq[n][2 * h + e]);
      }
  }
  dw_lo += __shfl_xor_sync(0xffffffffu, dw_lo, 1);
  dw_lo += __shfl_xor_sync(0xffffffffu, dw_lo, 2);
  dw_hi += __shfl_xor_sync(0xffffffffu, dw_hi, 1);
  dw_hi += __shfl_xor_sync(0xffffffffu, dw_hi, 2);
  if (quad == 0) {
    if (j0 + grp < p.Hi) gw[j0 + grp] = scale * dw_lo;
    if (j0 + grp + 8 < p.Hi) gw[j0 + grp + 8] = scale * dw_hi;
  }
}

// dk. Block = 64 keys of one batch (warp w: keys 16w..16w+15), tiles of 4 m-tiles streamed from
// the first query that sees the block's first key.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    indexer_dk_kernel(const __grid_constant__ IndexerBwdParams bp, const BwdLayout L, const IndexerBwdGrid grid) {
  extern __shared__ __align__(16) uint8_t smem[];
  const IndexerParams& p = bp.fwd;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int grp = lane >> 2, quad = lane & 3;
  const int mq = L.hp / 16;
  const int64_t blocks_per_batch = ceil_div(p.S, kBwdKeys);
  const int64_t b = blockIdx.x / blocks_per_batch;
  const int64_t s0 = (blockIdx.x % blocks_per_batch) * kBwdKeys;
  const int64_t s_warp = s0 + 16 * warp;                    // the warp's first key
  const int64_t t_first = p.causal ? max(int64_t{0}, s0 - p.causal_offset) : 0;
  const int64_t mt_first = t_first * mq;
  const int tiles = mt_first < grid.mtiles ? static_cast<int>(ceil_div(grid.mtiles - mt_first, 4)) : 0;

  T* k_s = reinterpret_cast<T*>(smem + L.fixed);
  const auto q_s = [&](int stage) { return reinterpret_cast<T*>(smem + L.tile + stage * L.tile_stage); };
  const auto w_s = [&](int stage) { return reinterpret_cast<float*>(smem + L.w + stage * L.w_stage); };
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const float* w = static_cast<const float*>(p.w);
  copy_rows64(L, p, k_s, k, [&](int r) -> int64_t { return s0 + r < p.S ? b * p.k_batch_stride + (s0 + r) * p.k_row_stride : -1; });
  const auto load_rows = [&](int stage, int64_t m_begin) {  // rows of m-tiles m_begin..m_begin+3
    copy_rows64(L, p, q_s(stage), q, [&](int r) -> int64_t {
      const int64_t m = m_begin + r / 16;
      const int64_t tt = m / mq, j = (m % mq) * 16 + r % 16;
      return m < grid.mtiles && j < p.Hi ? b * p.q_batch_stride + tt * p.q_row_stride + j * p.q_head_stride : -1;
    });
    for (int r = threadIdx.x; r < kBwdRows; r += kThreads) {
      const int64_t m = m_begin + r / 16;
      const int64_t tt = m / mq, j = (m % mq) * 16 + r % 16;
      w_s(stage)[r] = m < grid.mtiles && j < p.Hi ? w[(b * p.T + tt) * p.Hi + j] : 0.f;
    }
  };
  if (tiles > 0) load_rows(0, mt_first);
  cp_async_commit();

  const float scale = static_cast<float>(p.scale);
  const float* g = static_cast<const float*>(bp.grad_logits) + b * bp.grad_batch_stride;
  float dk[kBwdMaxDim / 8][4] = {};
  for (int i = 0; i < tiles; ++i) {
    const int64_t m_begin = mt_first + int64_t{i} * 4;
    cp_async_wait_all();
    __syncthreads();
    if (i + 1 < tiles) {
      load_rows((i + 1) & 1, m_begin + 4);
      cp_async_commit();
    }
    // Warp-uniform skip: the warp's keys are past S, or no query of the tile sees them.
    const int64_t t_tile_last = (min(m_begin + 4, grid.mtiles) - 1) / mq;
    if (s_warp >= p.S || s_warp >= visible_keys(p, t_tile_last)) continue;
    float d[8][4];
    mma_rows_x64(L, k_s + warp * 16 * L.ld, q_s(i & 1), d);
    const float* ws = w_s(i & 1);
#pragma unroll
    for (int mm = 0; mm < 4; ++mm) {  // m-tile mm of the tile = n-tiles 2mm, 2mm + 1
      const int64_t m = m_begin + mm;
      const int64_t tt = m / mq;
      const int64_t visible = m < grid.mtiles ? min(p.S, visible_keys(p, tt)) : 0;
      const int64_t s_lo = s_warp + grp, s_hi = s_lo + 8;
      const float g_lo = s_lo < visible ? __ldg(g + tt * bp.grad_row_stride + s_lo) * scale : 0.f;
      const float g_hi = s_hi < visible ? __ldg(g + tt * bp.grad_row_stride + s_hi) * scale : 0.f;
#pragma unroll
      for (int nn = 0; nn < 2; ++nn)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float wr = ws[16 * mm + 8 * nn + 2 * quad + e];
          float& lo = d[2 * mm + nn][e];
          float& hi = d[2 * mm + nn][2 + e];
          lo = s_lo < visible && lo > 0.f ? g_lo * wr : 0.f;
          hi = s_hi < visible && hi > 0.f ? g_hi * wr : 0.f;
        }
    }
    mma_p_times_rows(L, d, q_s(i & 1), dk);
  }
  cp_async_wait_all();

  T* gk = static_cast<T*>(bp.grad_k) + b * p.S * p.Di;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t s = s_warp + grp + 8 * h;
    if (s >= p.S) continue;
#pragma unroll
    for (int n = 0; n < kBwdMaxDim / 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int dcol = 8 * n + 2 * quad + e;
        if (dcol < p.Di) gk[s * p.Di + dcol] = from_float<T>(dk[n][2 * h + e]);
      }
  }
}

}  // namespace indexer
}  // namespace cuda
}  // namespace dsa
