// The AVX512-BF16 micro-kernels of bf16_tiles.h. vdpbf16ps multiplies pairs: float lane i of the
// result adds x[2i] * y[2i] + x[2i+1] * y[2i+1] (bfloat16 x, y). So the pairs run along the
// summed dimension: D for dots (rows are read as they are stored), two gathered rows for combine
// (interleaved 16-bit, which permutes the output columns in each 128-bit lane; undone once per
// output block). Every function carries the
// target attribute, so the file builds in any x86-64 build and runs only where enabled() says.
#include "bf16_tiles.h"

#include <atomic>

#ifdef DSA_CPU_BF16_TILES
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "attention_tiles.h"
#include "x86_reduce.h"

#define DSA_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace dsa::cpu::bf16 {
namespace {
std::atomic<bool> switched_on{true};

bool cpu_has_avx512_bf16() {
#ifdef DSA_CPU_BF16_TILES
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}
}  // namespace

bool available() {
  static const bool has = cpu_has_avx512_bf16();
  return has;
}

bool enabled() { return available() && switched_on.load(std::memory_order_relaxed); }

void set_enabled(bool on) { switched_on.store(on, std::memory_order_relaxed); }

#ifdef DSA_CPU_BF16_TILES
namespace {

// 32 bfloat16 from p, or its first m (a tail; masked, so nothing past the row is read).
DSA_BF16_TARGET inline __m512bh load32(const BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
DSA_BF16_TARGET inline __m512bh load32(const BFloat16* p, __mmask32 m) {
  return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
}
DSA_BF16_TARGET inline __m512 dp(__m512 acc, __m512bh x, __m512bh y) { return _mm512_dpbf16_ps(acc, x, y); }

inline __mmask32 tail_mask(int64_t m) { return m >= 32 ? ~__mmask32(0) : (__mmask32(1) << m) - 1; }

// Scratch for rounded weights and interleaved rows, one per thread, grown as needed.
template <typename T>
T* scratch(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}
thread_local std::vector<uint16_t> weight_scratch;

}  // namespace

DSA_BF16_TARGET void dots(const BFloat16* a, int64_t M, int64_t D, const BFloat16* const* rows, int64_t n,
                          float scale, float* out, int64_t ld) {
  const int64_t Dv = D - D % 32;
  const __mmask32 tail = tail_mask(D % 32);
  for (int64_t g0 = 0; g0 < M; g0 += kHeadTile) {
    const BFloat16* a0 = a + g0 * D;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const BFloat16 *r0 = rows[j], *r1 = rows[j + 1], *r2 = rows[j + 2], *r3 = rows[j + 3];
      if (g0 == 0)
        for (int64_t jj = j + 4; jj < std::min(n, j + 8); ++jj) prefetch_row(rows[jj], D);
      // 16 named accumulators (no array) so that they are register-allocated
#define DSA_ACC_ROW(g) __m512 c##g##0 = _mm512_setzero_ps(), c##g##1 = c##g##0, c##g##2 = c##g##0, c##g##3 = c##g##0
      DSA_ACC_ROW(0); DSA_ACC_ROW(1); DSA_ACC_ROW(2); DSA_ACC_ROW(3);
#undef DSA_ACC_ROW
#define DSA_DP_ROW(g, q)            \
  {                                 \
    const __m512bh x = q;           \
    c##g##0 = dp(c##g##0, x, k0);   \
    c##g##1 = dp(c##g##1, x, k1);   \
    c##g##2 = dp(c##g##2, x, k2);   \
    c##g##3 = dp(c##g##3, x, k3);   \
  }
      for (int64_t d = 0; d < Dv; d += 32) {
        const __m512bh k0 = load32(r0 + d), k1 = load32(r1 + d), k2 = load32(r2 + d), k3 = load32(r3 + d);
        DSA_DP_ROW(0, load32(a0 + d)) DSA_DP_ROW(1, load32(a0 + D + d))
        DSA_DP_ROW(2, load32(a0 + 2 * D + d)) DSA_DP_ROW(3, load32(a0 + 3 * D + d))
      }
      if (tail) {
        const __m512bh k0 = load32(r0 + Dv, tail), k1 = load32(r1 + Dv, tail), k2 = load32(r2 + Dv, tail),
                       k3 = load32(r3 + Dv, tail);
        DSA_DP_ROW(0, load32(a0 + Dv, tail)) DSA_DP_ROW(1, load32(a0 + D + Dv, tail))
        DSA_DP_ROW(2, load32(a0 + 2 * D + Dv, tail)) DSA_DP_ROW(3, load32(a0 + 3 * D + Dv, tail))
      }
#undef DSA_DP_ROW
      float s[4][4];
      hsum4_512(c00, c01, c02, c03, s[0]);
      hsum4_512(c10, c11, c12, c13, s[1]);
      hsum4_512(c20, c21, c22, c23, s[2]);
      hsum4_512(c30, c31, c32, c33, s[3]);
      for (int g = 0; g < 4; ++g)
        for (int jj = 0; jj < 4; ++jj) out[(g0 + g) * ld + j + jj] = scale * s[g][jj];
    }
    for (; j < n; ++j)
      for (int g = 0; g < 4; ++g) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < Dv; d += 32) acc = dp(acc, load32(a0 + g * D + d), load32(rows[j] + d));
        if (tail) acc = dp(acc, load32(a0 + g * D + Dv, tail), load32(rows[j] + Dv, tail));
        out[(g0 + g) * ld + j] = scale * _mm512_reduce_add_ps(acc);
      }
  }
}

