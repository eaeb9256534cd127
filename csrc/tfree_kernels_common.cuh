// Device helpers shared by csrc/*_kernels.cu (not a public header; see tfree_kernels.h).
//
// Only explicit conversion intrinsics are used on __half / __nv_bfloat16, so the kernels also build
// under torch's CUDAExtension flags (-D__CUDA_NO_HALF_OPERATORS__, -D__CUDA_NO_HALF_CONVERSIONS__,
// -D__CUDA_NO_BFLOAT16_CONVERSIONS__, -D__CUDA_NO_HALF2_OPERATORS__).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "tfree_kernels.h"

namespace tfree {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC consecutive elements moved as one aligned access (16 bytes when sizeof(T) * VEC == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_add(float (&acc)[VEC], const T* p) {
  const Vec<T, VEC> x = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] += to_float(x.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&acc)[VEC]) {
  Vec<T, VEC> x;
#pragma unroll
  for (int i = 0; i < VEC; ++i) x.v[i] = from_float<T>(acc[i]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = x;
}

// The widest vector (elements) for rows of h elements of `elem_bytes` at the given base pointers:
// 16 bytes when every row start stays 16-byte aligned, else narrower, down to 1.
inline int vector_width(int64_t h, int elem_bytes, const void* a, const void* b) {
  for (int vec = 16 / elem_bytes; vec > 1; vec /= 2) {
    const uintptr_t align = static_cast<uintptr_t>(vec * elem_bytes);
    if (h % vec == 0 && reinterpret_cast<uintptr_t>(a) % align == 0 && reinterpret_cast<uintptr_t>(b) % align == 0)
      return vec;
  }
  return 1;
}

inline int elem_bytes(tfree_dtype dtype) { return dtype == TFREE_F32 ? 4 : 2; }

inline bool valid_dtype(tfree_dtype dtype) { return dtype == TFREE_F32 || dtype == TFREE_F16 || dtype == TFREE_BF16; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per block for a row of h elements moved VEC at a time: one vector per thread up to 256.
inline int row_threads(int64_t h, int vec) {
  const int64_t vectors = ceil_div(h, vec);
  const int64_t t = ceil_div(vectors, 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > 256 ? 256 : t));
}

// Largest grid.x the launchers use for one-block-per-row kernels (the hardware allows 2^31 - 1).
constexpr int64_t kMaxGridX = 2147483647;

}  // namespace tfree
