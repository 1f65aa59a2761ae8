// Tiled indexer scores on the CPU, shared by indexer_logits (forward, backward), indexer_topk and
// the indexer KL loss. A tile is a block of tq queries (all Hi heads) against ns keys: the
// head dot products come from a register-tiled micro-kernel (attention_tiles.h) over rows
// converted to acc_t (for bfloat16 inputs on CPUs with AVX512-BF16: from vdpbf16ps over the rows
// as stored, bf16_tiles.h), the ReLU and the weighted head sum run in the epilogue. Nothing larger
// than a tile is ever materialised. No BLAS call: the tiles run inside at::parallel_for, where
// MKL would open a nested thread team per call (measured: 2 threads 100x slower than 1).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "../params.h"
#include "attention_tiles.h"
#include "bf16_tiles.h"
#include "vec_math.h"

namespace dsa::cpu {

constexpr int64_t kQueryBlock = 16;  // queries per tile (x Hi GEMM rows)
constexpr int64_t kKeyBlock = 256;   // keys per tile

// Per-thread scratch for one tile, reused across tiles.
template <typename scalar_t>
struct IndexerTile {
  using acc_t = acc_type<scalar_t>;
  const IndexerParams& p;
  std::vector<acc_t> q;     // [m, Di]: tq * Hi query rows, then zero rows up to m
  std::vector<acc_t> k;     // [ns, Di]
  std::vector<acc_t> dots;  // [m, ns]
  std::vector<const acc_t*> k_rows;  // k_rows[s] = k + s * Di
  const bool bf16 = bf16::use_tiles<scalar_t>();
  std::vector<scalar_t> q16;              // bf16 tiles: q's rows as stored, [m, Di], pad rows 0
  std::vector<const scalar_t*> k16_rows;  // bf16 tiles: the keys' rows where they are stored
  const float* key_scale = nullptr;  // the loaded keys' scales (p.k_scale), or nullptr
  int64_t tq = 0, ns = 0;
  int64_t m = 0;  // tq * Hi rounded up to the micro-kernel's kHeadTile (kQueryBlock * Hi is a multiple)

  explicit IndexerTile(const IndexerParams& params)
      : p(params),
        q(kQueryBlock * params.Hi * params.Di),
        k(kKeyBlock * params.Di),
        dots(kQueryBlock * params.Hi * kKeyBlock),
        k_rows(kKeyBlock),
        q16(bf16 ? kQueryBlock * params.Hi * params.Di : 0),
        k16_rows(bf16 ? kKeyBlock : 0) {
    static_assert(kQueryBlock % kHeadTile == 0, "padded tiles must fit the buffers");
    for (int64_t s = 0; s < kKeyBlock; ++s) k_rows[s] = k.data() + s * params.Di;
  }

  const acc_t* w_row(int64_t b, int64_t t) const {
    return static_cast<const acc_t*>(p.w) + (b * p.T + t) * p.Hi;
  }

