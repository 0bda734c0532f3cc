// recurrence_cpu.cpp: the ops of the cpu backend (bnrnn/kernels/cpu/recurrence.py), registered
// as torch.ops.bnrnn_cpu.*: the BN-LSTM recurrence as two compiled loops (forward,
// backward), inference with population statistics, and helpers for their tests.
//
// The same function as bnrnn/nn/reference.py and the aten backend. At the paper's seqMNIST
// size a time step is a few dozen small ops, each costing microseconds from Python; here
// everything but the recurrent GEMM is a handful of loops per step over contiguous rows.
// The parts, each building on the one before:
//
//   common.h             headers and tensor names
//   rows.h               activations and per-row arithmetic
//   statistics.h         batch statistics and batch norm, forward and backward (its formula)
//   recurrent_product.h  the GEMMs and the recurrent products
//   input_term.h         the narrow input term and its statistics
//   threads.h            the threads, their barrier, the split of a batch
//   forward.h            the forward loops (training, inference)
//   backward_parts.h     what the backward's threads share
//   backward.h           the backward loop
//
// Why the loops are built this way, and what was measured: docs/performance.md.

#include "backward.h"

namespace {

// The float activations of the loops, exposed for their accuracy tests: (sigmoid, tanh).
std::tuple<Tensor, Tensor> activations(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "bnrnn_cpu.activations: float32 CPU tensor");
  const Tensor in = x.contiguous();
  Tensor sig = at::empty_like(in), th = at::empty_like(in);
  const float* p = in.data_ptr<float>();
  float *ps = sig.data_ptr<float>(), *pt = th.data_ptr<float>();
  const int64_t n = in.numel();
  for (int64_t k = 0; k < n; ++k) {
    ps[k] = sigmoid(p[k]);
    pt[k] = tanh_approx(p[k]);
  }
  return {sig, th};
}

}  // namespace

// out (N, G) = x (N, I) W_x^T (+ bias (G)) by small_gemm.h's kernel, float, W_x^T packed once
// and the rows split over torch's threads (each row's values the same on any count): the
// input projection before the loops, where torch's MKL would run its AVX2 code.
void project_input(const Tensor& x, const Tensor& weight, const OptTensor& bias, const Tensor& out) {
  TORCH_CHECK(SMALL_GEMM_AVAILABLE, "bnrnn_cpu: built without AVX-512, no small_gemm kernel");
  check_cpu_contiguous({{&x, "x"}, {&out, "out"}});
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "bnrnn_cpu.project_input: float32 only");
  const int64_t N = x.size(0), I = x.size(1), G = weight.size(0);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == I && out.size(0) == N && out.size(1) == G,
              "bnrnn_cpu.project_input: shapes (N, I), (G, I), (N, G)");
#if SMALL_GEMM_AVAILABLE
  const Tensor w = weight.contiguous();
  const small_gemm::PackedB packed(I, G, w.data_ptr<float>(), 1, I);  // W_x^T, read in place
  const Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t r0, int64_t r1) {
    if (pb)
      for (int64_t r = r0; r < r1; ++r) std::copy(pb, pb + G, po + r * G);
    small_gemm::gemm(r1 - r0, px + r0 * I, I, 1, packed, pb ? 1.0f : 0.0f, po + r0 * G, G);
  });
#endif
}

// Whether the loops' float GEMMs run on small_gemm.h's kernel (built with AVX-512, not
// limited by set_gemm_ceiling); cpu_recurrence.py packs no weights for oneDNN then.
bool own_gemm() { return gemm_kernel<float>() == GemmKernel::own; }

// The best GEMM the loops may use: 0 small_gemm.h's kernel, 1 the BLAS, 2 ATen's mm.
void set_gemm_ceiling(int64_t ceiling) {
  TORCH_CHECK(ceiling >= 0 && ceiling <= 2, "bnrnn_cpu.set_gemm_ceiling: 0 (own), 1 (blas) or 2 (aten)");
  gemm_ceiling.store(static_cast<int>(ceiling));
}

