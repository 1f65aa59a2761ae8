// Lane sums of four AVX-512 float vectors, for vec_math.h's hsum4 in AVX-512 builds and for the
// bf16 micro-kernels, which are compiled for AVX512-BF16 function by function in any build.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace dsa::cpu {

// out[i] = the sum of the lanes of the i-th vector. A shuffle tree shares the work of the four
// reductions (a third of the instructions of four separate ones).
__attribute__((target("avx512f,avx512dq"))) inline void hsum4_512(__m512 a, __m512 b, __m512 c, __m512 d,
                                                                   float out[4]) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a,b,a,b per 128
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

}  // namespace dsa::cpu
#endif
