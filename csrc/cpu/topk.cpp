// CPU topk_indices (over given logits) and indexer_topk (fused: indexer score tiles stream
// into one running selection per query; [B, T, S] never exists; only the key tiles some query of
// a block sees are scored). Parallel over rows; the fused kernel deals its query blocks out in
// zigzag order (under a causal mask their cost grows with t), and with fewer query blocks than
// threads (decode) splits each block's key tiles over the threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../host.h"
#include "indexer_tiles.h"
#include "parallel.h"
#include "topk_selector.h"

namespace dsa::cpu {
namespace {

template <typename scalar_t>
void topk_indices_kernel(const TopkParams& p) {
  using acc_t = acc_type<scalar_t>;
  parallel_items(0, p.B * p.T, 16, [&](int64_t begin, int64_t end) {
    TopkSelector<acc_t> selector(p.topk);
    std::vector<acc_t> row(p.S);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / p.T, t = r % p.T;
      load_row(static_cast<const scalar_t*>(p.logits) + b * p.logits_batch_stride + t * p.logits_row_stride, row.data(), p.S);
      selector.reset();
      selector.push(row.data(), p.S, 0);
      selector.finish(p.out + r * p.topk);
    }
  });
}

// Feeds the scores of query block (b, t0, n) against part `part` of `parts` of its key tiles
// (score_key_tiles: only tiles some row sees, each row's keys within its range) into one
// selector per query.
template <typename scalar_t, typename acc_t>
void score_block(const IndexerParams& p, IndexerTile<scalar_t>& tile, std::vector<TopkSelector<acc_t>>& selectors,
                 std::vector<acc_t>& scores, int64_t b, int64_t t0, int64_t n, int64_t part, int64_t parts) {
  for (auto& s : selectors) s.reset();
  tile.load_queries(b, t0, n);
  score_key_tiles(
      tile, TileRanges(p, b, t0, n), b, t0, n, [&](int64_t, int64_t) { return scores.data(); },
      [&](int64_t t, int64_t s, int64_t count) { selectors[t].push(scores.data(), count, s); }, part, parts);
}

// A key range shorter than this many tiles per thread is not worth splitting (merge overhead).
constexpr int64_t kMinTilesPerPart = 8;

// Parts per query block when there are fewer query blocks than threads (decode: one query over
// a long cache), else 1.
int64_t key_parts(const IndexerParams& p, int64_t items) {
  const int64_t threads = at::get_num_threads();
  if (items >= threads) return 1;
  const int64_t tiles = (p.S + kKeyBlock - 1) / kKeyBlock;
  return std::max<int64_t>(1, std::min((threads + items - 1) / items, tiles / kMinTilesPerPart));
}

// Few query blocks, many keys (decode): each block's key range is dealt out to `parts` threads
// in whole key tiles (the tiles, hence the scores, are those of one pass); each part keeps its
// best k per query, and the parts' candidates merge in position order, which selects exactly
// what one pass over every key does.
template <typename scalar_t>
void indexer_topk_split_kernel(const IndexerParams& p, int64_t topk, int32_t* out, int64_t blocks, int64_t parts) {
  using acc_t = acc_type<scalar_t>;
  using Entry = typename TopkSelector<acc_t>::Entry;
  const int64_t items = p.B * blocks;
  std::vector<std::vector<Entry>> kept(items * parts * kQueryBlock);  // [item][part][query]
  parallel_items(0, items * parts, 1, [&](int64_t begin, int64_t end) {
    IndexerTile<scalar_t> tile(p);
    std::vector<TopkSelector<acc_t>> selectors(kQueryBlock, TopkSelector<acc_t>(topk));
    std::vector<acc_t> scores(kKeyBlock);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t item = w / parts, part = w % parts;
      const int64_t b = item / blocks, t0 = (item % blocks) * kQueryBlock;
      const int64_t n = std::min(kQueryBlock, p.T - t0);
      score_block(p, tile, selectors, scores, b, t0, n, part, parts);
      for (int64_t t = 0; t < n; ++t) selectors[t].take(kept[w * kQueryBlock + t]);
    }
  });
  parallel_items(0, p.B * p.T, 16, [&](int64_t begin, int64_t end) {
    TopkSelector<acc_t> selector(topk);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / p.T, t = r % p.T;
      const int64_t item = b * blocks + t / kQueryBlock;
      selector.reset();
      for (int64_t part = 0; part < parts; ++part) selector.push(kept[(item * parts + part) * kQueryBlock + t % kQueryBlock]);
      selector.finish(out + r * topk);
    }
  });
}

template <typename scalar_t>
void indexer_topk_kernel(const IndexerParams& p, int64_t topk, int32_t* out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t blocks = (p.T + kQueryBlock - 1) / kQueryBlock;
  const int64_t parts = key_parts(p, p.B * blocks);
  if (parts > 1) return indexer_topk_split_kernel<scalar_t>(p, topk, out, blocks, parts);
  parallel_items(0, p.B * blocks, 1, [&](int64_t begin, int64_t end) {
    IndexerTile<scalar_t> tile(p);
    std::vector<TopkSelector<acc_t>> selectors(kQueryBlock, TopkSelector<acc_t>(topk));
    std::vector<acc_t> scores(kKeyBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, t0 = zigzag(item % blocks, blocks) * kQueryBlock;
      const int64_t n = std::min(kQueryBlock, p.T - t0);
      score_block(p, tile, selectors, scores, b, t0, n, 0, 1);
      for (int64_t t = 0; t < n; ++t) selectors[t].finish(out + (b * p.T + t0 + t) * topk);
    }
  });
}

at::Tensor topk_indices_cpu(const at::Tensor& logits, int64_t topk) {
  auto c = prepare_topk(logits, topk);
  DSA_DISPATCH_CPU(c.logits.scalar_type(), "dsa.topk_indices", AT_WRAP([&] { topk_indices_kernel<scalar_t>(c.p); }));
  return c.out;
}

at::Tensor indexer_topk_cpu(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, int64_t topk,
                            std::optional<double> scale, bool causal, const std::optional<at::Tensor>& k_scale,
                            const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end) {
  auto c = prepare_indexer_topk(q_idx, k_idx, w, topk, scale, causal, k_scale, key_start, key_end);
  DSA_DISPATCH_CPU(c.q.scalar_type(), "dsa.indexer_topk",
                   AT_WRAP([&] { indexer_topk_kernel<scalar_t>(c.p, c.topk, c.out.data_ptr<int32_t>()); }),
                   at::kFloat8_e4m3fn);
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("topk_indices", &topk_indices_cpu);
  m.impl("indexer_topk", &indexer_topk_cpu);
}

}  // namespace dsa::cpu
