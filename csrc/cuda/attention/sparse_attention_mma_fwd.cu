// Launch of the tensor-core forward of sparse_attention (kernel: sparse_attention_mma_fwd.cuh)
// and of the merge of its splits (sparse_attention_split.cuh).
#include "cuda/attention/sparse_attention_mma_fwd.cuh"
#include "cuda/attention/sparse_attention_mma_launch.cuh"
#include "cuda/attention/sparse_attention_split.cuh"

namespace dsa {
namespace cuda {

template <typename T>
void launch_fwd_mma(const FwdArgs& a, cudaStream_t stream) {
  launch_mma_kernel(sparse_attention_fwd_mma_kernel<T>, a, a.p, /*backward=*/false, stream, a.splits);
}

template <typename T>
void launch_combine_splits(const CombineArgs& a, cudaStream_t stream) {
  combine_splits_kernel<T><<<static_cast<unsigned>(combine_blocks(a)), kCombineWarps * 32, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_fwd_mma<__nv_bfloat16>(const FwdArgs&, cudaStream_t);
template void launch_fwd_mma<__half>(const FwdArgs&, cudaStream_t);
template void launch_combine_splits<__nv_bfloat16>(const CombineArgs&, cudaStream_t);
template void launch_combine_splits<__half>(const CombineArgs&, cudaStream_t);

}  // namespace cuda
}  // namespace dsa
