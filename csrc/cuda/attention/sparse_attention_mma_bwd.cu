// Launch of the tensor-core backward of sparse_attention (kernel: sparse_attention_mma_bwd.cuh).
#include "cuda/attention/sparse_attention_mma_bwd.cuh"
#include "cuda/attention/sparse_attention_mma_launch.cuh"

namespace dsa {
namespace cuda {

template <typename T>
void launch_bwd_mma(const BwdArgs& a, cudaStream_t stream) {
  launch_mma_kernel(sparse_attention_bwd_mma_kernel<T>, a, a.p.fwd, /*backward=*/true, stream);
}

template void launch_bwd_mma<__nv_bfloat16>(const BwdArgs&, cudaStream_t);
template void launch_bwd_mma<__half>(const BwdArgs&, cudaStream_t);

}  // namespace cuda
}  // namespace dsa
