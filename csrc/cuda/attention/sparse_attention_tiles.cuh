// Device helpers shared by the tensor-core forward and backward kernels of sparse_attention:
// which (batch, token, kv head, query heads) a block serves, and the warp-cooperative gathers of
// query rows and of one key tile into shared memory. Every global address is formed only from
// an index that was checked to lie in [0, S); anything else becomes a zero-filled row.
#pragma once

#include "cuda/attention/sparse_attention_kernels.h"
#include "cuda/common/tensor_core.cuh"

namespace dsa {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kTileNTiles = kKeysPerTile / 8;  // 8-key mma n-tiles per key tile
static_assert(kKeysPerTile == 32, "one key per lane: the empty-tile vote reads idx[lane]");

struct BlockTask {
  int64_t b, t;
  int64_t kvh;    // kv head
  int64_t head0;  // first query head of the block
  int rows_valid; // query heads of the block that exist; the rows after them are zero padding
};

// Tasks are numbered ((b * T + t) * Hkv + kvh) * chunks + chunk: the blocks of one token are
// neighbours, so the key rows they share are still in L2. `id` is the block's task number
// (blockIdx.x, or blockIdx.x / splits in a forward split over index slots).
__device__ __forceinline__ BlockTask block_task(const SparseAttentionParams& p, const MmaShape& s, int64_t id) {
  const int chunk = static_cast<int>(id % s.chunks);
  id /= s.chunks;
  BlockTask task;
  task.kvh = id % p.Hkv;
  id /= p.Hkv;
  task.t = id % p.T;
  task.b = id / p.T;
  task.head0 = task.kvh * s.group + static_cast<int64_t>(chunk) * s.rows;
  task.rows_valid = min(s.rows, s.group - chunk * s.rows);
  return task;
}

// One warp copies a row of `real` 16-byte chunks from `src` to shared `dst` and zero-fills it up
// to `total` chunks; src == nullptr (a padding row) gives a row of zeros. `mapped` is any
// mapped global address, passed (never read) for the zero-filled chunks.
template <typename T>
__device__ __forceinline__ void copy_row_async(uint32_t dst, const T* src, int real, int total, const T* mapped,
                                               int lane) {
  for (int c = lane; c < total; c += 32) {
    const bool ok = src != nullptr && c < real;
    cp_async_16(dst + c * 16, ok ? src + c * 8 : mapped, ok);
  }
}

// Issues the gather of key tile `tile` (keys tile*32 .. tile*32+31 of the block's index row) into
// stage `buf`: the key positions (-1 for an empty slot, a position outside [0, S) or a slot past
// K) go to the idx array, the K rows (and V rows unless v_in_k) to the tiles. Warps take rows.
template <typename T>
__device__ __forceinline__ void issue_key_tile(const SparseAttentionParams& p, const MmaShape& s,
                                               const SmemLayout& L, unsigned char* smem, const int32_t* idx_row,
                                               const T* k_head, const T* v_head, int64_t tile, int buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int* idx = reinterpret_cast<int*>(smem + L.idx) + buf * kKeysPerTile;
  const uint32_t k_dst = smem_addr(smem + L.k) + buf * kKeysPerTile * L.q_stride * 2;
  const uint32_t v_dst = smem_addr(smem + L.v) + buf * kKeysPerTile * L.kv_stride * 2;
  const int k_chunks = s.dqk_pad / 8, v_chunks = s.v_in_k ? 0 : s.dv_pad / 8;
  const int k_real = static_cast<int>(p.Dqk / 8), v_real = static_cast<int>(p.Dv / 8);
  const T* k_mapped = static_cast<const T*>(p.k);
  const T* v_mapped = static_cast<const T*>(p.v);
  for (int r = warp; r < kKeysPerTile; r += nwarps) {
    const int64_t slot = tile * kKeysPerTile + r;
    int pos = slot < p.topk ? __ldg(idx_row + slot) : -1;
    if (pos < 0 || pos >= p.S) pos = -1;
    if (lane == 0) idx[r] = pos;
    const T* k_row = pos >= 0 ? k_head + pos * p.k_row_stride : nullptr;
    const T* v_row = pos >= 0 ? v_head + pos * p.v_row_stride : nullptr;
    // the K row's chunks then the V row's: with D = 128 all 32 lanes copy
    for (int c = lane; c < k_chunks + v_chunks; c += 32) {
      if (c < k_chunks) {
        const bool ok = k_row != nullptr && c < k_real;
        cp_async_16(k_dst + (r * L.q_stride + c * 8) * 2, ok ? k_row + c * 8 : k_mapped, ok);
      } else {
        const int cv = c - k_chunks;
        const bool ok = v_row != nullptr && cv < v_real;
        cp_async_16(v_dst + (r * L.kv_stride + cv * 8) * 2, ok ? v_row + cv * 8 : v_mapped, ok);
      }
    }
  }
}

// Row r of the block's query heads in a [B, T, H, D] tensor, nullptr for a padding row.
template <typename T>
__device__ __forceinline__ const T* head_row(const void* base, int64_t sb, int64_t st, int64_t sh,
                                             const BlockTask& task, int r) {
  if (r >= task.rows_valid) return nullptr;
  return static_cast<const T*>(base) + task.b * sb + task.t * st + (task.head0 + r) * sh;
}

// Register tiles of 16 rows x (2 * kMaxPairs) 8-column mma fragments: the forward's O and the
// backward's dq, each warp owning the column pairs pair0 .. pair0 + npairs - 1.
template <int kMaxPairs>
__device__ __forceinline__ void zero_tile(float (&acc)[2 * kMaxPairs][4]) {
#pragma unroll
  for (int n = 0; n < 2 * kMaxPairs; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// acc += A B over one key tile: A = rows rw*16 .. rw*16 + 15 of a [rows][keys] shared tile (P in
// the forward, dS in the backward; a_stride elements per row), B = the tile's keys x this warp's
// columns of a [keys][columns] shared tile (V, or K), read transposed.
template <typename T, int kMaxPairs>
__device__ __forceinline__ void accumulate_tile_product(float (&acc)[2 * kMaxPairs][4], uint32_t a_s, int a_stride,
                                                        uint32_t b_s, int b_stride, int rw, int pair0, int npairs,
                                                        int lane) {
#pragma unroll
  for (int ks = 0; ks < kKeysPerTile / 16; ++ks) {
    uint32_t fa[4];
    ldsm_x4(a_s + ((rw * 16 + (lane & 15)) * a_stride + ks * 16 + (lane >> 4) * 8) * 2, fa);
    const int b_row = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int jp = 0; jp < kMaxPairs; ++jp) {
      if (jp < npairs) {
        uint32_t fb[4];
        ldsm_x4_trans(b_s + (b_row * b_stride + (pair0 + jp) * 16 + (lane >> 4) * 8) * 2, fb);
        Mma<T>::run(acc[2 * jp], fa, fb[0], fb[1]);
        Mma<T>::run(acc[2 * jp + 1], fa, fb[2], fb[3]);
      }
    }
  }
}

// Two adjacent values of an output row: packed in the 16-bit input dtype T, or as float32 (the
// forward's split partials, sparse_attention_split.cuh).
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float a, float b) {
  *reinterpret_cast<uint32_t*>(dst) = Mma<T>::pack(a, b);
}
template <>
__device__ __forceinline__ void store_pair<float>(float* dst, float a, float b) {
  *reinterpret_cast<float2*>(dst) = make_float2(a, b);
}

// Stores this lane's half h (row grp + 8h of the warp's 16) of a register tile, times `scale`,
// into the row `dst` of D elements (T: the input dtype, or float): the lane's two adjacent
// columns of every pair.
template <typename T, int kMaxPairs>
__device__ __forceinline__ void store_tile_row(T* dst, const float (&acc)[2 * kMaxPairs][4], int h, float scale,
                                               int pair0, int npairs, int64_t D, int quad) {
#pragma unroll
  for (int jp = 0; jp < kMaxPairs; ++jp) {
    if (jp < npairs) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int col = (pair0 + jp) * 16 + half * 8 + 2 * quad;
        if (col < D) store_pair(dst + col, acc[2 * jp + half][2 * h] * scale, acc[2 * jp + half][2 * h + 1] * scale);
      }
    }
  }
}

}  // namespace cuda
}  // namespace dsa
