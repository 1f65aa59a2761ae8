// Host-side helpers of the CUDA indexer and top-k operators (topk.cu, indexer_logits.cu,
// indexer_logits_backward.cu, indexer_topk.cu, all in cuda/indexer/): the launch limits of every
// kernel family (cuda/common/launch.h) with the indexer's share of a block's shared memory, and
// the choice of score engine. Everything else (shape checks, outputs, params) comes from host.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common/dispatch.h"
#include "cuda/common/launch.h"
#include "cuda/indexer/indexer_tile.cuh"
#include "params.h"

namespace dsa {
namespace cuda {
namespace indexer {

// Dynamic shared memory an indexer block may use: the block's limit (launch.h, which honours
// DSA_EXT_CUDA_SMEM_LIMIT) less kStaticSmemReserve for the kernels' static shared memory.
inline int dynamic_smem_limit() { return block_smem_limit() - kStaticSmemReserve; }

// The same call on converted copies of q_idx and k_idx (qc, kc).
inline IndexerParams with_inputs(IndexerParams p, const at::Tensor& qc, const at::Tensor& kc) {
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.q_batch_stride = qc.stride(0), p.q_row_stride = qc.stride(1), p.q_head_stride = qc.stride(2);
  p.k_batch_stride = kc.stride(0), p.k_row_stride = kc.stride(1);
  return p;
}

// An empty kernel compiled in the same translation unit (hence for the same architectures) as
// the score kernels: its binary version on this device says which code the device runs.
template <int = 0>
__global__ void arch_probe_kernel() {}

// e4m3 tensor cores need sm_89+ hardware running code compiled for sm_89+ (a build for sm_80
// alone runs its sm_80 code on an H100, where the e4m3 mma is compiled out).
inline bool native_fp8_mma() {
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, arch_probe_kernel<>));
  return attr.binaryVersion >= 89;
}

// Runs launch.template operator()<Tile>(params, vec16) with the score engine of this call:
// tensor cores for bfloat16/float16 (and e4m3 where native_fp8_mma) when the shapes fit, else
// the CUDA-core float32 engine (on float32 copies of q_idx and k_idx). e4m3 inputs on older GPUs
// take the bfloat16 tensor cores on bfloat16 copies: every e4m3 value is exact in bfloat16.
template <class Launch>
void with_score_engine(const char* op, const IndexerParams& p, at::ScalarType dtype, const at::Tensor& q,
                       const at::Tensor& k, const Launch& launch) {
  const int smem = dynamic_smem_limit();
  if (dtype == at::kFloat) {
    launch.template operator()<SimtTile>(p, false);
  } else if (dtype == at::kFloat8_e4m3fn && !(native_fp8_mma() && mma_fits<__nv_fp8_e4m3>(p, smem))) {
    const at::Tensor qb = q.to(at::kBFloat16), kb = k.to(at::kBFloat16);
    with_score_engine(op, with_inputs(p, qb, kb), at::kBFloat16, qb, kb, launch);
  } else {
    DSA_DISPATCH_CUDA(dtype, op, (at::kFloat8_e4m3fn, at::kHalf, at::kBFloat16), [&] {
      if (mma_fits<scalar_t>(p, smem)) {  // e4m3 always fits here (checked above)
        launch.template operator()<MmaTile<scalar_t>>(p, rows_16b_aligned(p, sizeof(scalar_t)));
      } else {
        const at::Tensor qf = q.to(at::kFloat), kf = k.to(at::kFloat);
        launch.template operator()<SimtTile>(with_inputs(p, qf, kf), false);
      }
    });
  }
}

}  // namespace indexer
}  // namespace cuda
}  // namespace dsa
