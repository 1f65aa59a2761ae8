// Launch of the tensor-core forward of sparse_attention (kernel: sparse_attention_mma_fwd.cuh).
#include "cuda/attention/sparse_attention_mma_fwd.cuh"
#include "cuda/attention/sparse_attention_mma_launch.cuh"

namespace dsa {
namespace cuda {

template <typename T>
void launch_fwd_mma(const FwdArgs& a, cudaStream_t stream) {
  launch_mma_kernel(sparse_attention_fwd_mma_kernel<T>, a, a.p, /*backward=*/false, stream);
}

template void launch_fwd_mma<__nv_bfloat16>(const FwdArgs&, cudaStream_t);
template void launch_fwd_mma<__half>(const FwdArgs&, cudaStream_t);

}  // namespace cuda
}  // namespace dsa
