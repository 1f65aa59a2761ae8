// CPU sparse_attention forward and backward. One work item is (batch, query, kv head): the G
// query heads that share the kv head are scored against each gathered key together, so a key
// row is read once per item. Gathered rows are read in their stored dtype: bfloat16 rows go
// straight into the AVX512-BF16 dot-product instruction where the CPU has it (bf16_tiles.h),
// else they are widened in registers (attention_tiles.h); the random row gathers bound this
// kernel, and bfloat16 rows are half the bytes.
//
// The backward recomputes probabilities from lse. dq belongs to its item; dk and dv receive
// contributions from every query that selected the key: a chunked_sum over chunks of items fixed
// by the problem, so the gradients are bit-identical for any number of threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../host.h"
#include "attention_tiles.h"
#include "bf16_tiles.h"
#include "chunked_sum.h"
#include "parallel.h"
#include "vec_math.h"

namespace dsa::cpu {
namespace {

// One work item: (batch, query, kv head), its G query heads padded to Gp (a multiple of the
// micro-kernels' head tile) and its valid gathered rows, with the item's tile products. q and
// dO are held as float (q pre-multiplied by the scale) for the widening micro-kernels; on the
// bf16 tiles the dot products take them in bfloat16 (q16, dout16), unscaled.
// The scatters into the float dk/dv rows stay widening: they are bound by those rows' traffic,
// and keep the weights in float.
template <typename scalar_t>
struct ItemScratch {
  using acc_t = acc_type<scalar_t>;
  const SparseAttentionParams& p;
  const bool bf16 = bf16::use_tiles<scalar_t>();
  int64_t G, Gp, n = 0;
  std::vector<acc_t> q, dout, scores, probs;
  std::vector<scalar_t> q16, dout16;  // bf16 tiles only; pad rows stay zero
  std::vector<const scalar_t*> krows, vrows;
  std::vector<acc_t*> dkrows, dvrows;
  std::vector<int32_t> pos;

  explicit ItemScratch(const SparseAttentionParams& params)
      : p(params),
        G(p.H / p.Hkv),
        Gp((G + kHeadTile - 1) / kHeadTile * kHeadTile),
        q(Gp * p.Dqk, acc_t(0)),
        dout(Gp * p.Dv, acc_t(0)),
        scores(Gp * p.topk, acc_t(0)),
        probs(Gp * p.topk, acc_t(0)),
        q16(bf16 ? Gp * p.Dqk : 0, scalar_t(0)),
        dout16(bf16 ? Gp * p.Dv : 0, scalar_t(0)),
        krows(p.topk),
        vrows(p.topk),
        dkrows(p.topk),
        dvrows(p.topk),
        pos(p.topk) {}

  // Loads the item's G query rows and its valid indices.
  void load(int64_t b, int64_t t, int64_t kvh) {
    const auto* Q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + t * p.q_row_stride;
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* row = Q + (kvh * G + g) * p.q_head_stride;
      load_row(row, q.data() + g * p.Dqk, p.Dqk);
      scale_row(q.data() + g * p.Dqk, static_cast<acc_t>(p.scale), p.Dqk);
      if (bf16) std::copy(row, row + p.Dqk, q16.data() + g * p.Dqk);
    }
    const int32_t* idx = p.indices + b * p.idx_batch_stride + t * p.idx_row_stride + kvh * p.idx_head_stride;
    const auto* K = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride;
    const auto* V = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride;
    n = 0;
    for (int64_t j = 0; j < p.topk; ++j) {
      if (idx[j] < 0) continue;  // the host checked every other index is in [0, S)
      pos[n] = idx[j];
      krows[n] = K + idx[j] * p.k_row_stride;
      vrows[n] = V + idx[j] * p.v_row_stride;
      ++n;
    }
  }

  // Head g's dO row (float; also bfloat16 on the bf16 tiles).
  void load_dout(const scalar_t* row, int64_t g) {
    load_row(row, dout.data() + g * p.Dv, p.Dv);
    if (bf16) std::copy(row, row + p.Dv, dout16.data() + g * p.Dv);
  }

  // out[g * topk + j] = scale * q[g] . krows[j]
  void q_dot_k(acc_t* out) {
#ifdef DSA_CPU_BF16_TILES
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
      if (bf16) return bf16::dots(q16.data(), Gp, p.Dqk, krows.data(), n, static_cast<float>(p.scale), out, p.topk);
#endif
    gathered_dots(q.data(), Gp, p.Dqk, krows.data(), n, out, p.topk);
  }

