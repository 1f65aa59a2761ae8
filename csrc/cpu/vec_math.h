// Small vectorised building blocks for the CPU kernels (ATen's Vectorized, compiled for the
// instruction set setup.py/CMake select). acc_t is float for float32/bfloat16/float16 inputs and
// double for float64: every kernel converts rows to acc_t once, then works on acc_t arrays.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

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
  acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec x, Vec y) { return x + y; }, s0 + s1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0:n] += a * x[0:n]
template <typename acc_t>
inline void axpy(acc_t* y, acc_t a, const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec va(a);
  int64_t i = 0;
  for (; i + W <= n; i += W) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += a * x[i];
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
    sum = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, vs);
  }
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - m));
  return sum;
}

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

}  // namespace dsa::cpu
