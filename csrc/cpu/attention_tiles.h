// Register-tiled micro-kernels for attention over gathered rows, on acc_t data. The G query
// heads of one kv head form the M dimension (padded to a multiple of 4 by the caller), the
// gathered rows the N dimension; each kernel keeps a 4 x 4 block of vectors in registers so a
// gathered row is loaded once per block instead of once per head.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "vec_math.h"

#include <algorithm>
#include <cstdint>

namespace dsa::cpu {

constexpr int64_t kHeadTile = 4;

// Gathered rows live in L3 at random places: prefetch the next rows' lines while computing.
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

// out[g * ld + j] = a[g, :] . rows[j][0:D] for g < M (M a multiple of 4, a row-major with
// row stride D), j < n.
template <typename acc_t, typename row_t>
void gathered_dots(const acc_t* a, int64_t M, int64_t D, const row_t* const* rows, int64_t n, acc_t* out,
                   int64_t ld) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t Dv = D - D % W;
  for (int64_t g0 = 0; g0 < M; g0 += kHeadTile) {
    const acc_t* a0 = a + g0 * D;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const row_t *r0 = rows[j], *r1 = rows[j + 1], *r2 = rows[j + 2], *r3 = rows[j + 3];
      if (g0 == 0)
        for (int64_t jj = j + 4; jj < std::min(n, j + 8); ++jj) prefetch_row(rows[jj], D);
      // 16 named accumulators (no array) so that they are register-allocated
#define DSA_ACC_ROW(g) Vec a##g##0(acc_t(0)), a##g##1(acc_t(0)), a##g##2(acc_t(0)), a##g##3(acc_t(0))
      DSA_ACC_ROW(0); DSA_ACC_ROW(1); DSA_ACC_ROW(2); DSA_ACC_ROW(3);
#undef DSA_ACC_ROW
      for (int64_t d = 0; d < Dv; d += W) {
        const Vec k0 = load_widen<acc_t>(r0 + d), k1 = load_widen<acc_t>(r1 + d), k2 = load_widen<acc_t>(r2 + d),
                  k3 = load_widen<acc_t>(r3 + d);
#define DSA_FMA_ROW(g)                               \
  {                                                  \
    const Vec q = Vec::loadu(a0 + g * D + d);        \
    a##g##0 = at::vec::fmadd(q, k0, a##g##0);        \
    a##g##1 = at::vec::fmadd(q, k1, a##g##1);        \
    a##g##2 = at::vec::fmadd(q, k2, a##g##2);        \
    a##g##3 = at::vec::fmadd(q, k3, a##g##3);        \
  }
        DSA_FMA_ROW(0) DSA_FMA_ROW(1) DSA_FMA_ROW(2) DSA_FMA_ROW(3)
#undef DSA_FMA_ROW
      }
      acc_t s[4][4];
      hsum4(a00, a01, a02, a03, s[0]);
      hsum4(a10, a11, a12, a13, s[1]);
      hsum4(a20, a21, a22, a23, s[2]);
      hsum4(a30, a31, a32, a33, s[3]);
      const row_t* r[4] = {r0, r1, r2, r3};
      for (int g = 0; g < 4; ++g)
        for (int jj = 0; jj < 4; ++jj) {
          for (int64_t d = Dv; d < D; ++d) s[g][jj] += a0[g * D + d] * static_cast<acc_t>(r[jj][d]);
          out[(g0 + g) * ld + j + jj] = s[g][jj];
        }
    }
    for (; j < n; ++j) {
      for (int g = 0; g < 4; ++g) {
        Vec acc(acc_t(0));
        for (int64_t d = 0; d < Dv; d += W)
          acc = at::vec::fmadd(Vec::loadu(a0 + g * D + d), load_widen<acc_t>(rows[j] + d), acc);
        acc_t s = hsum(acc);
        for (int64_t d = Dv; d < D; ++d) s += a0[g * D + d] * static_cast<acc_t>(rows[j][d]);
        out[(g0 + g) * ld + j] = s;
      }
    }
  }
}

