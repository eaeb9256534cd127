// CPU kernels of megatron_tfree's sparse T-Free ops (OpenMP via ATen's parallel_for) + pybind11 bindings.
//
// Semantics are those of megatron_tfree/ops/reference.py; the Python wrappers (autograd Functions)
// live in megatron_tfree/ops/extension.py. This file must build without CUDA.
//
//   embedding_bag_forward / embedding_bag_backward  sum of weight rows per CSR row and its weight
//       gradient; ids outside [vocab_start, vocab_start + v_local) are skipped, repeated ids count each
//       time. The backward counting-sorts the (id, row) pairs once and reduces every weight row over
//       its rows in row order: deterministic, no dense [N, v] matrix, parallel over weight rows. Both
//       directions run one gather-sum kernel (AVX2 column blocks with prefetching where the CPU has it).
//   bce_loss        T-Free BCE loss of given logits [N, v_local] + its logits gradient (no multi-hot).
//   head_loss       fused output head + BCE loss: logits = hidden @ weight^T chunk by chunk of the
//                   vocabulary; the loss and both gradients are accumulated per chunk, so the fp32
//                   [N, v] logits and their gradient never exist in full.
//   decode_scores   spec-4 dictionary scores from logits, parallel over words.
//
// Types: fp32 / bf16 / fp16 inputs are computed with fp32 accumulation (at::opmath_type), fp64 in fp64
// (so torch.autograd.gradcheck applies). Loss sums are accumulated in double per row and reduced in
// row order, so every result is deterministic for a given thread count and input.

#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

// Builds pass -DTFREE_OPS_SOURCE_ID=h<sha256[:16] of this file> so Python can tell a stale build.
#ifndef TFREE_OPS_SOURCE_ID
#define TFREE_OPS_SOURCE_ID hunknown
#endif
#define TFREE_STR2(x) #x
#define TFREE_STR(x) TFREE_STR2(x)

namespace {

// ----------------------------------------------------------------------------------------- checks
void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "tfree_ops: ", name, " must be a CPU tensor (got ", t.device(), ")");
}

// Validates CSR offsets/ids (int64, 1-D, contiguous, monotone, offsets[0] == 0, offsets[-1] == nnz).
void check_csr(const at::Tensor& offsets, const at::Tensor& ids, const char* what) {
  check_cpu(offsets, what);
  check_cpu(ids, what);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && ids.scalar_type() == at::kLong, "tfree_ops: ", what,
              " offsets and ids must be int64");
  TORCH_CHECK(offsets.dim() == 1 && ids.dim() == 1 && offsets.numel() >= 1, "tfree_ops: ", what,
              " offsets [N + 1] and ids [nnz] must be 1-D");
  TORCH_CHECK(offsets.is_contiguous() && ids.is_contiguous(), "tfree_ops: ", what, " must be contiguous");
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t n = offsets.numel() - 1;
  TORCH_CHECK(o[0] == 0 && o[n] == ids.numel(), "tfree_ops: ", what, " offsets must start at 0 and end at nnz = ",
              ids.numel(), " (got ", o[0], " .. ", o[n], ")");
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(o[i] <= o[i + 1], "tfree_ops: ", what, " offsets must be non-decreasing (row ", i, ")");
  }
}

// ----------------------------------------------------------------------------------- embedding bag
// Both directions are one gather-sum: out[r] = sum over k in [seg[r], seg[r+1]) of src[idx[k] - shift]
// (rows outside [0, V) skipped). Forward: src = weight, segments = the CSR rows. Backward: src = the
// output gradient, segments = the weight rows after a counting sort of the (id, row) pairs.
//
// Speed (it is memory bound: ~100 random rows of h values per output row): an output row is built in
// column blocks of kBlock floats held in 16 AVX registers; each block walks all the segment's source
// rows, and the same block of the row kPrefetch entries ahead is prefetched. Blocks are the outer loop
// (see gather_sum), so the random reads stay within one cache-sized column panel of the source. The
// AVX2 (+F16C for fp16) instantiation is chosen at run time (__builtin_cpu_supports), so the build needs
// no -march flag; other CPUs and fp64 take the portable loop, which has the same summation order per
// column (so results do not depend on the path taken).
constexpr int64_t kBlock = 128;
constexpr int64_t kPrefetch = 4;

