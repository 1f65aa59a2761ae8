// CPU sparse_attention forward and backward. One work item is (batch, query, kv head): the G
// query heads that share the kv head are scored against each gathered key together, so a key
// row is read once per item. K and V are converted to acc_t once per call (O(S) memory), not
// once per gather (O(T*k) conversions).
//
// The backward recomputes probabilities from lse. dq belongs to its item; dk and dv receive
// contributions from every query that selected the key, so each of a fixed number of chunks
// accumulates into its own buffer and the buffers are summed in chunk order: deterministic
// for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../host.h"
#include "vec_math.h"

namespace dsa::cpu {
namespace {

// K and V as acc_t with their own strides (a no-op view when already acc_t).
struct KeyValues {
  at::Tensor k, v;
  int64_t k_sb, k_ss, k_sh, v_sb, v_ss, v_sh;
};

KeyValues key_values_as(const SparseAttentionCall& c, at::ScalarType acc) {
  KeyValues kv;
  kv.k = c.k.to(acc);
  kv.v = c.v.to(acc);
  kv.k_sb = kv.k.stride(0), kv.k_ss = kv.k.stride(1), kv.k_sh = kv.k.stride(2);
  kv.v_sb = kv.v.stride(0), kv.v_ss = kv.v.stride(1), kv.v_sh = kv.v.stride(2);
  return kv;
}

// One work item's view of the problem.
struct Item {
  int64_t b, t, kvh;
  Item(const SparseAttentionParams& p, int64_t i) : b(i / (p.T * p.Hkv)), t((i / p.Hkv) % p.T), kvh(i % p.Hkv) {}
  const int32_t* indices(const SparseAttentionParams& p) const {
    return p.indices + b * p.i_sb + t * p.i_st + kvh * p.i_sh;
  }
  int64_t first_head(const SparseAttentionParams& p) const { return kvh * (p.H / p.Hkv); }
};

template <typename scalar_t>
void sparse_attention_fwd_kernel(const SparseAttentionParams& p, const KeyValues& kv) {
  using acc_t = acc_type<scalar_t>;
  const int64_t G = p.H / p.Hkv;
  const auto* K = kv.k.data_ptr<acc_t>();
  const auto* V = kv.v.data_ptr<acc_t>();
  at::parallel_for(0, p.B * p.T * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q(G * p.Dqk), scores(G * p.K), acc(G * p.Dv);
    for (int64_t i = begin; i < end; ++i) {
      const Item it(p, i);
      const int64_t h0 = it.first_head(p);
      const int32_t* idx = it.indices(p);
      for (int64_t g = 0; g < G; ++g) {
        load_row(static_cast<const scalar_t*>(p.q) + it.b * p.q_sb + it.t * p.q_st + (h0 + g) * p.q_sh,
                 q.data() + g * p.Dqk, p.Dqk);
        scale_row(q.data() + g * p.Dqk, static_cast<acc_t>(p.scale), p.Dqk);
      }
      for (int64_t j = 0; j < p.K; ++j) {
        const int32_t s = idx[j];
        for (int64_t g = 0; g < G; ++g)
          scores[g * p.K + j] =
              s < 0 ? neg_inf<acc_t>()
                    : dot(q.data() + g * p.Dqk, K + it.b * kv.k_sb + s * kv.k_ss + it.kvh * kv.k_sh, p.Dqk);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::vector<acc_t> lse(G);
      for (int64_t g = 0; g < G; ++g) {
        acc_t* sc = scores.data() + g * p.K;
        acc_t m = neg_inf<acc_t>();
        for (int64_t j = 0; j < p.K; ++j) m = std::max(m, sc[j]);
        if (m == neg_inf<acc_t>()) {  // no valid index: out 0, lse -inf
          lse[g] = m;
          std::fill(sc, sc + p.K, acc_t(0));
          continue;
        }
        acc_t l = 0;
        for (int64_t j = 0; j < p.K; ++j) l += (sc[j] = std::exp(sc[j] - m));
        for (int64_t j = 0; j < p.K; ++j) sc[j] /= l;
        lse[g] = m + std::log(l);
      }
      for (int64_t j = 0; j < p.K; ++j) {
        const int32_t s = idx[j];
        if (s < 0) continue;
        const acc_t* vrow = V + it.b * kv.v_sb + s * kv.v_ss + it.kvh * kv.v_sh;
        for (int64_t g = 0; g < G; ++g) axpy(acc.data() + g * p.Dv, scores[g * p.K + j], vrow, p.Dv);
      }
      const int64_t row = (it.b * p.T + it.t) * p.H + h0;
      store_row(acc.data(), static_cast<scalar_t*>(p.out) + row * p.Dv, G * p.Dv);
      std::copy(lse.begin(), lse.end(), static_cast<acc_t*>(p.lse) + row);
    }
  });
}

template <typename scalar_t>
void sparse_attention_bwd_kernel(const SparseAttentionBwdParams& bp, const KeyValues& kv, at::Tensor& dk_acc,
                                 at::Tensor& dv_acc) {
  using acc_t = acc_type<scalar_t>;
  const auto& p = bp.fwd;
  const int64_t G = p.H / p.Hkv;
  const auto* K = kv.k.data_ptr<acc_t>();
  const auto* V = kv.v.data_ptr<acc_t>();
  const int64_t items = p.B * p.T * p.Hkv;
  const int64_t chunks = dk_acc.size(0);
  const int64_t per_chunk = (items + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    std::vector<acc_t> q(G * p.Dqk), dout(G * p.Dv), out(G * p.Dv), delta(G), lse(G), dq(G * p.Dqk);
    for (int64_t c = cbegin; c < cend; ++c) {
      acc_t* dK = dk_acc[c].data_ptr<acc_t>();  // [B, S, Hkv, Dqk]
      acc_t* dV = dv_acc[c].data_ptr<acc_t>();  // [B, S, Hkv, Dv]
      for (int64_t i = c * per_chunk; i < std::min(items, (c + 1) * per_chunk); ++i) {
        const Item it(p, i);
        const int64_t h0 = it.first_head(p);
        const int32_t* idx = it.indices(p);
        const int64_t row = (it.b * p.T + it.t) * p.H + h0;
        for (int64_t g = 0; g < G; ++g) {
          load_row(static_cast<const scalar_t*>(p.q) + it.b * p.q_sb + it.t * p.q_st + (h0 + g) * p.q_sh,
                   q.data() + g * p.Dqk, p.Dqk);
          scale_row(q.data() + g * p.Dqk, static_cast<acc_t>(p.scale), p.Dqk);
          load_row(static_cast<const scalar_t*>(bp.grad_out) + it.b * bp.do_sb + it.t * bp.do_st +
                       (h0 + g) * bp.do_sh,
                   dout.data() + g * p.Dv, p.Dv);
          load_row(static_cast<const scalar_t*>(p.out) + (row + g) * p.Dv, out.data() + g * p.Dv, p.Dv);
          lse[g] = static_cast<const acc_t*>(p.lse)[row + g];
          // d lse / d score = p, so a gradient on lse enters like a shift of the softmax's delta.
          const acc_t dlse = bp.grad_lse ? static_cast<const acc_t*>(bp.grad_lse)[row + g] : acc_t(0);
          delta[g] = dot(dout.data() + g * p.Dv, out.data() + g * p.Dv, p.Dv) - dlse;
        }
        std::fill(dq.begin(), dq.end(), acc_t(0));
        for (int64_t j = 0; j < p.K; ++j) {
          const int32_t s = idx[j];
          if (s < 0) continue;
          const acc_t* krow = K + it.b * kv.k_sb + s * kv.k_ss + it.kvh * kv.k_sh;
          const acc_t* vrow = V + it.b * kv.v_sb + s * kv.v_ss + it.kvh * kv.v_sh;
          acc_t* dkrow = dK + ((it.b * p.S + s) * p.Hkv + it.kvh) * p.Dqk;
          acc_t* dvrow = dV + ((it.b * p.S + s) * p.Hkv + it.kvh) * p.Dv;
          for (int64_t g = 0; g < G; ++g) {
            if (lse[g] == neg_inf<acc_t>()) continue;
            const acc_t prob = std::exp(dot(q.data() + g * p.Dqk, krow, p.Dqk) - lse[g]);
            const acc_t ds = prob * (dot(dout.data() + g * p.Dv, vrow, p.Dv) - delta[g]);
            axpy(dq.data() + g * p.Dqk, ds, krow, p.Dqk);
            axpy(dkrow, ds, q.data() + g * p.Dqk, p.Dqk);  // q is pre-scaled: ds * scale * q
            axpy(dvrow, prob, dout.data() + g * p.Dv, p.Dv);
          }
        }
        scale_row(dq.data(), static_cast<acc_t>(p.scale), G * p.Dqk);
        store_row(dq.data(), static_cast<scalar_t*>(bp.grad_q) + row * p.Dqk, G * p.Dqk);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& indices,
                                                        double scale) {
  auto c = prepare_sparse_attention(q, k, v, indices, scale);
  check_index_values("dsa.sparse_attention", c.indices, c.p.S);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "dsa.sparse_attention", [&] {
    const auto kv = key_values_as(c, c10::CppTypeToScalarType<acc_type<scalar_t>>::value);
    sparse_attention_fwd_kernel<scalar_t>(c.p, kv);
  });
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& indices, const at::Tensor& out, const at::Tensor& lse, double scale) {
  auto c = prepare_sparse_attention_backward(grad_out, grad_lse, q, k, v, indices, out, lse, scale);
  const auto& p = c.p.fwd;
  check_index_values("dsa.sparse_attention_backward", c.fwd.indices, p.S);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "dsa.sparse_attention_backward", [&] {
    const auto acc = c10::CppTypeToScalarType<acc_type<scalar_t>>::value;
    const auto kv = key_values_as(c.fwd, acc);
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.B * p.T * p.Hkv));
    auto dk_acc = at::zeros({chunks, p.B, p.S, p.Hkv, p.Dqk}, q.options().dtype(acc));
    auto dv_acc = at::zeros({chunks, p.B, p.S, p.Hkv, p.Dv}, q.options().dtype(acc));
    sparse_attention_bwd_kernel<scalar_t>(c.p, kv, dk_acc, dv_acc);
    c.grad_k.copy_(dk_acc.sum(0));
    c.grad_v.copy_(dv_acc.sum(0));
  });
  return {c.grad_q, c.grad_k, c.grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("sparse_attention", &sparse_attention_cpu);
  m.impl("sparse_attention_backward", &sparse_attention_backward_cpu);
}

}  // namespace dsa::cpu