// out[g, 0:D] += sum_j p[g * ld + j] * rows[j][0:D] for g < M (multiple of 4), out row stride D.
// A 4-head x 4-vector block of outputs stays in registers over all n rows; the first D chunk
// pulls each row into cache (prefetched ahead), later chunks find it there.
template <typename acc_t, typename row_t>
void gathered_combine(const acc_t* p, int64_t ld, int64_t M, const row_t* const* rows, int64_t n, int64_t D,
                      acc_t* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t C = 4;  // vectors per chunk
  const int64_t Dv = D - D % W;
  for (int64_t g0 = 0; g0 < M; g0 += kHeadTile) {
    const acc_t* p0 = p + g0 * ld;
    acc_t* o0 = out + g0 * D;
    int64_t d0 = 0;
    for (; d0 + C * W <= Dv; d0 += C * W) {
      Vec acc[4][C];  // fully unrolled fixed-size loops keep these in registers
      for (int g = 0; g < 4; ++g)
        for (int64_t c = 0; c < C; ++c) acc[g][c] = Vec::loadu(o0 + g * D + d0 + c * W);
      for (int64_t j = 0; j < n; ++j) {
        if (d0 == 0 && j + 8 < n) prefetch_row(rows[j + 8], D);
        const row_t* r = rows[j] + d0;
        const Vec w0(p0[j]), w1(p0[ld + j]), w2(p0[2 * ld + j]), w3(p0[3 * ld + j]);
        for (int64_t c = 0; c < C; ++c) {
          const Vec x = load_widen<acc_t>(r + c * W);
          acc[0][c] = at::vec::fmadd(w0, x, acc[0][c]);
          acc[1][c] = at::vec::fmadd(w1, x, acc[1][c]);
          acc[2][c] = at::vec::fmadd(w2, x, acc[2][c]);
          acc[3][c] = at::vec::fmadd(w3, x, acc[3][c]);
        }
      }
      for (int g = 0; g < 4; ++g)
        for (int64_t c = 0; c < C; ++c) acc[g][c].store(o0 + g * D + d0 + c * W);
    }
    for (; d0 < Dv; d0 += W) {  // leftover whole vectors, one at a time
      Vec acc0 = Vec::loadu(o0 + d0), acc1 = Vec::loadu(o0 + D + d0), acc2 = Vec::loadu(o0 + 2 * D + d0),
          acc3 = Vec::loadu(o0 + 3 * D + d0);
      for (int64_t j = 0; j < n; ++j) {
        const Vec x = load_widen<acc_t>(rows[j] + d0);
        acc0 = at::vec::fmadd(Vec(p0[j]), x, acc0);
        acc1 = at::vec::fmadd(Vec(p0[ld + j]), x, acc1);
        acc2 = at::vec::fmadd(Vec(p0[2 * ld + j]), x, acc2);
        acc3 = at::vec::fmadd(Vec(p0[3 * ld + j]), x, acc3);
      }
      acc0.store(o0 + d0), acc1.store(o0 + D + d0), acc2.store(o0 + 2 * D + d0), acc3.store(o0 + 3 * D + d0);
    }
    for (int64_t d = Dv; d < D; ++d)
      for (int g = 0; g < 4; ++g) {
        acc_t s = o0[g * D + d];
        for (int64_t j = 0; j < n; ++j) s += p0[g * ld + j] * static_cast<acc_t>(rows[j][d]);
        o0[g * D + d] = s;
      }
  }
}

// rows[j][0:D] += sum_g p[g * ld + j] * a[g, 0:D] for j < n, g < M (multiple of 4). Rows are
// updated one at a time (front to back), so duplicate rows accumulate correctly.
template <typename acc_t>
void gathered_scatter(const acc_t* p, int64_t ld, int64_t M, const acc_t* a, int64_t D, acc_t* const* rows,
                      int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t Dv = D - D % W;
  for (int64_t j = 0; j < n; ++j) {
    acc_t* r = rows[j];
    if (j + 2 < n) prefetch_row(rows[j + 2], D);
    for (int64_t g0 = 0; g0 < M; g0 += kHeadTile) {
      const acc_t* a0 = a + g0 * D;
      const acc_t w[4] = {p[g0 * ld + j], p[(g0 + 1) * ld + j], p[(g0 + 2) * ld + j], p[(g0 + 3) * ld + j]};
      for (int64_t d = 0; d < Dv; d += W) {
        Vec acc = Vec::loadu(r + d);
        for (int g = 0; g < 4; ++g) acc = at::vec::fmadd(Vec(w[g]), Vec::loadu(a0 + g * D + d), acc);
        acc.store(r + d);
      }
      for (int64_t d = Dv; d < D; ++d)
        for (int g = 0; g < 4; ++g) r[d] += w[g] * a0[g * D + d];
    }
  }
}

}  // namespace dsa::cpu
