// Emulated replacement of csrc/cuda/common/tensor_core.cuh (same names and signatures), written from
// the PTX ISA fragment layouts, independently of how the kernels use them:
//   ldmatrix .m8n8 .x4: lanes 8i..8i+7 give the 8 row addresses (16 bytes each, 16-byte
//     aligned) of matrix i; lane l receives in r[i] the row l/4, columns 2(l%4), 2(l%4)+1 of
//     matrix i (lower column in the lower half). .trans: the transposed matrix, i.e. rows
//     2(l%4), 2(l%4)+1 of column l/4.
//   mma.m16n8k16 (row.col): A 16x16 with a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..),
//     a3 = (g+8, 2q+8..); B 16x8 (k x n) with b0 = (k = 2q..2q+1, n = g), b1 = (k = 2q+8.., n = g);
//     C/D 16x8 with c0, c1 = (g, 2q..2q+1), c2, c3 = (g+8, 2q..); g = lane / 4, q = lane % 4.
//   mma.m16n8k32 e4m3 (row.col): 8-bit elements, four per register, byte i = element k + i:
//     A 16x32 with a0 = (g, 4q..4q+3), a1 = (g+8, 4q..), a2 = (g, 4q+16..), a3 = (g+8, 4q+16..);
//     B 32x8 with b0 = (k = 4q..4q+3, n = g), b1 = (k = 4q+16.., n = g); C/D as above.
//     e4m3: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal; S.1111.111
//     is NaN; no infinities.
// Every shared-memory access is bounds- and alignment-checked.
#pragma once

#include "emu_cuda.h"

namespace dsa {
namespace cuda {

inline uint32_t smem_addr(const void* p) {
  const auto* base = emu::current->smem.data();
  const auto* q = static_cast<const uint8_t*>(p);
  if (q < base || q >= base + emu::dyn_smem_bytes) {
    std::fprintf(stderr, "emu: smem_addr of a pointer outside dynamic shared memory\n");
    std::abort();
  }
  return static_cast<uint32_t>(q - base);
}

inline uint8_t* smem_at(uint32_t addr, size_t bytes, size_t align) {
  if (addr + bytes > emu::dyn_smem_bytes || addr % align != 0) {
    std::fprintf(stderr, "emu: shared access [%u, %zu) out of %zu bytes or misaligned\n", addr, addr + bytes,
                 emu::dyn_smem_bytes);
    std::abort();
  }
  return emu::current->smem.data() + addr;
}

inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  uint8_t* d = smem_at(dst, 16, 16);
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) {
      std::fprintf(stderr, "emu: cp.async source not 16-byte aligned\n");
      std::abort();
    }
    std::memcpy(d, src, 16);
  } else {
    std::memset(d, 0, 16);
  }
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}

namespace detail {
inline uint16_t load_b16(uint32_t addr) {
  uint16_t v;
  std::memcpy(&v, smem_at(addr, 2, 2), 2);
  return v;
}
inline void ldsm(uint32_t addr, uint32_t (&r)[4], bool trans) {
  uint64_t* ex = emu::warp_exch();
  const unsigned lane = emu::lane();
  ex[lane * 16] = addr;
  emu::warp_sync();
  for (int m = 0; m < 4; ++m) {
    for (int row = 0; row < 8; ++row) smem_at(static_cast<uint32_t>(ex[(8 * m + row) * 16]), 16, 16);
    uint16_t lo, hi;
    if (!trans) {
      const uint32_t row_addr = static_cast<uint32_t>(ex[(8 * m + lane / 4) * 16]);
      lo = load_b16(row_addr + 2 * (2 * (lane % 4)));
      hi = load_b16(row_addr + 2 * (2 * (lane % 4) + 1));
    } else {
      const uint32_t r0 = static_cast<uint32_t>(ex[(8 * m + 2 * (lane % 4)) * 16]);
      const uint32_t r1 = static_cast<uint32_t>(ex[(8 * m + 2 * (lane % 4) + 1) * 16]);
      lo = load_b16(r0 + 2 * (lane / 4));
      hi = load_b16(r1 + 2 * (lane / 4));
    }
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  emu::warp_sync();
}

template <typename T>
float b16_to_float(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, 2);
  if constexpr (std::is_same_v<T, __half>)
    return __half2float(v);
  else
    return __bfloat162float(v);
}

template <typename T>
void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint64_t* ex = emu::warp_exch();
  const unsigned lane = emu::lane();
  for (int i = 0; i < 4; ++i) ex[lane * 16 + i] = a[i];
  ex[lane * 16 + 4] = b0;
  ex[lane * 16 + 5] = b1;
  emu::warp_sync();
  const auto half_of = [](uint64_t reg, int k) { return static_cast<uint16_t>(k % 2 ? reg >> 16 : reg); };
  const auto A = [&](int r, int k) {  // A[r][k]
    const int l = (r % 8) * 4 + (k % 8) / 2, reg = (r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return b16_to_float<T>(half_of(ex[l * 16 + reg], k));
  };
  const auto B = [&](int k, int n) {  // B[k][n]
    const int l = n * 4 + (k % 8) / 2, reg = 4 + (k >= 8 ? 1 : 0);
    return b16_to_float<T>(half_of(ex[l * 16 + reg], k));
  };
  const int g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = 2 * q + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc = std::fma(A(r, k), B(k, n), acc);
    d[i] = acc;
  }
  emu::warp_sync();
}
inline float e4m3_to_float(uint8_t bits) {
  const int sign = bits >> 7, exp = (bits >> 3) & 15, man = bits & 7;
  float v;
  if (exp == 15 && man == 7)
    v = NAN;
  else if (exp == 0)
    v = std::ldexp(static_cast<float>(man), -9);  // subnormal: man/8 * 2^(1-7)
  else
    v = std::ldexp(1.f + man / 8.f, exp - 7);
  return sign ? -v : v;
}

