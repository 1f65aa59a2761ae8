// CPU kernels of dsa::indexer_kl_loss and dsa::indexer_kl_loss_backward (semantics in
// indexer_kl_loss_host.h). Memory is O(B*T*(H+Hi)) plus per-thread scratch: each query row
// streams over its support in blocks of kKeyBlock keys and keeps only running statistics.
//
// Forward, per row:
//   pass A (skipped when the caller gives attn_lse): per-head online log-sum-exp of the
//     attention logits a_h(s) -> attn_lse[t, h];
//   pass B: indexer logits I(s), target p(s) = mean_h exp(a_h(s) - attn_lse[t,h]) and, online
//     against the running max m of I: lI = sum exp(I - m), A1 = sum p log p, A2 = sum p (I - m),
//     P = sum p (A2 is shifted by -(m' - m) * P when the max grows). Then
//     idx_lse = m + log lI and KL = sum p (log p - I + idx_lse) = A1 - A2 + P log lI.
// Backward, per row (one pass, both lse saved by the forward): dL/dI(s) = g * (softmax_I(s) - p(s))
// on the support, then the chain rule of I = idx_scale * sum_j w_j relu(q_idx_j . k_idx_s).
// dk_idx sums over query rows: each thread chunk accumulates into its own buffer and the buffers
// are added in chunk order, so the result is deterministic for a given thread count.
//
// The structure (row-parallel, key blocks, online statistics, a second pass only for the
// attention lse) is the one a CUDA kernel uses with a query tile per block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "indexer_kl_loss_host.h"
#include "vec_math.h"

namespace dsa::cpu {
namespace {

// Keys whose logits are computed before the softmax statistics consume them as vectors.
constexpr int64_t kKeyBlock = 64;

// Rows are flattened as r = b * T + t. A row costs about its support size, which grows with t
// under the causal mask: split the rows into n contiguous ranges of about equal cost.
std::vector<int64_t> balanced_row_splits(const IndexerKlLossParams& p, int64_t n) {
  const int64_t rows = p.B * p.T;
  auto cost = [&](int64_t r) { return 1 + (p.indices ? p.K : dense_support_size(p, r % p.T)); };
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) total += cost(r);
  std::vector<int64_t> splits{0};
  int64_t done = 0;
  for (int64_t r = 0; r < rows; ++r) {
    done += cost(r);
    while (static_cast<int64_t>(splits.size()) < n && done * n >= total * static_cast<int64_t>(splits.size()))
      splits.push_back(r + 1);
  }
  while (static_cast<int64_t>(splits.size()) <= n) splits.push_back(rows);
  return splits;
}

// Runs fn(chunk, row_begin, row_end) for n cost-balanced chunks of rows, one chunk per task.
template <typename Fn>
void for_each_row_chunk(const std::vector<int64_t>& splits, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(splits.size()) - 1;
  at::parallel_for(0, n, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c)
      if (splits[c] < splits[c + 1]) fn(c, splits[c], splits[c + 1]);
  });
}

// One query row at a time: its inputs in acc_t, its support as a stream of key blocks, and the
// logits of the current block. Scratch only; one per thread.
template <typename scalar_t>
class KlRow {
 public:
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;

