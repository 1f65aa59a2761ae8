// indexer_logits forward kernel: every block scores kQueries queries against a chunk of
// kChunkTiles key tiles and writes those logits (fp32, -inf where masked). Only the tiles between
// the first and the last key its queries see (their key ranges cut by the causal mask:
// key_range_hull) are scored; the rest of the chunk is filled with -inf without any arithmetic.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda/common/ceil_div.cuh"
#include "cuda/indexer/indexer_tile.cuh"

namespace dsa {
namespace cuda {
namespace indexer {

constexpr int kChunkTiles = 8;  // key tiles per block: the query tile is loaded once per 512 keys

// Grid of the forward: blocks = B * q_tiles * k_chunks, k_chunks fastest.
struct LogitsGrid {
  int64_t q_tiles, k_chunks, blocks;
};
inline LogitsGrid logits_grid(const IndexerParams& p) {
  LogitsGrid g;
  g.q_tiles = ceil_div(p.T, kQueries);
  g.k_chunks = ceil_div(p.S, int64_t{kKeys} * kChunkTiles);
  g.blocks = p.B * g.q_tiles * g.k_chunks;
  return g;
}

template <class Tile, class Layout>
__global__ void __launch_bounds__(kThreads, kTileBlocksPerSm)
    indexer_logits_kernel(const __grid_constant__ IndexerParams p, const Layout L, const LogitsGrid grid,
                          float* __restrict__ logits) {
  extern __shared__ __align__(16) uint8_t smem[];
  int64_t item = blockIdx.x;
  const int64_t chunk = item % grid.k_chunks;
  item /= grid.k_chunks;
  const int64_t t0 = (item % grid.q_tiles) * kQueries, b = item / grid.q_tiles;
  const int64_t s_begin = chunk * kKeys * kChunkTiles;
  const int64_t s_end = min(p.S, s_begin + int64_t{kKeys} * kChunkTiles);
  // Keys outside [s_lo, s_hi) are masked for every query of the block.
  const KeyRange hull = key_range_hull(p, b, t0, min(int64_t{kQueries}, p.T - t0));
  const int64_t s_lo = max(s_begin, hull.begin), s_hi = min(s_end, hull.end);
  const int tiles = s_hi > s_lo ? static_cast<int>(ceil_div(s_hi - s_lo, kKeys)) : 0;
  float* scores = reinterpret_cast<float*>(smem + L.scores);
  const Tile tile{p, L, smem, b, t0};

  for_each_score_tile(tile, s_lo, tiles, scores, [&](int, int64_t s0) {
    for (int e = threadIdx.x; e < kQueries * kKeys; e += kThreads) {
      const int64_t t = t0 + e / kKeys, s = s0 + e % kKeys;
      if (t >= p.T || s >= s_end) continue;
      const KeyRange r = key_range(p, b, t);
      logits[(b * p.T + t) * p.S + s] = s >= r.begin && s < r.end ? scores[e] : -INFINITY;
    }
  });
  // the chunk's keys before and after the scored tiles
  const int64_t scored_begin = tiles > 0 ? s_lo : s_begin;
  const int64_t scored_end = tiles > 0 ? min(s_end, s_lo + int64_t{tiles} * kKeys) : s_begin;
  const int64_t before = scored_begin - s_begin, width = before + (s_end - scored_end);
  for (int64_t e = threadIdx.x; e < kQueries * width; e += kThreads) {
    const int64_t t = t0 + e / width, i = e % width;
    const int64_t s = i < before ? s_begin + i : scored_end + (i - before);
    if (t < p.T) logits[(b * p.T + t) * p.S + s] = -INFINITY;
  }
}

}  // namespace indexer
}  // namespace cuda
}  // namespace dsa