inline void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint64_t* ex = emu::warp_exch();
  const unsigned lane = emu::lane();
  for (int i = 0; i < 4; ++i) ex[lane * 16 + i] = a[i];
  ex[lane * 16 + 4] = b0;
  ex[lane * 16 + 5] = b1;
  emu::warp_sync();
  const auto byte_of = [](uint64_t reg, int k) { return static_cast<uint8_t>(reg >> (8 * (k % 4))); };
  const auto A = [&](int r, int k) {  // A[r][k], k in [0, 32)
    const int l = (r % 8) * 4 + (k % 16) / 4, reg = (r >= 8 ? 1 : 0) + (k >= 16 ? 2 : 0);
    return e4m3_to_float(byte_of(ex[l * 16 + reg], k));
  };
  const auto B = [&](int k, int n) {  // B[k][n]
    const int l = n * 4 + (k % 16) / 4, reg = 4 + (k >= 16 ? 1 : 0);
    return e4m3_to_float(byte_of(ex[l * 16 + reg], k));
  };
  const int g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0), n = 2 * q + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 32; ++k) acc = std::fma(A(r, k), B(k, n), acc);
    d[i] = acc;
  }
  emu::warp_sync();
}
}  // namespace detail

inline void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) { detail::ldsm(addr, r, false); }
// .x2: matrices 0 and 1 from the addresses of lanes 0..15 (the others' addresses are ignored:
// they are replaced by lane 0..7's rows, which are valid, before the x4 model reads them).
inline void ldsm_x2(uint32_t addr, uint32_t (&r)[2]) {
  const uint32_t lo_half = static_cast<uint32_t>(__shfl_sync(0xffffffffu, addr, static_cast<int>(emu::lane() & 15)));
  uint32_t r4[4];
  detail::ldsm(emu::lane() < 16 ? addr : lo_half, r4, false);
  r[0] = r4[0];
  r[1] = r4[1];
}
inline void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) { detail::ldsm(addr, r, true); }

template <typename T>
struct Mma {
  static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { detail::mma<T>(d, a, b0, b1); }
  static uint32_t pack(float lo, float hi) {
    T l, h;
    if constexpr (std::is_same_v<T, __half>) {
      l = __float2half_rn(lo);
      h = __float2half_rn(hi);
    } else {
      l = __float2bfloat16_rn(lo);
      h = __float2bfloat16_rn(hi);
    }
    uint16_t lb, hb;
    std::memcpy(&lb, &l, 2);
    std::memcpy(&hb, &h, 2);
    return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
  }
};

template <>
struct Mma<__nv_fp8_e4m3> {
  static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { detail::mma_e4m3(d, a, b0, b1); }
};

// Max / sum over the four lanes of a quad (as tensor_core.cuh).
inline float quad_max(float x) {
  x = std::fmax(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return std::fmax(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
inline float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace cuda
}  // namespace dsa