namespace {

// One pair of gathered rows (x, y: the same 32 columns of rows j and j+1) into the accumulators
// of 4 heads: lo/hi hold the columns of the 16-bit interleave, w the heads' weight pairs and,
// with kSplit, w2 the pairs of the weights' remainders.
template <bool kSplit>
DSA_BF16_TARGET inline void combine_pair(__m512i x, __m512i y, const __m512bh w[4], const __m512bh w2[4], __m512 lo[4],
                                         __m512 hi[4]) {
  const __m512bh xl = (__m512bh)_mm512_unpacklo_epi16(x, y), xh = (__m512bh)_mm512_unpackhi_epi16(x, y);
  for (int g = 0; g < 4; ++g) {
    lo[g] = dp(lo[g], w[g], xl);
    hi[g] = dp(hi[g], w[g], xh);
    if constexpr (kSplit) {
      lo[g] = dp(lo[g], w2[g], xl);
      hi[g] = dp(hi[g], w2[g], xh);
    }
  }
}

// out[0:m] += the 32 columns the interleaved accumulators lo, hi hold: lane 4L+i of lo is
// column 8L+i, of hi column 8L+4+i.
DSA_BF16_TARGET inline void add_columns(__m512 lo, __m512 hi, float* out, int64_t m) {
  alignas(64) static constexpr int32_t first[16] = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
  alignas(64) static constexpr int32_t second[16] = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
  const __m512 c0 = _mm512_permutex2var_ps(lo, _mm512_load_si512(first), hi);
  const __m512 c1 = _mm512_permutex2var_ps(lo, _mm512_load_si512(second), hi);
  const __mmask16 m0 = m >= 16 ? 0xffff : (__mmask16(1) << m) - 1;
  const __mmask16 m1 = m >= 32 ? 0xffff : m <= 16 ? 0 : (__mmask16(1) << (m - 16)) - 1;
  _mm512_mask_storeu_ps(out, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, out), c0));
  _mm512_mask_storeu_ps(out + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, out + 16), c1));
}

