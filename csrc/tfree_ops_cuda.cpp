// ATen glue of megatron_tfree's CUDA kernels (csrc/*_kernels.cu, launchers in tfree_kernels.h) +
// pybind11 bindings. Built only by a CUDA build: setup.py's CUDAExtension
// `megatron_tfree._tfree_ops_cuda` (csrc/*_kernels.cu + csrc/*_cuda.cpp), or a JIT
// torch.utils.cpp_extension.load of the same sources (tests/ops/test_cuda_ops.py, benchmarks/kernels.py).
//
// The functions have the names, arguments and results of the CPU module (csrc/tfree_ops.cpp), so the
// autograd Functions of megatron_tfree/ops/extension.py can call either module:
//   embedding_bag_forward(weight, offsets, ids, vocab_start) -> [N, h]
//   embedding_bag_backward(grad, offsets, ids, vocab_start, num_weights, deterministic=True) -> [v_local, h]
//   bce_loss(logits, target_offsets, target_ids, weights, pos_weight, loss_scale, vocab_start, vocab_size,
//            strict, grad) -> [loss] or [loss, grad_logits]
//   head_loss(hidden, weight, target_offsets, target_ids, weights, pos_weight, loss_scale, vocab_start,
//             vocab_size, chunk_size, grad) -> [loss] or [loss, grad_hidden, grad_weight]
//   decode_scores(logits, offsets, ids, edge, c, m, edge_weight) -> [B, n_words] float32
// Differences from the CPU module: all tensors must be on one CUDA device; float32 / float16 / bfloat16
// only (float64 is the reference's, e.g. for gradcheck); embedding_bag_backward takes `deterministic`
// (False: atomicAdd into a float32 buffer); CSR offsets are not validated element by element (that would
// synchronise the device): they must be well formed (offsets[0] == 0, non-decreasing, offsets[-1] == nnz).
// Losses are float32 scalars on the device. Work is enqueued on the current stream of the tensors' device;
// only bce_loss(strict=True) and decode_scores synchronise (to report bad ids).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <vector>

#include "tfree_kernels.h"

// Builds pass -DTFREE_CUDA_SOURCE_ID=h<megatron_tfree.ops.cuda.sources_hash()> so Python can tell a stale build.
#ifndef TFREE_CUDA_SOURCE_ID
#define TFREE_CUDA_SOURCE_ID hunknown
#endif
#define TFREE_CUDA_STR2(x) #x
#define TFREE_CUDA_STR(x) TFREE_CUDA_STR2(x)

namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "tfree_ops_cuda: ", what, " failed: ", cudaGetErrorString(err));
}

void check_on(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda(), "tfree_ops_cuda: ", name, " must be a CUDA tensor (got ", t.device(), ")");
  TORCH_CHECK(t.device() == ref.device(), "tfree_ops_cuda: ", name, " is on ", t.device(), " but the other inputs on ",
              ref.device());
}

tfree_dtype kernel_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat:
      return TFREE_F32;
    case at::kHalf:
      return TFREE_F16;
    case at::kBFloat16:
      return TFREE_BF16;
    default:
      TORCH_CHECK(false, "tfree_ops_cuda: ", name, " must be float32, float16 or bfloat16 (got ", t,
                  "); use the reference ops for other dtypes");
  }
  return TFREE_F32;  // unreachable
}

// CSR offsets [N + 1] and ids [nnz]: int64, 1-D, contiguous, on ref's device (values unchecked: no sync).
void check_csr(const at::Tensor& offsets, const at::Tensor& ids, const at::Tensor& ref, const char* what) {
  check_on(offsets, ref, what);
  check_on(ids, ref, what);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && ids.scalar_type() == at::kLong, "tfree_ops_cuda: ", what,
              " offsets and ids must be int64");
  TORCH_CHECK(offsets.dim() == 1 && ids.dim() == 1 && offsets.numel() >= 1, "tfree_ops_cuda: ", what,
              " offsets [N + 1] and ids [nnz] must be 1-D");
  TORCH_CHECK(offsets.is_contiguous() && ids.is_contiguous(), "tfree_ops_cuda: ", what, " must be contiguous");
}