template <typename T, typename A>
inline void gather_sum_portable(const T* src, int64_t V, int64_t H, const int64_t* seg, const int64_t* idx,
                                int64_t shift, T* out, int64_t r0, int64_t r1, int64_t c_begin) {
  std::vector<A> acc(H - c_begin);
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc.begin(), acc.end(), A(0));
    for (int64_t k = seg[r]; k < seg[r + 1]; ++k) {
      const int64_t j = idx[k] - shift;
      if (j < 0 || j >= V) continue;  // another tensor-parallel shard's row
      const T* row = src + j * H + c_begin;
      for (int64_t c = 0; c < H - c_begin; ++c) acc[c] += static_cast<A>(row[c]);
    }
    T* dst = out + r * H + c_begin;
    for (int64_t c = 0; c < H - c_begin; ++c) dst[c] = static_cast<T>(acc[c]);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define TFREE_HAVE_AVX2_PATH 1
#define TFREE_AVX2 __attribute__((target("avx2,fma,f16c")))

TFREE_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
TFREE_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m128i u = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(u), 16));
}
TFREE_AVX2 inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
TFREE_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
TFREE_AVX2 inline void store8(at::BFloat16* p, __m256 v) {  // round to nearest even, as c10::BFloat16
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  for (int i = 0; i < 8; ++i) p[i] = static_cast<at::BFloat16>(f[i]);
}
TFREE_AVX2 inline void store8(at::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Columns [c0, c0 + kBlock) of the output rows r0..r1 (the caller makes sure the block fits in H).
template <typename T>
TFREE_AVX2 void gather_block_avx2(const T* src, int64_t V, int64_t H, const int64_t* seg, const int64_t* idx,
                                  int64_t shift, T* out, int64_t r0, int64_t r1, int64_t c0) {
  constexpr int kRegs = kBlock / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t k0 = seg[r], k1 = seg[r + 1];
    __m256 acc[kRegs];
    for (int i = 0; i < kRegs; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      if (k + kPrefetch < k1) {
        const int64_t jn = idx[k + kPrefetch] - shift;
        if (jn >= 0 && jn < V) {
          const char* p = reinterpret_cast<const char*>(src + jn * H + c0);
          for (int64_t q = 0; q < kBlock * static_cast<int64_t>(sizeof(T)); q += 64) __builtin_prefetch(p + q);
        }
      }
      const int64_t j = idx[k] - shift;
      if (j < 0 || j >= V) continue;
      const T* row = src + j * H + c0;
      for (int i = 0; i < kRegs; ++i) acc[i] = _mm256_add_ps(acc[i], load8(row + 8 * i));
    }
    for (int i = 0; i < kRegs; ++i) store8(out + r * H + c0 + 8 * i, acc[i]);
  }
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

// out [R, H] for the R = seg.size() - 1 segments; parallel over segments. The AVX2 path runs one column
// block at a time over all segments (the outer loop), so the block's source column panel ([V, kBlock]:
// 16 MB for 32k fp32 rows, 2 MB for 4k gradient rows) is what the random row reads hit, and it stays in
// the shared cache while both threads work through it.
template <typename T>
void gather_sum(const T* src, int64_t V, int64_t H, const int64_t* seg, const int64_t* idx, int64_t shift, T* out,
                int64_t R, int64_t grain) {
  using acc_t = at::opmath_type<T>;
  int64_t done = 0;  // columns [0, done) are written
#ifdef TFREE_HAVE_AVX2_PATH
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu_has_avx2()) {
      for (; done + kBlock <= H; done += kBlock) {
        at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
          gather_block_avx2<T>(src, V, H, seg, idx, shift, out, r0, r1, done);
        });
      }
    }
  }
#endif
  if (done < H) {
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      gather_sum_portable<T, acc_t>(src, V, H, seg, idx, shift, out, r0, r1, done);
    });
  }
}

