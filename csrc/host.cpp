#include "host.h"

#include <ATen/ATen.h>

#include <cmath>

namespace dsa {

// std::pow(x, -0.5), not 1 / sqrt(x): the same rounding as Python's x ** -0.5 (dsa_ext.conventions).
double indexer_scale(const IndexerDims& d, std::optional<double> scale) {
  return scale.has_value() ? *scale : std::pow(static_cast<double>(d.Hi * d.Di), -0.5);
}

double attention_scale(int64_t Dqk, std::optional<double> scale) {
  return scale.has_value() ? *scale : std::pow(static_cast<double>(Dqk), -0.5);
}

IndexerParams indexer_params(const IndexerDims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& w,
                             double scale, bool causal) {
  IndexerParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.w = w.data_ptr();
  p.k_scale = nullptr;
  p.key_start = nullptr;
  p.key_end = nullptr;
  p.B = d.B, p.T = d.T, p.S = d.S, p.Hi = d.Hi, p.Di = d.Di;
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1);
  p.scale = scale;
  p.causal = causal;
  p.causal_offset = d.S - d.T;
  return p;
}

at::Tensor with_key_scale(IndexerParams& p, const std::optional<at::Tensor>& k_scale) {
  if (!k_scale.has_value() || !k_scale->defined()) return {};
  at::Tensor ks = k_scale->contiguous();
  p.k_scale = ks.data_ptr<float>();
  return ks;
}

KeyRanges with_key_ranges(const char* op, IndexerParams& p, const std::optional<at::Tensor>& key_start,
                          const std::optional<at::Tensor>& key_end) {
  KeyRanges r;
  if (key_start.has_value() && key_start->defined()) {
    r.start = key_start->contiguous();
    check_key_range_values(op, "key_start", r.start, p.S);
    p.key_start = r.start.data_ptr<int32_t>();
  }
  if (key_end.has_value() && key_end->defined()) {
    r.end = key_end->contiguous();
    check_key_range_values(op, "key_end", r.end, p.S);
    p.key_end = r.end.data_ptr<int32_t>();
  }
  return r;
}

at::Tensor score_weights(const at::Tensor& w, const at::Tensor& q_idx) {
  return w.to(score_dtype(q_idx.scalar_type())).contiguous();
}

namespace {

// The scoring inputs of an indexer forward whose inputs (dims d) and key ranges passed the checks.
IndexerScoring indexer_scoring(const char* op, const IndexerDims& d, const at::Tensor& q_idx, const at::Tensor& k_idx,
                               const at::Tensor& w, std::optional<double> scale, bool causal,
                               const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& key_start,
                               const std::optional<at::Tensor>& key_end) {
  IndexerScoring s;
  s.q = last_dim_contiguous(q_idx);
  s.k = last_dim_contiguous(k_idx);
  s.w = score_weights(w, q_idx);
  s.p = indexer_params(d, s.q, s.k, s.w, indexer_scale(d, scale), causal);
  s.k_scale = with_key_scale(s.p, k_scale);
  s.ranges = with_key_ranges(op, s.p, key_start, key_end);
  return s;
}

}  // namespace

IndexerLogitsCall prepare_indexer_logits(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                         std::optional<double> scale, bool causal,
                                         const std::optional<at::Tensor>& k_scale,
                                         const std::optional<at::Tensor>& key_start,
                                         const std::optional<at::Tensor>& key_end) {
  const char* op = "dsa.indexer_logits";
  const auto d = check_indexer_forward_inputs(op, q_idx, k_idx, w, causal, k_scale);
  check_key_ranges(op, key_start, key_end, q_idx, d);
  return {indexer_scoring(op, d, q_idx, k_idx, w, scale, causal, k_scale, key_start, key_end),
          at::empty({d.B, d.T, d.S}, q_idx.options().dtype(score_dtype(q_idx.scalar_type())))};
}