  // out[g * topk + j] = dO[g] . vrows[j]
  void dout_dot_v(acc_t* out) {
#ifdef DSA_CPU_BF16_TILES
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
      if (bf16) return bf16::dots(dout16.data(), Gp, p.Dv, vrows.data(), n, 1.f, out, p.topk);
#endif
    gathered_dots(dout.data(), Gp, p.Dv, vrows.data(), n, out, p.topk);
  }

  // out[g, 0:D] += sum_j w[g * topk + j] * rows[j][0:D]. On the bf16 tiles the weights are
  // rounded to bfloat16 (the probabilities of the forward, as a bfloat16 matmul rounds them) or,
  // with exact_weights, split into two bfloat16 (dS for dq: about float accuracy).
  void combine(const acc_t* w, const scalar_t* const* rows, int64_t D, acc_t* out, bool exact_weights) {
#ifdef DSA_CPU_BF16_TILES
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>)
      if (bf16) return bf16::combine(w, p.topk, Gp, rows, n, D, out, exact_weights);
#endif
    gathered_combine(w, p.topk, Gp, rows, n, D, out);
  }
};

template <typename scalar_t>
void sparse_attention_fwd_kernel(const SparseAttentionParams& p) {
  using acc_t = acc_type<scalar_t>;
  parallel_items(0, p.B * p.T * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    ItemScratch<scalar_t> it(p);
    std::vector<acc_t> out(it.Gp * p.Dv);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / (p.T * p.Hkv), t = (i / p.Hkv) % p.T, kvh = i % p.Hkv;
      it.load(b, t, kvh);
      const int64_t row = (b * p.T + t) * p.H + kvh * it.G;
      auto* lse = static_cast<acc_t*>(p.lse) + row;
      std::fill(out.begin(), out.end(), acc_t(0));
      it.q_dot_k(it.scores.data());
      for (int64_t g = 0; g < it.G; ++g) {
        acc_t* sc = it.scores.data() + g * p.topk;
        if (it.n == 0) {  // no valid index: out 0, lse -inf
          lse[g] = neg_inf<acc_t>();
          continue;
        }
        const acc_t m = *std::max_element(sc, sc + it.n);
        const acc_t l = exp_shifted(sc, m, it.n);
        scale_row(sc, acc_t(1) / l, it.n);
        lse[g] = m + std::log(l);
      }
      it.combine(it.scores.data(), it.vrows.data(), p.Dv, out.data(), /*exact_weights=*/false);
      store_row(out.data(), static_cast<scalar_t*>(p.out) + row * p.Dv, it.G * p.Dv);
    }
  });
}