  explicit KlRow(const IndexerKlLossParams& p)
      : p_(p),
        G_(p.H / p.Hkv),
        q_idx_(p.Hi * p.Di),
        w_(p.Hi),
        q_(p.H * p.Dqk),
        keys_(kKeyBlock),
        k_idx_rows_(kKeyBlock),
        I_(kKeyBlock),
        dots_(p.Hi * kKeyBlock),
        a_(p.H * kKeyBlock),
        prob_(kKeyBlock) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      k_idx_conv_.resize(kKeyBlock * p.Di);
      k_conv_.resize(p.Hkv * p.Dqk);
    }
  }

  // Loads row (b, t): q_idx, w * idx_scale and q * attn_scale in acc_t; rewinds the support.
  void start(int64_t b, int64_t t) {
    b_ = b, t_ = t;
    const auto* qi = static_cast<const scalar_t*>(p_.q_idx) + b * p_.qi_sb + t * p_.qi_st;
    for (int64_t j = 0; j < p_.Hi; ++j) load_row(qi + j * p_.qi_sh, q_idx_.data() + j * p_.Di, p_.Di);
    const auto* w = static_cast<const acc_t*>(p_.w) + (b * p_.T + t) * p_.Hi;
    for (int64_t j = 0; j < p_.Hi; ++j) w_[j] = w[j] * static_cast<acc_t>(p_.idx_scale);
    const auto* q = static_cast<const scalar_t*>(p_.q) + b * p_.q_sb + t * p_.q_st;
    for (int64_t h = 0; h < p_.H; ++h) {
      load_row(q + h * p_.q_sh, q_.data() + h * p_.Dqk, p_.Dqk);
      scale_row(q_.data() + h * p_.Dqk, static_cast<acc_t>(p_.attn_scale), p_.Dqk);
    }
    if (p_.indices) {
      slots_ = p_.indices + b * p_.i_sb + t * p_.i_st;
      end_ = p_.K;
    } else {
      slots_ = nullptr;
      end_ = dense_support_size(p_, t);
    }
    rewind();
  }

  void rewind() { cursor_ = 0; }

  // Fills keys() with the next support elements (at most kKeyBlock) and returns how many; 0 when
  // the support is exhausted. Sparse rows skip empty slots; a duplicate is one element per slot.
  int64_t next_block() {
    int64_t n = 0;
    if (!slots_) {
      for (; n < kKeyBlock && cursor_ < end_; ++n) keys_[n] = cursor_++;
      return n;
    }
    for (; n < kKeyBlock && cursor_ < end_; ++cursor_) {
      const int64_t s = slots_[cursor_];
      if (s >= 0 && s < p_.S) keys_[n++] = s;  // never trust an index tensor with an address
    }
    return n;
  }

  // I(s) for the n keys of the block, and with keep_dots the raw q_idx_j . k_idx_s in dots(j).
  void indexer_logits(int64_t n, bool keep_dots) {
    for (int64_t i = 0; i < n; ++i) {
      const auto* k = static_cast<const scalar_t*>(p_.k_idx) + b_ * p_.ki_sb + keys_[i] * p_.ki_ss;
      const acc_t* key = k_idx_rows_[i] = acc_row(k, k_idx_conv_.data() + i * p_.Di, p_.Di);
      acc_t logit = 0;
      for (int64_t j = 0; j < p_.Hi; ++j) {
        const acc_t d = dot(q_idx_.data() + j * p_.Di, key, p_.Di);
        if (keep_dots) dots_[j * kKeyBlock + i] = d;
        logit += w_[j] * std::max(d, acc_t(0));
      }
      I_[i] = logit;
    }
  }

  // a_h(s) for the n keys of the block, head h in a(h).
  void attention_logits(int64_t n) {
    const auto* k = static_cast<const scalar_t*>(p_.k) + b_ * p_.k_sb;
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* key = k + keys_[i] * p_.k_ss;
      for (int64_t hk = 0; hk < p_.Hkv; ++hk) {
        const acc_t* kh = acc_row(key + hk * p_.k_sh, k_conv_.data() + hk * p_.Dqk, p_.Dqk);
        for (int64_t g = 0; g < G_; ++g) {
          const int64_t h = hk * G_ + g;
          a_[h * kKeyBlock + i] = dot(q_.data() + h * p_.Dqk, kh, p_.Dqk);
        }
      }
    }
  }

  // prob(i) = mean_h exp(a_h(s_i) - lse[h]), the target distribution on the block's keys.
  void target_probabilities(int64_t n, const acc_t* lse) {
    std::fill(prob_.begin(), prob_.begin() + n, acc_t(0));
    for (int64_t h = 0; h < p_.H; ++h) {
      const Vec l(lse[h]);
      at::vec::map2([&](Vec acc, Vec a) { return acc + (a - l).exp(); }, prob_.data(), prob_.data(),
                    a_.data() + h * kKeyBlock, n);
    }
    const Vec inv_h(acc_t(1) / static_cast<acc_t>(p_.H));
    at::vec::map([&](Vec x) { return x * inv_h; }, prob_.data(), prob_.data(), n);
  }

  int64_t b() const { return b_; }
  int64_t key(int64_t i) const { return keys_[i]; }
  const acc_t* q_idx_head(int64_t j) const { return q_idx_.data() + j * p_.Di; }
  acc_t scaled_w(int64_t j) const { return w_[j]; }
  acc_t* I() { return I_.data(); }
  acc_t* a(int64_t h) { return a_.data() + h * kKeyBlock; }
  acc_t* prob() { return prob_.data(); }
  acc_t dots(int64_t j, int64_t i) const { return dots_[j * kKeyBlock + i]; }

  // k_idx[b, s_i] in acc_t, valid after indexer_logits(n) for i < n.
  const acc_t* k_idx_row(int64_t i) const { return k_idx_rows_[i]; }

 private:
  static const acc_t* acc_row(const scalar_t* src, acc_t* scratch, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      load_row(src, scratch, n);
      return scratch;
    }
  }

  const IndexerKlLossParams& p_;
  const int64_t G_;
  int64_t b_ = 0, t_ = 0;
  const int32_t* slots_ = nullptr;
  int64_t cursor_ = 0, end_ = 0;
  std::vector<acc_t> q_idx_, w_, q_;
  std::vector<int64_t> keys_;
  std::vector<const acc_t*> k_idx_rows_;
  std::vector<acc_t> I_, dots_, a_, prob_;
  std::vector<acc_t> k_idx_conv_, k_conv_;
};

