// bfloat16 versions of the attention micro-kernels (attention_tiles.h) on the AVX512-BF16
// dot-product instruction (vdpbf16ps: 32 bfloat16 products per instruction, float sums, twice
// the FMA rate of float32 and no widening of the gathered rows). Compiled for that instruction
// set function by function and chosen at run time: enabled() is false on CPUs without it (the
// kernels then keep the widening float paths) and when switched off (set_enabled: the tests run
// both paths). Products of bfloat16 are exact and the sums float; the weights of combine are
// rounded to bfloat16 as a bfloat16 matmul rounds its inputs, or split in two for float-like
// accuracy. No scatter: the scatters into float dk/dv rows are bound by those rows' memory
// traffic, not by arithmetic (measured: no gain). x86-64 only (DSA_CPU_BF16_TILES); AMX tiles
// would suit large head groups (MLA) and are not written.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DSA_CPU_BF16_TILES 1
#endif

namespace dsa::cpu::bf16 {

// The CPU has AVX512-BF16 (and AVX512-BW/VL) and the path is switched on.
bool enabled();
// Whether the CPU has the instructions, whatever the switch.
bool available();
void set_enabled(bool on);

// Whether kernels on scalar_t take the bf16 micro-kernels now: bfloat16 inputs, enabled().
template <typename scalar_t>
bool use_tiles() {
#ifdef DSA_CPU_BF16_TILES
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return enabled();
#endif
  return false;
}

#ifdef DSA_CPU_BF16_TILES
using c10::BFloat16;

// out[g * ld + j] = scale * (a[g, :] . rows[j][0:D]) for g < M (M a multiple of 4, a row-major
// with row stride D), j < n.
void dots(const BFloat16* a, int64_t M, int64_t D, const BFloat16* const* rows, int64_t n, float scale, float* out,
          int64_t ld);

// out[g, 0:D] += sum_j w(p[g * ld + j]) * rows[j][0:D] for g < M (multiple of 4), out row
// stride D, where w rounds the weight to bfloat16 (a bfloat16 matmul's rounding) or, with
// exact_weights, splits it into a sum of two bfloat16 (16 bits of mantissa; twice the
// instructions).
void combine(const float* p, int64_t ld, int64_t M, const BFloat16* const* rows, int64_t n, int64_t D, float* out,
             bool exact_weights);
#endif

}  // namespace dsa::cpu::bf16
