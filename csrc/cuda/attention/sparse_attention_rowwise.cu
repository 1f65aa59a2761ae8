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

template <typename T>
void fwd(const SparseAttentionParams& p, cudaStream_t stream) {
  launch_rowwise(rowwise_fwd_kernel<T>, p, p, rowwise_smem_bytes(p, sizeof(typename AccOf<T>::type), false),
                    stream);
}
template <typename T>
void bwd(const SimpleBwdArgs& a, cudaStream_t stream) {
  launch_rowwise(rowwise_bwd_kernel<T>, a, a.p.fwd,
                    rowwise_smem_bytes(a.p.fwd, sizeof(typename AccOf<T>::type), true), stream);
}
template <typename T>
void delta(const SparseAttentionBwdParams& p, void* out, cudaStream_t stream) {
  using Acc = typename AccOf<T>::type;
  delta_kernel<T><<<static_cast<unsigned>(rowwise_blocks(p.fwd)), kRowwiseWarps * 32, 0, stream>>>(
      p, static_cast<Acc*>(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_fwd_simple(const SparseAttentionParams& p, ElemType t, cudaStream_t stream) {
  switch (t) {
    case ElemType::kBFloat16: return fwd<__nv_bfloat16>(p, stream);
    case ElemType::kHalf: return fwd<__half>(p, stream);
    case ElemType::kFloat: return fwd<float>(p, stream);
    case ElemType::kDouble: return fwd<double>(p, stream);
  }
}

void launch_bwd_simple(const SimpleBwdArgs& a, ElemType t, cudaStream_t stream) {
  switch (t) {
    case ElemType::kBFloat16: return bwd<__nv_bfloat16>(a, stream);
    case ElemType::kHalf: return bwd<__half>(a, stream);
    case ElemType::kFloat: return bwd<float>(a, stream);
    case ElemType::kDouble: return bwd<double>(a, stream);
  }
}

void launch_bwd_delta(const SparseAttentionBwdParams& p, ElemType t, void* out, cudaStream_t stream) {
  switch (t) {
    case ElemType::kBFloat16: return delta<__nv_bfloat16>(p, out, stream);
    case ElemType::kHalf: return delta<__half>(p, out, stream);
    case ElemType::kFloat: return delta<float>(p, out, stream);
    case ElemType::kDouble: return delta<double>(p, out, stream);
  }
}

}  // namespace cuda
}  // namespace dsa