template <typename acc_t>
acc_t block_max(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec u, Vec v) { return at::vec::maximum(u, v); }, x, n);
}

template <typename acc_t>
acc_t block_sum_exp(const acc_t* x, acc_t shift, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec m(shift);
  return at::vec::map_reduce_all<acc_t>([&](Vec v) { return (v - m).exp(); },
                                        [](Vec u, Vec v) { return u + v; }, x, n);
}

// Pass A: attention lse of every head over the row's support, into lse[0:H].
template <typename scalar_t, typename acc_t>
void attention_lse_pass(KlRow<scalar_t>& row, int64_t H, acc_t* lse, std::vector<acc_t>& max,
                        std::vector<acc_t>& sum) {
  std::fill(max.begin(), max.end(), neg_inf<acc_t>());
  std::fill(sum.begin(), sum.end(), acc_t(0));
  row.rewind();
  for (int64_t n; (n = row.next_block()) > 0;) {
    row.attention_logits(n);
    for (int64_t h = 0; h < H; ++h) {
      const acc_t m = std::max(max[h], block_max(row.a(h), n));
      sum[h] = sum[h] * std::exp(max[h] - m) + block_sum_exp(row.a(h), m, n);
      max[h] = m;
    }
  }
  for (int64_t h = 0; h < H; ++h) lse[h] = sum[h] > 0 ? max[h] + std::log(sum[h]) : neg_inf<acc_t>();
}

template <typename scalar_t>
void kl_loss_forward(const IndexerKlLossParams& p) {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t rows = p.B * p.T;
  if (rows == 0) return;
  const auto splits = balanced_row_splits(p, std::min<int64_t>(at::get_num_threads(), rows));
  for_each_row_chunk(splits, [&](int64_t, int64_t rb, int64_t re) {
    KlRow<scalar_t> row(p);
    std::vector<acc_t> head_max(p.H), head_sum(p.H);
    const Vec tiny(std::numeric_limits<acc_t>::min());  // p log p -> 0 as p -> 0
    for (int64_t r = rb; r < re; ++r) {
      row.start(r / p.T, r % p.T);
      acc_t* lse = static_cast<acc_t*>(p.attn_lse) + r * p.H;
      if (!p.attn_lse_given) attention_lse_pass(row, p.H, lse, head_max, head_sum);
      // Pass B: indexer lse and the KL sums, online against the running max m of I.
      acc_t m = neg_inf<acc_t>(), lI = 0, A1 = 0, A2 = 0, P = 0;
      int64_t support = 0;
      row.rewind();
      for (int64_t n; (n = row.next_block()) > 0; support += n) {
        row.indexer_logits(n, false);
        row.attention_logits(n);
        row.target_probabilities(n, lse);
        const acc_t* I = row.I();
        const acc_t* prob = row.prob();
        const acc_t bm = block_max(I, n);
        if (bm > m) {
          if (support > 0) {
            lI *= std::exp(m - bm);
            A2 -= (bm - m) * P;
          }
          m = bm;
        }
        const Vec vm(m);
        lI += block_sum_exp(I, m, n);
        A2 += at::vec::map2_reduce_all<acc_t>([&](Vec pr, Vec x) { return pr * (x - vm); },
                                              [](Vec u, Vec v) { return u + v; }, prob, I, n);
        A1 += at::vec::map_reduce_all<acc_t>([&](Vec pr) { return pr * at::vec::maximum(pr, tiny).log(); },
                                             [](Vec u, Vec v) { return u + v; }, prob, n);
        P += at::vec::reduce_all<acc_t>([](Vec u, Vec v) { return u + v; }, prob, n);
      }
      const bool empty = support == 0;
      static_cast<acc_t*>(p.idx_lse)[r] = empty ? neg_inf<acc_t>() : m + std::log(lI);
      static_cast<acc_t*>(p.loss)[r] = empty ? acc_t(0) : A1 - A2 + P * std::log(lI);
    }
  });
}

