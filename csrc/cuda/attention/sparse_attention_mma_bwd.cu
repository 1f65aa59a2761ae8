// Launch of the tensor-core backward of sparse_attention (kernel: sparse_attention_mma_bwd.cuh).
#include "cuda/attention/sparse_attention_mma_bwd.cuh"
#include "cuda/attention/sparse_attention_mma_launch.cuh"

namespace dsa {
namespace cuda {

void launch_bwd_mma(const BwdArgs& a, ElemType t, cudaStream_t stream) {
  if (t == ElemType::kBFloat16)
    launch_mma_kernel(sparse_attention_bwd_mma_kernel<__nv_bfloat16>, a, a.p.fwd, /*backward=*/true, stream);
  else
    launch_mma_kernel(sparse_attention_bwd_mma_kernel<__half>, a, a.p.fwd, /*backward=*/true, stream);
}

}  // namespace cuda
}  // namespace dsa
