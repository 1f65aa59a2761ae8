// CUDA operators dsa::sparse_attention and dsa::sparse_attention_backward: checks and allocation
// through host.h, then the choice of kernels (sparse_attention_kernels.h) and their launch on the
// current stream of the inputs' device.
//   - bfloat16 / float16 with head dims that are multiples of 8 and 16-byte aligned rows: the
//     tensor-core kernels, when their tiles fit in shared memory;
//   - everything else (float32, float64, odd dims, misaligned views): the row-wise kernels.
// The backward adds dk/dv atomically, or under torch.use_deterministic_algorithms in a fixed order
// (sparse_attention_deterministic.h). The tensor-core forward of decoding shapes (too few blocks
// for the GPU) splits each row's index slots and merges the splits (attention_splits).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>

#include "checks.h"
#include "host.h"
#include "cuda/attention/sparse_attention_deterministic.h"
#include "cuda/attention/sparse_attention_kernels.h"
#include "cuda/common/dispatch.h"
#include "cuda/common/launch.h"

namespace dsa {
namespace cuda {
namespace {

constexpr double kLog2e = 1.4426950408889634;

// The dtypes each path's launchers are instantiated for (sparse_attention_mma_fwd.cu / _bwd.cu,
// sparse_attention_rowwise.cu), as DSA_DISPATCH_CUDA lists.
#define DSA_MMA_TYPES (at::kBFloat16, at::kHalf)
#define DSA_ROWWISE_TYPES (at::kBFloat16, at::kHalf, at::kFloat, at::kDouble)

// Warps per tensor-core block at least (choose_mma_shape): 4, or DSA_EXT_CUDA_MIN_WARPS (1 gives
// the narrowest blocks, for comparing the two on a GPU).
int min_block_warps() {
  const char* env = std::getenv("DSA_EXT_CUDA_MIN_WARPS");
  return env != nullptr ? std::clamp(std::atoi(env), 1, kMaxWarps) : 4;
}

// Most splits of the forward's index slots (attention_splits): DSA_EXT_CUDA_ATTN_MAX_SPLITS, 1 to
// time the unsplit kernel on a GPU; read on every call.
int max_attention_splits() {
  const char* env = std::getenv("DSA_EXT_CUDA_ATTN_MAX_SPLITS");
  return env != nullptr ? std::clamp(std::atoi(env), 1, kMaxAttnSplits) : kMaxAttnSplits;
}

// The tensor-core forward, split over index slots when the blocks would not fill the GPU: float32
// partials per split, then their merge into out and lse.
void forward_mma(const char* op, const SparseAttentionCall& c, const MmaShape& s, cudaStream_t stream) {
  const auto& p = c.p;
  FwdArgs args{p, s, static_cast<float>(p.scale * kLog2e)};
  const AttnSplits sp = attention_splits(p, s, sm_count(), max_attention_splits());
  check_grid(op, p.B * p.T * p.Hkv * s.chunks * sp.splits);
  const at::ScalarType dtype = c.q.scalar_type();
  if (sp.splits == 1) {
    DSA_DISPATCH_CUDA(dtype, op, DSA_MMA_TYPES, [&] { launch_fwd_mma<scalar_t>(args, stream); });
    return;
  }
  const int64_t rows = p.B * p.T * p.H;
  const auto f32 = c.q.options().dtype(at::kFloat);
  const at::Tensor part_out = at::empty({rows, sp.splits, p.Dv}, f32);
  const at::Tensor part_lse = at::empty({rows, sp.splits}, f32);
  args.splits = sp.splits;
  args.split_tiles = sp.split_tiles;
  args.part_out = part_out.data_ptr<float>();
  args.part_lse = part_lse.data_ptr<float>();
  const CombineArgs merge{args.part_out, args.part_lse, c.out.data_ptr(), c.lse.data_ptr<float>(), rows, p.Dv,
                          sp.splits};
  check_grid(op, ceil_div(rows, kCombineWarps));
  DSA_DISPATCH_CUDA(dtype, op, DSA_MMA_TYPES, [&] {
    launch_fwd_mma<scalar_t>(args, stream);
    launch_combine_splits<scalar_t>(merge, stream);
  });
}

// The tensor-core kernels copy rows in 16-byte pieces: every row must start 16-byte aligned.
bool rows_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  return true;
}

// v is a column prefix of k's storage (MLA: v = kv[..., :Dv]): the kernels read V from the K tile.
bool v_is_prefix_of_k(const at::Tensor& k, const at::Tensor& v) {
  if (v.data_ptr() != k.data_ptr() || v.size(3) > k.size(3)) return false;
  for (int64_t d = 0; d < 3; ++d)
    if (k.size(d) > 1 && k.stride(d) != v.stride(d)) return false;
  return true;
}

// The tensor-core block shape for these inputs (choose_mma_shape), or nullopt for the row-wise
// path: other dtypes, head dims that are not multiples of 8 (or absurdly large), misaligned rows.
std::optional<MmaShape> tensor_core_shape(const SparseAttentionCall& c, const at::Tensor* grad_out, bool backward) {
  const auto& p = c.p;
  const auto dtype = c.q.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return std::nullopt;
  if (!mma_head_dims(p)) return std::nullopt;
  if (!rows_aligned(c.q) || !rows_aligned(c.k) || !rows_aligned(c.v)) return std::nullopt;
  if (grad_out != nullptr && !rows_aligned(*grad_out)) return std::nullopt;
  MmaShape s;
  if (!choose_mma_shape(p, v_is_prefix_of_k(c.k, c.v), backward, block_smem_limit(), min_block_warps(), s))
    return std::nullopt;
  return s;
}

// The row-wise kernels keep whole rows in shared memory; absurd head dims do not fit.
void check_rowwise(const char* op, const SparseAttentionCall& c, bool backward) {
  const auto& p = c.p;
  check_grid(op, rowwise_blocks(p));
  const int64_t need = rowwise_smem_bytes(p, c.q.scalar_type() == at::kDouble ? 8 : 4, backward);
  const int limit = block_smem_limit();
  TORCH_CHECK(need <= limit, op, ": head dims Dqk=", p.Dqk, " and Dv=", p.Dv, " need ", need,
              " bytes of shared memory per block, more than the device's ", limit);
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& indices,
                                                         std::optional<double> scale) {
  const char* op = "dsa.sparse_attention";
  const c10::cuda::CUDAGuard guard(q.device());
  auto c = prepare_sparse_attention(q, k, v, indices, scale);
  const auto& p = c.p;
  if (c.out.numel() == 0) return {c.out, c.lse};
  if (p.S == 0) {  // every slot is empty
    c.out.zero_();
    c.lse.fill_(-std::numeric_limits<double>::infinity());
    return {c.out, c.lse};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType dtype = c.q.scalar_type();
  if (const auto s = tensor_core_shape(c, nullptr, /*backward=*/false)) {
    forward_mma(op, c, *s, stream);
  } else {
    check_rowwise(op, c, /*backward=*/false);
    DSA_DISPATCH_CUDA(dtype, op, DSA_ROWWISE_TYPES, [&] { launch_fwd_simple<scalar_t>(p, stream); });
  }
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& indices, const at::Tensor& out, const at::Tensor& lse,
    std::optional<double> scale) {
  const char* op = "dsa.sparse_attention_backward";
  const c10::cuda::CUDAGuard guard(q.device());
  auto c = prepare_sparse_attention_backward(grad_out, grad_lse, q, k, v, indices, out, lse, scale);
  const auto& f = c.p.fwd;
  if (f.B * f.T * f.H == 0 || f.S == 0) {  // no query, or every slot empty: all gradients are 0
    c.grad_q.zero_();
    c.grad_k.zero_();
    c.grad_v.zero_();
    return {c.grad_q, c.grad_k, c.grad_v};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType dtype = c.fwd.q.scalar_type();
  const auto acc_options = c.fwd.q.options().dtype(score_dtype(dtype));
  const at::Tensor delta = at::empty({f.B, f.T, f.H}, acc_options);
  check_grid(op, rowwise_blocks(f));  // the delta kernel: one warp per (b, t, h) row, on both paths
  DSA_DISPATCH_CUDA(dtype, op, DSA_ROWWISE_TYPES, [&] { launch_bwd_delta<scalar_t>(c.p, delta.data_ptr(), stream); });

  const auto mma = tensor_core_shape(c.fwd, &c.grad_out, /*backward=*/true);
  if (!mma) check_rowwise(op, c.fwd, /*backward=*/true);
  const float scale_log2 = static_cast<float>(f.scale * kLog2e);
  const auto launch = [&](const SparseAttentionBwdParams& p, const void* delta_p, const KeyGradOut& g) {
    if (mma) {
      check_grid(op, p.fwd.B * p.fwd.T * p.fwd.Hkv * mma->chunks);
      const BwdArgs args{p, *mma, scale_log2, static_cast<const float*>(delta_p), g};
      DSA_DISPATCH_CUDA(dtype, op, DSA_MMA_TYPES, [&] { launch_bwd_mma<scalar_t>(args, stream); });
    } else {
      const SimpleBwdArgs args{p, delta_p, g};
      DSA_DISPATCH_CUDA(dtype, op, DSA_ROWWISE_TYPES, [&] { launch_bwd_simple<scalar_t>(args, stream); });
    }
  };
  const int64_t rows = f.B * f.S * f.Hkv;
  if (at::globalContext().deterministicAlgorithms()) {
    at::Tensor dk = at::zeros({rows + 1, f.Dqk}, acc_options), dv = at::zeros({rows + 1, f.Dv}, acc_options);
    deterministic_key_grads(c, delta, mma ? mma->chunks : f.H / f.Hkv, kContribBytes, dk, dv, launch);
    c.grad_k.copy_(dk.narrow(0, 0, rows).view(c.grad_k.sizes()));
    c.grad_v.copy_(dv.narrow(0, 0, rows).view(c.grad_v.sizes()));
    return {c.grad_q, c.grad_k, c.grad_v};
  }
  // dk / dv accumulate atomically in the accumulation dtype: in place when the gradients have it
  const bool in_place = c.grad_k.scalar_type() == acc_options.dtype();
  const at::Tensor dk = in_place ? c.grad_k.zero_() : at::zeros(c.grad_k.sizes(), acc_options);
  const at::Tensor dv = in_place ? c.grad_v.zero_() : at::zeros(c.grad_v.sizes(), acc_options);
  launch(c.p, delta.data_ptr(), KeyGradOut{dk.data_ptr(), dv.data_ptr(), nullptr, nullptr});
  if (!in_place) {
    c.grad_k.copy_(dk);
    c.grad_v.copy_(dv);
  }
  return {c.grad_q, c.grad_k, c.grad_v};
}

}  // namespace
}  // namespace cuda
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) {
  m.impl("sparse_attention", &dsa::cuda::sparse_attention_cuda);
  m.impl("sparse_attention_backward", &dsa::cuda::sparse_attention_backward_cuda);
}
