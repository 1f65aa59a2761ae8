// Launch of the tensor-core forward of sparse_attention (kernel: sparse_attention_mma_fwd.cuh).
#include <c10/cuda/CUDAException.h>

#include "sparse_attention_mma_fwd.cuh"

namespace dsa {
namespace cuda {
namespace {

template <typename T>
void launch(const FwdArgs& a, cudaStream_t stream) {
  const int smem = smem_layout(a.s, /*backward=*/false).bytes;
  auto kernel = sparse_attention_fwd_mma_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t blocks = a.p.B * a.p.T * a.p.Hkv * a.s.chunks;
  kernel<<<static_cast<unsigned>(blocks), threads_of(a.s), smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_fwd_mma(const FwdArgs& a, ElemType t, cudaStream_t stream) {
  if (t == ElemType::kBFloat16)
    launch<__nv_bfloat16>(a, stream);
  else
    launch<__half>(a, stream);
}

}  // namespace cuda
}  // namespace dsa
