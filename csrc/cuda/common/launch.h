// Host-side launch limits shared by every CUDA kernel family (cuda/attention, cuda/indexer): the
// grid-size check, the shared memory a block may use and the opt-in above the 48 KiB default, the
// device's SM count. Host code only: kernel headers do not include it, so that the CPU emulator
// (tests/cuda_emulation) compiles them without the CUDA runtime or c10.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include "cuda/common/ceil_div.cuh"

namespace dsa {
namespace cuda {

// Every kernel numbers its blocks along gridDim.x, which holds at most 2^31 - 1.
inline void check_grid(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": the launch needs ", blocks,
              " thread blocks, more than a CUDA grid holds (2^31 - 1); split the batch");
}

// Shared memory (bytes, static + dynamic) a block of the current device may use after opting in.
// The environment variable DSA_EXT_CUDA_SMEM_LIMIT (bytes) lowers it for every kernel family, so
// that the tests can run on one GPU the block shapes and fallbacks that GPUs with less shared
// memory get (one-stage attention tiles, the indexer's CUDA-core engine).
inline int block_smem_limit() {
  int device = 0, bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (const char* cap = std::getenv("DSA_EXT_CUDA_SMEM_LIMIT")) bytes = std::min(bytes, std::atoi(cap));
  return bytes;
}

// A block gets 48 KiB of shared memory, static and dynamic together, without asking; `kernel`
// may launch with `dynamic_bytes` once this has opted it in to more. static_bytes: (an upper
// bound of) the kernel's static __shared__ memory, which counts against the same 48 KiB.
template <typename Kernel>
void allow_smem(Kernel kernel, int dynamic_bytes, int static_bytes = 0) {
  if (dynamic_bytes + static_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_bytes));
}

inline int sm_count() {
  int device = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

}  // namespace cuda
}  // namespace dsa
