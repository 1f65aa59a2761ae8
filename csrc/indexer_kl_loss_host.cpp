#include "indexer_kl_loss_host.h"

#include <ATen/ATen.h>

#include "checks.h"
#include "host.h"

namespace dsa {

namespace {

struct KlLossDims {
  IndexerDims idx;
  int64_t H, Hkv, Dqk, K;  // K = 0 in the dense form
};

KlLossDims check_indexer_kl_loss_inputs(const char* op, const at::Tensor& q_idx, const at::Tensor& k_idx,
                                        const at::Tensor& w, const at::Tensor& q, const at::Tensor& k,
                                        const c10::optional<at::Tensor>& indices, bool causal) {
  KlLossDims d{};
  d.idx = check_indexer_inputs(op, q_idx, k_idx, w, causal);
  check_rank(op, "q", q, 4, "[B, T, H, Dqk]");
  check_rank(op, "k", k, 4, "[B, S, Hkv, Dqk]");
  // One dtype for all four feature tensors keeps one kernel instantiation per dtype.
  check_same_dtype(op, "q", q, "q_idx", q_idx);
  check_same_dtype(op, "k", k, "q_idx", q_idx);
  check_same_device(op, "q", q, "q_idx", q_idx);
  check_same_device(op, "k", k, "q_idx", q_idx);
  d.H = q.size(2), d.Hkv = k.size(2), d.Dqk = q.size(3);
  check_dim(op, "q", q, 0, d.idx.B, "batch B of q_idx");
  check_dim(op, "q", q, 1, d.idx.T, "length T of q_idx");
  check_dim(op, "k", k, 0, d.idx.B, "batch B of q_idx");
  check_dim(op, "k", k, 1, d.idx.S, "length S of k_idx");
  check_dim(op, "k", k, 3, d.Dqk, "head dim Dqk of q");
  TORCH_CHECK(d.H > 0 && d.Hkv > 0 && d.H % d.Hkv == 0, op, ": expected the H=", d.H,
              " query heads of q to be a positive multiple of the Hkv=", d.Hkv, " kv heads of k");
  TORCH_CHECK(d.Dqk > 0, op, ": expected q to have Dqk > 0, got shape ", shape_str(q));
  if (indices.has_value()) {
    const auto& ind = *indices;
    TORCH_CHECK(ind.scalar_type() == at::kInt, op, ": expected indices to be int32, got ", ind.scalar_type());
    check_rank(op, "indices", ind, 3, "[B, T, k]");
    check_same_device(op, "indices", ind, "q_idx", q_idx);
    check_dim(op, "indices", ind, 0, d.idx.B, "batch B of q_idx");
    check_dim(op, "indices", ind, 1, d.idx.T, "length T of q_idx");
    d.K = ind.size(2);
    TORCH_CHECK_VALUE(d.K >= 1, op, ": expected indices to hold k >= 1 entries per row, got shape ",
                      shape_str(ind));
    // CPU always checks; CUDA kernels treat out-of-range entries as -1 unless checking is on.
    if (!ind.is_cuda() || index_checks_enabled()) check_index_values(op, ind, d.idx.S);
  }
  return d;
}

// Inputs brought to stride-1 last dimensions and the parameter block over them and the outputs.
IndexerKlLossCall kl_loss_call(const KlLossDims& d, const at::Tensor& q_idx, const at::Tensor& k_idx,
                               const at::Tensor& w, const at::Tensor& q, const at::Tensor& k,
                               const c10::optional<at::Tensor>& indices, double idx_scale, double attn_scale,
                               bool causal) {
  IndexerKlLossCall c;
  c.q_idx = last_dim_contiguous(q_idx);
  c.k_idx = last_dim_contiguous(k_idx);
  c.w = score_weights(w, q_idx);
  c.q = last_dim_contiguous(q);
  c.k = last_dim_contiguous(k);
  if (indices.has_value()) c.indices = last_dim_contiguous(*indices);
  auto& p = c.p;
  p = IndexerKlLossParams{};
  p.idx = indexer_params(d.idx, c.q_idx, c.k_idx, c.w, idx_scale, causal);
  p.q = c.q.data_ptr();
  p.k = c.k.data_ptr();
  p.indices = c.indices.defined() ? c.indices.data_ptr<int32_t>() : nullptr;
  p.H = d.H, p.Hkv = d.Hkv, p.Dqk = d.Dqk, p.K = d.K;
  p.q_sb = c.q.stride(0), p.q_st = c.q.stride(1), p.q_sh = c.q.stride(2);
  p.k_sb = c.k.stride(0), p.k_ss = c.k.stride(1), p.k_sh = c.k.stride(2);
  if (c.indices.defined()) p.i_sb = c.indices.stride(0), p.i_st = c.indices.stride(1);
  p.attn_scale = attn_scale;
  return c;
}

// A fresh contiguous copy: an output must never alias an input.
at::Tensor contiguous_copy(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous)).copy_(t);
}

}  // namespace