  void load_queries(int64_t b, int64_t t0, int64_t n) {
    tq = n;
    const auto* base = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < p.Hi; ++j)
        load_row(base + (t0 + t) * p.q_row_stride + j * p.q_head_stride, q.data() + (t * p.Hi + j) * p.Di, p.Di);
    m = (n * p.Hi + kHeadTile - 1) / kHeadTile * kHeadTile;
    std::fill(q.begin() + n * p.Hi * p.Di, q.begin() + m * p.Di, acc_t(0));
    if (bf16) {
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < p.Hi; ++j) {
          const scalar_t* row = base + (t0 + t) * p.q_row_stride + j * p.q_head_stride;
          std::copy(row, row + p.Di, q16.begin() + (t * p.Hi + j) * p.Di);
        }
      std::fill(q16.begin() + n * p.Hi * p.Di, q16.begin() + m * p.Di, scalar_t(0));
    }
  }

  void load_keys(int64_t b, int64_t s0, int64_t n) {
    ns = n;
    key_scale = p.k_scale != nullptr ? p.k_scale + b * p.S + s0 : nullptr;
    const auto* base = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride;
    for (int64_t s = 0; s < n; ++s) load_row(base + (s0 + s) * p.k_row_stride, k.data() + s * p.Di, p.Di);
    if (bf16)
      for (int64_t s = 0; s < n; ++s) k16_rows[s] = base + (s0 + s) * p.k_row_stride;
  }

  // The keys at positions keys[0:n] of batch b (a gathered block, e.g. one query's top-k).
  // (Only the KL loss gathers; it takes no FP8 inputs, hence no key scales.)
  void gather_keys(int64_t b, const int64_t* keys, int64_t n) {
    TORCH_INTERNAL_ASSERT(p.k_scale == nullptr, "gathered indexer keys carry no key scales");
    ns = n;
    const auto* base = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride;
    for (int64_t s = 0; s < n; ++s) load_row(base + keys[s] * p.k_row_stride, k.data() + s * p.Di, p.Di);
    if (bf16)
      for (int64_t s = 0; s < n; ++s) k16_rows[s] = base + keys[s] * p.k_row_stride;
  }

  // dots[m, ns] = q k^T, row stride ns (the pad rows come out 0). The bf16 tiles give the same
  // exact products summed in another order; the backward's combines and scatters stay on the
  // float rows.
  void compute_dots() {
#ifdef DSA_CPU_BF16_TILES
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
      if (bf16) return bf16::dots(q16.data(), m, p.Di, k16_rows.data(), ns, 1.f, dots.data(), ns);
#endif
    gathered_dots(q.data(), m, p.Di, k_rows.data(), ns, dots.data(), ns);
  }

  const acc_t* dots_row(int64_t t, int64_t j) const { return dots.data() + (t * p.Hi + j) * ns; }
  acc_t* dots_row(int64_t t, int64_t j) { return dots.data() + (t * p.Hi + j) * ns; }

  // out[0:n] = scale * sum_j w[t,j] * relu(dots[t,j,first:first+n]): the scores of the tile's
  // query t on the tile's keys first .. first + n - 1, times the keys' scales when the inputs are
  // FP8 (after the head sum, as the GPU kernels do).
  void scores(int64_t b, int64_t t0, int64_t t, int64_t first, int64_t n, acc_t* out) const {
    using Vec = at::vec::Vectorized<acc_t>;
    constexpr int64_t W = Vec::size();
    std::fill(out, out + n, acc_t(0));
    const acc_t* w = w_row(b, t0 + t);
    for (int64_t j = 0; j < p.Hi; ++j) {
      const acc_t* d = dots_row(t, j) + first;
      const Vec wj(w[j] * static_cast<acc_t>(p.scale));
      const Vec zero(acc_t(0));
      int64_t s = 0;
      for (; s + W <= n; s += W)
        at::vec::fmadd(wj, at::vec::maximum(Vec::loadu(d + s), zero), Vec::loadu(out + s)).store(out + s);
      for (; s < n; ++s) out[s] += w[j] * static_cast<acc_t>(p.scale) * std::max(d[s], acc_t(0));
    }
    if (key_scale != nullptr)
      for (int64_t s = 0; s < n; ++s) out[s] *= static_cast<acc_t>(key_scale[first + s]);
  }

  // Turns the dots of the tile's query t into dL/d(dots) in place, given g[0:n] = dL/dscore on the
  // tile's keys first .. first + n - 1: g[s] * scale * w[t,j] where the dot is positive, 0
  // elsewhere and outside those keys. With dw, also adds dL/dw[t,j] = sum_s g[s] * scale *
  // relu(dot) to dw[j].
  void dots_to_grad(int64_t b, int64_t t0, int64_t t, const acc_t* g, int64_t first, int64_t n, acc_t* dw) {
    const acc_t scale = static_cast<acc_t>(p.scale);
    const acc_t* w = w_row(b, t0 + t);
    for (int64_t j = 0; j < p.Hi; ++j) {
      acc_t* row = dots_row(t, j);
      acc_t* d = row + first;
      acc_t dw_tj = 0;
      for (int64_t s = 0; s < n; ++s) {
        const acc_t gs = g[s] * scale;
        const bool active = d[s] > acc_t(0);
        dw_tj += active ? gs * d[s] : acc_t(0);
        d[s] = active ? gs * w[j] : acc_t(0);
      }
      std::fill(row, d, acc_t(0));
      std::fill(d + n, row + ns, acc_t(0));
      if (dw != nullptr) dw[j] += dw_tj;
    }
  }
};