// c = a b + beta c by small_gemm.h's kernel, for its tests: a (M, K) float, row-major or the
// transpose of a row-major matrix (strides (1, M)); b (K, N) and c (M, N) row-major.
void small_gemm_op(const Tensor& a, const Tensor& b, const Tensor& c, double beta) {
  TORCH_CHECK(SMALL_GEMM_AVAILABLE, "bnrnn_cpu: built without AVX-512, no small_gemm kernel");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat,
              "bnrnn_cpu.small_gemm: float32 only");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.size(1) == b.size(0) && c.size(0) == a.size(0) &&
                  c.size(1) == b.size(1),
              "bnrnn_cpu.small_gemm: shapes (M, K), (K, N), (M, N)");
  TORCH_CHECK(a.stride(1) == 1 || a.stride(0) == 1, "bnrnn_cpu.small_gemm: a row-major or transposed");
  TORCH_CHECK(b.stride(1) == 1 && c.stride(1) == 1, "bnrnn_cpu.small_gemm: b and c row-major");
  gemm<float>(GemmKernel::own, a.size(0), b.size(1), a.size(1), a.data_ptr<float>(), a.stride(0), a.stride(1),
              b.data_ptr<float>(), b.stride(0), static_cast<float>(beta), c.data_ptr<float>(), c.stride(0));
}

TORCH_LIBRARY(bnrnn_cpu, m) {
  m.def(
      "recurrence_forward(Tensor x, Tensor weight_ih, Tensor? input_bias, Tensor? wx, Tensor weight_hh, "
      "Tensor? gamma_x, Tensor? beta_x, Tensor? gamma_h, "
      "Tensor? gamma_c, Tensor? beta_c, Tensor h0, Tensor c0, float eps_x, float eps_h, float eps_c, "
      "Tensor(a!) hs, Tensor(b!) cs, Tensor(c!) sig, Tensor(d!) tanh_c, Tensor(e!)? wh, Tensor(f!)? mean_x, "
      "Tensor(g!)? invstd_x, Tensor(h!)? mean_h, Tensor(i!)? invstd_h, Tensor(j!)? mean_c, Tensor(k!)? invstd_c, "
      "Tensor[] packed_hh) -> ()");
  m.def(
      "recurrence_backward(Tensor grad_hs, Tensor grad_c_last, Tensor x, Tensor? wx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? gamma_x, Tensor? gamma_h, Tensor? gamma_c, Tensor? beta_x, float eps_x, "
      "Tensor h0, Tensor c0, Tensor hs, Tensor cs, Tensor sig, Tensor tanh_c, Tensor? wh, Tensor? mean_x, "
      "Tensor? invstd_x, Tensor? mean_h, Tensor? invstd_h, Tensor? mean_c, Tensor? invstd_c, "
      "Tensor(a!)? grad_x, Tensor(b!) grad_weight_ih, "
      "Tensor(c!) grad_bias, Tensor(d!) grad_weight_hh, Tensor(e!) grad_h0, Tensor(f!) grad_c0, "
      "Tensor(g!)? grad_gamma_x, Tensor(h!)? grad_gamma_h, Tensor(i!)? grad_gamma_c, Tensor(j!)? grad_beta_c, "
      "Tensor[] packed_hh_t, Tensor(k!)? dwh_steps) -> ()");
  m.def(
      "population_forward(Tensor xin, Tensor? x_coef, Tensor? x_shift, Tensor weight_hh, Tensor? h_scale, "
      "Tensor? c_scale, Tensor? c_shift, Tensor h0, Tensor c0, Tensor(a!) hs, Tensor(b!) c_last, Tensor[] packed_hh) -> ()");
  m.def("activations(Tensor x) -> (Tensor, Tensor)");
  m.def("small_gemm(Tensor a, Tensor b, Tensor(a!) c, float beta) -> ()");
  m.def("own_gemm() -> bool", &own_gemm);
  m.def("set_gemm_ceiling(int ceiling) -> ()", &set_gemm_ceiling);
  m.def("project_input(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(bnrnn_cpu, CPU, m) {
  m.impl("recurrence_forward", &recurrence_forward);
  m.impl("recurrence_backward", &recurrence_backward);
  m.impl("population_forward", &population_forward);
  m.impl("activations", &activations);
  m.impl("small_gemm", &small_gemm_op);
  m.impl("project_input", &project_input);
}

// The packed weights (oneDNN's layout) dispatch as MkldnnCPU tensors: the same kernels.
TORCH_LIBRARY_IMPL(bnrnn_cpu, MkldnnCPU, m) {
  m.impl("recurrence_forward", &recurrence_forward);
  m.impl("recurrence_backward", &recurrence_backward);
  m.impl("population_forward", &population_forward);
}
