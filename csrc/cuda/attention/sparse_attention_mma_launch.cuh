// Launch of a tensor-core sparse_attention kernel (forward or backward, sparse_attention_mma_*.cu):
// one block of threads_of(s) threads per (batch, token, kv head, head chunk) and split of the
// index slots (forward only, FwdArgs::splits), smem_layout bytes of dynamic shared memory, on the
// given stream, checked.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "cuda/attention/sparse_attention_kernels.h"
#include "cuda/common/launch.h"

namespace dsa {
namespace cuda {

template <typename Args>
void launch_mma_kernel(void (*kernel)(Args), const Args& a, const SparseAttentionParams& p, bool backward,
                       cudaStream_t stream, int splits = 1) {
  const int smem = smem_layout(a.s, backward).bytes;
  allow_smem(kernel, smem);
  const int64_t blocks = p.B * p.T * p.Hkv * a.s.chunks * splits;
  kernel<<<static_cast<unsigned>(blocks), threads_of(a.s), smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace dsa
