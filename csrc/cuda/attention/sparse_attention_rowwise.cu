// Launch of the row-wise sparse_attention kernels (sparse_attention_rowwise.cuh).
#include <c10/cuda/CUDAException.h>

#include "cuda/attention/sparse_attention_rowwise.cuh"
#include "cuda/common/launch.h"

namespace dsa {
namespace cuda {
namespace {

using namespace rowwise;

template <typename Kernel, typename Args>
void launch_rowwise(Kernel kernel, const Args& args, const SparseAttentionParams& p, int64_t smem,
                    cudaStream_t stream) {
  allow_smem(kernel, static_cast<int>(smem));  // the host checked that it fits the opt-in limit
  kernel<<<static_cast<unsigned>(rowwise_blocks(p)), kRowwiseWarps * 32, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void launch_fwd_simple(const SparseAttentionParams& p, cudaStream_t stream) {
  launch_rowwise(rowwise_fwd_kernel<T>, p, p, rowwise_smem_bytes(p, sizeof(typename AccOf<T>::type), false), stream);
}
template <typename T>
void launch_bwd_simple(const SimpleBwdArgs& a, cudaStream_t stream) {
  launch_rowwise(rowwise_bwd_kernel<T>, a, a.p.fwd, rowwise_smem_bytes(a.p.fwd, sizeof(typename AccOf<T>::type), true),
                 stream);
}
template <typename T>
void launch_bwd_delta(const SparseAttentionBwdParams& p, void* out, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  delta_kernel<T><<<static_cast<unsigned>(rowwise_blocks(p.fwd)), kRowwiseWarps * 32, 0, stream>>>(
      p, static_cast<Acc*>(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Every dtype sparse_attention.cu dispatches the row-wise path for (DSA_ROWWISE_TYPES there).
template void launch_fwd_simple<__nv_bfloat16>(const SparseAttentionParams&, cudaStream_t);
template void launch_fwd_simple<__half>(const SparseAttentionParams&, cudaStream_t);
template void launch_fwd_simple<float>(const SparseAttentionParams&, cudaStream_t);
template void launch_fwd_simple<double>(const SparseAttentionParams&, cudaStream_t);
template void launch_bwd_simple<__nv_bfloat16>(const SimpleBwdArgs&, cudaStream_t);
template void launch_bwd_simple<__half>(const SimpleBwdArgs&, cudaStream_t);
template void launch_bwd_simple<float>(const SimpleBwdArgs&, cudaStream_t);
template void launch_bwd_simple<double>(const SimpleBwdArgs&, cudaStream_t);
template void launch_bwd_delta<__nv_bfloat16>(const SparseAttentionBwdParams&, void*, cudaStream_t);
template void launch_bwd_delta<__half>(const SparseAttentionBwdParams&, void*, cudaStream_t);
template void launch_bwd_delta<float>(const SparseAttentionBwdParams&, void*, cudaStream_t);
template void launch_bwd_delta<double>(const SparseAttentionBwdParams&, void*, cudaStream_t);

}  // namespace cuda
}  // namespace dsa