// ----------------------------------------------------------------------------------- embedding bag
at::Tensor embedding_bag_forward(const at::Tensor& weight_in, const at::Tensor& offsets, const at::Tensor& ids,
                                 int64_t vocab_start) {
  TORCH_CHECK(weight_in.is_cuda() && weight_in.dim() == 2, "tfree_ops_cuda: embedding_bag weight must be a CUDA [v_local, h]");
  check_csr(offsets, ids, weight_in, "embedding_bag");
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight = weight_in.contiguous();
  const int64_t V = weight.size(0), H = weight.size(1), N = offsets.numel() - 1;
  at::Tensor out = at::empty({N, H}, weight.options());
  check_launch(tfree_embedding_bag_forward(kernel_dtype(weight.scalar_type(), "weight"), weight.data_ptr(), V, H,
                                           offsets.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), N, vocab_start,
                                           out.data_ptr(), current_stream()),
               "embedding_bag_forward");
  return out;
}

at::Tensor embedding_bag_backward(const at::Tensor& grad_in, const at::Tensor& offsets, const at::Tensor& ids,
                                  int64_t vocab_start, int64_t num_weights, bool deterministic) {
  TORCH_CHECK(grad_in.is_cuda(), "tfree_ops_cuda: embedding_bag grad must be a CUDA tensor");
  check_csr(offsets, ids, grad_in, "embedding_bag");
  const int64_t N = offsets.numel() - 1, V = num_weights, nnz = ids.numel();
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == N, "tfree_ops_cuda: embedding_bag grad must be [N, h]");
  TORCH_CHECK(V >= 0, "tfree_ops_cuda: num_weights must be >= 0");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t H = grad.size(1);
  const tfree_dtype dt = kernel_dtype(grad.scalar_type(), "grad");
  const cudaStream_t stream = current_stream();
  if (!deterministic) {
    at::Tensor gw32 = at::zeros({V, H}, grad.options().dtype(at::kFloat));
    check_launch(tfree_embedding_bag_backward_atomic(dt, grad.data_ptr(), H, offsets.data_ptr<int64_t>(),
                                                     ids.data_ptr<int64_t>(), N, vocab_start, V,
                                                     gw32.data_ptr<float>(), stream),
                 "embedding_bag_backward_atomic");
    return grad.scalar_type() == at::kFloat ? gw32 : gw32.to(grad.scalar_type());
  }
  // Deterministic: key = local id (or V for other shards) and row per entry, stable sort by key, then one
  // ordered sum per distinct key. No host synchronisation.
  at::Tensor gw = at::zeros({V, H}, grad.options());
  if (nnz == 0 || N == 0) return gw;
  at::Tensor keys = at::empty({nnz}, offsets.options());
  at::Tensor rows = at::empty({nnz}, offsets.options());
  check_launch(tfree_embedding_bag_sort_keys(offsets.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), N, nnz,
                                             vocab_start, V, keys.data_ptr<int64_t>(), rows.data_ptr<int64_t>(),
                                             stream),
               "embedding_bag_sort_keys");
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_keys = std::get<0>(sorted).contiguous();
  const at::Tensor sorted_rows = rows.index_select(0, std::get<1>(sorted)).contiguous();
  check_launch(tfree_embedding_bag_backward_sorted(dt, grad.data_ptr(), H, sorted_keys.data_ptr<int64_t>(),
                                                   sorted_rows.data_ptr<int64_t>(), nnz, V, gw.data_ptr(), stream),
               "embedding_bag_backward_sorted");
  return gw;
}

// ------------------------------------------------------------------------------------------ BCE
double loss_coef(int64_t N, int64_t vocab_size, double loss_scale) {
  return (N > 0 && vocab_size > 0) ? loss_scale / (static_cast<double>(N) * static_cast<double>(vocab_size)) : 0.0;
}

// Runs the chunk kernel over the columns [0, n_cols) of x (row stride ld), at most TFREE_BCE_MAX_CHUNK at a time.
void bce_columns(at::Tensor& x, int64_t ld, int64_t n_cols, int64_t col_start, const at::Tensor& t_off,
                 const at::Tensor& t_ids, const at::Tensor& w, double pos_weight, double coef, bool grad,
                 at::Tensor& row_loss) {
  const int64_t N = x.size(0);
  const tfree_dtype dt = kernel_dtype(x.scalar_type(), "logits");
  char* base = static_cast<char*>(x.data_ptr());
  for (int64_t j0 = 0; j0 < n_cols; j0 += TFREE_BCE_MAX_CHUNK) {
    const int64_t C = std::min<int64_t>(TFREE_BCE_MAX_CHUNK, n_cols - j0);
    check_launch(tfree_bce_chunk(dt, base + j0 * x.element_size(), ld, N, C, col_start + j0,
                                 t_off.data_ptr<int64_t>(), t_ids.data_ptr<int64_t>(), w.data_ptr<float>(),
                                 static_cast<float>(pos_weight), static_cast<float>(coef), grad ? 1 : 0,
                                 row_loss.data_ptr<double>(), current_stream()),
                 "bce_chunk");
  }
}

