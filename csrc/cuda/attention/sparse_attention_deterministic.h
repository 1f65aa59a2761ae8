// Deterministic dk / dv of the CUDA sparse_attention backward (torch.use_deterministic_algorithms).
// The backward kernels run over slices of tokens small enough that every (contributor, index
// slot) share of dk and dv gets its own row (KeyGradOut); index_put_ with accumulate, whose
// deterministic implementation sorts by destination row, then sums the rows of each key in a
// fixed order. Slower than the atomics and O(slice * K * D) extra memory, but bit-identical on
// repeat. ATen only (no CUDA calls of its own): the kernels come in through `launch`, so the CPU
// emulator tests run this file with the emulated kernels (tests/cuda_emulation).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "host.h"
#include "cuda/attention/sparse_attention_kernels.h"

namespace dsa {
namespace cuda {

constexpr int64_t kContribBytes = int64_t{512} << 20;  // contribution rows per slice, bytes

// Batch b, tokens [t0, t0 + n) of a [B, T, ...] tensor.
inline at::Tensor token_rows(const at::Tensor& t, int64_t b, int64_t t0, int64_t n) {
  return t.narrow(0, b, 1).narrow(1, t0, n);
}

// The backward's params for batch b, tokens [t0, t0 + n): B = 1, T = n, every [B, T, ...] tensor
// narrowed (out, lse, grad_q stay contiguous [1, n, H, ...], as the kernels index them).
inline SparseAttentionBwdParams token_slice(const SparseAttentionBwdCall& c, int64_t b, int64_t t0, int64_t n) {
  SparseAttentionBwdParams s = c.p;
  SparseAttentionParams& f = s.fwd;
  f.B = 1;
  f.T = n;
  f.q = token_rows(c.fwd.q, b, t0, n).data_ptr();
  f.k = c.fwd.k.narrow(0, b, 1).data_ptr();
  f.v = c.fwd.v.narrow(0, b, 1).data_ptr();
  f.indices = token_rows(c.fwd.indices, b, t0, n).data_ptr<int32_t>();
  f.out = token_rows(c.fwd.out, b, t0, n).data_ptr();
  f.lse = token_rows(c.fwd.lse, b, t0, n).data_ptr();
  s.grad_out = token_rows(c.grad_out, b, t0, n).data_ptr();
  s.grad_lse = c.grad_lse.defined() ? token_rows(c.grad_lse, b, t0, n).data_ptr() : nullptr;
  s.grad_q = token_rows(c.grad_q, b, t0, n).data_ptr();
  return s;
}

// For each contribution row of the slice, the row of the [B*S*Hkv + 1, D] accumulator it adds to:
// (b*S + pos)*Hkv + kvh, or the last (dummy) row for an empty slot. Contributors are ordered
// (token, kv head, r) with `per_kv_head` of them per (token, kv head): the tensor-core blocks of
// its head chunks, or the row-wise kernel's query rows of its group.
inline at::Tensor contribution_rows(const SparseAttentionCall& c, int64_t b, int64_t t0, int64_t n, int64_t per_kv_head) {
  const auto& p = c.p;
  at::Tensor idx = token_rows(c.indices, b, t0, n).squeeze(0).to(at::kLong);  // [n, K] or [n, Hkv, K]
  if (idx.dim() == 2) idx = idx.unsqueeze(1).expand({n, p.Hkv, p.topk});
  const at::Tensor kvh = at::arange(p.Hkv, idx.options()).view({1, p.Hkv, 1});
  const at::Tensor rows = at::where(idx.ge(0).logical_and(idx.lt(p.S)), (idx + b * p.S) * p.Hkv + kvh,
                                    at::Scalar(p.B * p.S * p.Hkv));
  return rows.unsqueeze(2).expand({n, p.Hkv, per_kv_head, p.topk}).reshape({-1});
}

// Runs the backward kernels slice by slice into contribution rows (at most contrib_bytes per slice)
// and sums them into dk, dv ([B*S*Hkv + 1, D] accumulators, zeroed; the last row takes the empty
// slots). launch(params, delta, KeyGradOut) launches the kernels of one slice.
template <class Launch>
void deterministic_key_grads(const SparseAttentionBwdCall& c, const at::Tensor& delta, int64_t per_kv_head,
                             int64_t contrib_bytes, at::Tensor& dk, at::Tensor& dv, const Launch& launch) {
  const auto& p = c.p.fwd;
  const int64_t per_token = p.Hkv * per_kv_head * p.topk * (p.Dqk + p.Dv) * dk.element_size();
  const int64_t n_max = std::clamp<int64_t>(contrib_bytes / per_token, 1, p.T);
  const at::Tensor ck = at::empty({n_max * p.Hkv * per_kv_head * p.topk, p.Dqk}, dk.options());
  const at::Tensor cv = at::empty({n_max * p.Hkv * per_kv_head * p.topk, p.Dv}, dv.options());
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t t0 = 0; t0 < p.T; t0 += n_max) {
      const int64_t n = std::min(n_max, p.T - t0);
      const int64_t rows = n * p.Hkv * per_kv_head * p.topk;
      at::Tensor ck_n = ck.narrow(0, 0, rows).zero_(), cv_n = cv.narrow(0, 0, rows).zero_();
      launch(token_slice(c, b, t0, n), token_rows(delta, b, t0, n).data_ptr(),
             KeyGradOut{nullptr, nullptr, ck_n.data_ptr(), cv_n.data_ptr()});
      const at::Tensor dest = contribution_rows(c.fwd, b, t0, n, per_kv_head);
      dk.index_put_({dest}, ck_n, /*accumulate=*/true);
      dv.index_put_({dest}, cv_n, /*accumulate=*/true);
    }
  }
}

}  // namespace cuda
}  // namespace dsa
