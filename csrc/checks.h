// Argument validation and shape logic shared by every backend (CPU, CUDA) and the LibTorch
// library. Each check names the operator and argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

namespace dsa {

struct IndexerDims {
  int64_t B, T, S, Hi, Di;
};

struct AttentionDims {
  int64_t B, T, S, H, Hkv, Dqk, Dv, topk;
  bool per_kv_head_indices;  // indices [B,T,Hkv,topk] instead of [B,T,topk]
};

struct KlLossDims {
  IndexerDims idx;
  int64_t H, Hkv, Dqk, topk;  // topk = 0 in the dense form (no indices)
};

// "[2, 3, 4]"
std::string shape_str(const at::Tensor& t);

// Building blocks for an operator's argument checks; each raises with the operator's name, the
// argument's name, what was expected and what came.
bool is_supported_float(at::ScalarType t);
void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank, const char* layout);
void check_float(const char* op, const char* name, const at::Tensor& t);
void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref);
void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref);
// t.size(dim) == expected; `what` says where the expected size comes from.
void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
               const char* what);
// t has exactly this shape and dtype and lives on like's device (saved tensors, incoming gradients).
void check_same_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                      at::ScalarType dtype, const at::Tensor& like);

// Scores, lse and losses are float32, or float64 when the inputs are float64.
at::ScalarType score_dtype(at::ScalarType input);

// The kernels address the last dimension as contiguous; any other stride may be arbitrary
// (v = kv[..., :512] works without a copy). Copies only when the last stride is not 1.
at::Tensor last_dim_contiguous(const at::Tensor& t);

IndexerDims check_indexer_inputs(const char* op, const at::Tensor& q_idx, const at::Tensor& k_idx,
                                 const at::Tensor& w, bool causal);

// The forward indexer ops (indexer_logits, indexer_topk) also take float8_e4m3fn q_idx/k_idx with
// float32 w and an optional k_scale [B, S] float32; k_scale is only for FP8 inputs.
IndexerDims check_indexer_forward_inputs(const char* op, const at::Tensor& q_idx, const at::Tensor& k_idx,
                                         const at::Tensor& w, bool causal,
                                         const std::optional<at::Tensor>& k_scale);

// The optional per-query key ranges key_start, key_end of the indexer ops: each, when given, an
// int32 [B, T] tensor on q_idx's device (either may come alone; the other defaults to 0 or S).
void check_key_ranges(const char* op, const std::optional<at::Tensor>& key_start,
                      const std::optional<at::Tensor>& key_end, const at::Tensor& q_idx, const IndexerDims& d);

// The one place key-range values are checked, called by the host preparation of every indexer op
// that takes ranges: every entry of key_start and key_end in [0, S] (start >= end is a legal empty
// row). Always on CPU; on CUDA only when index checking is switched on (the kernels clamp the
// values to [0, S]), as check_index_range.
void check_key_range_values(const char* op, const char* name, const at::Tensor& t, int64_t S);

// 1 <= topk < 2^31 (index entries are int32).
void check_topk(const char* op, int64_t topk);
void check_topk_inputs(const char* op, const at::Tensor& logits, int64_t topk);

AttentionDims check_sparse_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& indices);

// indexer_kl_loss and its backward: the indexer inputs, the main attention's q [B,T,H,Dqk] and
// k [B,S,Hkv,Dqk] in q_idx's dtype, and indices [B,T,topk] int32 or none (dense form).
KlLossDims check_indexer_kl_loss_inputs(const char* op, const at::Tensor& q_idx, const at::Tensor& k_idx,
                                        const at::Tensor& w, const at::Tensor& q, const at::Tensor& k,
                                        const std::optional<at::Tensor>& indices, bool causal);

// The one place index values are checked, called by every operator's host preparation: every
// entry of an int32 index tensor must be -1 or in [0, S). Always on CPU; on CUDA only when index
// checking is switched on (it synchronises the stream; the kernels treat such entries as -1).
void check_index_range(const char* op, const at::Tensor& indices, int64_t S);

// The CUDA kernels take float32, bfloat16, float16 (and float8_e4m3fn where the op allows it),
// not float64 (those kernels run on CPU); sparse_attention's row-wise kernels also take float64.
void check_cuda_dtype(const char* op, const char* name, const at::Tensor& t);

// Selected positions are int32 (and the CUDA selection's loop counters run a block past a row's
// end): the top-k operators take rows of at most INT32_MAX - 2^16 positions, on every backend.
void check_row_length(const char* op, const char* name, int64_t n);

// The CUDA index-range check. Off by default: CUDA kernels treat any out-of-range index as -1
// and never read out of bounds either way. DSA_EXT_CHECK_INDICES=1 in the environment or
// dsa_ext.set_index_checks(True) switches it on.
bool index_checks_enabled();
void set_index_checks(bool enabled);

}  // namespace dsa
