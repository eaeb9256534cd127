// CUDA kernel of the T-Free BCE loss over one chunk of logits, for the chunked fused head + loss.
// See tfree_kernels.h (tfree_bce_chunk) for the contract.
//
// The glue loops over vocabulary chunks: logits_chunk = hidden @ W[chunk]^T (cuBLAS), this kernel
// (loss partial sums per row + dlogits written over the logits), then grad_hidden += dlogits @ W[chunk]
// and grad_W[chunk] = dlogits^T @ hidden. So the [N, v] logits and their gradient never exist in full.
//
// One block per row. The row's multi-hot restricted to the chunk is built in shared memory as a bitmap
// (atomicOr: repeated target ids clamp to 1, ids outside the chunk are ignored), then every column is
// read once, its loss term added and its gradient written in place; a fixed-shape block reduction gives
// the row's loss, added (float64) to row_loss[n] by a single thread: deterministic.
#include "tfree_kernels_common.cuh"

namespace tfree {
namespace {

constexpr int kBceThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kBceThreads) bce_chunk_kernel(T* __restrict__ x, int64_t ld, int64_t n_cols,
                                                                int64_t col_start,
                                                                const int64_t* __restrict__ target_offsets,
                                                                const int64_t* __restrict__ target_ids,
                                                                const float* __restrict__ weights, float pos_weight,
                                                                float coef, int want_grad, double* __restrict__ row_loss) {
  extern __shared__ unsigned int target_bits[];  // ceil(n_cols / 32) words
  __shared__ float warp_sums[kBceThreads / 32];
  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x;
  T* row = x + n * ld;
  const float w = weights[n];
  if (w == 0.0f) {  // padding: contributes 0 to the loss, zero gradient (uniform over the block)
    if (want_grad) {
      for (int64_t c = tid; c < n_cols; c += blockDim.x) row[c] = from_float<T>(0.0f);
    }
    return;
  }
  const int64_t n_words = (n_cols + 31) / 32;
  for (int64_t i = tid; i < n_words; i += blockDim.x) target_bits[i] = 0u;
  __syncthreads();
  const int64_t begin = target_offsets[n], end = target_offsets[n + 1];
  for (int64_t k = begin + tid; k < end; k += blockDim.x) {
    const int64_t j = target_ids[k] - col_start;
    if (j >= 0 && j < n_cols) atomicOr(&target_bits[j >> 5], 1u << (j & 31));
  }
  __syncthreads();

  const float gscale = coef * w;
  float sum = 0.0f;
  for (int64_t c = tid; c < n_cols; c += blockDim.x) {
    const float v = to_float(row[c]);
    const float t = expf(-fabsf(v));   // in (0, 1]
    const float l1p = log1pf(t);
    const float inv = 1.0f / (1.0f + t);
    const float sig = v >= 0.0f ? inv : t * inv;      // sigmoid(v)
    const float sig_neg = v >= 0.0f ? t * inv : inv;  // sigmoid(-v) = 1 - sigmoid(v), without cancellation
    const bool positive = (target_bits[c >> 5] >> (c & 31)) & 1u;
    float g;
    if (positive) {
      sum += pos_weight * (fmaxf(-v, 0.0f) + l1p);  // pos_weight * softplus(-v) = -pos_weight * log sigmoid(v)
      g = -gscale * pos_weight * sig_neg;
    } else {
      sum += fmaxf(v, 0.0f) + l1p;                   // softplus(v) = -log(1 - sigmoid(v))
      g = gscale * sig;
    }
    if (want_grad) row[c] = from_float<T>(g);
  }

  // block reduction: warps by shuffles (fixed tree), then the first warp over the warp sums
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if ((tid & 31) == 0) warp_sums[tid >> 5] = sum;
  __syncthreads();
  if (tid < 32) {
    float s = tid < static_cast<int>(blockDim.x >> 5) ? warp_sums[tid] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (tid == 0) row_loss[n] += static_cast<double>(w) * static_cast<double>(s);
  }
}

template <typename T>
cudaError_t launch_bce_chunk(T* x, int64_t ld, int64_t n_rows, int64_t n_cols, int64_t col_start,
                             const int64_t* target_offsets, const int64_t* target_ids, const float* weights,
                             float pos_weight, float coef, int want_grad, double* row_loss, cudaStream_t stream) {
  const size_t shared = static_cast<size_t>((n_cols + 31) / 32) * sizeof(unsigned int);  // <= 8 KiB
  bce_chunk_kernel<T><<<static_cast<unsigned>(n_rows), kBceThreads, shared, stream>>>(
      x, ld, n_cols, col_start, target_offsets, target_ids, weights, pos_weight, coef, want_grad, row_loss);
  return cudaGetLastError();
}

}  // namespace
}  // namespace tfree

using namespace tfree;

extern "C" cudaError_t tfree_bce_chunk(tfree_dtype dtype, void* x, int64_t ld, int64_t n_rows, int64_t n_cols,
                                       int64_t col_start, const int64_t* target_offsets, const int64_t* target_ids,
                                       const float* weights, float pos_weight, float coef, int want_grad,
                                       double* row_loss, cudaStream_t stream) {
  if (!valid_dtype(dtype) || n_rows < 0 || n_rows > kMaxGridX || n_cols < 0 || n_cols > TFREE_BCE_MAX_CHUNK ||
      (n_rows > 1 && ld < n_cols))
    return cudaErrorInvalidValue;
  if (n_rows == 0 || n_cols == 0) return cudaSuccess;
  switch (dtype) {
    case TFREE_F32:
      return launch_bce_chunk(static_cast<float*>(x), ld, n_rows, n_cols, col_start, target_offsets, target_ids,
                              weights, pos_weight, coef, want_grad, row_loss, stream);
    case TFREE_F16:
      return launch_bce_chunk(static_cast<__half*>(x), ld, n_rows, n_cols, col_start, target_offsets, target_ids,
                              weights, pos_weight, coef, want_grad, row_loss, stream);
    default:
      return launch_bce_chunk(static_cast<__nv_bfloat16*>(x), ld, n_rows, n_cols, col_start, target_offsets,
                              target_ids, weights, pos_weight, coef, want_grad, row_loss, stream);
  }
}
