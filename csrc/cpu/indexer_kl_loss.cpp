// CPU kernels of dsa::indexer_kl_loss and dsa::indexer_kl_loss_backward (semantics:
// IndexerKlLossParams in params.h). Extra memory is O(B*T*(H+Hi)) plus per-thread tiles: a work item is a
// tile of queries that streams over its keys kKeyBlock at a time and keeps only per-query
// running statistics. Dense form: up to kQueryBlock consecutive queries share the key blocks,
// each using the prefix it sees; sparse form: one query and its valid index entries, gathered.
// Both logit tiles come from register-tiled micro-kernels (indexer: IndexerTile; attention: per
// kv head), never from BLAS, which would nest a thread team inside at::parallel_for.
//
// Forward, per query:
//   pass A (skipped when the caller gives attn_lse): per-head online log-sum-exp of the
//     attention logits a_h(s) -> attn_lse[t, h];
//   pass B: indexer logits I(s), target p(s) = mean_h exp(a_h(s) - attn_lse[t,h]) and, online
//     against the running max m of I: lI = sum exp(I - m), A1 = sum p log p, A2 = sum p (I - m),
//     P = sum p (when the max grows to m', lI is rescaled and A2 shifted by -(m' - m) * P). Then
//     idx_lse = m + log lI and KL = sum p (log p - I + idx_lse) = A1 - A2 + P log lI.
// Backward, per query (one pass, both lse saved by the forward): dL/dI(s) = g (softmax_I(s) - p(s))
// on the support, then the indexer's chain rule on the tile (IndexerTile::dots_to_grad, then
// the combine and scatter micro-kernels for dq_idx and dk_idx).
// dk_idx sums over queries: a chunked_sum over chunks of items fixed by the problem, so it is
// bit-identical for any number of threads.
//
// A CUDA kernel keeps this structure: a query tile per block, key tiles through shared memory,
// the same online statistics, a second sweep only for the attention lse.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../host.h"
#include "chunked_sum.h"
#include "indexer_tiles.h"
#include "parallel.h"

namespace dsa::cpu {
namespace {

// A work item: queries [t0, t0 + tq) of batch b.
struct Item {
  int64_t b, t0, tq;
};

int64_t item_count(const IndexerKlLossParams& p) {
  return p.indices ? p.idx.B * p.idx.T : p.idx.B * ((p.idx.T + kQueryBlock - 1) / kQueryBlock);
}

Item item_at(const IndexerKlLossParams& p, int64_t i) {
  if (p.indices) return {i / p.idx.T, i % p.idx.T, 1};
  const int64_t blocks = (p.idx.T + kQueryBlock - 1) / kQueryBlock;
  const int64_t b = i / blocks, t0 = (i % blocks) * kQueryBlock;
  return {b, t0, std::min(kQueryBlock, p.idx.T - t0)};
}

// An item's work: the keys it scores, summed over its queries (plus one).
int64_t item_cost(const IndexerKlLossParams& p, int64_t i) {
  const Item it = item_at(p, i);
  return 1 + it.tq * (p.indices ? p.topk : block_visible_keys(p.idx, it.t0, it.tq));
}

int64_t total_cost(const IndexerKlLossParams& p) {
  int64_t total = 0;
  for (int64_t i = 0; i < item_count(p); ++i) total += item_cost(p, i);
  return total;
}

// Splits the items into n contiguous ranges of about equal work (a causal tile's keys grow with
// t, so equal item counts would leave the first threads idle). splits[c]..splits[c+1] is chunk c.
std::vector<int64_t> balanced_splits(const IndexerKlLossParams& p, int64_t n) {
  const int64_t items = item_count(p), total = total_cost(p);
  std::vector<int64_t> splits{0};
  int64_t done = 0;
  for (int64_t i = 0; i < items; ++i) {
    done += item_cost(p, i);
    while (static_cast<int64_t>(splits.size()) < n && done * n >= total * static_cast<int64_t>(splits.size()))
      splits.push_back(i + 1);
  }
  while (static_cast<int64_t>(splits.size()) <= n) splits.push_back(items);
  return splits;
}

// Runs fn(chunk, item_begin, item_end) for every non-empty chunk, one chunk per task.
template <typename Fn>
void for_each_chunk(const std::vector<int64_t>& splits, const Fn& fn) {
  parallel_items(0, static_cast<int64_t>(splits.size()) - 1, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c)
      if (splits[c] < splits[c + 1]) fn(c, splits[c], splits[c + 1]);
  });
}