IndexerKlLossCall prepare_indexer_kl_loss(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                          const at::Tensor& q, const at::Tensor& k,
                                          const c10::optional<at::Tensor>& indices, double idx_scale,
                                          double attn_scale, bool causal,
                                          const c10::optional<at::Tensor>& attn_lse) {
  const char* op = "dsa.indexer_kl_loss";
  const auto d = check_indexer_kl_loss_inputs(op, q_idx, k_idx, w, q, k, indices, causal);
  const auto sdt = score_dtype(q_idx.scalar_type());
  const auto stats = q_idx.options().dtype(sdt);
  auto c = kl_loss_call(d, q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal);
  c.loss = at::empty({d.idx.B, d.idx.T}, stats);
  c.idx_lse = at::empty({d.idx.B, d.idx.T}, stats);
  if (attn_lse.has_value()) {
    check_same_shape(op, "attn_lse", *attn_lse, {d.idx.B, d.idx.T, d.H}, sdt, q_idx);
    c.attn_lse = contiguous_copy(*attn_lse);
  } else {
    c.attn_lse = at::empty({d.idx.B, d.idx.T, d.H}, stats);
  }
  c.p.loss = c.loss.data_ptr();
  c.p.idx_lse = c.idx_lse.data_ptr();
  c.p.attn_lse = c.attn_lse.data_ptr();
  c.p.attn_lse_given = attn_lse.has_value();
  return c;
}

IndexerKlLossBwdCall prepare_indexer_kl_loss_backward(const at::Tensor& grad_loss, const at::Tensor& q_idx,
                                                      const at::Tensor& k_idx, const at::Tensor& w,
                                                      const at::Tensor& q, const at::Tensor& k,
                                                      const c10::optional<at::Tensor>& indices,
                                                      const at::Tensor& idx_lse, const at::Tensor& attn_lse,
                                                      double idx_scale, double attn_scale, bool causal) {
  const char* op = "dsa.indexer_kl_loss_backward";
  const auto d = check_indexer_kl_loss_inputs(op, q_idx, k_idx, w, q, k, indices, causal);
  const auto sdt = score_dtype(q_idx.scalar_type());
  check_same_shape(op, "grad_loss", grad_loss, {d.idx.B, d.idx.T}, sdt, q_idx);
  check_same_shape(op, "idx_lse", idx_lse, {d.idx.B, d.idx.T}, sdt, q_idx);
  check_same_shape(op, "attn_lse", attn_lse, {d.idx.B, d.idx.T, d.H}, sdt, q_idx);
  IndexerKlLossBwdCall c;
  c.fwd = kl_loss_call(d, q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal);
  c.fwd.idx_lse = idx_lse.contiguous();
  c.fwd.attn_lse = attn_lse.contiguous();
  c.grad_loss = grad_loss.contiguous();  // often an expanded scalar (stride 0) from loss.sum()
  c.grad_q_idx = at::empty(q_idx.sizes(), q_idx.options());
  c.grad_k_idx = at::empty(k_idx.sizes(), k_idx.options());
  c.grad_w = at::empty(w.sizes(), c.fwd.w.options());
  auto& p = c.p;
  p.fwd = c.fwd.p;
  p.fwd.idx_lse = c.fwd.idx_lse.data_ptr();
  p.fwd.attn_lse = c.fwd.attn_lse.data_ptr();
  p.fwd.attn_lse_given = true;
  p.grad_loss = c.grad_loss.data_ptr();
  p.grad_q_idx = c.grad_q_idx.data_ptr();
  p.grad_k_idx = c.grad_k_idx.data_ptr();
  p.grad_w = c.grad_w.data_ptr();
  return c;
}

at::Tensor finish_grad_w(const IndexerKlLossBwdCall& call, const at::Tensor& w) {
  return call.grad_w.to(w.scalar_type());
}

}  // namespace dsa
