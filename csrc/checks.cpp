#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <sstream>

namespace dsa {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

at::ScalarType score_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.dim() > 0 && t.stride(-1) != 1 && t.size(-1) > 1 ? t.contiguous() : t;
}


bool is_supported_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK(t.dim() == rank, op, ": expected ", name, " to be a ", rank, "-D tensor ", layout,
              ", got shape ", shape_str(t));
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": expected ", name,
              " to be float64, float32, bfloat16 or float16, got ", t.scalar_type());
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " to have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": expected ", name, " on the device of ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
               const char* what) {
  TORCH_CHECK(t.size(dim) == expected, op, ": expected ", name, ".size(", dim, ") == ", expected, " (",
              what, "), got shape ", shape_str(t));
}

void check_same_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                      at::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of shape ", expected, ", got ", shape_str(t));
  TORCH_CHECK(t.scalar_type() == dtype, op, ": expected ", name, " to be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": expected ", name, " on ", like.device(), ", got ", t.device());
}


namespace {

// Ranks, devices and sizes of the indexer inputs, after their dtypes were checked.
IndexerDims check_indexer_shapes(const char* op, const at::Tensor& q_idx, const at::Tensor& k_idx,
                                 const at::Tensor& w, bool causal) {
  check_same_device(op, "k_idx", k_idx, "q_idx", q_idx);
  check_same_device(op, "w", w, "q_idx", q_idx);
  IndexerDims d{q_idx.size(0), q_idx.size(1), k_idx.size(1), q_idx.size(2), q_idx.size(3)};
  check_dim(op, "k_idx", k_idx, 0, d.B, "batch B of q_idx");
  check_dim(op, "k_idx", k_idx, 2, d.Di, "head dim Di of q_idx");
  check_dim(op, "w", w, 0, d.B, "batch B of q_idx");
  check_dim(op, "w", w, 1, d.T, "length T of q_idx");
  check_dim(op, "w", w, 2, d.Hi, "heads Hi of q_idx");
  TORCH_CHECK(d.Hi > 0 && d.Di > 0, op, ": expected q_idx to have Hi > 0 heads of Di > 0 dims, got shape ",
              shape_str(q_idx));
  TORCH_CHECK(!causal || d.S >= d.T, op, ": causal attention needs S >= T (queries are aligned to the last ",
              "keys), got T=", d.T, " from q_idx and S=", d.S, " from k_idx");
  return d;
}

void check_indexer_ranks(const char* op, const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& w) {
  check_rank(op, "q_idx", q_idx, 4, "[B, T, Hi, Di]");
  check_rank(op, "k_idx", k_idx, 3, "[B, S, Di]");
  check_rank(op, "w", w, 3, "[B, T, Hi]");
}

}  // namespace

IndexerDims check_indexer_inputs(const char* op, const at::Tensor& q_idx, const at::Tensor& k_idx,
                                 const at::Tensor& w, bool causal) {
  check_indexer_ranks(op, q_idx, k_idx, w);
  TORCH_CHECK(q_idx.scalar_type() != at::kFloat8_e4m3fn, op, ": expected q_idx to be float64, float32, ",
              "bfloat16 or float16, got Float8_e4m3fn (FP8 indexer inputs are forward-only: indexer_logits ",
              "and indexer_topk; train the indexer in bfloat16)");
  check_float(op, "q_idx", q_idx);
  check_same_dtype(op, "k_idx", k_idx, "q_idx", q_idx);
  TORCH_CHECK(w.scalar_type() == q_idx.scalar_type() || w.scalar_type() == at::kFloat, op,
              ": expected w to be float32 or the dtype of q_idx (", q_idx.scalar_type(), "), got ",
              w.scalar_type());
  return check_indexer_shapes(op, q_idx, k_idx, w, causal);
}

IndexerDims check_indexer_forward_inputs(const char* op, const at::Tensor& q_idx, const at::Tensor& k_idx,
                                         const at::Tensor& w, bool causal,
                                         const std::optional<at::Tensor>& k_scale) {
  const bool fp8 = q_idx.scalar_type() == at::kFloat8_e4m3fn;
  const bool has_scale = k_scale.has_value() && k_scale->defined();
  if (!fp8) {
    TORCH_CHECK(!has_scale, op, ": k_scale is only for float8_e4m3fn q_idx/k_idx, got q_idx ",
                q_idx.scalar_type(), " (scale the keys themselves instead)");
    return check_indexer_inputs(op, q_idx, k_idx, w, causal);
  }
  check_indexer_ranks(op, q_idx, k_idx, w);
  check_same_dtype(op, "k_idx", k_idx, "q_idx", q_idx);
  TORCH_CHECK(w.scalar_type() == at::kFloat, op,
              ": expected w to be float32 with float8_e4m3fn q_idx (fold the query scales into it), got ",
              w.scalar_type());
  const auto d = check_indexer_shapes(op, q_idx, k_idx, w, causal);
  if (has_scale) {
    check_rank(op, "k_scale", *k_scale, 2, "[B, S]");
    TORCH_CHECK(k_scale->scalar_type() == at::kFloat, op, ": expected k_scale to be float32, got ",
                k_scale->scalar_type());
    check_same_device(op, "k_scale", *k_scale, "q_idx", q_idx);
    check_dim(op, "k_scale", *k_scale, 0, d.B, "batch B of q_idx");
    check_dim(op, "k_scale", *k_scale, 1, d.S, "length S of k_idx");
  }
  return d;
}

void check_topk(const char* op, int64_t topk) {
  TORCH_CHECK_VALUE(topk >= 1 && topk <= INT32_MAX, op, ": expected 1 <= topk < 2^31, got topk=", topk);
}

