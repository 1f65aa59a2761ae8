// Tensor-core backward of sparse_attention (bfloat16 / float16 in, float32 accumulation).
//
// Same blocks and key tiles as the forward (sparse_attention_mma_fwd.cuh); Q and dO of the block's
// query heads stay in shared memory. Per tile of 32 gathered keys:
//   1. S = Q K^T and dP = dO V^T for this warp's rows and key n-tiles; P = exp2(S - lse) is
//      recomputed from the forward's lse, dS = P (dP - delta) * scale with
//      delta = rowsum(dO * O) - grad_lse (sparse_attention_rowwise.cuh). P and dS go to shared memory.
//   2. dq += dS K: each warp's 16 rows x (pairs_per_warp * 16) columns stay in registers.
//   3. dk += dS^T Q and dv += P^T dO for the tile's 32 keys, in units of 16 keys x 16 columns
//      spread over all warps, added atomically into float32 buffers: a key is chosen by many
//      queries (atomic order makes dk/dv non-deterministic). In deterministic mode the units are
//      stored to the block's own contribution rows instead (KeyGradOut).
// Padding rows and rows without valid keys (lse -inf) get P = 0, hence dS = 0: no contribution.
#pragma once

#include <cstdint>

#include "cuda/attention/sparse_attention_tiles.cuh"

