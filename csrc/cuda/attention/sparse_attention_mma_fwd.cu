// Launch of the tensor-core forward of sparse_attention (kernel: sparse_attention_mma_fwd.cuh).
#include "cuda/attention/sparse_attention_mma_fwd.cuh"
#include "cuda/attention/sparse_attention_mma_launch.cuh"

namespace dsa {
namespace cuda {

void launch_fwd_mma(const FwdArgs& a, ElemType t, cudaStream_t stream) {
  if (t == ElemType::kBFloat16)
    launch_mma_kernel(sparse_attention_fwd_mma_kernel<__nv_bfloat16>, a, a.p, /*backward=*/false, stream);
  else
    launch_mma_kernel(sparse_attention_fwd_mma_kernel<__half>, a, a.p, /*backward=*/false, stream);
}

}  // namespace cuda
}  // namespace dsa
