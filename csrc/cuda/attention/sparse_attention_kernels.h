// Interface between the CUDA host code of sparse_attention (sparse_attention.cu) and its kernels
// (sparse_attention_mma_fwd.cuh, sparse_attention_mma_bwd.cuh, sparse_attention_rowwise.cuh, each
// launched from its .cu): block shapes and their choice, the shared-memory layout (one function
// used by both sides, so the size the host reserves is the size the kernel carves up), kernel
// arguments and launchers.
//
// Tensor-core path (bfloat16, float16): one block serves `rows` query heads of one token that
// read the same kv head (the heads of a GQA/MQA group), so every gathered key tile is loaded
// into shared memory once and used by all of them. Warps form a grid of row_warps x col_warps:
// row warp r owns the 16 query heads 16r..16r+15, column warp c a slice of the output columns
// (out in the forward, dq in the backward), kept in registers across all key tiles.
// Other dtypes, head dims that are not a multiple of 8, misaligned inputs and shapes whose tiles
// do not fit in shared memory take the simple path: one warp per (token, head), CUDA cores.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cuda/common/ceil_div.cuh"
#include "params.h"

namespace dsa {
namespace cuda {

constexpr int kKeysPerTile = 32;  // keys gathered per tile
constexpr int kMaxPairsFwd = 8;   // 16-wide output column pairs per warp, forward (64 fp32 registers)
constexpr int kMaxPairsBwd = 9;   // dq column pairs per warp, backward (72 registers; 576 = 4 x 144)
constexpr int kMaxWarps = 16;     // 512 threads: kernels are compiled for <= 128 registers
constexpr int kMaxRowWarps = 8;   // at most 128 query heads per block

struct MmaShape {
  int group;            // query heads per kv head (H / Hkv)
  int rows;             // query heads per block, 16 * row_warps (rows >= group are padding)
  int row_warps, col_warps;
  int chunks;           // blocks per (batch, token, kv head): ceil(group / rows)
  int dqk_pad, dv_pad;  // head dims rounded up to 32 (zero-filled in shared memory)
  int pairs_per_warp;   // column pairs per column warp
  int stages;           // key tiles in flight: 2 overlaps the next gather with this tile's math
  bool v_in_k;          // v is a column prefix of k (MLA: v = kv[..., :512]): V tile = K tile
};

__host__ __device__ inline int threads_of(const MmaShape& s) { return 32 * s.row_warps * s.col_warps; }

// Byte offsets into dynamic shared memory. Tile rows are padded by 8 elements (16 bytes) so
// that the 8 row addresses of an ldmatrix fall into distinct bank groups.
struct SmemLayout {
  int q_stride, v_stride;  // elements per shared row of the Q/K and dO/V tiles
  int kv_stride;           // elements per shared row of the V tile (q_stride when v_in_k)
  int p_stride;            // elements per row of the P / dS tiles
  int q, dout, k, v, p, ds, red_max, red_sum, idx, lse, delta;
  int bytes;
};

__host__ __device__ inline int align16(int n) { return (n + 15) & ~15; }

// Hands out consecutive 16-byte aligned regions.
struct SmemCursor {
  int end = 0;
  __host__ __device__ int take(int bytes) {
    const int at = end;
    end += align16(bytes);
    return at;
  }
};

// Forward: Q [rows], K/V tiles [stages][keys], P [rows][keys], per-column-warp row max and sum,
// the tile's key positions. Backward: Q and dO [rows], K/V tiles, P and dS [rows][keys], the
// tile's key positions, per-row lse and delta.
__host__ __device__ inline SmemLayout smem_layout(const MmaShape& s, bool backward) {
  constexpr int kElem = 2;  // bfloat16 / float16
  SmemLayout L{};
  L.q_stride = s.dqk_pad + 8;
  L.v_stride = s.dv_pad + 8;
  L.kv_stride = s.v_in_k ? L.q_stride : L.v_stride;
  L.p_stride = kKeysPerTile + 8;
  SmemCursor c;  // parts a kernel does not use get offset -1
  L.q = c.take(s.rows * L.q_stride * kElem);
  L.dout = backward ? c.take(s.rows * L.v_stride * kElem) : -1;
  L.k = c.take(s.stages * kKeysPerTile * L.q_stride * kElem);
  L.v = s.v_in_k ? L.k : c.take(s.stages * kKeysPerTile * L.v_stride * kElem);
  L.p = c.take(s.rows * L.p_stride * kElem);
  L.ds = backward ? c.take(s.rows * L.p_stride * kElem) : -1;
  L.red_max = backward ? -1 : c.take(s.col_warps * s.rows * 4);
  L.red_sum = backward ? -1 : c.take(s.col_warps * s.rows * 4);
  L.idx = c.take(s.stages * kKeysPerTile * 4);
  L.lse = backward ? c.take(s.rows * 4) : -1;
  L.delta = backward ? c.take(s.rows * 4) : -1;
  L.bytes = c.end;
  return L;
}

__host__ __device__ inline int ceil_div_int(int64_t a, int64_t b) { return static_cast<int>(ceil_div(a, b)); }

// Head dims the tensor-core kernels take: multiples of 8 (rows are gathered in 16-byte pieces)
// and not absurdly large. The host code (sparse_attention.cu) and the emulator's driver both ask.
inline bool mma_head_dims(const SparseAttentionParams& p) {
  return p.Dqk % 8 == 0 && p.Dv % 8 == 0 && p.Dqk <= 4096 && p.Dv <= 4096;
}

// The tensor-core block shape for these dims (16-bit inputs whose rows are 16-byte aligned and
// whose head dims pass mma_head_dims: the caller checks that), or false when none fits in
// smem_limit bytes. Column warps split the out (forward) or dq (backward) columns so that each
// keeps at most kMaxPairs* 16-wide pairs in registers; row warps cover as many heads of the GQA
// group as fit in shared memory, with two stages when they fit. Blocks with fewer than min_warps
// warps (small groups: one row warp) split their columns further, down to one pair per warp, so
// that more warps share the gathers and the math of a tile.
inline bool choose_mma_shape(const SparseAttentionParams& p, bool v_in_k, bool backward, int smem_limit,
                             int min_warps, MmaShape& s) {
  s = MmaShape{};
  if (p.H / p.Hkv > INT32_MAX) return false;  // MmaShape holds the group in int; row-wise indexes heads in int64
  s.group = static_cast<int>(p.H / p.Hkv);
  s.dqk_pad = ceil_div_int(p.Dqk, 32) * 32;
  s.dv_pad = ceil_div_int(p.Dv, 32) * 32;
  s.v_in_k = v_in_k;
  const int pairs = (backward ? s.dqk_pad : s.dv_pad) / 16;
  s.col_warps = ceil_div_int(pairs, backward ? kMaxPairsBwd : kMaxPairsFwd);
  if (s.col_warps > kMaxWarps) return false;
  s.pairs_per_warp = ceil_div_int(pairs, s.col_warps);
  const int most_row_warps = std::min({ceil_div_int(s.group, 16), kMaxRowWarps, kMaxWarps / s.col_warps});
  for (s.row_warps = most_row_warps; s.row_warps >= 1; --s.row_warps) {
    s.rows = 16 * s.row_warps;
    s.chunks = ceil_div_int(s.group, s.rows);
    for (s.stages = 2; s.stages >= 1; --s.stages) {
      if (smem_layout(s, backward).bytes > smem_limit) continue;
      const int want = std::min(pairs, ceil_div_int(min_warps, s.row_warps));
      if (s.col_warps < want) {
        MmaShape wide = s;
        wide.pairs_per_warp = ceil_div_int(pairs, want);
        wide.col_warps = ceil_div_int(pairs, wide.pairs_per_warp);  // no column warp without columns
        if (smem_layout(wide, backward).bytes <= smem_limit) s = wide;
      }
      return true;
    }
  }
  return false;
}

struct FwdArgs {
  SparseAttentionParams p;
  MmaShape s;
  float scale_log2;  // scale * log2(e): scores live in the exp2 domain
  // Split over index slots (attention_splits): block (task, split) reads key tiles
  // split * split_tiles .. + split_tiles - 1 of its row and writes its normalised partial out
  // and lse (float32, [B, T, H, splits, Dv] and [B, T, H, splits]) instead of out and lse;
  // combine_splits_kernel (sparse_attention_split.cuh) then merges them. splits = 1: no partials.
  int splits = 1;
  int split_tiles = 0;
  float* part_out = nullptr;
  float* part_lse = nullptr;
};

// Forward splits over index slots. Decoding (T = 1 .. 4 per sequence) gives B * T * Hkv * chunks
// blocks, MLA at B = 1 just 2, each walking all topk / 32 key tiles while the other SMs idle: the
// slots of a row are then split so that the blocks fill about one wave of sm_count SMs (one
// block per SM: MLA's tiles take most of an SM's shared memory), each split keeping at least
// kMinSplitTiles tiles: a split loads its query rows once and writes H * Dv float32 partials per
// token (MLA: 256 KiB, against 4 tiles' 144 KiB of gathered keys). max_splits caps it (1: no
// split; DSA_EXT_CUDA_ATTN_MAX_SPLITS on a GPU).
constexpr int kMaxAttnSplits = 64;
constexpr int kMinSplitTiles = 4;

struct AttnSplits {
  int splits, split_tiles;
};

inline AttnSplits attention_splits(const SparseAttentionParams& p, const MmaShape& s, int sm_count, int max_splits) {
  const int64_t blocks = p.B * p.T * p.Hkv * s.chunks;
  const int64_t tiles = ceil_div(p.topk, kKeysPerTile);
  const int64_t want = std::min<int64_t>({sm_count / std::max<int64_t>(1, blocks), tiles / kMinSplitTiles,
                                          std::min(max_splits, kMaxAttnSplits)});
  if (want <= 1) return AttnSplits{1, 0};
  const int64_t split_tiles = ceil_div(tiles, want);
  return AttnSplits{static_cast<int>(ceil_div(tiles, split_tiles)), static_cast<int>(split_tiles)};  // no empty split
}

// The merge of the splits' partials: out = sum_i exp(lse_i - lse) out_i, lse = ln sum_i exp(lse_i),
// one warp per (b, t, h) row.
constexpr int kCombineWarps = 4;
struct CombineArgs {
  const float* part_out;  // [rows, splits, Dv]
  const float* part_lse;  // [rows, splits]
  void* out;              // [rows, Dv] in the input dtype
  float* lse;             // [rows]
  int64_t rows, Dv;
  int splits;
};

// dk and dv sum over the queries that chose each key. By default the backward kernels add their
// shares atomically into [B, S, Hkv, D] accumulators (dk_acc, dv_acc). In deterministic mode
// (contrib_k != nullptr) they store the share of every (block or query row, index slot) into its
// own contribution row instead, and the host sums the rows per key in a fixed order
// (sparse_attention.cu): bit-identical on repeat.
struct KeyGradOut {
  void* dk_acc;     // [B, S, Hkv, Dqk] acc_t, zeroed: dk accumulates here (atomics)
  void* dv_acc;     // [B, S, Hkv, Dv] acc_t, zeroed
  void* contrib_k;  // deterministic mode: [contributors, K, Dqk] acc_t, contributor = the tensor-core
                    // block (blockIdx.x) or the row-wise query row; nullptr otherwise
  void* contrib_v;  // [contributors, K, Dv] acc_t
};

struct BwdArgs {
  SparseAttentionBwdParams p;
  MmaShape s;
  float scale_log2;
  const float* delta;  // [B, T, H]: rowsum(dO * O) - grad_lse
  KeyGradOut g;        // float32
};

// Row-wise path (sparse_attention_rowwise.cu): one warp per query row, kRowwiseWarps per block.
// acc_t = double for double inputs, float otherwise.
constexpr int kRowwiseWarps = 4;

// Shared memory of a row-wise block: per warp the query row and the output row (forward), or the
// query row, dq and dO (backward), in acc_t.
__host__ __device__ inline int64_t rowwise_smem_bytes(const SparseAttentionParams& p, int acc_bytes, bool backward) {
  return int64_t{kRowwiseWarps} * acc_bytes * (backward ? 2 * p.Dqk + p.Dv : p.Dqk + p.Dv);
}

// Blocks of a row-wise launch (forward, backward and delta alike): one warp per (b, t, h) row.
inline int64_t rowwise_blocks(const SparseAttentionParams& p) { return ceil_div(p.B * p.T * p.H, kRowwiseWarps); }

struct SimpleBwdArgs {
  SparseAttentionBwdParams p;
  const void* delta;  // [B, T, H] acc_t
  KeyGradOut g;       // acc_t
};

// The launchers, for element type T: __nv_bfloat16 or __half for the tensor-core kernels
// (instantiated in sparse_attention_mma_fwd.cu / _bwd.cu), also float and double for the row-wise
// ones (sparse_attention_rowwise.cu). sparse_attention.cu picks T with DSA_DISPATCH_CUDA. Each
// launcher checks its launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
template <typename T>
void launch_fwd_mma(const FwdArgs& a, cudaStream_t stream);
template <typename T>
void launch_combine_splits(const CombineArgs& a, cudaStream_t stream);
template <typename T>
void launch_fwd_simple(const SparseAttentionParams& p, cudaStream_t stream);
// delta[b,t,h] = sum_d grad_out * out - grad_lse, in acc_t
template <typename T>
void launch_bwd_delta(const SparseAttentionBwdParams& p, void* delta, cudaStream_t stream);
template <typename T>
void launch_bwd_mma(const BwdArgs& a, cudaStream_t stream);
template <typename T>
void launch_bwd_simple(const SimpleBwdArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace dsa