at::Tensor embedding_bag_forward(const at::Tensor& weight_in, const at::Tensor& offsets, const at::Tensor& ids,
                                 int64_t vocab_start) {
  check_cpu(weight_in, "weight");
  TORCH_CHECK(weight_in.dim() == 2, "tfree_ops: embedding_bag weight must be [v_local, h]");
  check_csr(offsets, ids, "embedding_bag");
  const at::Tensor weight = weight_in.contiguous();
  const int64_t V = weight.size(0), H = weight.size(1), N = offsets.numel() - 1;
  at::Tensor out = at::empty({N, H}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "embedding_bag_forward", [&] {
    gather_sum<scalar_t>(weight.data_ptr<scalar_t>(), V, H, offsets.data_ptr<int64_t>(), ids.data_ptr<int64_t>(),
                         vocab_start, out.data_ptr<scalar_t>(), N, 8);
  });
  return out;
}

at::Tensor embedding_bag_backward(const at::Tensor& grad_in, const at::Tensor& offsets, const at::Tensor& ids,
                                  int64_t vocab_start, int64_t num_weights) {
  check_cpu(grad_in, "grad");
  check_csr(offsets, ids, "embedding_bag");
  const int64_t N = offsets.numel() - 1, V = num_weights;
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == N, "tfree_ops: embedding_bag grad must be [N, h]");
  const at::Tensor grad = grad_in.contiguous();
  const int64_t H = grad.size(1);
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t* idp = ids.data_ptr<int64_t>();
  // Counting sort of the in-shard entries by local id; rows stay in increasing order per id.
  std::vector<int64_t> start(V + 1, 0);
  for (int64_t k = 0; k < ids.numel(); ++k) {
    const int64_t j = idp[k] - vocab_start;
    if (j >= 0 && j < V) ++start[j + 1];
  }
  for (int64_t j = 0; j < V; ++j) start[j + 1] += start[j];
  std::vector<int64_t> rows(start[V]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = o[n]; k < o[n + 1]; ++k) {
      const int64_t j = idp[k] - vocab_start;
      if (j >= 0 && j < V) rows[fill[j]++] = n;
    }
  }
  at::Tensor gw = at::empty({V, H}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "embedding_bag_backward", [&] {
    gather_sum<scalar_t>(grad.data_ptr<scalar_t>(), N, H, start.data(), rows.data(), 0, gw.data_ptr<scalar_t>(), V,
                         64);
  });
  return gw;
}

// ------------------------------------------------------------------------------------------ BCE
// Per row: sorted distinct local target ids (the multi-hot clamps repeats to 1).
struct Targets {
  std::vector<int64_t> begin, end, ids;  // row n: ids[begin[n] .. end[n])
};

Targets local_targets(const at::Tensor& offsets, const at::Tensor& ids, int64_t vocab_start, int64_t V, bool strict) {
  check_csr(offsets, ids, "targets");
  const int64_t N = offsets.numel() - 1;
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t* idp = ids.data_ptr<int64_t>();
  if (strict) {
    for (int64_t k = 0; k < ids.numel(); ++k) {
      TORCH_CHECK(idp[k] >= 0 && idp[k] < V, "tfree_ops: target id ", idp[k], " outside [0, ", V, ")");
    }
  }
  Targets t;
  t.begin.assign(o, o + N);
  t.end.resize(N);
  t.ids.resize(ids.numel());
  at::parallel_for(0, N, 256, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      int64_t* dst = t.ids.data() + o[n];
      int64_t cnt = 0;
      for (int64_t k = o[n]; k < o[n + 1]; ++k) {
        const int64_t j = idp[k] - vocab_start;
        if (j >= 0 && j < V) dst[cnt++] = j;
      }
      std::sort(dst, dst + cnt);
      t.end[n] = o[n] + (std::unique(dst, dst + cnt) - dst);
    }
  });
  return t;
}

