// Small vectorised building blocks for the CPU kernels (ATen's Vectorized, compiled for the
// instruction set setup.py/CMake select). acc_t is float for float32/bfloat16/float16 inputs and
// double for float64: every kernel converts rows to acc_t once, then works on acc_t arrays.
#pragma once

#include <ATen/Dispatch_v2.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "x86_reduce.h"

// The one dtype dispatch of the CPU kernels: float64, float32, bfloat16, float16, and the extra
// types an operator names after its body (the forward indexer: at::kFloat8_e4m3fn). The body is
// wrapped in AT_WRAP (its commas would split the macro's arguments):
//   DSA_DISPATCH_CPU(dtype, "dsa.op", AT_WRAP([&] { kernel<scalar_t>(p); }));
#define DSA_DISPATCH_CPU(TYPE, NAME, BODY, ...) \
  AT_DISPATCH_V2(TYPE, NAME, BODY, AT_EXPAND(AT_FLOATING_TYPES), at::kBFloat16, at::kHalf __VA_OPT__(, ) __VA_ARGS__)

namespace dsa::cpu {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

// dst[0:n] = src[0:n] converted to acc_t.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, acc_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// dst[0:n] = src[0:n] converted to the storage type.
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, scalar_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// One vector of acc_t from W = Vectorized<acc_t>::size() stored elements of type T: gathered
// bfloat16/float16 rows are read as they are stored (half the bytes of a float copy) and
// widened in registers.
template <typename acc_t, typename T>
inline at::vec::Vectorized<acc_t> load_widen(const T* p) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    return Vec::loadu(p);
  } else {
    static_assert(std::is_same_v<acc_t, float>, "only float widens from 16-bit storage");
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (std::is_same_v<T, c10::BFloat16>)
      return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
    else
      return Vec(_mm512_cvtph_ps(raw));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, c10::BFloat16>)
      return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
    else
      return Vec(_mm256_cvtph_ps(raw));
#else
    acc_t lanes[Vec::size()];
    for (int64_t i = 0; i < Vec::size(); ++i) lanes[i] = static_cast<acc_t>(p[i]);
    return Vec::loadu(lanes);
#endif
  }
}

// Sum of a vector's lanes: the instruction-set's reduction for float, lanes in order for double.
template <typename acc_t>
inline acc_t hsum(const at::vec::Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return v.reduce_add();
  } else {
    acc_t lanes[at::vec::Vectorized<acc_t>::size()];
    v.store(lanes);
    acc_t s = 0;
    for (acc_t x : lanes) s += x;
    return s;
  }
}

// The lane sums of four vectors: out[i] = hsum(v[i]). On AVX2/AVX-512 float a shuffle tree
// shares the work of the four reductions (a third of the instructions of four hsums).
// Vectors by value (not an array) so the caller's accumulators stay in registers.
template <typename acc_t>
inline void hsum4(at::vec::Vectorized<acc_t> a, at::vec::Vectorized<acc_t> b, at::vec::Vectorized<acc_t> c,
                  at::vec::Vectorized<acc_t> d, acc_t out[4]) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    hsum4_512(a, b, c, d, out);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256 ab = _mm256_hadd_ps(a, b);  // a01 a23 b01 b23 | a45 a67 b45 b67
    const __m256 cd = _mm256_hadd_ps(c, d);
    const __m256 abcd = _mm256_hadd_ps(ab, cd);  // a b c d | a b c d
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
    return;
  }
#endif
  out[0] = hsum(a), out[1] = hsum(b), out[2] = hsum(c), out[3] = hsum(d);
}

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + i + W), Vec::loadu(b + i + W), s1);
  }
  for (; i + W <= n; i += W) s0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), s0);
  acc_t s = hsum(s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0:n] *= a
template <typename acc_t>
inline void scale_row(acc_t* y, acc_t a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

// x[0:n] = exp(x[0:n] - m); returns the sum. float uses ATen's vectorised polynomial exp
// (exp_u20, no Sleef); double keeps std::exp, whose precision the float64 tests rely on.
template <typename acc_t>
inline acc_t exp_shifted(acc_t* x, acc_t m, int64_t n) {
  acc_t sum = 0;
  int64_t i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = at::vec::Vectorized<float>;
    constexpr int64_t W = Vec::size();
    const Vec vm(m);
    Vec vs(0.f);
    for (; i + W <= n; i += W) {
      const Vec e = (Vec::loadu(x + i) - vm).exp_u20();
      e.store(x + i);
      vs = vs + e;
    }
    sum = hsum(vs);
  }
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - m));
  return sum;
}

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

}  // namespace dsa::cpu
