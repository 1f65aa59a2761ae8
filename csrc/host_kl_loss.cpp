// Host preparation of dsa::indexer_kl_loss and its backward (declared in host.h), shared by the
// CPU and CUDA backends. What they compute: params.h (IndexerKlLossParams) and docs/DESIGN.md.
#include <ATen/ATen.h>

#include "host.h"

namespace dsa {

namespace {

// Inputs brought to stride-1 last dimensions and the parameter block over them and the outputs.
IndexerKlLossCall kl_loss_call(const char* op, const KlLossDims& d, const at::Tensor& q_idx,
                               const at::Tensor& k_idx, const at::Tensor& w, const at::Tensor& q,
                               const at::Tensor& k, const std::optional<at::Tensor>& indices,
                               std::optional<double> idx_scale, std::optional<double> attn_scale, bool causal,
                               const std::optional<at::Tensor>& key_start, const std::optional<at::Tensor>& key_end) {
  IndexerKlLossCall c;
  c.q_idx = last_dim_contiguous(q_idx);
  c.k_idx = last_dim_contiguous(k_idx);
  c.w = score_weights(w, q_idx);
  c.q = last_dim_contiguous(q);
  c.k = last_dim_contiguous(k);
  if (indices.has_value()) {
    c.indices = last_dim_contiguous(*indices);
    check_index_range(op, c.indices, d.idx.S);
  }
  auto& p = c.p;
  p = IndexerKlLossParams{};
  p.idx = indexer_params(d.idx, c.q_idx, c.k_idx, c.w, indexer_scale(d.idx, idx_scale), causal);
  c.ranges = with_key_ranges(op, p.idx, key_start, key_end);
  p.q = c.q.data_ptr();
  p.k = c.k.data_ptr();
  p.indices = c.indices.defined() ? c.indices.data_ptr<int32_t>() : nullptr;
  p.H = d.H, p.Hkv = d.Hkv, p.Dqk = d.Dqk, p.topk = d.topk;
  p.q_batch_stride = c.q.stride(0), p.q_row_stride = c.q.stride(1), p.q_head_stride = c.q.stride(2);
  p.k_batch_stride = c.k.stride(0), p.k_row_stride = c.k.stride(1), p.k_head_stride = c.k.stride(2);
  if (c.indices.defined()) p.idx_batch_stride = c.indices.stride(0), p.idx_row_stride = c.indices.stride(1);
  p.attn_scale = attention_scale(d.Dqk, attn_scale);
  return c;
}

// A fresh contiguous copy: an output must never alias an input.
at::Tensor contiguous_copy(const at::Tensor& t) {
  return at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous)).copy_(t);
}

}  // namespace

IndexerKlLossCall prepare_indexer_kl_loss(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                          const at::Tensor& q, const at::Tensor& k,
                                          const std::optional<at::Tensor>& indices, std::optional<double> idx_scale,
                                          std::optional<double> attn_scale, bool causal,
                                          const std::optional<at::Tensor>& attn_lse,
                                          const std::optional<at::Tensor>& key_start,
                                          const std::optional<at::Tensor>& key_end) {
  const char* op = "dsa.indexer_kl_loss";
  const auto d = check_indexer_kl_loss_inputs(op, q_idx, k_idx, w, q, k, indices, causal);
  check_key_ranges(op, key_start, key_end, q_idx, d.idx);
  const auto sdt = score_dtype(q_idx.scalar_type());
  const auto stats = q_idx.options().dtype(sdt);
  auto c = kl_loss_call(op, d, q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, key_start, key_end);
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
                                                      const std::optional<at::Tensor>& indices,
                                                      const at::Tensor& idx_lse, const at::Tensor& attn_lse,
                                                      std::optional<double> idx_scale,
                                                      std::optional<double> attn_scale, bool causal,
                                                      const std::optional<at::Tensor>& key_start,
                                                      const std::optional<at::Tensor>& key_end) {
  const char* op = "dsa.indexer_kl_loss_backward";
  const auto d = check_indexer_kl_loss_inputs(op, q_idx, k_idx, w, q, k, indices, causal);
  check_key_ranges(op, key_start, key_end, q_idx, d.idx);
  const auto sdt = score_dtype(q_idx.scalar_type());
  check_same_shape(op, "grad_loss", grad_loss, {d.idx.B, d.idx.T}, sdt, q_idx);
  check_same_shape(op, "idx_lse", idx_lse, {d.idx.B, d.idx.T}, sdt, q_idx);
  check_same_shape(op, "attn_lse", attn_lse, {d.idx.B, d.idx.T, d.H}, sdt, q_idx);
  IndexerKlLossBwdCall c;
  c.fwd = kl_loss_call(op, d, q_idx, k_idx, w, q, k, indices, idx_scale, attn_scale, causal, key_start, key_end);
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

}  // namespace dsa