#ifdef TFREE_HAVE_AVX2_PATH
// exp(y) for y <= 0, 8 lanes: y = n ln2 + r (two-part ln2), exp(r) by its degree-7 Taylor polynomial on
// |r| <= ln2 / 2 (error < 1e-8 relative), times 2^n through the exponent bits. y is clamped at -87 (the
// result stays a normal float; exp(-87) = 1.6e-38 is as good as 0 for softplus and sigmoid).
TFREE_AVX2 inline __m256 exp_nonpositive(__m256 y) {
  y = _mm256_max_ps(_mm256_set1_ps(-87.0f), y);  // operand order: a NaN y stays NaN (maxps returns the 2nd)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), y);  // ln2 = 0.693359375 - 2.12194440e-4
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// log1p(t) for t in [0, 1], 8 lanes: 2 atanh(s) with s = t / (2 + t) in [0, 1/3], the odd series up to
// s^13 (truncation < 2e-8 relative); exact for t = 0 and without the cancellation of log(1 + t).
TFREE_AVX2 inline __m256 log1p_unit(__m256 t) {
  const __m256 s = _mm256_div_ps(t, _mm256_add_ps(t, _mm256_set1_ps(2.0f)));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 p = _mm256_set1_ps(1.0f / 13.0f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 11.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 9.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 7.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 5.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f / 3.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(_mm256_add_ps(s, s), p);
}

// The all-columns (negative) part of bce_row for float, 8 columns at a time: adds softplus(x) to sum
// (two double accumulators, reduced in a fixed order: deterministic) and, if grad, writes
// gscale * sigmoid(x) over x. Returns how many columns it did (a multiple of 8; the caller does the rest).
TFREE_AVX2 int64_t bce_negatives_avx2(float* x, int64_t C, float gscale, bool grad, double& sum) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f), g = _mm256_set1_ps(gscale);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 v = _mm256_loadu_ps(x + c);
    const __m256 t = exp_nonpositive(_mm256_or_ps(v, sign));  // exp(-|x|)
    const __m256 sp = _mm256_add_ps(_mm256_max_ps(zero, v), log1p_unit(t));  // NaN logits give NaN losses
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(sp)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(sp, 1)));
    if (grad) {
      const __m256 q = _mm256_div_ps(one, _mm256_add_ps(one, t));  // sigmoid(|x|)
      const __m256 sig = _mm256_blendv_ps(_mm256_mul_ps(t, q), q, _mm256_cmp_ps(v, zero, _CMP_GE_OQ));
      _mm256_storeu_ps(x + c, _mm256_mul_ps(g, sig));
    }
  }
  alignas(32) double parts[8];
  _mm256_store_pd(parts, acc0);
  _mm256_store_pd(parts + 4, acc1);
  for (double d : parts) sum += d;
  return c;
}
#endif

// One row of BCE-with-logits (pos_weight) over the columns [j0, j0 + C) of the local vocabulary:
// returns the row's loss sum (without w and coef) and, if grad, overwrites x with
// d(coef * w * loss)/dx. tb..te are the row's sorted distinct local targets; scratch is reused.
template <typename T>
double bce_row(T* x, int64_t C, int64_t j0, const int64_t* tb, const int64_t* te, T w, T pw, T coef, bool grad,
               std::vector<std::pair<int64_t, T>>& scratch) {
  if (w == T(0)) {  // padding contributes 0 (for finite logits), as w * bce in the reference
    if (grad) std::fill(x, x + C, T(0));
    return 0.0;
  }
  const T gscale = coef * w;
  double sum = 0.0;
  scratch.clear();
  // positives first, while x still holds the logits: loss pw * softplus(-x) instead of softplus(x)
  for (const int64_t* p = std::lower_bound(tb, te, j0); p < te && *p < j0 + C; ++p) {
    const int64_t c = *p - j0;
    const T v = x[c], t = std::exp(-std::abs(v));
    const T sp_neg = std::max(v, T(0)) + std::log1p(t);  // softplus(x)
    const T sp_pos = std::max(-v, T(0)) + std::log1p(t);  // softplus(-x)
    const T sig_neg = v >= T(0) ? t / (T(1) + t) : T(1) / (T(1) + t);  // sigmoid(-x) = 1 - sigmoid(x), exact
    sum += static_cast<double>(pw * sp_pos) - static_cast<double>(sp_neg);
    scratch.emplace_back(c, -gscale * pw * sig_neg);
  }
  int64_t c = 0;  // every column as a negative: softplus(x), grad sigmoid(x)
#ifdef TFREE_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2()) c = bce_negatives_avx2(x, C, gscale, grad, sum);
  }
#endif
  for (; c < C; ++c) {
    const T v = x[c], t = std::exp(-std::abs(v));
    sum += static_cast<double>(std::max(v, T(0)) + std::log1p(t));
    if (grad) x[c] = gscale * (v >= T(0) ? T(1) / (T(1) + t) : t / (T(1) + t));
  }
  if (grad) {
    for (const auto& pg : scratch) x[pg.first] = pg.second;
  }
  return sum;
}

