// Tensor-core forward of sparse_attention (bfloat16 / float16 in, float32 accumulation).
//
// A block serves `rows` query heads of one token that read the same kv head. Per tile of 32
// gathered keys (cp.async, two stages: the next tile's gather overlaps this tile's math):
//   1. S = Q K^T: row warp r, column warp c computes the 16 x 8 score tiles nt = c, c + col_warps, ..
//   2. online softmax in the exp2 domain: row maxima are combined across the column warps
//      through shared memory, P = exp2(S - max) goes to shared memory as 16-bit values
//   3. O += P V: each warp updates its 16 rows x (pairs_per_warp * 16) output columns, which stay
//      in registers for the whole key loop.
// Empty slots (-1, out of range, past K) are masked to -inf; a row that never sees a valid key
// keeps max -inf, sum 0 and gets out 0, lse -inf. Split over index slots (a.splits > 1,
// decoding), a block walks only its split's key tiles and stores float32 partials that
// combine_splits_kernel merges (sparse_attention_split.cuh).
#pragma once

#include <cstdint>

#include "cuda/attention/sparse_attention_tiles.cuh"

namespace dsa {
namespace cuda {

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * 32)
    sparse_attention_fwd_mma_kernel(const __grid_constant__ FwdArgs a) {
  extern __shared__ __align__(16) uint8_t smem[];
  using M = Mma<T>;
  const SparseAttentionParams& p = a.p;
  const MmaShape& s = a.s;
  const SmemLayout L = smem_layout(s, /*backward=*/false);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int rw = warp / s.col_warps, cw = warp % s.col_warps;
  const int grp = lane >> 2, quad = lane & 3;
  const int row_a = rw * 16 + grp;  // this lane's rows: row_a and row_a + 8
  const int split = static_cast<int>(blockIdx.x % a.splits);
  const BlockTask task = block_task(p, s, blockIdx.x / a.splits);

  const T* k_head = static_cast<const T*>(p.k) + task.b * p.k_batch_stride + task.kvh * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + task.b * p.v_batch_stride + task.kvh * p.v_head_stride;
  const int32_t* idx_row = p.indices + task.b * p.idx_batch_stride + task.t * p.idx_row_stride + task.kvh * p.idx_head_stride;

  const uint32_t q_s = smem_addr(smem + L.q), p_s = smem_addr(smem + L.p);
  T* p_tile = reinterpret_cast<T*>(smem + L.p);
  float* red_max = reinterpret_cast<float*>(smem + L.red_max);
  float* red_sum = reinterpret_cast<float*>(smem + L.red_sum);

  for (int r = warp; r < s.rows; r += nwarps)
    copy_row_async(q_s + r * L.q_stride * 2, head_row<T>(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, task, r),
                   static_cast<int>(p.Dqk / 8), s.dqk_pad / 8, static_cast<const T*>(p.q), lane);
  const int all_tiles = static_cast<int>((p.topk + kKeysPerTile - 1) / kKeysPerTile);  // K < 2^31
  const int tile0 = a.splits > 1 ? split * a.split_tiles : 0;  // this block's key tiles: tile0 .. tile_end - 1
  const int tile_end = a.splits > 1 ? min(all_tiles, tile0 + a.split_tiles) : all_tiles;
  issue_key_tile<T>(p, s, L, smem, idx_row, k_head, v_head, tile0, 0);
  cp_async_commit();

  float o[2 * kMaxPairsFwd][4];
  zero_tile<kMaxPairsFwd>(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int pair0 = cw * s.pairs_per_warp;
  const int npairs = min(s.pairs_per_warp, s.dv_pad / 16 - pair0);  // may be <= 0 for the last warps
  // [B, T, H] row of query head head0: the epilogue needs only this, not b, t, head0
  const int64_t out_row0 = (task.b * p.T + task.t) * p.H + task.head0;
  const int rows_valid = task.rows_valid;

  for (int j = tile0; j < tile_end; ++j) {
    const int buf = s.stages == 2 ? ((j - tile0) & 1) : 0;
    cp_async_wait_all();
    __syncthreads();  // tile j (and Q) visible; every warp is done with tile j - 1
    if (s.stages == 2 && j + 1 < tile_end) issue_key_tile<T>(p, s, L, smem, idx_row, k_head, v_head, j + 1, buf ^ 1);
    cp_async_commit();
    const int* idx = reinterpret_cast<const int*>(smem + L.idx) + buf * kKeysPerTile;
    // A tile of empty slots (the -1 padding of short rows) changes nothing; every warp reads the
    // same idx, so all of them skip it together.
    if (__any_sync(0xffffffffu, idx[lane] >= 0)) {
      const uint32_t k_s = smem_addr(smem + L.k) + buf * kKeysPerTile * L.q_stride * 2;
      const uint32_t v_s = smem_addr(smem + L.v) + buf * kKeysPerTile * L.kv_stride * 2;

      // 1. scores of rows rw*16.. against key n-tiles nt = cw + i * col_warps
      float sc[kTileNTiles][4];
#pragma unroll
      for (int i = 0; i < kTileNTiles; ++i) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.f;
      // k steps of 16 with one A fragment live at a time: the 64 output registers leave no room
      // for more
      for (int kk = 0; kk < s.dqk_pad; kk += 16) {
        uint32_t qa[4];
        ldsm_x4(q_s + ((rw * 16 + (lane & 15)) * L.q_stride + kk + (lane >> 4) * 8) * 2, qa);
#pragma unroll
        for (int i = 0; i < kTileNTiles; ++i) {
          const int nt = cw + i * s.col_warps;
          if (nt < kTileNTiles) {
            uint32_t kb[2];
            ldsm_x2(k_s + ((nt * 8 + (lane & 7)) * L.q_stride + kk + ((lane >> 3) & 1) * 8) * 2, kb);
            M::run(sc[i], qa, kb[0], kb[1]);
          }
        }
      }

      // 2. mask empty slots, scale into the exp2 domain, this warp's row maxima
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < kTileNTiles; ++i) {
        const int nt = cw + i * s.col_warps;
        if (nt < kTileNTiles) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool valid = idx[nt * 8 + 2 * quad + (e & 1)] >= 0;
            sc[i][e] = valid ? sc[i][e] * a.scale_log2 : -INFINITY;
            mx[e >> 1] = fmaxf(mx[e >> 1], sc[i][e]);
          }
        }
      }
      mx[0] = quad_max(mx[0]);
      mx[1] = quad_max(mx[1]);
      if (quad == 0) {
        red_max[cw * s.rows + row_a] = mx[0];
        red_max[cw * s.rows + row_a + 8] = mx[1];
      }
      __syncthreads();

      // 3. running max over all column warps; P = exp2(S - max) to shared memory, partial sums
      float base[2], alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m = row_max[h];
        for (int c = 0; c < s.col_warps; ++c) m = fmaxf(m, red_max[c * s.rows + row_a + 8 * h]);
        base[h] = m == -INFINITY ? 0.f : m;  // no valid key yet: exp2(-inf - 0) = 0, never NaN
        alpha[h] = exp2f(row_max[h] - base[h]);
        row_max[h] = m;
      }
      float ps[2] = {0.f, 0.f};
#pragma unroll
      for (int i = 0; i < kTileNTiles; ++i) {
        const int nt = cw + i * s.col_warps;
        if (nt < kTileNTiles) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            sc[i][e] = exp2f(sc[i][e] - base[e >> 1]);
            ps[e >> 1] += sc[i][e];
          }
          const int col = nt * 8 + 2 * quad;
          *reinterpret_cast<uint32_t*>(p_tile + row_a * L.p_stride + col) = M::pack(sc[i][0], sc[i][1]);
          *reinterpret_cast<uint32_t*>(p_tile + (row_a + 8) * L.p_stride + col) = M::pack(sc[i][2], sc[i][3]);
        }
      }
      ps[0] = quad_sum(ps[0]);
      ps[1] = quad_sum(ps[1]);
      if (quad == 0) {
        red_sum[cw * s.rows + row_a] = ps[0];
        red_sum[cw * s.rows + row_a + 8] = ps[1];
      }
      __syncthreads();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_sum = 0.f;
        for (int c = 0; c < s.col_warps; ++c) tile_sum += red_sum[c * s.rows + row_a + 8 * h];
        row_sum[h] = row_sum[h] * alpha[h] + tile_sum;
      }
