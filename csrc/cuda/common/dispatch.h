// DSA_DISPATCH_CUDA, the dtype dispatch of the CUDA host code: runs a lambda with `scalar_t`, the
// device element type of an at::ScalarType (DeviceType below), for the dtypes listed, and raises,
// naming the op, for any other:
//
//   DSA_DISPATCH_CUDA(q.scalar_type(), "dsa.sparse_attention", (at::kBFloat16, at::kHalf), [&] {
//     launch_fwd_mma<scalar_t>(args, stream);
//   });
//
// Each call lists the dtypes its kernels are compiled for (a family's paths differ: the row-wise
// attention kernels take float64, the tensor-core ones only 16-bit types, the forward indexer
// e4m3), at most five; the body is instantiated for those, in that order. Host code only (c10):
// kernel headers do not include it.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <initializer_list>
#include <string>

namespace dsa {
namespace cuda {

// The element type the kernels use for a dtype.
template <at::ScalarType>
struct DeviceType;
template <>
struct DeviceType<at::kBFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct DeviceType<at::kHalf> {
  using type = __half;
};
template <>
struct DeviceType<at::kFloat> {
  using type = float;
};
template <>
struct DeviceType<at::kDouble> {
  using type = double;
};
template <>
struct DeviceType<at::kFloat8_e4m3fn> {
  using type = __nv_fp8_e4m3;
};

[[noreturn]] inline void unsupported_dtype(const char* op, at::ScalarType dtype,
                                           std::initializer_list<at::ScalarType> supported) {
  std::string names;
  for (const at::ScalarType t : supported) names += (names.empty() ? "" : ", ") + std::string(c10::toString(t));
  TORCH_CHECK(false, op, ": no CUDA kernel for dtype ", dtype, " (this path takes ", names, ")");
}

}  // namespace cuda
}  // namespace dsa

#define DSA_DISPATCH_CUDA(TYPE, NAME, TYPES, ...)                                                  \
  [&] {                                                                                            \
    const ::at::ScalarType dsa_dispatch_type_ = (TYPE);                                            \
    switch (dsa_dispatch_type_) {                                                                  \
      DSA_DISPATCH_CUDA_CASES_((__VA_ARGS__), DSA_DISPATCH_CUDA_EXPAND_ TYPES)                     \
      default:                                                                                     \
        ::dsa::cuda::unsupported_dtype(NAME, dsa_dispatch_type_, {DSA_DISPATCH_CUDA_EXPAND_ TYPES}); \
    }                                                                                              \
  }()

// One `case` per listed dtype (a fixed-arity for-each: up to five).
#define DSA_DISPATCH_CUDA_EXPAND_(...) __VA_ARGS__
#define DSA_DISPATCH_CUDA_CASE_(BODY, DTYPE)                          \
  case DTYPE: {                                                       \
    using scalar_t [[maybe_unused]] = ::dsa::cuda::DeviceType<DTYPE>::type; \
    return BODY();                                                    \
  }
#define DSA_DISPATCH_CUDA_PICK_(_1, _2, _3, _4, _5, CASES, ...) CASES
#define DSA_DISPATCH_CUDA_CASES_(BODY, ...)                                                          \
  DSA_DISPATCH_CUDA_PICK_(__VA_ARGS__, DSA_DISPATCH_CUDA_5_, DSA_DISPATCH_CUDA_4_, DSA_DISPATCH_CUDA_3_, \
                          DSA_DISPATCH_CUDA_2_, DSA_DISPATCH_CUDA_1_)(BODY, __VA_ARGS__)
#define DSA_DISPATCH_CUDA_1_(BODY, T) DSA_DISPATCH_CUDA_CASE_(BODY, T)
#define DSA_DISPATCH_CUDA_2_(BODY, T, ...) DSA_DISPATCH_CUDA_CASE_(BODY, T) DSA_DISPATCH_CUDA_1_(BODY, __VA_ARGS__)
#define DSA_DISPATCH_CUDA_3_(BODY, T, ...) DSA_DISPATCH_CUDA_CASE_(BODY, T) DSA_DISPATCH_CUDA_2_(BODY, __VA_ARGS__)
#define DSA_DISPATCH_CUDA_4_(BODY, T, ...) DSA_DISPATCH_CUDA_CASE_(BODY, T) DSA_DISPATCH_CUDA_3_(BODY, __VA_ARGS__)
#define DSA_DISPATCH_CUDA_5_(BODY, T, ...) DSA_DISPATCH_CUDA_CASE_(BODY, T) DSA_DISPATCH_CUDA_4_(BODY, __VA_ARGS__)