at::Tensor finish_loss(const at::Tensor& row_loss, double coef) {
  return (row_loss.sum() * coef).to(at::kFloat);  // fixed-order device reduction of the per-row sums
}

std::vector<at::Tensor> bce_loss(const at::Tensor& logits, const at::Tensor& t_off, const at::Tensor& t_ids,
                                 const at::Tensor& weights, double pos_weight, double loss_scale, int64_t vocab_start,
                                 int64_t vocab_size, bool strict, bool grad) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2, "tfree_ops_cuda: logits must be a CUDA [N, v]");
  check_csr(t_off, t_ids, logits, "targets");
  check_on(weights, logits, "weights");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(t_off.numel() == N + 1, "tfree_ops_cuda: target_offsets must have N + 1 = ", N + 1, " entries");
  TORCH_CHECK(weights.numel() == N, "tfree_ops_cuda: weights must have N = ", N, " entries");
  kernel_dtype(logits.scalar_type(), "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  if (strict && t_ids.numel() > 0) {  // the reference's multi-hot would fail on such ids (synchronises)
    const bool ok = at::logical_and(t_ids >= vocab_start, t_ids < vocab_start + V).all().item<bool>();
    TORCH_CHECK(ok, "tfree_ops_cuda: a target id lies outside [", vocab_start, ", ", vocab_start + V, ")");
  }
  at::Tensor x = logits.clone(at::MemoryFormat::Contiguous);  // becomes the gradient in place
  const at::Tensor w = weights.reshape({N}).to(at::kFloat).contiguous();
  at::Tensor row_loss = at::zeros({N}, logits.options().dtype(at::kDouble));
  const double coef = loss_coef(N, vocab_size, loss_scale);
  bce_columns(x, V, V, vocab_start, t_off, t_ids, w, pos_weight, coef, grad, row_loss);
  at::Tensor loss = finish_loss(row_loss, coef);
  if (!grad) return {loss};
  return {loss, x};
}