// Adds the BCE loss of logits chunk x [N, C] (columns j0.. of the local vocabulary) to row_loss
// (weighted by w_n) and, if grad, turns x into its gradient.
template <typename T>
void bce_chunk(T* x, int64_t N, int64_t C, int64_t j0, const Targets& tg, const T* w, T pw, T coef, bool grad,
               double* row_loss) {
  at::parallel_for(0, N, 4, [&](int64_t b, int64_t e) {
    std::vector<std::pair<int64_t, T>> scratch;
    for (int64_t n = b; n < e; ++n) {
      const int64_t* base = tg.ids.data();
      const double s = bce_row<T>(x + n * C, C, j0, base + tg.begin[n], base + tg.end[n], w[n], pw, coef, grad,
                                  scratch);
      row_loss[n] += static_cast<double>(w[n]) * s;
    }
  });
}

// The compute dtype: float for fp32/bf16/fp16, double for fp64.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor finish_loss(const std::vector<double>& row_loss, double coef, at::ScalarType ct) {
  double total = 0.0;
  for (double r : row_loss) total += r;  // row order: deterministic
  return at::scalar_tensor(total * coef, at::TensorOptions().dtype(ct));
}

// Loss of given logits [N, v_local] (targets shifted by vocab_start; strict: ids must lie in the
// shard) and, if grad, the logits gradient in the logits' dtype. Mean over N * vocab_size.
std::vector<at::Tensor> bce_loss(const at::Tensor& logits, const at::Tensor& t_off, const at::Tensor& t_ids,
                                 const at::Tensor& weights, double pos_weight, double loss_scale, int64_t vocab_start,
                                 int64_t vocab_size, bool strict, bool grad) {
  check_cpu(logits, "logits");
  check_cpu(weights, "weights");
  TORCH_CHECK(logits.dim() == 2, "tfree_ops: logits must be [N, v]");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(t_off.numel() == N + 1, "tfree_ops: target_offsets must have N + 1 = ", N + 1, " entries");
  TORCH_CHECK(weights.numel() == N, "tfree_ops: weights must have N = ", N, " entries");
  const at::ScalarType ct = compute_type(logits.scalar_type());
  at::Tensor x = logits.to(ct, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor w = weights.reshape({N}).to(ct).contiguous();
  const Targets tg = local_targets(t_off, t_ids, vocab_start, V, strict);
  std::vector<double> row_loss(N, 0.0);
  const double coef = (N > 0 && vocab_size > 0) ? loss_scale / (static_cast<double>(N) * vocab_size) : 0.0;
  AT_DISPATCH_FLOATING_TYPES(ct, "bce_loss", [&] {
    bce_chunk<scalar_t>(x.data_ptr<scalar_t>(), N, V, 0, tg, w.data_ptr<scalar_t>(), scalar_t(pos_weight),
                        scalar_t(coef), grad, row_loss.data());
  });
  at::Tensor loss = finish_loss(row_loss, coef, ct);
  if (!grad) return {loss};
  return {loss, x.to(logits.scalar_type())};
}

// Fused head + loss: logits = hidden [N, h] @ weight[v_local, h]^T computed chunk_size vocabulary rows
// at a time. Returns {loss} or {loss, grad_hidden (hidden dtype), grad_weight (weight dtype)}.
std::vector<at::Tensor> head_loss(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& t_off,
                                  const at::Tensor& t_ids, const at::Tensor& weights, double pos_weight,
                                  double loss_scale, int64_t vocab_start, int64_t vocab_size, int64_t chunk_size,
                                  bool grad) {
  check_cpu(hidden, "hidden");
  check_cpu(weight, "weight");
  check_cpu(weights, "weights");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "tfree_ops: head_loss needs hidden [N, h] and weight [v_local, h], got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(chunk_size > 0, "tfree_ops: chunk_size must be positive");
  const int64_t N = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  TORCH_CHECK(t_off.numel() == N + 1, "tfree_ops: target_offsets must have N + 1 = ", N + 1, " entries");
  TORCH_CHECK(weights.numel() == N, "tfree_ops: weights must have N = ", N, " entries");
  const at::ScalarType ct = compute_type(hidden.scalar_type());
  const at::Tensor hf = hidden.to(ct).contiguous();
  const at::Tensor w = weights.reshape({N}).to(ct).contiguous();
  const Targets tg = local_targets(t_off, t_ids, vocab_start, V, /*strict=*/false);
  std::vector<double> row_loss(N, 0.0);
  const double coef = (N > 0 && vocab_size > 0) ? loss_scale / (static_cast<double>(N) * vocab_size) : 0.0;
  at::Tensor gh, gw;
  if (grad) {
    gh = at::zeros({N, H}, hf.options());
    gw = at::empty({V, H}, weight.options());
  }
  for (int64_t j0 = 0; j0 < V; j0 += chunk_size) {
    const int64_t C = std::min(chunk_size, V - j0);
    const at::Tensor wc = weight.narrow(0, j0, C).to(ct).contiguous();  // [C, h]
    at::Tensor x = at::mm(hf, wc.t()).contiguous();                    // [N, C] logits of this chunk
    AT_DISPATCH_FLOATING_TYPES(ct, "head_loss", [&] {
      bce_chunk<scalar_t>(x.data_ptr<scalar_t>(), N, C, j0, tg, w.data_ptr<scalar_t>(), scalar_t(pos_weight),
                          scalar_t(coef), grad, row_loss.data());
    });
    if (grad) {
      gh.addmm_(x, wc);                                  // [N, C] @ [C, h]
      at::Tensor gw_chunk = gw.narrow(0, j0, C);         // rows of a contiguous [V, h]: contiguous
      if (gw.scalar_type() == ct) {
        at::mm_out(gw_chunk, x.t(), hf);                 // [C, N] @ [N, h] straight into the gradient
      } else {
        gw_chunk.copy_(at::mm(x.t(), hf));               // computed in fp32, stored in the weight dtype
      }
    }
  }
  at::Tensor loss = finish_loss(row_loss, coef, ct);
  if (!grad) return {loss};
  return {loss, gh.to(hidden.scalar_type()), gw};
}

// ------------------------------------------------------------------------------------ decode scores
// scores [B, n_words] (float32) = S / (m c) + (S - sum p) / max(v - m c, 1) with p = sigmoid(logits),
// S_w = sum_{ids of w} (edge ? edge_weight : 1) * p_id. ids int32, edge uint8, c int32.
at::Tensor decode_scores(const at::Tensor& logits, const at::Tensor& offsets, const at::Tensor& ids,
                         const at::Tensor& edge, const at::Tensor& c, int64_t m, double edge_weight) {
  check_cpu(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "tfree_ops: decode_scores logits must be [B, v]");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && ids.scalar_type() == at::kInt &&
                  edge.scalar_type() == at::kByte && c.scalar_type() == at::kInt,
              "tfree_ops: decode_scores needs int64 offsets, int32 ids, uint8 edge flags and int32 c");
  TORCH_CHECK(offsets.is_contiguous() && ids.is_contiguous() && edge.is_contiguous() && c.is_contiguous(),
              "tfree_ops: decode_scores pattern arrays must be contiguous");
  const int64_t W = offsets.numel() - 1, B = logits.size(0), v = logits.size(1);
  TORCH_CHECK(W >= 0 && c.numel() == W && edge.numel() == ids.numel(), "tfree_ops: decode_scores pattern sizes differ");
  const int64_t* o = offsets.data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0 && o[W] == ids.numel(), "tfree_ops: decode_scores offsets must span the ids");
  const at::Tensor p = at::sigmoid(logits.to(at::kFloat));
  const at::Tensor total_t = p.sum(1).contiguous();  // the same reduction as the torch path
  const at::Tensor pt = p.t().contiguous();           // [v, B]: one id's B probabilities side by side
  at::Tensor out = at::empty({B, W}, p.options());
  const float* P = pt.data_ptr<float>();
  const float* total = total_t.data_ptr<float>();
  const int32_t* idp = ids.data_ptr<int32_t>();
  const uint8_t* ep = edge.data_ptr<uint8_t>();
  const int32_t* cp = c.data_ptr<int32_t>();
  float* y = out.data_ptr<float>();
  const float e = static_cast<float>(edge_weight);
  const float factor[2] = {1.0f, e};  // by edge flag: a load, not a branch (real words' flags are irregular)
  std::atomic<bool> bad{false};
  if (B == 1) {  // greedy decoding: one branch-free gather-sum per word (ids clamped, then checked)
    const uint32_t vmax = static_cast<uint32_t>(std::max<int64_t>(v, 1) - 1);
    at::parallel_for(0, W, 2048, [&](int64_t b0, int64_t b1) {
      uint32_t worst = 0;
      auto term = [&](int64_t k) {
        const uint32_t id = static_cast<uint32_t>(idp[k]);
        worst = std::max(worst, id);
        return factor[ep[k] != 0] * P[std::min(id, vmax)];
      };
      for (int64_t wd = b0; wd < b1; ++wd) {
        // four partial sums (entries k = 0, 1, 2, 3 mod 4): the adds overlap instead of waiting on each other
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        int64_t k = o[wd];
        const int64_t k1 = o[wd + 1];
        for (; k + 4 <= k1; k += 4) {
          s0 += term(k);
          s1 += term(k + 1);
          s2 += term(k + 2);
          s3 += term(k + 3);
        }
        for (; k < k1; ++k) s0 += term(k);
        const float s = (s0 + s1) + (s2 + s3);
        const float mc = static_cast<float>(cp[wd]) * static_cast<float>(m);
        y[wd] = s / mc + (s - total[0]) / std::max(static_cast<float>(v) - mc, 1.0f);
      }
      if (static_cast<int64_t>(worst) >= v) bad.store(true, std::memory_order_relaxed);
    });
    TORCH_CHECK(!bad.load(), "tfree_ops: decode_scores: a pattern id lies outside [0, ", v, ")");
    return out;
  }
  at::parallel_for(0, W, 1024, [&](int64_t b0, int64_t b1) {
    std::vector<float> S(B);
    for (int64_t wd = b0; wd < b1; ++wd) {
      std::fill(S.begin(), S.end(), 0.0f);
      for (int64_t k = o[wd]; k < o[wd + 1]; ++k) {
        const int64_t id = idp[k];
        if (id < 0 || id >= v) {
          bad.store(true, std::memory_order_relaxed);
          continue;
        }
        const float f = factor[ep[k] != 0];
        const float* row = P + id * B;
        for (int64_t b = 0; b < B; ++b) S[b] += f * row[b];
      }
      const float mc = static_cast<float>(cp[wd]) * static_cast<float>(m);
      const float den = std::max(static_cast<float>(v) - mc, 1.0f);
      for (int64_t b = 0; b < B; ++b) y[b * W + wd] = S[b] / mc + (S[b] - total[b]) / den;
    }
  });
  TORCH_CHECK(!bad.load(), "tfree_ops: decode_scores: a pattern id lies outside [0, ", v, ")");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "megatron_tfree CPU kernels (see csrc/tfree_ops.cpp and megatron_tfree/ops/extension.py)";
  mod.attr("source_hash") = std::string(TFREE_STR(TFREE_OPS_SOURCE_ID)).substr(1);
  mod.def("embedding_bag_forward", &embedding_bag_forward, "sum of weight rows per CSR row",
          py::arg("weight"), py::arg("offsets"), py::arg("ids"), py::arg("vocab_start"));
  mod.def("embedding_bag_backward", &embedding_bag_backward, "weight gradient of embedding_bag_forward",
          py::arg("grad"), py::arg("offsets"), py::arg("ids"), py::arg("vocab_start"), py::arg("num_weights"));
  mod.def("bce_loss", &bce_loss, "T-Free BCE loss of logits (+ logits gradient)", py::arg("logits"),
          py::arg("target_offsets"), py::arg("target_ids"), py::arg("weights"), py::arg("pos_weight"),
          py::arg("loss_scale"), py::arg("vocab_start"), py::arg("vocab_size"), py::arg("strict"), py::arg("grad"));
  mod.def("head_loss", &head_loss, "fused output head + T-Free BCE loss (+ gradients), chunked over v",
          py::arg("hidden"), py::arg("weight"), py::arg("target_offsets"), py::arg("target_ids"),
          py::arg("weights"), py::arg("pos_weight"), py::arg("loss_scale"), py::arg("vocab_start"),
          py::arg("vocab_size"), py::arg("chunk_size"), py::arg("grad"));
  mod.def("decode_scores", &decode_scores, "spec-4 dictionary scores from logits", py::arg("logits"),
          py::arg("offsets"), py::arg("ids"), py::arg("edge"), py::arg("c"), py::arg("m"), py::arg("edge_weight"));
}
