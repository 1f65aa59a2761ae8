// Launch of the tensor-core backward of sparse_attention (kernel: sparse_attention_mma_bwd.cuh).
#include <c10/cuda/CUDAException.h>

#include "sparse_attention_mma_bwd.cuh"

namespace dsa {
namespace cuda {
namespace {

template <typename T>
void launch(const BwdArgs& a, cudaStream_t stream) {
  const int smem = smem_layout(a.s, /*backward=*/true).bytes;
  auto kernel = sparse_attention_bwd_mma_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t blocks = a.p.fwd.B * a.p.fwd.T * a.p.fwd.Hkv * a.s.chunks;
  kernel<<<static_cast<unsigned>(blocks), threads_of(a.s), smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_bwd_mma(const BwdArgs& a, ElemType t, cudaStream_t stream) {
  if (t == ElemType::kBFloat16)
    launch<__nv_bfloat16>(a, stream);
  else
    launch<__half>(a, stream);
}

}  // namespace cuda
}  // namespace dsa