IndexerLogitsBwdCall prepare_indexer_logits_backward(const at::Tensor& grad_logits, const at::Tensor& q_idx,
                                                     const at::Tensor& k_idx, const at::Tensor& w,
                                                     std::optional<double> scale, bool causal,
                                                     const std::optional<at::Tensor>& key_start,
                                                     const std::optional<at::Tensor>& key_end) {
  const char* op = "dsa.indexer_logits_backward";
  const auto d = check_indexer_inputs(op, q_idx, k_idx, w, causal);
  check_key_ranges(op, key_start, key_end, q_idx, d);
  check_same_shape(op, "grad_logits", grad_logits, {d.B, d.T, d.S}, score_dtype(q_idx.scalar_type()), q_idx);
  IndexerLogitsBwdCall c;
  c.q = last_dim_contiguous(q_idx);
  c.k = last_dim_contiguous(k_idx);
  c.w = score_weights(w, q_idx);
  c.grad_logits = last_dim_contiguous(grad_logits);
  c.grad_q = at::empty({d.B, d.T, d.Hi, d.Di}, q_idx.options());
  c.grad_k = at::empty({d.B, d.S, d.Di}, k_idx.options());
  c.grad_w = at::empty({d.B, d.T, d.Hi}, c.w.options());
  c.p.fwd = indexer_params(d, c.q, c.k, c.w, indexer_scale(d, scale), causal);
  c.ranges = with_key_ranges(op, c.p.fwd, key_start, key_end);
  c.p.grad_logits = c.grad_logits.data_ptr();
  c.p.grad_batch_stride = c.grad_logits.stride(0), c.p.grad_row_stride = c.grad_logits.stride(1);
  c.p.grad_q = c.grad_q.data_ptr();
  c.p.grad_k = c.grad_k.data_ptr();
  c.p.grad_w = c.grad_w.data_ptr();
  return c;
}

at::Tensor finish_grad_w(const at::Tensor& grad_w, const at::Tensor& w) { return grad_w.to(w.scalar_type()); }

TopkCall prepare_topk(const at::Tensor& logits, int64_t topk) {
  check_topk_inputs("dsa.topk_indices", logits, topk);
  check_row_length("dsa.topk_indices", "logits", logits.size(2));
  TopkCall c;
  c.logits = last_dim_contiguous(logits);
  const int64_t B = logits.size(0), T = logits.size(1), S = logits.size(2);
  c.out = at::empty({B, T, topk}, logits.options().dtype(at::kInt));
  c.p = TopkParams{c.logits.data_ptr(), B, T, S, topk, c.logits.stride(0), c.logits.stride(1),
                   c.out.data_ptr<int32_t>()};
  return c;
}

IndexerTopkCall prepare_indexer_topk(const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w,
                                     int64_t topk, std::optional<double> scale, bool causal,
                                     const std::optional<at::Tensor>& k_scale,
                                     const std::optional<at::Tensor>& key_start,
                                     const std::optional<at::Tensor>& key_end) {
  const char* op = "dsa.indexer_topk";
  const auto d = check_indexer_forward_inputs(op, q_idx, k_idx, w, causal, k_scale);
  check_key_ranges(op, key_start, key_end, q_idx, d);
  check_topk(op, topk);
  check_row_length(op, "k_idx", d.S);
  return {indexer_scoring(op, d, q_idx, k_idx, w, scale, causal, k_scale, key_start, key_end),
          at::empty({d.B, d.T, topk}, q_idx.options().dtype(at::kInt)), topk};
}