// The keys of an item, kKeyBlock at a time. Dense: contiguous blocks [s0, s0 + ns) up to the keys
// the tile's last query sees; query t uses a prefix of each. Sparse: the valid entries of the
// query's index row, gathered (a duplicate is one entry per occurrence).
class KeyStream {
 public:
  explicit KeyStream(const IndexerKlLossParams& p) : p_(p), keys_(p.indices ? kKeyBlock : 0) {}

  void reset(const Item& it) {
    it_ = it;
    cursor_ = 0, s0 = 0, ns = 0;
    if (p_.indices) {
      slots_ = p_.indices + it.b * p_.idx_batch_stride + it.t0 * p_.idx_row_stride;
      end_ = p_.topk;
    } else {
      end_ = block_visible_keys(p_.idx, it.t0, it.tq);
    }
  }

  // Advances to the next block; false when the item has no more keys.
  bool next() {
    if (!p_.indices) {
      s0 = cursor_;
      ns = std::min(kKeyBlock, end_ - cursor_);
      cursor_ += ns;
      return ns > 0;
    }
    ns = 0;
    for (; ns < kKeyBlock && cursor_ < end_; ++cursor_) {
      const int64_t s = slots_[cursor_];
      if (s >= 0 && s < p_.idx.S) keys_[ns++] = s;  // never address memory with an unchecked index
    }
    return ns > 0;
  }

  // How many of the block's keys (a prefix) the tile's query t sees.
  int64_t visible(int64_t t) const {
    return p_.indices ? ns : std::clamp<int64_t>(visible_keys(p_.idx, it_.t0 + t) - s0, 0, ns);
  }

  template <typename Tile>
  void load_into(Tile& tile) const {
    if (p_.indices)
      tile.gather_keys(it_.b, keys_.data(), ns);
    else
      tile.load_keys(it_.b, s0, ns);
  }

  bool gathered() const { return p_.indices != nullptr; }
  const int64_t* keys() const { return keys_.data(); }

  int64_t s0 = 0, ns = 0;

 private:
  const IndexerKlLossParams& p_;
  Item it_{};
  const int32_t* slots_ = nullptr;
  int64_t cursor_ = 0, end_ = 0;
  std::vector<int64_t> keys_;
};

// Attention logits a_h(s) = attn_scale * q[t,h] . k[s, h / G] of a query tile against a key
// block: per kv head, the micro-kernel of attention_tiles.h over the tq * G query rows that share
// it (padded with zero rows to a multiple of kHeadTile). Per-thread scratch.
template <typename scalar_t>
struct AttentionTile {
  using acc_t = acc_type<scalar_t>;
  const IndexerKlLossParams& p;
  const int64_t G;
  const int64_t m_cap;        // query rows per kv head: kQueryBlock * G rounded up to kHeadTile
  std::vector<acc_t> q;       // [Hkv][m_cap][Dqk]: rows t * G + g, times attn_scale; pad rows 0
  std::vector<acc_t> k;       // [Hkv][kKeyBlock][Dqk]
  std::vector<acc_t> logits;  // [Hkv][m_cap][ns]
  std::vector<const acc_t*> k_rows;  // [Hkv][kKeyBlock] row pointers into k
  int64_t tq = 0, ns = 0, m = 0;

  explicit AttentionTile(const IndexerKlLossParams& params)
      : p(params),
        G(params.H / params.Hkv),
        m_cap((kQueryBlock * G + kHeadTile - 1) / kHeadTile * kHeadTile),
        q(params.Hkv * m_cap * params.Dqk),
        k(params.Hkv * kKeyBlock * params.Dqk),
        logits(params.Hkv * m_cap * kKeyBlock),
        k_rows(params.Hkv * kKeyBlock) {
    for (int64_t r = 0; r < params.Hkv * kKeyBlock; ++r) k_rows[r] = k.data() + r * params.Dqk;
  }

