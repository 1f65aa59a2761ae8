// CPU indexer_logits forward and backward. Parallel over (batch, query block) for the logits,
// dq and dw; over (batch, key block) for dk, so every output element has one writer and the
// result is deterministic. Query blocks differ in cost (causal rows grow with t), so they are
// dealt out in zigzag order. The tile products use the register-tiled micro-kernels, never BLAS
// (see indexer_tiles.h). Only key tiles that some query of a block sees are computed
// (TileRanges); the forward writes -inf everywhere else.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../host.h"
#include "indexer_tiles.h"
#include "parallel.h"

namespace dsa::cpu {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
void indexer_logits_kernel(const IndexerParams& p, acc_type<scalar_t>* logits) {
  using acc_t = acc_type<scalar_t>;
  const int64_t blocks = ceil_div(p.T, kQueryBlock);
  parallel_items(0, p.B * blocks, 1, [&](int64_t begin, int64_t end) {
    IndexerTile<scalar_t> tile(p);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, t0 = zigzag(item % blocks, blocks) * kQueryBlock;
      const int64_t n = std::min(kQueryBlock, p.T - t0);
      const auto row = [&](int64_t t) { return logits + (b * p.T + t0 + t) * p.S; };
      tile.load_queries(b, t0, n);
      const TileRanges ranges(p, b, t0, n);
      score_key_tiles(
          tile, ranges, b, t0, n, [&](int64_t t, int64_t s) { return row(t) + s; }, [](int64_t, int64_t, int64_t) {});
      for (int64_t t = 0; t < n; ++t) {  // every key outside the row's range (all of an empty row's)
        const KeyRange r = ranges.row[t];
        std::fill(row(t), row(t) + r.begin, neg_inf<acc_t>());
        std::fill(row(t) + std::max(r.begin, r.end), row(t) + p.S, neg_inf<acc_t>());
      }
    }
  });
}

// Turns the tile's dots (keys [s0, s0 + ns)) into dL/d(dots) in place: g[t,s] * scale * w[t,j]
// where the dot is positive and query t sees key s, else 0 (whatever g holds there). With dw,
// also accumulates dw[t,j] += g[t,s] * scale * relu(dot).
template <typename scalar_t>
void dots_to_grad(IndexerTile<scalar_t>& tile, const IndexerBwdParams& bp, const TileRanges& ranges, int64_t b,
                  int64_t t0, int64_t s0, acc_type<scalar_t>* dw) {
  using acc_t = acc_type<scalar_t>;
  const auto& p = bp.fwd;
  for (int64_t t = 0; t < tile.tq; ++t) {
    const Span sp = ranges.span(t, s0, tile.ns);
    const acc_t* g = static_cast<const acc_t*>(bp.grad_logits) + b * bp.grad_batch_stride +
                     (t0 + t) * bp.grad_row_stride + s0 + sp.first;
    tile.dots_to_grad(b, t0, t, g, sp.first, sp.count, dw != nullptr ? dw + t * p.Hi : nullptr);
  }
}

