// Row-wise kernels of sparse_attention: one warp per (batch, token, query head) row, CUDA cores.
//   - the forward and backward for float32 and float64, and for 16-bit inputs the tensor-core
//     kernels cannot take (head dims not a multiple of 8, rows not 16-byte aligned, tiles too big
//     for shared memory); accumulation in float32 (float64 for float64)
//   - the backward's delta = rowsum(grad_out * out) - grad_lse, for both paths.
// Lanes own the head-dim elements d = lane + 32 i; keys are taken four at a time so that four
// gathered rows are in flight. Out-of-range index entries are skipped, never read.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/attention/sparse_attention_kernels.h"

namespace dsa {
namespace cuda {
namespace rowwise {

constexpr int kKeyBatch = 4;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ void store(__nv_bfloat16* dst, float x) { *dst = __float2bfloat16(x); }
__device__ __forceinline__ void store(__half* dst, float x) { *dst = __float2half(x); }
__device__ __forceinline__ void store(float* dst, float x) { *dst = x; }
__device__ __forceinline__ void store(double* dst, double x) { *dst = x; }

// --use_fast_math turns expf/logf into approximations whose error grows with |x|; this is the
// float32 path, held to float32 accuracy, so it exponentiates in double (fast math leaves double alone).
__device__ __forceinline__ float exp_acc(float x) { return static_cast<float>(exp(static_cast<double>(x))); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return static_cast<float>(log(static_cast<double>(x))); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// Butterfly sum: every lane ends with the same value (each step adds the same two numbers).
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

// The query row this warp serves; false when the warp is past the last row.
struct RowTask {
  int64_t row, b, t, h, kvh;
};
__device__ __forceinline__ bool row_task(const SparseAttentionParams& p, RowTask& r) {
  r.row = static_cast<int64_t>(blockIdx.x) * kRowwiseWarps + (threadIdx.x >> 5);
  if (r.row >= p.B * p.T * p.H) return false;
  r.h = r.row % p.H;
  r.t = (r.row / p.H) % p.T;
  r.b = r.row / (p.H * p.T);
  r.kvh = r.h / (p.H / p.Hkv);
  return true;
}

// Index slots i0 .. i0 + kKeyBatch - 1 of the row: a position in [0, S), or -1.
__device__ __forceinline__ void load_positions(const SparseAttentionParams& p, const int32_t* idx_row, int64_t i0,
                                               int (&pos)[kKeyBatch]) {
#pragma unroll
  for (int u = 0; u < kKeyBatch; ++u) {
    const int v = i0 + u < p.topk ? __ldg(idx_row + i0 + u) : -1;
    pos[u] = v >= 0 && v < p.S ? v : -1;
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowwiseWarps * 32) rowwise_fwd_kernel(const __grid_constant__ SparseAttentionParams p) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31;
  RowTask r;
  if (!row_task(p, r)) return;  // no block-wide barriers below
  const int Dqk = static_cast<int>(p.Dqk), Dv = static_cast<int>(p.Dv);
  Acc* q_s = reinterpret_cast<Acc*>(smem) + (threadIdx.x >> 5) * (Dqk + Dv);
  Acc* o_s = q_s + Dqk;
  const T* q = static_cast<const T*>(p.q) + r.b * p.q_batch_stride + r.t * p.q_row_stride + r.h * p.q_head_stride;
  const T* k_head = static_cast<const T*>(p.k) + r.b * p.k_batch_stride + r.kvh * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + r.b * p.v_batch_stride + r.kvh * p.v_head_stride;
  const int32_t* idx_row = p.indices + r.b * p.idx_batch_stride + r.t * p.idx_row_stride + r.kvh * p.idx_head_stride;
  for (int d = lane; d < Dqk; d += 32) q_s[d] = to_acc(q[d]);
  for (int d = lane; d < Dv; d += 32) o_s[d] = 0;
  const Acc scale = p.scale;

  Acc m = -INFINITY, l = 0;
  for (int64_t i0 = 0; i0 < p.topk; i0 += kKeyBatch) {
    int pos[kKeyBatch];
    load_positions(p, idx_row, i0, pos);
    Acc dot[kKeyBatch] = {};
    for (int d = lane; d < Dqk; d += 32) {
      const Acc qd = q_s[d];
#pragma unroll
      for (int u = 0; u < kKeyBatch; ++u)
        if (pos[u] >= 0) dot[u] += qd * to_acc(k_head[pos[u] * p.k_row_stride + d]);
    }
    Acc m_new = m;
#pragma unroll
    for (int u = 0; u < kKeyBatch; ++u) {
      dot[u] = warp_sum(dot[u]) * scale;
      if (pos[u] >= 0) m_new = fmax(m_new, dot[u]);
    }
    if (m_new == -INFINITY) continue;  // no valid key yet (the same on every lane)
    const Acc alpha = exp_acc(m - m_new);  // 0 while m is -inf
    Acc e[kKeyBatch];
    l *= alpha;
#pragma unroll
    for (int u = 0; u < kKeyBatch; ++u) {
      e[u] = pos[u] >= 0 ? exp_acc(dot[u] - m_new) : Acc(0);
      l += e[u];
    }
    for (int d = lane; d < Dv; d += 32) {
      Acc o = o_s[d] * alpha;
#pragma unroll
      for (int u = 0; u < kKeyBatch; ++u)
        if (pos[u] >= 0) o += e[u] * to_acc(v_head[pos[u] * p.v_row_stride + d]);
      o_s[d] = o;
    }
    m = m_new;
  }

  const Acc inv = l > 0 ? Acc(1) / l : Acc(0);
  T* out = static_cast<T*>(p.out) + r.row * p.Dv;
  for (int d = lane; d < Dv; d += 32) store(out + d, o_s[d] * inv);
  if (lane == 0) static_cast<Acc*>(p.lse)[r.row] = l > 0 ? m + log_acc(l) : Acc(-INFINITY);
}

template <typename T>
__global__ void __launch_bounds__(kRowwiseWarps * 32) rowwise_bwd_kernel(const __grid_constant__ SimpleBwdArgs a) {
  using Acc = typename AccOf<T>::type;
  extern __shared__ __align__(16) uint8_t smem[];
  const SparseAttentionParams& p = a.p.fwd;
  const int lane = threadIdx.x & 31;
  RowTask r;
  if (!row_task(p, r)) return;  // no block-wide barriers below
  const int Dqk = static_cast<int>(p.Dqk), Dv = static_cast<int>(p.Dv);
  Acc* q_s = reinterpret_cast<Acc*>(smem) + (threadIdx.x >> 5) * (2 * Dqk + Dv);
  Acc* dq_s = q_s + Dqk;
  Acc* do_s = dq_s + Dqk;
  const T* q = static_cast<const T*>(p.q) + r.b * p.q_batch_stride + r.t * p.q_row_stride + r.h * p.q_head_stride;
  const T* dout = static_cast<const T*>(a.p.grad_out) + r.b * a.p.do_batch_stride + r.t * a.p.do_row_stride + r.h * a.p.do_head_stride;
  const T* k_head = static_cast<const T*>(p.k) + r.b * p.k_batch_stride + r.kvh * p.k_head_stride;
  const T* v_head = static_cast<const T*>(p.v) + r.b * p.v_batch_stride + r.kvh * p.v_head_stride;
  const int32_t* idx_row = p.indices + r.b * p.idx_batch_stride + r.t * p.idx_row_stride + r.kvh * p.idx_head_stride;
  // [B, S, Hkv, D] accumulators: key pos of this batch and kv head is row kv_row0 + pos * Hkv
  const int64_t kv_row0 = r.b * p.S * p.Hkv + r.kvh;
  Acc* dk = static_cast<Acc*>(a.g.dk_acc);
  Acc* dv = static_cast<Acc*>(a.g.dv_acc);
  // deterministic mode: this row's own contribution rows, one per index slot (KeyGradOut)
  Acc* contrib_k = static_cast<Acc*>(a.g.contrib_k);
  Acc* contrib_v = static_cast<Acc*>(a.g.contrib_v);
  for (int d = lane; d < Dqk; d += 32) {
    q_s[d] = to_acc(q[d]);
    dq_s[d] = 0;
  }
  for (int d = lane; d < Dv; d += 32) do_s[d] = to_acc(dout[d]);
  const Acc scale = p.scale;
  const Acc lse = static_cast<const Acc*>(p.lse)[r.row];
  const Acc delta = static_cast<const Acc*>(a.delta)[r.row];

  // a row without valid keys (lse -inf) has P = 0: no gradient anywhere
  for (int64_t i0 = 0; lse != -INFINITY && i0 < p.topk; i0 += kKeyBatch) {
    int pos[kKeyBatch];
    load_positions(p, idx_row, i0, pos);
    Acc dot[kKeyBatch] = {}, dp[kKeyBatch] = {};
    for (int d = lane; d < Dqk; d += 32) {
      const Acc qd = q_s[d];
#pragma unroll
      for (int u = 0; u < kKeyBatch; ++u)
        if (pos[u] >= 0) dot[u] += qd * to_acc(k_head[pos[u] * p.k_row_stride + d]);
    }
    for (int d = lane; d < Dv; d += 32) {
      const Acc gd = do_s[d];
#pragma unroll
      for (int u = 0; u < kKeyBatch; ++u)
        if (pos[u] >= 0) dp[u] += gd * to_acc(v_head[pos[u] * p.v_row_stride + d]);
    }
#pragma unroll
    for (int u = 0; u < kKeyBatch; ++u) {
      dot[u] = warp_sum(dot[u]);
      dp[u] = warp_sum(dp[u]);
      if (pos[u] < 0) continue;
      const Acc prob = exp_acc(dot[u] * scale - lse);
      const Acc ds = prob * (dp[u] - delta) * scale;  // d loss / d (q . k)
      const T* k_row = k_head + pos[u] * p.k_row_stride;
      for (int d = lane; d < Dqk; d += 32) dq_s[d] += ds * to_acc(k_row[d]);
      if (contrib_k != nullptr) {
        Acc* dk_row = contrib_k + (r.row * p.topk + i0 + u) * p.Dqk;
        Acc* dv_row = contrib_v + (r.row * p.topk + i0 + u) * p.Dv;
        for (int d = lane; d < Dqk; d += 32) dk_row[d] = ds * q_s[d];
        for (int d = lane; d < Dv; d += 32) dv_row[d] = prob * do_s[d];
      } else {
        Acc* dk_row = dk + (kv_row0 + pos[u] * p.Hkv) * p.Dqk;
        Acc* dv_row = dv + (kv_row0 + pos[u] * p.Hkv) * p.Dv;
        for (int d = lane; d < Dqk; d += 32) atomicAdd(dk_row + d, ds * q_s[d]);
        for (int d = lane; d < Dv; d += 32) atomicAdd(dv_row + d, prob * do_s[d]);
      }
    }
  }
  T* gq = static_cast<T*>(a.p.grad_q) + r.row * p.Dqk;
  for (int d = lane; d < Dqk; d += 32) store(gq + d, dq_s[d]);
}

template <typename T>
__global__ void __launch_bounds__(kRowwiseWarps * 32)
    delta_kernel(const __grid_constant__ SparseAttentionBwdParams a, typename AccOf<T>::type* delta) {
  using Acc = typename AccOf<T>::type;
  const SparseAttentionParams& p = a.fwd;
  const int lane = threadIdx.x & 31;
  RowTask r;
  if (!row_task(p, r)) return;
  const T* out = static_cast<const T*>(p.out) + r.row * p.Dv;  // contiguous [B, T, H, Dv]
  const T* dout = static_cast<const T*>(a.grad_out) + r.b * a.do_batch_stride + r.t * a.do_row_stride + r.h * a.do_head_stride;
  Acc sum = 0;
  for (int64_t d = lane; d < p.Dv; d += 32) sum += to_acc(dout[d]) * to_acc(out[d]);
  sum = warp_sum(sum);
  if (lane == 0) delta[r.row] = sum - (a.grad_lse != nullptr ? static_cast<const Acc*>(a.grad_lse)[r.row] : Acc(0));
}

}  // namespace rowwise
}  // namespace cuda
}  // namespace dsa
