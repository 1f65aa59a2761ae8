// Register-tiled micro-kernels for attention over gathered rows, on acc_t data. The G query
// heads of one kv head form the M dimension (padded to a multiple of 4 by the caller), the
// gathered rows the N dimension; each kernel keeps a 4 x 4 block of vectors in registers so a
// gathered row is loaded once per block instead of once per head.
#pragma once

#include <ATen/cpu/vec/vec.h>

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

template <typename acc_t>
inline acc_t hsum(const at::vec::Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](auto x, auto y) { return x + y; }, v);
}

// out[g * ld + j] = a[g, :] . rows[j][0:D] for g < M (M a multiple of 4, a row-major with
// row stride D), j < n.
template <typename acc_t>
void gathered_dots(const acc_t* a, int64_t M, int64_t D, const acc_t* const* rows, int64_t n, acc_t* out,
                   int64_t ld) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t Dv = D - D % W;
  for (int64_t g0 = 0; g0 < M; g0 += kHeadTile) {
    const acc_t* a0 = a + g0 * D;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const acc_t* r[4] = {rows[j], rows[j + 1], rows[j + 2], rows[j + 3]};
      if (g0 == 0)
        for (int64_t jj = j + 4; jj < std::min(n, j + 8); ++jj) prefetch_row(rows[jj], D);
      Vec acc[4][4];
      for (auto& x : acc)
        for (auto& y : x) y = Vec(acc_t(0));
      for (int64_t d = 0; d < Dv; d += W) {
        const Vec k0 = Vec::loadu(r[0] + d), k1 = Vec::loadu(r[1] + d), k2 = Vec::loadu(r[2] + d),
                  k3 = Vec::loadu(r[3] + d);
        for (int g = 0; g < 4; ++g) {
          const Vec q = Vec::loadu(a0 + g * D + d);
          acc[g][0] = at::vec::fmadd(q, k0, acc[g][0]);
          acc[g][1] = at::vec::fmadd(q, k1, acc[g][1]);
          acc[g][2] = at::vec::fmadd(q, k2, acc[g][2]);
          acc[g][3] = at::vec::fmadd(q, k3, acc[g][3]);
        }
      }
      for (int g = 0; g < 4; ++g)
        for (int jj = 0; jj < 4; ++jj) {
          acc_t s = hsum(acc[g][jj]);
          for (int64_t d = Dv; d < D; ++d) s += a0[g * D + d] * r[jj][d];
          out[(g0 + g) * ld + j + jj] = s;
        }
    }
    for (; j < n; ++j) {
      for (int g = 0; g < 4; ++g) {
        Vec acc(acc_t(0));
        for (int64_t d = 0; d < Dv; d += W) acc = at::vec::fmadd(Vec::loadu(a0 + g * D + d), Vec::loadu(rows[j] + d), acc);
        acc_t s = hsum(acc);
        for (int64_t d = Dv; d < D; ++d) s += a0[g * D + d] * rows[j][d];
        out[(g0 + g) * ld + j] = s;
      }
    }
  }
}

// out[g, 0:D] += sum_j p[g * ld + j] * rows[j][0:D] for g < M (multiple of 4), out row stride D.
// Keys in pairs, each row read front to back; the 4 heads' outputs stay in L1.
template <typename acc_t>
void gathered_combine(const acc_t* p, int64_t ld, int64_t M, const acc_t* const* rows, int64_t n, int64_t D,
                      acc_t* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t Dv = D - D % W;
  for (int64_t j = 0; j < n; j += 2) {
    const acc_t* r0 = rows[j];
    const acc_t* r1 = j + 1 < n ? rows[j + 1] : rows[j];
    for (int64_t jj = j + 2; jj < std::min(n, j + 4); ++jj) prefetch_row(rows[jj], D);
    for (int64_t g0 = 0; g0 < M; g0 += kHeadTile) {
      acc_t w0[4], w1[4];
      for (int g = 0; g < 4; ++g) {
        w0[g] = p[(g0 + g) * ld + j];
        w1[g] = j + 1 < n ? p[(g0 + g) * ld + j + 1] : acc_t(0);
      }
      acc_t* o0 = out + g0 * D;
      for (int64_t d = 0; d < Dv; d += W) {
        const Vec v0 = Vec::loadu(r0 + d), v1 = Vec::loadu(r1 + d);
        for (int g = 0; g < 4; ++g) {
          Vec acc = Vec::loadu(o0 + g * D + d);
          acc = at::vec::fmadd(Vec(w0[g]), v0, acc);
          acc = at::vec::fmadd(Vec(w1[g]), v1, acc);
          acc.store(o0 + g * D + d);
        }
      }
      for (int64_t d = Dv; d < D; ++d)
        for (int g = 0; g < 4; ++g) o0[g * D + d] += w0[g] * r0[d] + w1[g] * r1[d];
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