// The weights p[g, 0:n] of heads g < M as bfloat16 rows of n2 = n rounded up to even (a zero
// after an odd n): the 32-bit word jp of row g is the pair (p[g, 2jp], p[g, 2jp+1]) that
// vdpbf16ps takes. With rest, rest[g, j] = p[g, j] - hi[g, j] rounded likewise.
void weight_pairs(const float* p, int64_t ld, int64_t M, int64_t n, int64_t n2, uint16_t* hi, uint16_t* rest) {
  for (int64_t g = 0; g < M; ++g) {
    for (int64_t j = 0; j < n; ++j) {
      const c10::BFloat16 h(p[g * ld + j]);
      hi[g * n2 + j] = h.x;
      if (rest) rest[g * n2 + j] = c10::BFloat16(p[g * ld + j] - static_cast<float>(h)).x;
    }
    if (n2 > n) {
      hi[g * n2 + n] = 0;
      if (rest) rest[g * n2 + n] = 0;
    }
  }
}

template <bool kSplit>
DSA_BF16_TARGET void combine_tiles(const float* p, int64_t ld, int64_t M, const BFloat16* const* rows, int64_t n,
                                   int64_t D, float* out) {
  const int64_t n2 = (n + 1) / 2 * 2;
  uint16_t* pb = scratch(weight_scratch, (kSplit ? 2 : 1) * M * n2);
  weight_pairs(p, ld, M, n, n2, pb, kSplit ? pb + M * n2 : nullptr);
  const auto* words = reinterpret_cast<const uint32_t*>(pb);
  const int64_t wstride = n2 / 2, rest = M * wstride;  // words per head row; offset of the remainders
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t g0 = 0; g0 < M; g0 += kHeadTile) {
    const uint32_t* w0 = words + g0 * wstride;
    for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 64 columns (two blocks of 32) per pass
      const __mmask32 m0 = tail_mask(D - d0), m1 = D - d0 > 32 ? tail_mask(D - d0 - 32) : 0;
      __m512 lo0[4], hi0[4], lo1[4], hi1[4];
      for (int g = 0; g < 4; ++g) lo0[g] = hi0[g] = lo1[g] = hi1[g] = _mm512_setzero_ps();
      for (int64_t jp = 0; jp < n2 / 2; ++jp) {
        const int64_t j = 2 * jp;
        if (d0 == 0)
          for (int64_t jj = j + 8; jj < std::min(n, j + 10); ++jj) prefetch_row(rows[jj], D);
        const BFloat16* x = rows[j] + d0;
        const BFloat16* y = j + 1 < n ? rows[j + 1] + d0 : nullptr;  // odd n: a zero row, weight 0
        __m512bh w[4], w2[4];
        for (int g = 0; g < 4; ++g) {
          w[g] = (__m512bh)_mm512_set1_epi32(static_cast<int>(w0[g * wstride + jp]));
          if constexpr (kSplit) w2[g] = (__m512bh)_mm512_set1_epi32(static_cast<int>(w0[rest + g * wstride + jp]));
        }
        combine_pair<kSplit>(_mm512_maskz_loadu_epi16(m0, x), y ? _mm512_maskz_loadu_epi16(m0, y) : zero, w, w2, lo0,
                             hi0);
        if (m1)
          combine_pair<kSplit>(_mm512_maskz_loadu_epi16(m1, x + 32), y ? _mm512_maskz_loadu_epi16(m1, y + 32) : zero,
                               w, w2, lo1, hi1);
      }
      for (int g = 0; g < 4; ++g) {
        float* o = out + (g0 + g) * D + d0;
        add_columns(lo0[g], hi0[g], o, std::min<int64_t>(32, D - d0));
        if (m1) add_columns(lo1[g], hi1[g], o + 32, D - d0 - 32);
      }
    }
  }
}

}  // namespace

void combine(const float* p, int64_t ld, int64_t M, const BFloat16* const* rows, int64_t n, int64_t D, float* out,
             bool exact_weights) {
  if (exact_weights)
    combine_tiles<true>(p, ld, M, rows, n, D, out);
  else
    combine_tiles<false>(p, ld, M, rows, n, D, out);
}
#endif

}  // namespace dsa::cpu::bf16