// dkv [B, S, Hkv, Dqk + Dv] (zeroed): key row (b, s, kvh) holds its dk, then its dv.
template <typename scalar_t>
void sparse_attention_bwd_kernel(const SparseAttentionBwdParams& bp, acc_type<scalar_t>* dkv) {
  using acc_t = acc_type<scalar_t>;
  const auto& p = bp.fwd;
  const int64_t items = p.B * p.T * p.Hkv, width = p.Dqk + p.Dv;
  const int64_t chunks = fixed_chunks(items, items * p.topk, p.S * p.Hkv);
  const int64_t per_chunk = (items + chunks - 1) / chunks;
  chunked_sum(chunks, p.B * p.S * p.Hkv * width, dkv, [&](int64_t c, acc_t* dKV) {
    ItemScratch<scalar_t> it(p);
    std::vector<acc_t> dq(it.Gp * p.Dqk), out(p.Dv), delta(it.G);
    int64_t lo = p.B * p.S * p.Hkv, hi = 0;  // the key rows this chunk reaches
    for (int64_t i = c * per_chunk; i < std::min(items, (c + 1) * per_chunk); ++i) {
      const int64_t b = i / (p.T * p.Hkv), t = (i / p.Hkv) % p.T, kvh = i % p.Hkv;
      it.load(b, t, kvh);
      const int64_t row = (b * p.T + t) * p.H + kvh * it.G;
      const auto* lse = static_cast<const acc_t*>(p.lse) + row;
      const auto* dO = static_cast<const scalar_t*>(bp.grad_out) + b * bp.do_batch_stride + t * bp.do_row_stride;
      for (int64_t g = 0; g < it.G; ++g) {
        it.load_dout(dO + (kvh * it.G + g) * bp.do_head_stride, g);
        load_row(static_cast<const scalar_t*>(p.out) + (row + g) * p.Dv, out.data(), p.Dv);
        // d lse / d score = prob, so a gradient on lse shifts the softmax's row term.
        const acc_t dlse = bp.grad_lse ? static_cast<const acc_t*>(bp.grad_lse)[row + g] : acc_t(0);
        delta[g] = dot(it.dout.data() + g * p.Dv, out.data(), p.Dv) - dlse;
      }
      for (int64_t j = 0; j < it.n; ++j) {
        const int64_t key_row = (b * p.S + it.pos[j]) * p.Hkv + kvh;
        it.dkrows[j] = dKV + key_row * width;
        it.dvrows[j] = it.dkrows[j] + p.Dqk;
        lo = std::min(lo, key_row), hi = std::max(hi, key_row + 1);
      }
      // probs = exp(scores - lse); dS = probs * (dO . v - delta), written over scores.
      it.q_dot_k(it.probs.data());
      it.dout_dot_v(it.scores.data());
      for (int64_t g = 0; g < it.G; ++g) {
        acc_t* pr = it.probs.data() + g * p.topk;
        acc_t* ds = it.scores.data() + g * p.topk;
        if (lse[g] == neg_inf<acc_t>())
          std::fill_n(pr, it.n, acc_t(0));
        else
          exp_shifted(pr, lse[g], it.n);
        for (int64_t j = 0; j < it.n; ++j) ds[j] = pr[j] * (ds[j] - delta[g]);
      }
      for (int64_t g = it.G; g < it.Gp; ++g) {  // padding heads contribute nothing
        std::fill_n(it.probs.data() + g * p.topk, it.n, acc_t(0));
        std::fill_n(it.scores.data() + g * p.topk, it.n, acc_t(0));
      }
      std::fill(dq.begin(), dq.end(), acc_t(0));
      it.combine(it.scores.data(), it.krows.data(), p.Dqk, dq.data(), /*exact_weights=*/true);
      scale_row(dq.data(), static_cast<acc_t>(p.scale), it.G * p.Dqk);
      store_row(dq.data(), static_cast<scalar_t*>(bp.grad_q) + row * p.Dqk, it.G * p.Dqk);
      // q is pre-scaled, so dS . q already carries the scale of d score / d k.
      gathered_scatter(it.scores.data(), p.topk, it.Gp, it.q.data(), p.Dqk, it.dkrows.data(), it.n);
      gathered_scatter(it.probs.data(), p.topk, it.Gp, it.dout.data(), p.Dv, it.dvrows.data(), it.n);
    }
    return Reach{std::min(lo, hi) * width, hi * width};
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& indices,
                                                        std::optional<double> scale) {
  auto c = prepare_sparse_attention(q, k, v, indices, scale);
  DSA_DISPATCH_CPU(q.scalar_type(), "dsa.sparse_attention", AT_WRAP([&] { sparse_attention_fwd_kernel<scalar_t>(c.p); }));
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& indices, const at::Tensor& out, const at::Tensor& lse,
    std::optional<double> scale) {
  auto c = prepare_sparse_attention_backward(grad_out, grad_lse, q, k, v, indices, out, lse, scale);
  const auto& p = c.p.fwd;
  DSA_DISPATCH_CPU(q.scalar_type(), "dsa.sparse_attention_backward", AT_WRAP([&] {
    using acc_t = acc_type<scalar_t>;
    auto dkv = at::zeros({p.B, p.S, p.Hkv, p.Dqk + p.Dv}, q.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    sparse_attention_bwd_kernel<scalar_t>(c.p, dkv.data_ptr<acc_t>());
    c.grad_k.copy_(dkv.narrow(3, 0, p.Dqk));
    c.grad_v.copy_(dkv.narrow(3, p.Dqk, p.Dv));
  }));
  return {c.grad_q, c.grad_k, c.grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("sparse_attention", &sparse_attention_cpu);
  m.impl("sparse_attention_backward", &sparse_attention_backward_cpu);
}

}  // namespace dsa::cpu