namespace dsa {
namespace cuda {

__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));  // dst is 8-byte aligned: even column
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * 32)
    sparse_attention_bwd_mma_kernel(const __grid_constant__ BwdArgs a) {
  extern __shared__ __align__(16) uint8_t smem[];
  using M = Mma<T>;
  const SparseAttentionParams& p = a.p.fwd;
  const MmaShape& s = a.s;
  const SmemLayout L = smem_layout(s, /*backward=*/true);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int rw = warp / s.col_warps, cw = warp % s.col_warps;
  const int grp = lane >> 2, quad = lane & 3;
  const int row_a = rw * 16 + grp;  // this lane's rows: row_a and row_a + 8
  const BlockTask task = block_task(p, s, blockIdx.x);

  const T* k_head = static_cast<const T*>(p.k) + task.b * p.k_batch_stride + task.kvh * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + task.b * p.v_batch_stride + task.kvh * p.v_head_stride;
  const int32_t* idx_row = p.indices + task.b * p.idx_batch_stride + task.t * p.idx_row_stride + task.kvh * p.idx_head_stride;
  // row of (batch b, key 0, kv head kvh) in [B, S, Hkv, D]: key pos is row kv_row0 + pos * Hkv
  const int64_t kv_row0 = task.b * p.S * p.Hkv + task.kvh;

  const uint32_t q_s = smem_addr(smem + L.q), do_s = smem_addr(smem + L.dout);
  const uint32_t p_s = smem_addr(smem + L.p), ds_s = smem_addr(smem + L.ds);
  T* p_tile = reinterpret_cast<T*>(smem + L.p);
  T* ds_tile = reinterpret_cast<T*>(smem + L.ds);
  float* lse_s = reinterpret_cast<float*>(smem + L.lse);
  float* delta_s = reinterpret_cast<float*>(smem + L.delta);

  for (int r = warp; r < s.rows; r += nwarps) {
    copy_row_async(q_s + r * L.q_stride * 2, head_row<T>(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, task, r),
                   static_cast<int>(p.Dqk / 8), s.dqk_pad / 8, static_cast<const T*>(p.q), lane);
    copy_row_async(do_s + r * L.v_stride * 2,
                   head_row<T>(a.p.grad_out, a.p.do_batch_stride, a.p.do_row_stride, a.p.do_head_stride, task, r),
                   static_cast<int>(p.Dv / 8), s.dv_pad / 8, static_cast<const T*>(a.p.grad_out), lane);
  }
  const int64_t row0 = (task.b * p.T + task.t) * p.H + task.head0;  // [B, T, H] row of head0
  for (int r = threadIdx.x; r < s.rows; r += blockDim.x) {
    // lse in the exp2 domain; +inf for padding rows and rows without valid keys makes P = 0
    float lse2 = INFINITY, delta = 0.f;
    if (r < task.rows_valid) {
      const float lse = static_cast<const float*>(p.lse)[row0 + r];
      if (lse != -INFINITY) {
        lse2 = lse * kLog2e;
        delta = a.delta[row0 + r];
      }
    }
    lse_s[r] = lse2;
    delta_s[r] = delta;
  }
  issue_key_tile<T>(p, s, L, smem, idx_row, k_head, v_head, 0, 0);
  cp_async_commit();

  float dq[2 * kMaxPairsBwd][4];
  zero_tile<kMaxPairsBwd>(dq);
  const int pair0 = cw * s.pairs_per_warp;
  const int npairs = min(s.pairs_per_warp, s.dqk_pad / 16 - pair0);  // may be <= 0 for the last warps
  const int dk_units = 2 * (s.dqk_pad / 16);  // (16-key half, 16 columns) units of dk, then of dv
  const int units = dk_units + 2 * (s.dv_pad / 16);
  const int ntiles = static_cast<int>((p.topk + kKeysPerTile - 1) / kKeysPerTile);  // K < 2^31
  const float scale = p.scale;

  for (int j = 0; j < ntiles; ++j) {
    const int buf = s.stages == 2 ? (j & 1) : 0;
    cp_async_wait_all();
    __syncthreads();  // tile j (Q, dO, lse, delta) visible; every warp is done with tile j - 1
    if (s.stages == 2 && j + 1 < ntiles) issue_key_tile<T>(p, s, L, smem, idx_row, k_head, v_head, j + 1, buf ^ 1);
    cp_async_commit();
    const int* idx = reinterpret_cast<const int*>(smem + L.idx) + buf * kKeysPerTile;
    if (__any_sync(0xffffffffu, idx[lane] >= 0)) {  // same vote in every warp (see the forward)
      const uint32_t k_s = smem_addr(smem + L.k) + buf * kKeysPerTile * L.q_stride * 2;
      const uint32_t v_s = smem_addr(smem + L.v) + buf * kKeysPerTile * L.kv_stride * 2;

      // 1. P and dS of rows rw*16.. and key n-tiles nt = cw + i * col_warps, two at a time
      for (int nt0 = cw; nt0 < kTileNTiles; nt0 += 2 * s.col_warps) {
        const int nts[2] = {nt0, nt0 + s.col_warps};
        const bool two = nts[1] < kTileNTiles;
        float sc[2][4], dp[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) sc[i][e] = dp[i][e] = 0.f;
        for (int kk = 0; kk < s.dqk_pad; kk += 16) {
          uint32_t qa[4];
          ldsm_x4(q_s + ((rw * 16 + (lane & 15)) * L.q_stride + kk + (lane >> 4) * 8) * 2, qa);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            if (i == 0 || two) {
              uint32_t kb[2];
              ldsm_x2(k_s + ((nts[i] * 8 + (lane & 7)) * L.q_stride + kk + ((lane >> 3) & 1) * 8) * 2, kb);
              M::run(sc[i], qa, kb[0], kb[1]);
            }
          }
        }
        for (int kk = 0; kk < s.dv_pad; kk += 16) {
          uint32_t da[4];
          ldsm_x4(do_s + ((rw * 16 + (lane & 15)) * L.v_stride + kk + (lane >> 4) * 8) * 2, da);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            if (i == 0 || two) {
              uint32_t vb[2];
              ldsm_x2(v_s + ((nts[i] * 8 + (lane & 7)) * L.kv_stride + kk + ((lane >> 3) & 1) * 8) * 2, vb);
              M::run(dp[i], da, vb[0], vb[1]);
            }
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          if (i == 0 || two) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int row = row_a + 8 * (e >> 1);
              const bool valid = idx[nts[i] * 8 + 2 * quad + (e & 1)] >= 0;
              const float pv = valid ? exp2f(sc[i][e] * a.scale_log2 - lse_s[row]) : 0.f;
              sc[i][e] = pv;
              dp[i][e] = pv * (dp[i][e] - delta_s[row]) * scale;
            }
            const int col = nts[i] * 8 + 2 * quad;
            *reinterpret_cast<uint32_t*>(p_tile + row_a * L.p_stride + col) = M::pack(sc[i][0], sc[i][1]);
            *reinterpret_cast<uint32_t*>(p_tile + (row_a + 8) * L.p_stride + col) = M::pack(sc[i][2], sc[i][3]);
            *reinterpret_cast<uint32_t*>(ds_tile + row_a * L.p_stride + col) = M::pack(dp[i][0], dp[i][1]);
            *reinterpret_cast<uint32_t*>(ds_tile + (row_a + 8) * L.p_stride + col) = M::pack(dp[i][2], dp[i][3]);
          }
        }
      }
      __syncthreads();  // P and dS of every row visible

      // 2. dq += dS K over this warp's column pairs
      accumulate_tile_product<T, kMaxPairsBwd>(dq, ds_s, L.p_stride, k_s, L.q_stride, rw, pair0, npairs, lane);

      // 3. dk += dS^T Q, dv += P^T dO: unit u = (16 keys mt, 16 columns col0), k dimension = rows.
      //    (16 columns, not more: the 72 dq registers leave no room for a wider accumulator)
      for (int u = warp; u < units; u += nwarps) {
        const bool is_k = u < dk_units;
        const int uu = is_k ? u : u - dk_units;
        const int mt = uu & 1, col0 = (uu >> 1) * 16;
        const uint32_t a_s = is_k ? ds_s : p_s;  // [rows][keys], read transposed
        const uint32_t b_s = is_k ? q_s : do_s;  // [rows][columns]
        const int b_stride = is_k ? L.q_stride : L.v_stride;
        float acc[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
        for (int ks = 0; ks < s.row_warps; ++ks) {
          uint32_t at[4], bt[4];
          ldsm_x4_trans(a_s + ((ks * 16 + (lane >> 4) * 8 + (lane & 7)) * L.p_stride + mt * 16 +
                               ((lane >> 3) & 1) * 8) * 2,
                        at);
          ldsm_x4_trans(b_s + ((ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * b_stride + col0 + (lane >> 4) * 8) * 2,
                        bt);
          M::run(acc[0], at, bt[0], bt[1]);
          M::run(acc[1], at, bt[2], bt[3]);
        }
        const int64_t D = is_k ? p.Dqk : p.Dv;
        float* acc_base = static_cast<float*>(is_k ? a.g.dk_acc : a.g.dv_acc);
        float* contrib = static_cast<float*>(is_k ? a.g.contrib_k : a.g.contrib_v);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int key = mt * 16 + grp + 8 * h;  // within the tile
          const int pos = idx[key];
          if (pos < 0) continue;
          // deterministic mode: this block's own row for index slot j * 32 + key (< K: pos >= 0)
          float* dst = contrib != nullptr ? contrib + (blockIdx.x * p.topk + int64_t{j} * kKeysPerTile + key) * D
                                          : acc_base + (kv_row0 + pos * p.Hkv) * D;
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const int col = col0 + n * 8 + 2 * quad;
            if (col >= D) continue;
            if (contrib != nullptr)
              *reinterpret_cast<float2*>(dst + col) = make_float2(acc[n][2 * h], acc[n][2 * h + 1]);
            else
              atomic_add2(dst + col, acc[n][2 * h], acc[n][2 * h + 1]);
          }
        }
      }
    }
    if (s.stages == 1 && j + 1 < ntiles) {
      __syncthreads();  // the single stage is free again
      issue_key_tile<T>(p, s, L, smem, idx_row, k_head, v_head, j + 1, 0);
      cp_async_commit();
    }
  }

  // dq (the scale is already in dS)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row_a + 8 * h;
    if (row >= task.rows_valid) continue;
    store_tile_row<T, kMaxPairsBwd>(static_cast<T*>(a.p.grad_q) + (row0 + row) * p.Dqk, dq, h, 1.f, pair0, npairs,
                                    p.Dqk, quad);
  }
}

}  // namespace cuda
}  // namespace dsa
