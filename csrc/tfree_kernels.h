// Launchers of megatron_tfree's CUDA kernels (csrc/*_kernels.cu): plain pointers, sizes and a stream.
//
// No torch headers here or in the .cu files: each *_kernels.cu compiles alone with
// `nvcc -c -std=c++17 -arch=sm_90 X_kernels.cu`. The ATen glue (csrc/tfree_ops_cuda.cpp) checks the
// tensors, allocates outputs, runs the dense matmuls / sorts with torch ops and calls these launchers.
//
// Conventions (the semantics are those of megatron_tfree/ops/reference.py):
//  * Element types: TFREE_F32 / TFREE_F16 / TFREE_BF16 (float, __half, __nv_bfloat16); arithmetic and
//    accumulation are float32 whatever the element type.
//  * CSR: offsets [n_rows + 1] int64 (offsets[0] == 0, non-decreasing), ids int64 *global* vocabulary ids.
//    A weight shard holds rows vocab_start .. vocab_start + v_local - 1; other ids are skipped.
//  * Row-major matrices with a row length of h (or a row stride ld where stated).
//  * Every launcher enqueues on `stream`, returns cudaGetLastError() after its launches (or
//    cudaErrorInvalidValue for bad arguments) and never synchronises. Zero-sized work launches nothing.
//  * Nothing here allocates: outputs and scratch are the caller's.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tfree_dtype { TFREE_F32 = 0, TFREE_F16 = 1, TFREE_BF16 = 2 } tfree_dtype;

// ----------------------------------------------------------------------------- embedding bag
// out[n, :] = sum_{k in row n, id_k in shard} weight[id_k - vocab_start, :]   (an empty row -> zeros)
// weight [v_local, h], out [n_rows, h], both of element type `dtype`.
cudaError_t tfree_embedding_bag_forward(tfree_dtype dtype, const void* weight, int64_t v_local, int64_t h,
                                        const int64_t* offsets, const int64_t* ids, int64_t n_rows,
                                        int64_t vocab_start, void* out, cudaStream_t stream);

// Deterministic backward, step 1: for every CSR entry k, keys[k] = id_k - vocab_start if that lies in
// [0, v_local), else v_local (a sentinel that sorts last), and rows[k] = the row of entry k.
// keys, rows: [nnz] int64 (nnz = ids' length = offsets[n_rows]).
cudaError_t tfree_embedding_bag_sort_keys(const int64_t* offsets, const int64_t* ids, int64_t n_rows,
                                          int64_t nnz, int64_t vocab_start, int64_t v_local, int64_t* keys,
                                          int64_t* rows, cudaStream_t stream);

// Deterministic backward, step 2 (after a *stable* sort of the keys by the caller, rows permuted alike):
// grad_weight[j, :] = sum over the sorted entries with key j, in their order, of grad[row, :].
// Writes (does not add) every row j that occurs; rows that never occur are left untouched (the caller
// zero-fills grad_weight). Sentinel keys (>= v_local) are ignored. grad [n_rows, h], grad_weight
// [v_local, h], both `dtype`. Bit-identical results for identical inputs.
cudaError_t tfree_embedding_bag_backward_sorted(tfree_dtype dtype, const void* grad, int64_t h,
                                                const int64_t* sorted_keys, const int64_t* sorted_rows, int64_t nnz,
                                                int64_t v_local, void* grad_weight, cudaStream_t stream);

// Fast (non-deterministic) backward: atomicAdd of grad rows into a float32 grad_weight [v_local, h]
// (which the caller zero-fills; for f16/bf16 weights the caller converts it afterwards).
cudaError_t tfree_embedding_bag_backward_atomic(tfree_dtype dtype, const void* grad, int64_t h,
                                                const int64_t* offsets, const int64_t* ids, int64_t n_rows,
                                                int64_t vocab_start, int64_t v_local, float* grad_weight,
                                                cudaStream_t stream);

// ------------------------------------------------------------------------- T-Free BCE head loss
// Largest number of columns one tfree_bce_chunk call takes (its multi-hot lives in shared memory as a
// bitmap); callers split wider column ranges into several calls.
#define TFREE_BCE_MAX_CHUNK 65536

// One chunk of the T-Free BCE loss, in place. x points at column 0 of the chunk: element (n, c) is
// x[n * ld + c], n < n_rows, c < n_cols (<= TFREE_BCE_MAX_CHUNK), holding logits of local vocabulary
// columns; the chunk's column c is the *global* id col_start + c (col_start = vocab_start + first local
// column). The targets are the CSR rows (target_offsets [n_rows + 1], target_ids global ids, repeats
// clamp to 1); ids outside [col_start, col_start + n_cols) are ignored by this chunk.
// With y the multi-hot and w = weights[n] (float32 [n_rows]):
//   row_loss[n] += w * sum_c (y ? pos_weight * softplus(-x) : softplus(x))     (float64 [n_rows])
//   if want_grad: x[n, c] = coef * w * (y ? -pos_weight * sigmoid(-x) : sigmoid(x))
// (coef = loss_scale / (N * vocab_size) so that sum(row_loss) * coef is the loss). Rows with w == 0 add
// nothing and get a zero gradient. One block per row: each row's row_loss entry has one writer per call.
cudaError_t tfree_bce_chunk(tfree_dtype dtype, void* x, int64_t ld, int64_t n_rows, int64_t n_cols,
                            int64_t col_start, const int64_t* target_offsets, const int64_t* target_ids,
                            const float* weights, float pos_weight, float coef, int want_grad, double* row_loss,
                            cudaStream_t stream);

// ------------------------------------------------------------------------------ decode scoring
// Spec-4 dictionary scores. probs [batch, v] float32 = sigmoid(logits), totals [batch] = sum_i probs.
// Word w: ids[offsets[w] .. offsets[w + 1]) int32 distinct ids, edge flags uint8 (1: edge trigram id),
// c[w] int32 distinct trigrams, m = vocab_population.
//   S = sum_k (edge_k ? edge_weight : 1) * probs[b, id_k]
//   scores[b, w] = S / (m c) + (S - totals[b]) / max(v - m c, 1)            (float32 [batch, n_words])
// Ids outside [0, v) are skipped and set *bad_id = 1 (int32, zeroed by the caller) for the caller to
// report. A group of lanes per word, ids strided over the group; fixed reduction order.
cudaError_t tfree_decode_scores(const float* probs, const float* totals, int64_t batch, int64_t v,
                                const int64_t* offsets, const int32_t* ids, const uint8_t* edge, const int32_t* c,
                                int64_t n_words, int64_t m, float edge_weight, float* scores, int32_t* bad_id,
                                cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