  void load_queries(int64_t b, int64_t t0, int64_t n) {
    tq = n;
    m = (n * G + kHeadTile - 1) / kHeadTile * kHeadTile;
    std::fill(q.begin(), q.end(), acc_t(0));
    const auto* base = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < p.H; ++h) {
        acc_t* dst = q.data() + ((h / G) * m_cap + t * G + h % G) * p.Dqk;
        load_row(base + (t0 + t) * p.q_row_stride + h * p.q_head_stride, dst, p.Dqk);
        scale_row(dst, static_cast<acc_t>(p.attn_scale), p.Dqk);
      }
  }

  void load_keys(int64_t b, int64_t s0, int64_t n) {
    ns = n;
    for (int64_t s = 0; s < n; ++s) load_key(b, s0 + s, s);
  }

  void gather_keys(int64_t b, const int64_t* keys, int64_t n) {
    ns = n;
    for (int64_t s = 0; s < n; ++s) load_key(b, keys[s], s);
  }

  void compute_logits() {
    for (int64_t hk = 0; hk < p.Hkv; ++hk)
      gathered_dots(q.data() + hk * m_cap * p.Dqk, m, p.Dqk, k_rows.data() + hk * kKeyBlock, ns,
                    logits.data() + hk * m_cap * kKeyBlock, ns);
  }

  // a_h of the tile's query t over the block's keys.
  const acc_t* row(int64_t t, int64_t h) const {
    return logits.data() + (h / G) * m_cap * kKeyBlock + (t * G + h % G) * ns;
  }

 private:
  void load_key(int64_t b, int64_t key, int64_t s) {
    const auto* src = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + key * p.k_row_stride;
    for (int64_t hk = 0; hk < p.Hkv; ++hk)
      load_row(src + hk * p.k_head_stride, k.data() + (hk * kKeyBlock + s) * p.Dqk, p.Dqk);
  }
};

template <typename acc_t>
acc_t block_max(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec u, Vec v) { return at::vec::maximum(u, v); }, x, n);
}

template <typename acc_t>
acc_t block_sum(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec u, Vec v) { return u + v; }, x, n);
}

template <typename acc_t>
acc_t block_sum_exp(const acc_t* x, acc_t shift, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec m(shift);
  return at::vec::map_reduce_all<acc_t>([&](Vec v) { return (v - m).exp(); }, [](Vec u, Vec v) { return u + v; }, x,
                                        n);
}

// Online log-sum-exp over blocks of one sequence of logits.
template <typename acc_t>
struct OnlineLse {
  acc_t max = neg_inf<acc_t>(), sum = 0;
  void add(const acc_t* x, int64_t n) {
    const acc_t m = std::max(max, block_max(x, n));
    sum = sum * std::exp(max - m) + block_sum_exp(x, m, n);
    max = m;
  }
  acc_t lse() const { return sum > 0 ? max + std::log(sum) : neg_inf<acc_t>(); }
};

// The KL sums of one query (see the file comment), fed block by block.
template <typename acc_t>
struct OnlineKl {
  acc_t m = neg_inf<acc_t>(), lI = 0, A1 = 0, A2 = 0, P = 0;
  int64_t support = 0;

  // I[0:n]: indexer logits; prob[0:n]: target probabilities of the same keys.
  void add(const acc_t* I, const acc_t* prob, int64_t n) {
    using Vec = at::vec::Vectorized<acc_t>;
    const acc_t bm = block_max(I, n);
    if (bm > m) {
      if (support > 0) {
        lI *= std::exp(m - bm);
        A2 -= (bm - m) * P;
      }
      m = bm;
    }
    const Vec vm(m), tiny(std::numeric_limits<acc_t>::min());  // p log p -> 0 as p -> 0
    lI += block_sum_exp(I, m, n);
    A2 += at::vec::map2_reduce_all<acc_t>([&](Vec pr, Vec x) { return pr * (x - vm); },
                                          [](Vec u, Vec v) { return u + v; }, prob, I, n);
    A1 += at::vec::map_reduce_all<acc_t>([&](Vec pr) { return pr * at::vec::maximum(pr, tiny).log(); },
                                         [](Vec u, Vec v) { return u + v; }, prob, n);
    P += block_sum(prob, n);
    support += n;
  }
  acc_t idx_lse() const { return support > 0 ? m + std::log(lI) : neg_inf<acc_t>(); }
  acc_t loss() const { return support > 0 ? A1 - A2 + P * std::log(lI) : acc_t(0); }
};