template <typename scalar_t>
void kl_loss_backward(const IndexerKlLossBwdParams& bp) {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const auto& p = bp.fwd;
  const int64_t rows = p.B * p.T, key_row = p.S * p.Di;
  const auto splits = balanced_row_splits(p, std::min<int64_t>(at::get_num_threads(), rows));
  const int64_t chunks = static_cast<int64_t>(splits.size()) - 1;
  // dk_idx partial sums of chunk c over the batches its rows span: [b_first(c) .. b_last(c)].
  std::vector<std::vector<acc_t>> dk(chunks);
  auto b_first = [&](int64_t c) { return splits[c] / p.T; };
  auto b_last = [&](int64_t c) { return (splits[c + 1] - 1) / p.T; };

  for_each_row_chunk(splits, [&](int64_t c, int64_t rb, int64_t re) {
    dk[c].assign((b_last(c) - b_first(c) + 1) * key_row, acc_t(0));
    KlRow<scalar_t> row(p);
    std::vector<acc_t> dq(p.Hi * p.Di), dw(p.Hi);
    for (int64_t r = rb; r < re; ++r) {
      std::fill(dq.begin(), dq.end(), acc_t(0));
      std::fill(dw.begin(), dw.end(), acc_t(0));
      const acc_t g = static_cast<const acc_t*>(bp.grad_loss)[r];
      if (g != acc_t(0)) {
        row.start(r / p.T, r % p.T);
        const acc_t* lse = static_cast<const acc_t*>(p.attn_lse) + r * p.H;
        const Vec idx_lse(static_cast<const acc_t*>(p.idx_lse)[r]), vg(g);
        acc_t* dk_batch = dk[c].data() + (row.b() - b_first(c)) * key_row;
        for (int64_t n; (n = row.next_block()) > 0;) {
          row.indexer_logits(n, true);
          row.attention_logits(n);
          row.target_probabilities(n, lse);
          acc_t* dI = row.prob();  // dL/dI = g * (softmax_I - p), written over p
          at::vec::map2([&](Vec pr, Vec x) { return vg * ((x - idx_lse).exp() - pr); }, dI, dI, row.I(), n);
          for (int64_t i = 0; i < n; ++i) {
            const acc_t* k_idx = row.k_idx_row(i);
            acc_t* dk_key = dk_batch + row.key(i) * p.Di;
            for (int64_t j = 0; j < p.Hi; ++j) {
              const acc_t d = row.dots(j, i);
              if (!(d > acc_t(0))) continue;  // relu'(d) = 0 for d <= 0, as torch's relu
              const acc_t coef = dI[i] * row.scaled_w(j);
              axpy(dq.data() + j * p.Di, coef, k_idx, p.Di);
              axpy(dk_key, coef, row.q_idx_head(j), p.Di);
              dw[j] += dI[i] * d;
            }
          }
        }
      }
      store_row(dq.data(), static_cast<scalar_t*>(bp.grad_q_idx) + r * p.Hi * p.Di, p.Hi * p.Di);
      acc_t* gw = static_cast<acc_t*>(bp.grad_w) + r * p.Hi;
      for (int64_t j = 0; j < p.Hi; ++j) gw[j] = dw[j] * static_cast<acc_t>(p.idx_scale);
    }
  });

  // dk_idx[b, s] = sum of the chunks' partial sums in chunk order.
  at::parallel_for(0, p.B * p.S, 16, [&](int64_t kb, int64_t ke) {
    std::vector<acc_t> sum(p.Di);
    for (int64_t bs = kb; bs < ke; ++bs) {
      const int64_t b = bs / p.S, s = bs % p.S;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t c = 0; c < chunks; ++c) {
        if (splits[c] == splits[c + 1] || b < b_first(c) || b > b_last(c)) continue;
        axpy(sum.data(), acc_t(1), dk[c].data() + (b - b_first(c)) * key_row + s * p.Di, p.Di);
      }
      store_row(sum.data(), static_cast<scalar_t*>(bp.grad_k_idx) + bs * p.Di, p.Di);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_cpu(
    const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q,
    const at::Tensor& k, const c10::optional<at::Tensor>& indices, double idx_scale, double attn_scale,
    bool causal, const c10::optional<at::Tensor>& attn_lse) {
  auto c = prepare_indexer_kl_loss(q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, attn_lse);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.q_idx.scalar_type(), "indexer_kl_loss_cpu",
                                  [&] { kl_loss_forward<scalar_t>(c.p); });
  return {c.loss, c.idx_lse, c.attn_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
    const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& indices, const at::Tensor& idx_lse,
    const at::Tensor& attn_lse, double idx_scale, double attn_scale, bool causal) {
  auto c = prepare_indexer_kl_loss_backward(grad_loss, q_idx, k_idx, w, q, k, indices, idx_lse, attn_lse, idx_scale,
                                            attn_scale, causal);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.fwd.q_idx.scalar_type(),
                                  "indexer_kl_loss_backward_cpu", [&] { kl_loss_backward<scalar_t>(c.p); });
  return {c.grad_q_idx, c.grad_k_idx, finish_grad_w(c, w)};
}

}  // namespace
}  // namespace dsa::cpu

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("indexer_kl_loss", &dsa::cpu::indexer_kl_loss_cpu);
  m.impl("indexer_kl_loss_backward", &dsa::cpu::indexer_kl_loss_backward_cpu);
}