// Tile offsets [first, first + count) of a query's keys inside one key tile.
struct Span {
  int64_t first, count;
};

// The keys of the query tile [t0, t0 + n) of batch b: each row's key range (params.h: key_range)
// and their hull. The tile visits only the key tiles inside the hull that some row sees, so a
// packed sequence costs what its documents cost, not what one long causal sequence would.
struct TileRanges {
  KeyRange row[kQueryBlock];
  KeyRange hull;
  int64_t n;

  TileRanges(const IndexerParams& p, int64_t b, int64_t t0, int64_t n_rows)
      : hull(key_range_hull(p, b, t0, n_rows)), n(n_rows) {
    for (int64_t t = 0; t < n; ++t) row[t] = key_range(p, b, t0 + t);
  }

  // Row t's keys inside the key tile [s0, s0 + ns), as offsets into the tile.
  Span span(int64_t t, int64_t s0, int64_t ns) const {
    const int64_t first = std::clamp(row[t].begin - s0, int64_t{0}, ns);
    const int64_t last = std::clamp(row[t].end - s0, first, ns);
    return {first, last - first};
  }

  // Some row sees a key of [s0, s0 + ns).
  bool any_in(int64_t s0, int64_t ns) const {
    for (int64_t t = 0; t < n; ++t)
      if (span(t, s0, ns).count > 0) return true;
    return false;
  }
};

// Calls fn(s0, ns) for each key tile [s0, s0 + ns) of up to kKeyBlock keys from the hull's first
// key on, skipping the tiles no row of r sees. With parts > 1, only part `part` of those tiles:
// the hull's tiles cut into `parts` runs in order, so the parts together are the one pass, tile
// for tile (the same tiles, hence the same scores).
template <class Fn>
void for_each_key_tile(const TileRanges& r, const Fn& fn, int64_t part = 0, int64_t parts = 1) {
  const int64_t tiles = (std::max<int64_t>(0, r.hull.end - r.hull.begin) + kKeyBlock - 1) / kKeyBlock;
  const int64_t first = r.hull.begin + tiles * part / parts * kKeyBlock;
  const int64_t last = std::min(r.hull.end, r.hull.begin + tiles * (part + 1) / parts * kKeyBlock);
  for (int64_t s0 = first; s0 < last; s0 += kKeyBlock) {
    const int64_t ns = std::min(kKeyBlock, last - s0);
    if (r.any_in(s0, ns)) fn(s0, ns);
  }
}

// The scores of query block (b, t0, n), loaded in `tile`, against the key tiles some row sees
// (part `part` of `parts`, as for_each_key_tile): per tile and row t, the scores of the row's
// visible keys [s, s + count) of the tile go to dest(t, s), which then done(t, s, count) takes.
template <typename scalar_t, class Dest, class Done>
void score_key_tiles(IndexerTile<scalar_t>& tile, const TileRanges& ranges, int64_t b, int64_t t0, int64_t n,
                     const Dest& dest, const Done& done, int64_t part = 0, int64_t parts = 1) {
  for_each_key_tile(ranges, [&](int64_t s0, int64_t ns) {
    tile.load_keys(b, s0, ns);
    tile.compute_dots();
    for (int64_t t = 0; t < n; ++t) {
      const Span sp = ranges.span(t, s0, ns);
      const int64_t s = s0 + sp.first;
      tile.scores(b, t0, t, sp.first, sp.count, dest(t, s));
      done(t, s, sp.count);
    }
  }, part, parts);
}

}  // namespace dsa::cpu
