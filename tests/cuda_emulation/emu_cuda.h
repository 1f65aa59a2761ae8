// A small CPU emulation of the CUDA execution model, enough to run the kernels of
// csrc/cuda/*/*.cuh on a machine without a GPU (tests/cuda_emulation/emulator.py).
//
// One block runs at a time; each of its threads is a std::thread. __syncthreads is a barrier
// of the block, warp intrinsics (shuffles, ballot) meet at a barrier of the warp and exchange
// values through a per-warp buffer. A thread that returns drops out of both barriers, as an
// exited GPU thread does. `__shared__` variables become function statics (shared by the block's
// threads); dynamic shared memory is a fresh buffer per block filled with 0xFF bytes (NaN as
// floats), so reading shared memory that was never written shows up in the results.
// cp.async copies at once (the waits are no-ops); ldmatrix and mma.sync are modelled from the
// PTX fragment layouts in emu_tensor_core.cuh. Timing, memory ordering beyond the barriers and
// warp divergence are not modelled: this checks arithmetic, indexing and bounds, not speed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>  // before the macros below (it names parameters blockDim, ...)

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

// cuda_runtime's host-side definitions of these are replaced
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};

namespace emu {

struct Block {
  explicit Block(unsigned threads, size_t smem_bytes)
      : threads(threads), bar(threads), smem(smem_bytes + 16, 0xFF), exch((threads / 32) * 32 * 16) {
    for (unsigned w = 0; w < threads / 32; ++w) warp_bars.push_back(std::make_unique<std::barrier<>>(32));
  }
  unsigned threads;
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<uint8_t> smem;    // dynamic shared memory (+16 bytes of slack, never handed out)
  std::vector<uint64_t> exch;   // per warp: 32 lanes x 16 words
};

inline Block* current = nullptr;
inline thread_local EmuDim3 thread_idx, block_idx, block_dim;
inline size_t dyn_smem_bytes = 0;

inline unsigned lane() { return thread_idx.x & 31u; }
inline unsigned warp() { return thread_idx.x >> 5; }
inline uint64_t* warp_exch() { return current->exch.data() + warp() * 32 * 16; }
inline void warp_sync() { current->warp_bars[warp()]->arrive_and_wait(); }

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(current->smem.data());
}

template <class F>
void launch(unsigned grid, unsigned block, size_t smem_bytes, const F& body) {
  if (block % 32 != 0) {
    std::fprintf(stderr, "emu: block of %u threads is not whole warps\n", block);
    std::abort();
  }
  for (unsigned bi = 0; bi < grid; ++bi) {
    Block blk(block, smem_bytes);
    current = &blk;
    dyn_smem_bytes = smem_bytes;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t, bi] {
        thread_idx = EmuDim3{t, 0, 0};
        block_idx = EmuDim3{bi, 0, 0};
        block_dim = EmuDim3{block, 1, 1};
        body();
        blk.warp_bars[t / 32]->arrive_and_drop();
        blk.bar.arrive_and_drop();
      });
    }
    for (auto& th : threads) th.join();
    current = nullptr;
  }
}

template <typename V>
V exchange(V v, unsigned src_lane) {
  static_assert(sizeof(V) <= 8, "shuffle of up to 64 bits");
  uint64_t* ex = warp_exch();
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  ex[lane() * 16] = bits;
  warp_sync();
  const uint64_t got = ex[src_lane * 16];
  warp_sync();
  V out;
  std::memcpy(&out, &got, sizeof(V));
  return out;
}

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)

inline void __syncthreads() { emu::current->bar.arrive_and_wait(); }

template <typename V>
V __shfl_sync(unsigned, V v, int src) {
  return emu::exchange(v, static_cast<unsigned>(src) & 31u);
}
template <typename V>
V __shfl_xor_sync(unsigned, V v, int m) {
  return emu::exchange(v, emu::lane() ^ static_cast<unsigned>(m));
}
template <typename V>
V __shfl_down_sync(unsigned, V v, unsigned d) {
  const unsigned src = emu::lane() + d;
  return emu::exchange(v, src < 32 ? src : emu::lane());
}
template <typename V>
V __shfl_up_sync(unsigned, V v, unsigned d) {
  return emu::exchange(v, emu::lane() >= d ? emu::lane() - d : emu::lane());
}
inline unsigned __ballot_sync(unsigned, bool pred) {
  uint64_t* ex = emu::warp_exch();
  ex[emu::lane() * 16] = pred ? 1 : 0;
  emu::warp_sync();
  unsigned bits = 0;
  for (unsigned l = 0; l < 32; ++l) bits |= ex[l * 16] ? (1u << l) : 0u;
  emu::warp_sync();
  return bits;
}

inline bool __any_sync(unsigned mask, bool pred) { return __ballot_sync(mask, pred) != 0; }

inline int __popc(unsigned x) { return std::popcount(x); }
inline uint32_t __float_as_uint(float x) { return std::bit_cast<uint32_t>(x); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

// CUDA's min/max overloads take two values of the same type; so do these (mixing int and
// int64_t fails to compile here as a reminder to be explicit).
template <typename A>
A min(A a, A b) {
  return b < a ? b : a;
}
template <typename A>
A max(A a, A b) {
  return a < b ? b : a;
}