// prob[0:n] = mean_h exp(a_h - lse[h]) for the tile's query t: the target on the block's keys.
template <typename scalar_t, typename acc_t>
void target_probabilities(const AttentionTile<scalar_t>& tile, int64_t t, int64_t n, const acc_t* lse,
                          acc_t* prob) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t H = tile.p.H;
  std::fill(prob, prob + n, acc_t(0));
  for (int64_t h = 0; h < H; ++h) {
    const Vec l(lse[h]);
    at::vec::map2([&](Vec acc, Vec a) { return acc + (a - l).exp(); }, prob, prob, tile.row(t, h), n);
  }
  const Vec inv_h(acc_t(1) / static_cast<acc_t>(H));
  at::vec::map([&](Vec x) { return x * inv_h; }, prob, prob, n);
}

template <typename scalar_t>
void kl_loss_forward(const IndexerKlLossParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t items = item_count(p);
  if (items == 0) return;
  const auto splits = balanced_splits(p, std::min<int64_t>(at::get_num_threads(), items));
  for_each_chunk(splits, [&](int64_t, int64_t ib, int64_t ie) {
    IndexerTile<scalar_t> itile(p.idx);
    AttentionTile<scalar_t> atile(p);
    KeyStream keys(p);
    std::vector<OnlineLse<acc_t>> heads(kQueryBlock * p.H);
    std::vector<OnlineKl<acc_t>> kl(kQueryBlock);
    std::vector<acc_t> I(kKeyBlock), prob(kKeyBlock);
    for (int64_t i = ib; i < ie; ++i) {
      const Item it = item_at(p, i);
      const int64_t row0 = it.b * p.idx.T + it.t0;
      acc_t* lse = static_cast<acc_t*>(p.attn_lse) + row0 * p.H;  // [tq, H]
      itile.load_queries(it.b, it.t0, it.tq);
      atile.load_queries(it.b, it.t0, it.tq);
      if (!p.attn_lse_given) {  // pass A
        std::fill(heads.begin(), heads.end(), OnlineLse<acc_t>{});
        for (keys.reset(it); keys.next();) {
          keys.load_into(atile);
          atile.compute_logits();
          for (int64_t t = 0; t < it.tq; ++t)
            if (const int64_t n = keys.visible(t))
              for (int64_t h = 0; h < p.H; ++h) heads[t * p.H + h].add(atile.row(t, h), n);
        }
        for (int64_t th = 0; th < it.tq * p.H; ++th) lse[th] = heads[th].lse();
      }
      std::fill(kl.begin(), kl.end(), OnlineKl<acc_t>{});  // pass B
      for (keys.reset(it); keys.next();) {
        keys.load_into(itile);
        itile.compute_dots();
        keys.load_into(atile);
        atile.compute_logits();
        for (int64_t t = 0; t < it.tq; ++t) {
          const int64_t n = keys.visible(t);
          if (n == 0) continue;
          itile.scores(it.b, it.t0, t, n, I.data());
          target_probabilities(atile, t, n, lse + t * p.H, prob.data());
          kl[t].add(I.data(), prob.data(), n);
        }
      }
      for (int64_t t = 0; t < it.tq; ++t) {
        static_cast<acc_t*>(p.idx_lse)[row0 + t] = kl[t].idx_lse();
        static_cast<acc_t*>(p.loss)[row0 + t] = kl[t].loss();
      }
    }
  });
}

