// CUDA kernel of spec-4 decode scoring: dictionary words (CSR patterns) scored against
// p = sigmoid(logits). See tfree_kernels.h (tfree_decode_scores) for the contract.
//
// The glue computes p [B, v] (float32) and its row sums with torch ops; this kernel does the per-word
// gathers. A group of kGroup lanes serves one word (words have tens of ids: a whole warp would idle
// most lanes): the lanes stride over the word's ids, sum (edge ? e : 1) * p[b, id] for every batch row b,
// reduce with shuffles inside the group (fixed order) and the group's first lane writes the score.
// For a batch of one, p (v floats) stays in L2 and the pattern arrays are streamed once.
#include "tfree_kernels_common.cuh"

namespace tfree {
namespace {

constexpr int kGroup = 8;            // lanes per word
constexpr int kDecodeThreads = 256;  // 32 words per block

__global__ void __launch_bounds__(kDecodeThreads) decode_scores_kernel(
    const float* __restrict__ probs, const float* __restrict__ totals, int64_t batch, int64_t v,
    const int64_t* __restrict__ offsets, const int32_t* __restrict__ ids, const uint8_t* __restrict__ edge,
    const int32_t* __restrict__ c, int64_t n_words, float m, float edge_weight, float* __restrict__ scores,
    int32_t* __restrict__ bad_id) {
  const int64_t word = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kGroup;
  if (word >= n_words) return;  // whole groups leave together (blockDim is a multiple of kGroup)
  const int sub = threadIdx.x % kGroup;
  const unsigned lane = threadIdx.x & 31u;
  const unsigned mask = ((1u << kGroup) - 1u) << (lane & ~static_cast<unsigned>(kGroup - 1));
  const int64_t begin = offsets[word], end = offsets[word + 1];
  const float mc = static_cast<float>(c[word]) * m;
  const float den = fmaxf(static_cast<float>(v) - mc, 1.0f);
  bool bad = false;
  for (int64_t b = 0; b < batch; ++b) {
    const float* p = probs + b * v;
    float s = 0.0f;
    for (int64_t k = begin + sub; k < end; k += kGroup) {
      const int32_t id = ids[k];
      if (id < 0 || static_cast<int64_t>(id) >= v) {
        bad = true;
        continue;
      }
      s += (edge[k] ? edge_weight : 1.0f) * p[id];
    }
#pragma unroll
    for (int off = kGroup / 2; off > 0; off >>= 1) s += __shfl_xor_sync(mask, s, off, kGroup);
    if (sub == 0) scores[b * n_words + word] = s / mc + (s - totals[b]) / den;
  }
  if (bad) *bad_id = 1;
}

}  // namespace
}  // namespace tfree

using namespace tfree;

extern "C" cudaError_t tfree_decode_scores(const float* probs, const float* totals, int64_t batch, int64_t v,
                                           const int64_t* offsets, const int32_t* ids, const uint8_t* edge,
                                           const int32_t* c, int64_t n_words, int64_t m, float edge_weight,
                                           float* scores, int32_t* bad_id, cudaStream_t stream) {
  if (batch < 0 || v < 0 || n_words < 0) return cudaErrorInvalidValue;
  const int64_t blocks = ceil_div(n_words * kGroup, kDecodeThreads);
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  if (batch == 0 || n_words == 0) return cudaSuccess;
  decode_scores_kernel<<<static_cast<unsigned>(blocks), kDecodeThreads, 0, stream>>>(
      probs, totals, batch, v, offsets, ids, edge, c, n_words, static_cast<float>(m), edge_weight, scores, bad_id);
  return cudaGetLastError();
}
