// The deterministic sparse_attention backward of the CUDA backend on CPU tensors: the host code
// of csrc/cuda/attention/sparse_attention_deterministic.h (token slices, contribution rows, ordered sums)
// driving the emulated backward kernels (emu_cuda.h), for test_deterministic_backward.py. Built
// by torch.utils.cpp_extension against the emulator's source directory (emulator.source_dir).
#include <torch/extension.h>

// after torch: the emulated tensor_core.cuh brings emu_cuda.h, whose macros (__global__,
// threadIdx, ...) are for the kernels only
#include "cuda/attention/sparse_attention_deterministic.h"
#include "cuda/attention/sparse_attention_mma_bwd.cuh"
#include "cuda/attention/sparse_attention_rowwise.cuh"

namespace {

using namespace dsa;
using namespace dsa::cuda;

template <typename T>
std::vector<at::Tensor> run(SparseAttentionBwdCall& c, double scale, bool use_mma, int64_t smem_limit,
                            int64_t contrib_bytes) {
  using Acc = typename rowwise::AccOf<T>::type;
  const SparseAttentionParams& f = c.p.fwd;
  const auto acc = c.fwd.q.options().dtype(score_dtype(c.fwd.q.scalar_type()));
  const at::Tensor delta = at::empty({f.B, f.T, f.H}, acc);
  emu::launch(static_cast<unsigned>(rowwise_blocks(f)), kRowwiseWarps * 32, 0,
              [&] { rowwise::delta_kernel<T>(c.p, delta.data_ptr<Acc>()); });
  MmaShape s{};
  const bool v_in_k = c.fwd.v.data_ptr() == c.fwd.k.data_ptr();
  TORCH_CHECK(!use_mma || choose_mma_shape(f, v_in_k, /*backward=*/true, static_cast<int>(smem_limit), 4, s),
              "no tensor-core shape fits");
  const float scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const int64_t rows = f.B * f.S * f.Hkv;
  at::Tensor dk = at::zeros({rows + 1, f.Dqk}, acc), dv = at::zeros({rows + 1, f.Dv}, acc);
  const auto launch = [&](const SparseAttentionBwdParams& p, const void* delta_p, const KeyGradOut& g) {
    if (use_mma) {
      if constexpr (sizeof(T) == 2) {
        const BwdArgs a{p, s, scale_log2, static_cast<const float*>(delta_p), g};
        emu::launch(static_cast<unsigned>(p.fwd.B * p.fwd.T * p.fwd.Hkv * s.chunks), threads_of(s),
                    smem_layout(s, true).bytes, [&] { sparse_attention_bwd_mma_kernel<T>(a); });
      }
    } else {
      const SimpleBwdArgs a{p, delta_p, g};
      emu::launch(static_cast<unsigned>(rowwise_blocks(p.fwd)), kRowwiseWarps * 32,
                  rowwise_smem_bytes(p.fwd, sizeof(Acc), true), [&] { rowwise::rowwise_bwd_kernel<T>(a); });
    }
  };
  deterministic_key_grads(c, delta, use_mma ? s.chunks : f.H / f.Hkv, contrib_bytes, dk, dv, launch);
  return {c.grad_q, dk.narrow(0, 0, rows).view(c.grad_k.sizes()), dv.narrow(0, 0, rows).view(c.grad_v.sizes())};
}

std::vector<at::Tensor> deterministic_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                                               const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& indices, const at::Tensor& out,
                                               const at::Tensor& lse, double scale, bool use_mma,
                                               int64_t smem_limit, int64_t contrib_bytes) {
  auto c = prepare_sparse_attention_backward(grad_out, grad_lse, q, k, v, indices, out, lse, scale);
  switch (q.scalar_type()) {
    case at::kBFloat16: return run<__nv_bfloat16>(c, scale, use_mma, smem_limit, contrib_bytes);
    case at::kHalf: return run<__half>(c, scale, use_mma, smem_limit, contrib_bytes);
    default: return run<float>(c, scale, use_mma, smem_limit, contrib_bytes);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("deterministic_backward", &deterministic_backward); }