#pragma unroll
      for (int n = 0; n < 2 * kMaxPairsFwd; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }

      // 4. O += P V over this warp's column pairs
      accumulate_tile_product<T, kMaxPairsFwd>(o, p_s, L.p_stride, v_s, L.kv_stride, rw, pair0, npairs, lane);
    }
    if (s.stages == 1 && j + 1 < tile_end) {
      __syncthreads();  // the single stage is free again
      issue_key_tile<T>(p, s, L, smem, idx_row, k_head, v_head, j + 1, 0);
      cp_async_commit();
    }
  }

  // out = O / sum (0 for a row without valid keys), lse = ln(sum) + max
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row_a + 8 * h;
    if (row >= rows_valid) continue;
    const int64_t out_row = out_row0 + row;
    const float inv = row_sum[h] > 0.f ? 1.f / row_sum[h] : 0.f;
    const float lse = row_sum[h] > 0.f ? (row_max[h] + log2f(row_sum[h])) * kLn2 : -INFINITY;
    if (a.splits > 1) {  // this split's partial row [out_row, split]
      const int64_t part_row = out_row * a.splits + split;
      store_tile_row<float, kMaxPairsFwd>(a.part_out + part_row * p.Dv, o, h, inv, pair0, npairs, p.Dv, quad);
      if (cw == 0 && quad == 0) a.part_lse[part_row] = lse;
    } else {
      store_tile_row<T, kMaxPairsFwd>(static_cast<T*>(p.out) + out_row * p.Dv, o, h, inv, pair0, npairs, p.Dv, quad);
      if (cw == 0 && quad == 0) static_cast<float*>(p.lse)[out_row] = lse;
    }
  }
}

}  // namespace cuda
}  // namespace dsa