void check_topk_inputs(const char* op, const at::Tensor& logits, int64_t topk) {
  check_rank(op, "logits", logits, 3, "[B, T, S]");
  check_float(op, "logits", logits);
  check_topk(op, topk);
}

AttentionDims check_sparse_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& indices) {
  check_rank(op, "q", q, 4, "[B, T, H, Dqk]");
  check_rank(op, "k", k, 4, "[B, S, Hkv, Dqk]");
  check_rank(op, "v", v, 4, "[B, S, Hkv, Dv]");
  check_float(op, "q", q);
  check_same_dtype(op, "k", k, "q", q);
  check_same_dtype(op, "v", v, "q", q);
  TORCH_CHECK(indices.scalar_type() == at::kInt, op, ": expected indices to be int32, got ",
              indices.scalar_type());
  check_same_device(op, "k", k, "q", q);
  check_same_device(op, "v", v, "q", q);
  check_same_device(op, "indices", indices, "q", q);
  AttentionDims d{};
  d.B = q.size(0);
  d.T = q.size(1);
  d.H = q.size(2);
  d.Dqk = q.size(3);
  d.S = k.size(1);
  d.Hkv = k.size(2);
  d.Dv = v.size(3);
  check_dim(op, "k", k, 0, d.B, "batch B of q");
  check_dim(op, "k", k, 3, d.Dqk, "head dim Dqk of q");
  check_dim(op, "v", v, 0, d.B, "batch B of q");
  check_dim(op, "v", v, 1, d.S, "length S of k");
  check_dim(op, "v", v, 2, d.Hkv, "kv heads Hkv of k");
  TORCH_CHECK(d.H > 0 && d.Hkv > 0 && d.H % d.Hkv == 0, op, ": expected the H=", d.H,
              " query heads of q to be a positive multiple of the Hkv=", d.Hkv, " kv heads of k");
  TORCH_CHECK(d.Dqk > 0 && d.Dv > 0, op, ": expected Dqk > 0 and Dv > 0, got q ", shape_str(q), " and v ",
              shape_str(v));
  TORCH_CHECK(indices.dim() == 3 || indices.dim() == 4, op,
              ": expected indices to be [B, T, topk] or [B, T, Hkv, topk], got shape ", shape_str(indices));
  d.per_kv_head_indices = indices.dim() == 4;
  check_dim(op, "indices", indices, 0, d.B, "batch B of q");
  check_dim(op, "indices", indices, 1, d.T, "length T of q");
  if (d.per_kv_head_indices) check_dim(op, "indices", indices, 2, d.Hkv, "kv heads Hkv of k");
  d.topk = indices.size(-1);
  TORCH_CHECK_VALUE(d.topk >= 1, op, ": expected indices to hold topk >= 1 entries per row, got shape ",
                    shape_str(indices));
  check_topk(op, d.topk);  // the kernels count index slots in int32 (tiles of a row)
  return d;
}

KlLossDims check_indexer_kl_loss_inputs(const char* op, const at::Tensor& q_idx, const at::Tensor& k_idx,
                                        const at::Tensor& w, const at::Tensor& q, const at::Tensor& k,
                                        const std::optional<at::Tensor>& indices, bool causal) {
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
    check_rank(op, "indices", ind, 3, "[B, T, topk]");
    check_same_device(op, "indices", ind, "q_idx", q_idx);
    check_dim(op, "indices", ind, 0, d.idx.B, "batch B of q_idx");
    check_dim(op, "indices", ind, 1, d.idx.T, "length T of q_idx");
    d.topk = ind.size(2);
    TORCH_CHECK_VALUE(d.topk >= 1, op, ": expected indices to hold topk >= 1 entries per row, got shape ",
                      shape_str(ind));
  }
  return d;
}

void check_cuda_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() != at::kDouble, op, ": expected ", name,
              " to be float32, bfloat16 or float16 on CUDA, got float64 (the float64 kernels run on CPU)");
}

void check_row_length(const char* op, const char* name, int64_t n) {
  constexpr int64_t kMaxRow = INT32_MAX - (1 << 16);
  TORCH_CHECK(n <= kMaxRow, op, ": expected ", name, " to have at most ", kMaxRow,
              " positions per row (int32 indices), got ", n);
}

void check_index_range(const char* op, const at::Tensor& indices, int64_t S) {
  if (indices.numel() == 0 || (indices.is_cuda() && !index_checks_enabled())) return;
  const auto bad = at::logical_or(indices.lt(-1), indices.ge(S));
  if (!bad.any().item<bool>()) return;
  const auto first = bad.nonzero()[0].cpu();  // coordinates of the first bad entry
  auto elem = indices;
  std::ostringstream where;
  for (int64_t i = 0; i < first.size(0); ++i) {
    const int64_t c = first[i].item<int64_t>();
    where << (i ? ", " : "") << c;
    elem = elem.select(0, c);
  }
  TORCH_CHECK_INDEX(false, op, ": expected every index to be -1 or in [0, S=", S, "), got ",
                    elem.item<int64_t>(), " at indices[", where.str(), "]");
}

namespace {
std::atomic<bool>& index_check_flag() {
  static std::atomic<bool> flag{[] {
    const char* env = std::getenv("DSA_EXT_CHECK_INDICES");
    return env != nullptr && env[0] == '1';
  }()};
  return flag;
}
}  // namespace

bool index_checks_enabled() { return index_check_flag().load(); }
void set_index_checks(bool enabled) { index_check_flag().store(enabled); }

}  // namespace dsa