template <typename scalar_t>
void kl_loss_backward(const IndexerKlLossBwdParams& bp) {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const auto& p = bp.fwd;
  const auto& ip = p.idx;
  const int64_t items = item_count(p);
  const auto splits = balanced_splits(p, fixed_chunks(items, total_cost(p), ip.S));
  std::vector<acc_t> dk(ip.B * ip.S * ip.Di, acc_t(0));  // dk_idx [B, S, Di]

  chunked_sum(static_cast<int64_t>(splits.size()) - 1, ip.B * ip.S * ip.Di, dk.data(), [&](int64_t c, acc_t* dK) {
    int64_t lo = ip.B * ip.S, hi = 0;  // the key rows this chunk reaches
    IndexerTile<scalar_t> itile(ip);
    AttentionTile<scalar_t> atile(p);
    KeyStream keys(p);
    std::vector<acc_t> dq(kQueryBlock * ip.Hi * ip.Di), dw(kQueryBlock * ip.Hi);
    std::vector<acc_t> I(kKeyBlock), dI(kKeyBlock);
    std::vector<acc_t*> dk_rows(kKeyBlock);
    for (int64_t i = splits[c]; i < splits[c + 1]; ++i) {
      const Item it = item_at(p, i);
      const int64_t row0 = it.b * ip.T + it.t0;
      const auto* g = static_cast<const acc_t*>(bp.grad_loss) + row0;
      const auto* idx_lse = static_cast<const acc_t*>(p.idx_lse) + row0;
      const auto* lse = static_cast<const acc_t*>(p.attn_lse) + row0 * p.H;
      std::fill(dq.begin(), dq.end(), acc_t(0));
      std::fill(dw.begin(), dw.end(), acc_t(0));
      const bool any_grad = std::any_of(g, g + it.tq, [](acc_t x) { return x != acc_t(0); });
      itile.load_queries(it.b, it.t0, it.tq);
      atile.load_queries(it.b, it.t0, it.tq);
      for (keys.reset(it); any_grad && keys.next();) {
        keys.load_into(itile);
        itile.compute_dots();
        keys.load_into(atile);
        atile.compute_logits();
        for (int64_t t = 0; t < it.tq; ++t) {
          const int64_t n = g[t] != acc_t(0) ? keys.visible(t) : 0;
          if (n > 0) {  // dL/dI = g (softmax_I - p), then into dL/d(dots) in place
            itile.scores(it.b, it.t0, t, n, I.data());
            target_probabilities(atile, t, n, lse + t * p.H, dI.data());
            const Vec vg(g[t]), vlse(idx_lse[t]);
            at::vec::map2([&](Vec pr, Vec x) { return vg * ((x - vlse).exp() - pr); }, dI.data(), dI.data(),
                          I.data(), n);
          }
          itile.dots_to_grad(it.b, it.t0, t, dI.data(), n, dw.data() + t * ip.Hi);
        }
        // dq += grad_dots k;  dk_idx[s] += grad_dots^T q (a key listed twice gets both)
        gathered_combine(itile.dots.data(), keys.ns, itile.m, itile.k_rows.data(), keys.ns, ip.Di, dq.data());
        for (int64_t s = 0; s < keys.ns; ++s) {
          const int64_t key_row = it.b * ip.S + (keys.gathered() ? keys.keys()[s] : keys.s0 + s);
          dk_rows[s] = dK + key_row * ip.Di;
          lo = std::min(lo, key_row), hi = std::max(hi, key_row + 1);
        }
        gathered_scatter(itile.dots.data(), keys.ns, itile.m, itile.q.data(), ip.Di, dk_rows.data(), keys.ns);
      }
      store_row(dq.data(), static_cast<scalar_t*>(bp.grad_q_idx) + row0 * ip.Hi * ip.Di, it.tq * ip.Hi * ip.Di);
      std::copy(dw.begin(), dw.begin() + it.tq * ip.Hi, static_cast<acc_t*>(bp.grad_w) + row0 * ip.Hi);
    }
    return Reach{std::min(lo, hi) * ip.Di, hi * ip.Di};
  });
  parallel_items(0, ip.B * ip.S, 256, [&](int64_t begin, int64_t end) {
    store_row(dk.data() + begin * ip.Di, static_cast<scalar_t*>(bp.grad_k_idx) + begin * ip.Di, (end - begin) * ip.Di);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_cpu(
    const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q, const at::Tensor& k,
    const std::optional<at::Tensor>& indices, std::optional<double> idx_scale, std::optional<double> attn_scale,
    bool causal, const std::optional<at::Tensor>& attn_lse) {
  auto c = prepare_indexer_kl_loss(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, attn_lse);
  DSA_DISPATCH_CPU(c.q_idx.scalar_type(), "dsa.indexer_kl_loss", AT_WRAP([&] { kl_loss_forward<scalar_t>(c.p); }));
  return {c.loss, c.idx_lse, c.attn_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& indices, const at::Tensor& idx_lse,
    const at::Tensor& attn_lse, std::optional<double> idx_scale, std::optional<double> attn_scale, bool causal) {
  auto c = prepare_indexer_kl_loss_backward(grad_loss, q_idx, k_idx, w, q, k, indices, idx_lse, attn_lse, idx_scale,
                                            attn_scale, causal);
  DSA_DISPATCH_CPU(c.fwd.q_idx.scalar_type(), "dsa.indexer_kl_loss_backward",
                   AT_WRAP([&] { kl_loss_backward<scalar_t>(c.p); }));
  return {c.grad_q_idx, c.grad_k_idx, finish_grad_w(c.grad_w, w)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("indexer_kl_loss", &indexer_kl_loss_cpu);
  m.impl("indexer_kl_loss_backward", &indexer_kl_loss_backward_cpu);
}

}  // namespace dsa::cpu
