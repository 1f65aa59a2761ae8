// Integer division rounding up, for host and device code of every kernel family (grid sizes,
// tile counts). Kernel headers include it directly; host launch code gets it with launch.h.
#pragma once

#include <cstdint>

namespace dsa {
namespace cuda {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace dsa
