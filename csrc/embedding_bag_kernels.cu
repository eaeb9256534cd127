// CUDA kernels of the sparse trigram embedding-bag (sum over CSR rows, TP-shard aware) and of its
// weight gradient, deterministic (sorted segment sums) or fast (atomicAdd). See tfree_kernels.h.
//
// Forward: one block per CSR row; each thread owns VEC consecutive columns (16-byte loads when the
// row length and pointers allow), loops over the row's ids with up to 4 row loads in flight, and
// accumulates in float32. Out-of-shard ids are skipped (their rows live on another TP rank).
//
// Deterministic backward: the glue sorts the (key = local id or sentinel, row) pairs stably by key;
// one warp per segment start (grid-stride over the sorted entries) sums the segment's grad rows in
// sorted order (= increasing row order thanks to the stable sort) and writes the weight row once.
// The result does not depend on the launch configuration or on timing.
//
// Fast backward: one block per CSR row; every in-shard id atomically adds the row's gradient into a
// float32 weight gradient (summation order varies run to run).
#include "tfree_kernels_common.cuh"

namespace tfree {
namespace {

template <typename T, int VEC>
__global__ void embedding_bag_forward_kernel(const T* __restrict__ weight, int64_t v_local, int64_t h,
                                             const int64_t* __restrict__ offsets, const int64_t* __restrict__ ids,
                                             int64_t vocab_start, T* __restrict__ out) {
  const int64_t n = blockIdx.x;
  const int64_t begin = offsets[n], end = offsets[n + 1];
  for (int64_t c0 = static_cast<int64_t>(threadIdx.x) * VEC; c0 < h; c0 += static_cast<int64_t>(blockDim.x) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
    int64_t k = begin;
    for (; k + 4 <= end; k += 4) {  // four independent row loads in flight
      int64_t j[4];
      bool ok[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        j[u] = ids[k + u] - vocab_start;
        ok[u] = j[u] >= 0 && j[u] < v_local;
      }
      Vec<T, VEC> x[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        if (ok[u]) {
          x[u] = *reinterpret_cast<const Vec<T, VEC>*>(weight + j[u] * h + c0);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) x[u].v[i] = from_float<T>(0.0f);
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += to_float(x[u].v[i]);
      }
    }
    for (; k < end; ++k) {
      const int64_t j = ids[k] - vocab_start;
      if (j >= 0 && j < v_local) load_add<T, VEC>(acc, weight + j * h + c0);
    }
    store_vec<T, VEC>(out + n * h + c0, acc);
  }
}

__global__ void sort_keys_kernel(const int64_t* __restrict__ offsets, const int64_t* __restrict__ ids,
                                 int64_t vocab_start, int64_t v_local, int64_t* __restrict__ keys,
                                 int64_t* __restrict__ rows) {
  const int64_t n = blockIdx.x;
  const int64_t begin = offsets[n], end = offsets[n + 1];
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const int64_t j = ids[k] - vocab_start;
    keys[k] = (j >= 0 && j < v_local) ? j : v_local;
    rows[k] = n;
  }
}

// One warp per segment of equal sorted keys (grid-stride over entries: a warp that lands on the first
// entry of a segment reduces it; the others move on). Lanes own VEC consecutive columns each.
template <typename T, int VEC>
__global__ void embedding_bag_backward_sorted_kernel(const T* __restrict__ grad, int64_t h,
                                                     const int64_t* __restrict__ keys,
                                                     const int64_t* __restrict__ rows, int64_t nnz, int64_t v_local,
                                                     T* __restrict__ grad_weight) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t n_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t k = warp; k < nnz; k += n_warps) {
    const int64_t key = keys[k];
    if (key < 0 || key >= v_local) break;  // sorted: the sentinels (out of shard) come last
    if (k > 0 && keys[k - 1] == key) continue;  // not the first entry of its segment
    int64_t end = k + 1;
    while (end < nnz && keys[end] == key) ++end;
    for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < h; c0 += 32 * VEC) {
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
      for (int64_t r = k; r < end; ++r) load_add<T, VEC>(acc, grad + rows[r] * h + c0);
      store_vec<T, VEC>(grad_weight + key * h + c0, acc);
    }
  }
}