template <typename scalar_t>
void indexer_logits_backward_kernel(const IndexerBwdParams& bp) {
  using acc_t = acc_type<scalar_t>;
  const auto& p = bp.fwd;
  const int64_t qblocks = ceil_div(p.T, kQueryBlock);
  // dq and dw: one query block per work item.
  parallel_items(0, p.B * qblocks, 1, [&](int64_t begin, int64_t end) {
    IndexerTile<scalar_t> tile(p);
    std::vector<acc_t> dq(kQueryBlock * p.Hi * p.Di), dw(kQueryBlock * p.Hi);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / qblocks, t0 = zigzag(item % qblocks, qblocks) * kQueryBlock;
      const int64_t n = std::min(kQueryBlock, p.T - t0);
      std::fill(dq.begin(), dq.end(), acc_t(0));
      std::fill(dw.begin(), dw.end(), acc_t(0));
      tile.load_queries(b, t0, n);
      const TileRanges ranges(p, b, t0, n);
      for_each_key_tile(ranges, [&](int64_t s0, int64_t ns) {
        tile.load_keys(b, s0, ns);
        tile.compute_dots();
        dots_to_grad(tile, bp, ranges, b, t0, s0, dw.data());
        gathered_combine(tile.dots.data(), tile.ns, tile.m, tile.k_rows.data(), tile.ns, p.Di, dq.data());
      });
      auto* gq = static_cast<scalar_t*>(bp.grad_q) + (b * p.T + t0) * p.Hi * p.Di;
      store_row(dq.data(), gq, n * p.Hi * p.Di);
      std::copy(dw.begin(), dw.begin() + n * p.Hi, static_cast<acc_t*>(bp.grad_w) + (b * p.T + t0) * p.Hi);
    }
  });
  // dk: one key block per work item, over the query blocks whose hull meets it.
  std::vector<KeyRange> hulls(p.B * qblocks);
  for (int64_t item = 0; item < p.B * qblocks; ++item) {
    const int64_t b = item / qblocks, t0 = (item % qblocks) * kQueryBlock;
    hulls[item] = key_range_hull(p, b, t0, std::min(kQueryBlock, p.T - t0));
  }
  const int64_t kblocks = ceil_div(p.S, kKeyBlock);
  parallel_items(0, p.B * kblocks, 1, [&](int64_t begin, int64_t end) {
    IndexerTile<scalar_t> tile(p);
    std::vector<acc_t> dk(kKeyBlock * p.Di);
    std::vector<acc_t*> dk_rows(kKeyBlock);
    for (int64_t s = 0; s < kKeyBlock; ++s) dk_rows[s] = dk.data() + s * p.Di;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kblocks, s0 = zigzag(item % kblocks, kblocks) * kKeyBlock;
      const int64_t ns = std::min(kKeyBlock, p.S - s0);
      std::fill(dk.begin(), dk.end(), acc_t(0));
      tile.load_keys(b, s0, ns);
      for (int64_t qb = 0; qb < qblocks; ++qb) {
        const KeyRange& h = hulls[b * qblocks + qb];
        if (h.empty() || h.end <= s0 || h.begin >= s0 + ns) continue;
        const int64_t t0 = qb * kQueryBlock, n = std::min(kQueryBlock, p.T - t0);
        const TileRanges ranges(p, b, t0, n);
        if (!ranges.any_in(s0, ns)) continue;
        tile.load_queries(b, t0, n);
        tile.compute_dots();
        dots_to_grad<scalar_t>(tile, bp, ranges, b, t0, s0, nullptr);
        gathered_scatter(tile.dots.data(), ns, tile.m, tile.q.data(), p.Di, dk_rows.data(), ns);
      }
      store_row(dk.data(), static_cast<scalar_t*>(bp.grad_k) + (b * p.S + s0) * p.Di, ns * p.Di);
    }
  });
}

at::Tensor indexer_logits_cpu(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                              std::optional<double> scale, bool causal, const std::optional<at::Tensor>& k_scale,
                              const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end) {
  auto c = prepare_indexer_logits(q_idx, k_idx, w, scale, causal, k_scale, key_start, key_end);
  DSA_DISPATCH_CPU(c.q.scalar_type(), "dsa.indexer_logits", AT_WRAP([&] {
    indexer_logits_kernel<scalar_t>(c.p, c.logits.data_ptr<acc_type<scalar_t>>());
  }), at::kFloat8_e4m3fn);
  return c.logits;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_logits_backward_cpu(const at::Tensor& grad_logits,
                                                                           const at::Tensor& q_idx,
                                                                           const at::Tensor& k_idx,
                                                                           const at::Tensor& w,
                                                                           std::optional<double> scale,
                                                                           bool causal,
                                                                           const std::optional<at::Tensor>& key_start,
                                                                           const std::optional<at::Tensor>& key_end) {
  auto c = prepare_indexer_logits_backward(grad_logits, q_idx, k_idx, w, scale, causal, key_start, key_end);
  DSA_DISPATCH_CPU(c.q.scalar_type(), "dsa.indexer_logits_backward",
                   AT_WRAP([&] { indexer_logits_backward_kernel<scalar_t>(c.p); }));
  return {c.grad_q, c.grad_k, finish_grad_w(c.grad_w, w)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("indexer_logits", &indexer_logits_cpu);
  m.impl("indexer_logits_backward", &indexer_logits_backward_cpu);
}

}  // namespace dsa::cpu