namespace {

// Inputs with stride-1 last dims, plus the params block over them and over out/lse.
SparseAttentionCall sparse_attention_call(const char* op, const AttentionDims& d, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& indices,
                                          at::Tensor out, at::Tensor lse, std::optional<double> scale) {
  SparseAttentionCall c;
  c.q = last_dim_contiguous(q);
  c.k = last_dim_contiguous(k);
  c.v = last_dim_contiguous(v);
  c.indices = last_dim_contiguous(indices);
  check_index_range(op, c.indices, d.S);
  c.out = std::move(out);
  c.lse = std::move(lse);
  auto& p = c.p;
  p.q = c.q.data_ptr();
  p.k = c.k.data_ptr();
  p.v = c.v.data_ptr();
  p.indices = c.indices.data_ptr<int32_t>();
  p.out = c.out.data_ptr();
  p.lse = c.lse.data_ptr();
  p.B = d.B, p.T = d.T, p.S = d.S, p.H = d.H, p.Hkv = d.Hkv, p.Dqk = d.Dqk, p.Dv = d.Dv, p.topk = d.topk;
  p.q_batch_stride = c.q.stride(0), p.q_row_stride = c.q.stride(1), p.q_head_stride = c.q.stride(2);
  p.k_batch_stride = c.k.stride(0), p.k_row_stride = c.k.stride(1), p.k_head_stride = c.k.stride(2);
  p.v_batch_stride = c.v.stride(0), p.v_row_stride = c.v.stride(1), p.v_head_stride = c.v.stride(2);
  p.idx_batch_stride = c.indices.stride(0), p.idx_row_stride = c.indices.stride(1);
  p.idx_head_stride = d.per_kv_head_indices ? c.indices.stride(2) : 0;
  p.scale = attention_scale(d.Dqk, scale);
  return c;
}

}  // namespace

SparseAttentionCall prepare_sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& indices, std::optional<double> scale) {
  const char* op = "dsa.sparse_attention";
  const auto d = check_sparse_attention_inputs(op, q, k, v, indices);
  return sparse_attention_call(op, d, q, k, v, indices, at::empty({d.B, d.T, d.H, d.Dv}, q.options()),
                               at::empty({d.B, d.T, d.H}, q.options().dtype(score_dtype(q.scalar_type()))),
                               scale);
}

SparseAttentionBwdCall prepare_sparse_attention_backward(const at::Tensor& grad_out,
                                                         const std::optional<at::Tensor>& grad_lse,
                                                         const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& indices,
                                                         const at::Tensor& out, const at::Tensor& lse,
                                                         std::optional<double> scale) {
  const char* op = "dsa.sparse_attention_backward";
  const auto d = check_sparse_attention_inputs(op, q, k, v, indices);
  const auto sdt = score_dtype(q.scalar_type());
  check_same_shape(op, "grad_out", grad_out, {d.B, d.T, d.H, d.Dv}, q.scalar_type(), q);
  check_same_shape(op, "out", out, {d.B, d.T, d.H, d.Dv}, q.scalar_type(), q);
  check_same_shape(op, "lse", lse, {d.B, d.T, d.H}, sdt, q);
  SparseAttentionBwdCall c;
  c.fwd = sparse_attention_call(op, d, q, k, v, indices, out.contiguous(), lse.contiguous(), scale);
  const auto& f = c.fwd.p;
  c.grad_out = last_dim_contiguous(grad_out);
  if (grad_lse.has_value() && grad_lse->defined()) {
    check_same_shape(op, "grad_lse", *grad_lse, {f.B, f.T, f.H}, sdt, q);
    c.grad_lse = grad_lse->contiguous();
  }
  c.grad_q = at::empty({f.B, f.T, f.H, f.Dqk}, q.options());
  c.grad_k = at::empty({f.B, f.S, f.Hkv, f.Dqk}, q.options());
  c.grad_v = at::empty({f.B, f.S, f.Hkv, f.Dv}, q.options());
  auto& p = c.p;
  p.fwd = c.fwd.p;
  p.grad_out = c.grad_out.data_ptr();
  p.do_batch_stride = c.grad_out.stride(0), p.do_row_stride = c.grad_out.stride(1), p.do_head_stride = c.grad_out.stride(2);
  p.grad_lse = c.grad_lse.defined() ? c.grad_lse.data_ptr() : nullptr;
  p.grad_q = c.grad_q.data_ptr();
  p.grad_k = c.grad_k.data_ptr();
  p.grad_v = c.grad_v.data_ptr();
  return c;
}

}  // namespace dsa