// Fused head + loss, chunk_size vocabulary rows at a time: logits chunk = hidden @ W[chunk]^T in the
// inputs' dtype (cuBLAS), the kernel turns it into its gradient in place, then two matmuls accumulate
// grad_hidden (float32 accumulator) and write grad_weight[chunk]. Peak extra memory: one [N, chunk]
// logits chunk (+ cuBLAS workspace), the [N, h] float32 accumulator and grad_weight.
std::vector<at::Tensor> head_loss(const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& t_off,
                                  const at::Tensor& t_ids, const at::Tensor& weights, double pos_weight,
                                  double loss_scale, int64_t vocab_start, int64_t vocab_size, int64_t chunk_size,
                                  bool grad) {
  TORCH_CHECK(hidden_in.is_cuda(), "tfree_ops_cuda: hidden must be a CUDA tensor");
  check_on(weight_in, hidden_in, "weight");
  check_on(weights, hidden_in, "weights");
  check_csr(t_off, t_ids, hidden_in, "targets");
  TORCH_CHECK(hidden_in.dim() == 2 && weight_in.dim() == 2 && hidden_in.size(1) == weight_in.size(1),
              "tfree_ops_cuda: head_loss needs hidden [N, h] and weight [v_local, h], got ", hidden_in.sizes(),
              " and ", weight_in.sizes());
  TORCH_CHECK(hidden_in.scalar_type() == weight_in.scalar_type(), "tfree_ops_cuda: hidden (",
              hidden_in.scalar_type(), ") and weight (", weight_in.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(chunk_size > 0, "tfree_ops_cuda: chunk_size must be positive");
  kernel_dtype(hidden_in.scalar_type(), "hidden");
  const int64_t N = hidden_in.size(0), V = weight_in.size(0), H = hidden_in.size(1);
  TORCH_CHECK(t_off.numel() == N + 1, "tfree_ops_cuda: target_offsets must have N + 1 = ", N + 1, " entries");
  TORCH_CHECK(weights.numel() == N, "tfree_ops_cuda: weights must have N = ", N, " entries");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor w = weights.reshape({N}).to(at::kFloat).contiguous();
  at::Tensor row_loss = at::zeros({N}, hidden.options().dtype(at::kDouble));
  const double coef = loss_coef(N, vocab_size, loss_scale);
  const int64_t chunk = std::min<int64_t>(chunk_size, TFREE_BCE_MAX_CHUNK);
  const bool fp32 = hidden.scalar_type() == at::kFloat;
  at::Tensor gh, gw;
  if (grad) {
    gh = at::zeros({N, H}, hidden.options().dtype(at::kFloat));
    gw = at::empty({V, H}, weight.options());
  }
  for (int64_t j0 = 0; j0 < V; j0 += chunk) {
    const int64_t C = std::min(chunk, V - j0);
    const at::Tensor wc = weight.narrow(0, j0, C);  // [C, h], contiguous
    at::Tensor x = at::mm(hidden, wc.t()).contiguous();  // [N, C] logits of this chunk
    bce_columns(x, C, C, vocab_start + j0, t_off, t_ids, w, pos_weight, coef, grad, row_loss);
    if (grad) {
      if (fp32) {
        gh.addmm_(x, wc);  // [N, C] @ [C, h]
      } else {
        gh.add_(at::mm(x, wc));  // one rounding to the input dtype per chunk, summed in float32
      }
      at::Tensor gw_chunk = gw.narrow(0, j0, C);
      at::mm_out(gw_chunk, x.t(), hidden);  // [C, N] @ [N, h]
    }
  }
  at::Tensor loss = finish_loss(row_loss, coef);
  if (!grad) return {loss};
  return {loss, fp32 ? gh : gh.to(hidden.scalar_type()), gw};
}

// ------------------------------------------------------------------------------------ decode scores
at::Tensor decode_scores(const at::Tensor& logits, const at::Tensor& offsets, const at::Tensor& ids,
                         const at::Tensor& edge, const at::Tensor& c, int64_t m, double edge_weight) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2, "tfree_ops_cuda: decode_scores logits must be a CUDA [B, v]");
  check_on(offsets, logits, "offsets");
  check_on(ids, logits, "ids");
  check_on(edge, logits, "edge");
  check_on(c, logits, "c");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && ids.scalar_type() == at::kInt &&
                  edge.scalar_type() == at::kByte && c.scalar_type() == at::kInt,
              "tfree_ops_cuda: decode_scores needs int64 offsets, int32 ids, uint8 edge flags and int32 c");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1 && offsets.is_contiguous() && ids.is_contiguous() &&
                  edge.is_contiguous() && c.is_contiguous(),
              "tfree_ops_cuda: decode_scores pattern arrays must be 1-D and contiguous");
  const int64_t W = offsets.numel() - 1, B = logits.size(0), v = logits.size(1);
  TORCH_CHECK(c.numel() == W && edge.numel() == ids.numel(), "tfree_ops_cuda: decode_scores pattern sizes differ");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor p = at::sigmoid(logits.to(at::kFloat)).contiguous();
  const at::Tensor total = p.sum(1).contiguous();  // the same reduction as the torch path
  at::Tensor out = at::empty({B, W}, p.options());
  at::Tensor bad = at::zeros({1}, p.options().dtype(at::kInt));
  check_launch(tfree_decode_scores(p.data_ptr<float>(), total.data_ptr<float>(), B, v, offsets.data_ptr<int64_t>(),
                                   ids.data_ptr<int32_t>(), edge.data_ptr<uint8_t>(), c.data_ptr<int32_t>(), W, m,
                                   static_cast<float>(edge_weight), out.data_ptr<float>(), bad.data_ptr<int32_t>(),
                                   current_stream()),
               "decode_scores");
  TORCH_CHECK(bad.item<int32_t>() == 0, "tfree_ops_cuda: decode_scores: a pattern id lies outside [0, ", v, ")");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "megatron_tfree CUDA kernels (see csrc/tfree_ops_cuda.cpp, csrc/*_kernels.cu, csrc/README.md)";
  mod.attr("device_type") = "cuda";
  mod.attr("source_hash") = std::string(TFREE_CUDA_STR(TFREE_CUDA_SOURCE_ID)).substr(1);
  mod.attr("bce_max_chunk") = static_cast<int64_t>(TFREE_BCE_MAX_CHUNK);
  mod.def("embedding_bag_forward", &embedding_bag_forward, "sum of weight rows per CSR row", py::arg("weight"),
          py::arg("offsets"), py::arg("ids"), py::arg("vocab_start"));
  mod.def("embedding_bag_backward", &embedding_bag_backward,
          "weight gradient of embedding_bag_forward (deterministic: sorted segment sums; else atomicAdd)",
          py::arg("grad"), py::arg("offsets"), py::arg("ids"), py::arg("vocab_start"), py::arg("num_weights"),
          py::arg("deterministic") = true);
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