template <typename T>
__global__ void embedding_bag_backward_atomic_kernel(const T* __restrict__ grad, int64_t h,
                                                     const int64_t* __restrict__ offsets,
                                                     const int64_t* __restrict__ ids, int64_t vocab_start,
                                                     int64_t v_local, float* __restrict__ grad_weight) {
  const int64_t n = blockIdx.x;
  const int64_t begin = offsets[n], end = offsets[n + 1];
  if (begin >= end) return;
  for (int64_t c = threadIdx.x; c < h; c += blockDim.x) {
    const float g = to_float(grad[n * h + c]);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t j = ids[k] - vocab_start;
      if (j >= 0 && j < v_local) atomicAdd(grad_weight + j * h + c, g);
    }
  }
}

template <typename T>
cudaError_t launch_forward(const T* weight, int64_t v_local, int64_t h, const int64_t* offsets, const int64_t* ids,
                           int64_t n_rows, int64_t vocab_start, T* out, cudaStream_t stream) {
  const int vec = vector_width(h, sizeof(T), weight, out);
  const int threads = row_threads(h, vec);
  const dim3 grid(static_cast<unsigned>(n_rows));
  switch (vec) {
    case 8:  // 16-byte vectors of 2-byte types (float rows stop at 4)
      if constexpr (sizeof(T) == 2) {
        embedding_bag_forward_kernel<T, 8><<<grid, threads, 0, stream>>>(weight, v_local, h, offsets, ids, vocab_start, out);
        break;
      }
      [[fallthrough]];
    case 4:
      embedding_bag_forward_kernel<T, 4><<<grid, threads, 0, stream>>>(weight, v_local, h, offsets, ids, vocab_start, out);
      break;
    case 2:
      embedding_bag_forward_kernel<T, 2><<<grid, threads, 0, stream>>>(weight, v_local, h, offsets, ids, vocab_start, out);
      break;
    default:
      embedding_bag_forward_kernel<T, 1><<<grid, threads, 0, stream>>>(weight, v_local, h, offsets, ids, vocab_start, out);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_sorted(const T* grad, int64_t h, const int64_t* keys, const int64_t* rows, int64_t nnz,
                                   int64_t v_local, T* grad_weight, cudaStream_t stream) {
  const int vec = vector_width(h, sizeof(T), grad, grad_weight);
  const int threads = 256;  // 8 warps
  const int64_t blocks = ceil_div(nnz, threads / 32);
  const dim3 grid(static_cast<unsigned>(blocks < 8192 ? blocks : 8192));
  switch (vec) {
    case 8:
      if constexpr (sizeof(T) == 2) {
        embedding_bag_backward_sorted_kernel<T, 8><<<grid, threads, 0, stream>>>(grad, h, keys, rows, nnz, v_local, grad_weight);
        break;
      }
      [[fallthrough]];
    case 4:
      embedding_bag_backward_sorted_kernel<T, 4><<<grid, threads, 0, stream>>>(grad, h, keys, rows, nnz, v_local, grad_weight);
      break;
    case 2:
      embedding_bag_backward_sorted_kernel<T, 2><<<grid, threads, 0, stream>>>(grad, h, keys, rows, nnz, v_local, grad_weight);
      break;
    default:
      embedding_bag_backward_sorted_kernel<T, 1><<<grid, threads, 0, stream>>>(grad, h, keys, rows, nnz, v_local, grad_weight);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_atomic(const T* grad, int64_t h, const int64_t* offsets, const int64_t* ids, int64_t n_rows,
                                   int64_t vocab_start, int64_t v_local, float* grad_weight, cudaStream_t stream) {
  const int threads = row_threads(h, 1);
  embedding_bag_backward_atomic_kernel<T><<<static_cast<unsigned>(n_rows), threads, 0, stream>>>(
      grad, h, offsets, ids, vocab_start, v_local, grad_weight);
  return cudaGetLastError();
}

bool bad_sizes(int64_t n_rows, int64_t h) { return n_rows < 0 || h < 0 || n_rows > kMaxGridX; }

}  // namespace
}  // namespace tfree

using namespace tfree;

extern "C" cudaError_t tfree_embedding_bag_forward(tfree_dtype dtype, const void* weight, int64_t v_local, int64_t h,
                                                   const int64_t* offsets, const int64_t* ids, int64_t n_rows,
                                                   int64_t vocab_start, void* out, cudaStream_t stream) {
  if (!valid_dtype(dtype) || bad_sizes(n_rows, h) || v_local < 0) return cudaErrorInvalidValue;
  if (n_rows == 0 || h == 0) return cudaSuccess;
  switch (dtype) {
    case TFREE_F32:
      return launch_forward(static_cast<const float*>(weight), v_local, h, offsets, ids, n_rows, vocab_start,
                            static_cast<float*>(out), stream);
    case TFREE_F16:
      return launch_forward(static_cast<const __half*>(weight), v_local, h, offsets, ids, n_rows, vocab_start,
                            static_cast<__half*>(out), stream);
    default:
      return launch_forward(static_cast<const __nv_bfloat16*>(weight), v_local, h, offsets, ids, n_rows, vocab_start,
                            static_cast<__nv_bfloat16*>(out), stream);
  }
}

extern "C" cudaError_t tfree_embedding_bag_sort_keys(const int64_t* offsets, const int64_t* ids, int64_t n_rows,
                                                     int64_t nnz, int64_t vocab_start, int64_t v_local, int64_t* keys,
                                                     int64_t* rows, cudaStream_t stream) {
  if (bad_sizes(n_rows, 0) || nnz < 0 || v_local < 0) return cudaErrorInvalidValue;
  if (n_rows == 0 || nnz == 0) return cudaSuccess;
  sort_keys_kernel<<<static_cast<unsigned>(n_rows), 128, 0, stream>>>(offsets, ids, vocab_start, v_local, keys, rows);
  return cudaGetLastError();
}

extern "C" cudaError_t tfree_embedding_bag_backward_sorted(tfree_dtype dtype, const void* grad, int64_t h,
                                                           const int64_t* sorted_keys, const int64_t* sorted_rows,
                                                           int64_t nnz, int64_t v_local, void* grad_weight,
                                                           cudaStream_t stream) {
  if (!valid_dtype(dtype) || h < 0 || nnz < 0 || v_local < 0) return cudaErrorInvalidValue;
  if (nnz == 0 || h == 0 || v_local == 0) return cudaSuccess;
  switch (dtype) {
    case TFREE_F32:
      return launch_backward_sorted(static_cast<const float*>(grad), h, sorted_keys, sorted_rows, nnz, v_local,
                                    static_cast<float*>(grad_weight), stream);
    case TFREE_F16:
      return launch_backward_sorted(static_cast<const __half*>(grad), h, sorted_keys, sorted_rows, nnz, v_local,
                                    static_cast<__half*>(grad_weight), stream);
    default:
      return launch_backward_sorted(static_cast<const __nv_bfloat16*>(grad), h, sorted_keys, sorted_rows, nnz, v_local,
                                    static_cast<__nv_bfloat16*>(grad_weight), stream);
  }
}

extern "C" cudaError_t tfree_embedding_bag_backward_atomic(tfree_dtype dtype, const void* grad, int64_t h,
                                                           const int64_t* offsets, const int64_t* ids, int64_t n_rows,
                                                           int64_t vocab_start, int64_t v_local, float* grad_weight,
                                                           cudaStream_t stream) {
  if (!valid_dtype(dtype) || bad_sizes(n_rows, h) || v_local < 0) return cudaErrorInvalidValue;
  if (n_rows == 0 || h == 0 || v_local == 0) return cudaSuccess;
  switch (dtype) {
    case TFREE_F32:
      return launch_backward_atomic(static_cast<const float*>(grad), h, offsets, ids, n_rows, vocab_start, v_local,
                                    grad_weight, stream);
    case TFREE_F16:
      return launch_backward_atomic(static_cast<const __half*>(grad), h, offsets, ids, n_rows, vocab_start, v_local,
                                    grad_weight, stream);
    default:
      return launch_backward_atomic(static_cast<const __nv_bfloat16*>(grad), h, offsets, ids, n_rows, vocab_start,
                                    v_local, grad_weight, stream);
  }
}
