// recurrent_product.h: the GEMMs (the own AVX-512 kernel, the BLAS called directly, or
// ATen's mm; GemmKernel) and the recurrent products h W_h^T and g W_h of every step, by rows
// or by halves of W_h.
//
// Part of the cpu backend's compiled loops; recurrence_cpu.cpp includes every part in one
// translation unit and registers the ops. Design notes and measurements: docs/performance.md.

#pragma once

#include "statistics.h"

namespace {

// ---- the recurrent products ---------------------------------------------------------------

// The Fortran BLAS GEMMs of the library torch links (MKL's, on x86), weak: null where torch
// exports none, and the callers fall back on ATen's mm. Called directly, a small GEMM skips
// ATen's dispatch and the tensors that describe its operands (a few microseconds, 3 GEMMs a
// step, 784 steps); inside a parallel region MKL runs it on the calling thread.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

template <typename T>
struct Blas;
template <>
struct Blas<float> {
  static constexpr auto gemm = &sgemm_;
};
template <>
struct Blas<double> {
  static constexpr auto gemm = &dgemm_;
};

// Who computes the loops' GEMMs: small_gemm.h's kernel (float, where the build has AVX-512),
// the BLAS directly, or ATen's mm (tensors, dispatch). The tests and the bench can step down
// (bnrnn.kernels.cpu.extension.gemm_limit: the BLAS instead of the own kernel, or ATen's mm for
// everything); the best available is the default.
enum class GemmKernel { own, blas, aten };
std::atomic<int> gemm_ceiling{static_cast<int>(GemmKernel::own)};

template <typename T>
GemmKernel gemm_kernel() {
  const int ceiling = gemm_ceiling.load();
  if (ceiling >= static_cast<int>(GemmKernel::aten)) return GemmKernel::aten;
  if (std::is_same_v<T, float> && SMALL_GEMM_AVAILABLE && ceiling == static_cast<int>(GemmKernel::own))
    return GemmKernel::own;
  return Blas<T>::gemm != nullptr ? GemmKernel::blas : GemmKernel::aten;
}

// Row-major C (m, n) = A (m, k) B (k, n) + beta C, with a(i, k) = a[i rsa + k csa] (csa = 1:
// A row-major; rsa = 1: A^T row-major, its transpose read in place) and B row-major, by
// `kernel` (own or blas, never aten). (The column-major BLAS computes C^T = B^T A^T on the
// same memory.)
template <typename T>
void gemm(GemmKernel kernel, int64_t m, int64_t n, int64_t k, const T* a, int64_t rsa, int64_t csa, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
#if SMALL_GEMM_AVAILABLE
  if constexpr (std::is_same_v<T, float>)
    if (kernel == GemmKernel::own) return small_gemm::gemm(m, n, k, a, rsa, csa, b, ldb, beta, c, ldc);
#endif
  TORCH_CHECK(kernel == GemmKernel::blas && (csa == 1 || rsa == 1), "bnrnn_cpu: no direct GEMM for these operands");
  const bool trans_a = csa != 1;
  const char ta = trans_a ? 'T' : 'N', tb = 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LA = static_cast<int>(ldb), LB = static_cast<int>(trans_a ? csa : rsa), LC = static_cast<int>(ldc);
  const T one = T(1);
  Blas<T>::gemm(&tb, &ta, &M, &N, &K, &one, b, &LA, a, &LB, &beta, c, &LC);
}

// The same by ATen's mm where `kernel` is aten (operands described by strided tensors).
template <typename T>
void any_gemm(GemmKernel kernel, int64_t m, int64_t n, int64_t k, const T* a, int64_t rsa, int64_t csa, const T* b,
              int64_t ldb, T beta, T* c, int64_t ldc) {
  if (kernel != GemmKernel::aten) return gemm<T>(kernel, m, n, k, a, rsa, csa, b, ldb, beta, c, ldc);
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const Tensor A = at::from_blob(const_cast<T*>(a), {m, k}, {rsa, csa}, options);
  const Tensor Bm = at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, options);
  Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (beta == T(0))
    at::mm_out(C, A, Bm);
  else
    at::addmm_out(C, C, A, Bm, beta, 1);
}

// From this hidden size the own kernel forms the products in halves, one per thread over
// every row (see RecurrentProduct), as the oneDNN path does from PACKED_MIN_HIDDEN in
// aten_recurrence.py (the same 256): each thread then streams half of W_h from the shared cache
// instead of all of it.
constexpr int64_t OWN_HALVES_MIN_HIDDEN = 256;

// Columns [first_column(n, k), first_column(n, k + 1)) of n make half k.
inline int64_t first_column(int64_t n, int half) { return n * half / 2; }

// Which of the recurrent products a RecurrentProduct forms (it prepares W_h for those).
enum class Products { forward, backward };

// h W_h^T (forward, (B, H) -> (B, G)) and g W_h [+ add] (backward, (B, G) -> (B, H)) of every
// step, by rows [r0, r0 + rows) of the batch or, with a large hidden size, by halves (every
// row): one per thread, each streaming only its half of W_h.
//
// Kernels: the own kernel (float with AVX-512) reads W_h^T (forward) or W_h (backward) packed
// once per sequence in its panels (small_gemm::PackedB), whole or in two halves: column
// halves of W_h^T, row halves of W_h (halves of the backward's sum over G).
// Without it, from H = 256 the caller passes W_h (forward) or W_h^T (backward) packed once per
// sequence into oneDNN's blocked layout (what torch.nn.LSTM does inside; see
// cpu_recurrence.py) as two row halves: each column half is then a single-threaded oneDNN
// GEMM on its own half of the weight, which beat oneDNN's GEMM of the whole product on both
// threads (docs/performance.md). Otherwise the BLAS directly, or ATen's mm.
struct RecurrentProduct {
  RecurrentProduct(const Tensor& weight_hh, at::TensorList packed_halves, Products products)
      : weight(weight_hh), halves(packed_halves.vec()) {
    TORCH_CHECK(halves.empty() || halves.size() == 2, "bnrnn_cpu: W_h packs in two halves or none");
    AT_DISPATCH_FLOATING_TYPES(weight_hh.scalar_type(), "bnrnn_recurrent_product",
                               [&] { kernel = gemm_kernel<scalar_t>(); });
    // the BLAS's (and ATen's) forward product by rows reads W_h^T row-major
    if (kernel != GemmKernel::own && products == Products::forward && halves.empty())
      weight_t = weight_hh.t().contiguous();
#if SMALL_GEMM_AVAILABLE
    if (kernel != GemmKernel::own) return;
    halves.clear();  // not needed (cpu_recurrence.py packs none then)
    own_halves = weight_hh.size(1) >= OWN_HALVES_MIN_HIDDEN;
    // B of the product: W_h^T (H, G) forward, read in place, or W_h (G, H) backward
    const bool forward = products == Products::forward;
    const int64_t G = weight_hh.size(0), H = weight_hh.size(1), K = forward ? H : G, N = forward ? G : H;
    const int64_t row_stride = forward ? 1 : H, col_stride = forward ? H : 1;
    const float* data = weight_hh.data_ptr<float>();
    if (own_halves && forward)
      for (int half = 0; half < 2; ++half) {
        const int64_t j0 = first_column(N, half);
        packed.emplace_back(K, first_column(N, half + 1) - j0, data + j0 * col_stride, row_stride, col_stride);
      }
    else if (own_halves)  // backward: halves of K, the rows of W_h (see backward_half)
      for (int half = 0; half < 2; ++half) {
        const int64_t k0 = first_column(K, half);
        packed.emplace_back(first_column(K, half + 1) - k0, N, data + k0 * row_stride, row_stride, col_stride);
      }
    else
      packed.emplace_back(K, N, data, row_stride, col_stride);
#endif
  }

  bool by_halves() const { return own_halves || !halves.empty(); }
  // Whether backward_half forms halves of the sum over G (the own kernel), which the caller
  // adds up, rather than column halves of the result (oneDNN's packed halves).
  bool backward_by_sum_halves() const { return own_halves; }
  const Tensor& weight_hh() const { return weight; }
  GemmKernel kernel_in_use() const { return kernel; }

  // Rows [r0, r0 + rows) of h W^T into the same rows of out (B, G); h (B, H).
  template <typename T>
  void forward_rows(const T* h, int64_t r0, int64_t rows, T* out) const {
    const int64_t G = weight.size(0), H = weight.size(1);
    const T* a = h + r0 * H;
    if (own_product(a, H, rows, T(0), out + r0 * G, G, 0)) return;
    any_gemm<T>(kernel, rows, G, H, a, H, 1, weight_t.data_ptr<T>(), G, T(0), out + r0 * G, G);
  }

  // Rows [r0, r0 + rows) of g W (+ the same rows of `add` where not null) into out (B, H);
  // g (B, G).
  template <typename T>
  void backward_rows(const T* g, int64_t r0, int64_t rows, const T* add, T* out) const {
    const int64_t G = weight.size(0), H = weight.size(1);
    if (add) std::copy(add + r0 * H, add + (r0 + rows) * H, out + r0 * H);
    if (own_product(g + r0 * G, G, rows, T(add ? 1 : 0), out + r0 * H, H, 0)) return;
    any_gemm<T>(kernel, rows, H, G, g + r0 * G, G, 1, weight.data_ptr<T>(), H, T(add ? 1 : 0), out + r0 * H, H);
  }

  // Column half `half` of h W^T over all B rows, into out (B, G).
  template <typename T>
  void forward_half(const T* h, int64_t B, int half, T* out) const {
    const int64_t G = weight.size(0), H = weight.size(1);
    if (!own_product(h, H, B, T(0), out + first_column(G, half), G, half))
      packed_half<T>(at::from_blob(const_cast<T*>(h), {B, H}, weight.options()), half, nullptr, out, G);
  }
  // The backward's half `half` of g W [+ add] over all B rows; g (B, G). oneDNN's packed
  // halves: column half `half` of the result into out (B, H). The own kernel: half `half` of
  // the sum over G, g[:, k0:k1] W[k0:k1, :], into out (half 0, with `add`) or into `partial`
  // (half 1), for the caller to add up (backward_by_sum_halves). Each half then spans all H
  // columns, panels of 48 with one ragged edge, where column halves of PTB's H = 1000 were
  // two halves of 500, each ending in a 20-column block that cost about a whole panel
  // (docs/performance.md).
  template <typename T>
  void backward_half(const T* g, int64_t B, int half, const T* add, T* out, T* partial) const {
    const int64_t G = weight.size(0), H = weight.size(1);
    if (!own_halves)
      return packed_half<T>(at::from_blob(const_cast<T*>(g), {B, G}, weight.options()), half, add, out, H);
    const T* a = g + first_column(G, half);
    if (half == 1) {
      own_product(a, G, B, T(0), partial, H, 1);
      return;
    }
    if (add) std::copy(add, add + B * H, out);
    own_product(a, G, B, T(add ? 1 : 0), out, H, 0);
  }

 private:
  // out (rows, its part of the columns, row stride ldc) = a (rows, K) times the packed B of
  // `part` (0, or the half) + beta out, by the own kernel; false where it is not the
  // kernel (or T is not float).
  template <typename T>
  bool own_product(const T* a, int64_t lda, int64_t rows, T beta, T* out, int64_t ldc, int part) const {
#if SMALL_GEMM_AVAILABLE
    if constexpr (std::is_same_v<T, float>) {
      if (packed.empty()) return false;
      small_gemm::gemm(rows, a, lda, 1, packed[part], beta, out, ldc);
      return true;
    }
#endif
    return false;
  }

  // The product of `a` (rows, K) with the packed weight's half (n columns: the first or the
  // last n of ld), plus those columns of `add` where not null, into those of `out`; `add`
  // and `out` have row stride ld. (The halves of an odd width differ by one column: the
  // second starts at ld - n, not at n.)
  template <typename T>
  void packed_half(const Tensor& a, int half, const T* add, T* out, int64_t ld) const {
    const Tensor product = linear(a, halves[half]).contiguous();
    const int64_t rows = product.size(0), n = product.size(1), first = half == 0 ? 0 : ld - n;
    const T* p = product.data_ptr<T>();
    for (int64_t b = 0; b < rows; ++b) {
      T* o = out + b * ld + first;
      if (add) {
        const T* q = add + b * ld + first;
        for (int64_t j = 0; j < n; ++j) o[j] = p[b * n + j] + q[j];
      } else {
        std::copy(p + b * n, p + (b + 1) * n, o);
      }
    }
  }

  // mkldnn::_linear_pointwise(X, W, B=None, attr="none", scalars=[], algorithm="") = X W^T
  static Tensor linear(const Tensor& x, const Tensor& w) {
    static const c10::OperatorHandle plain =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    torch::jit::Stack stack{x, w, c10::IValue(), std::string("none"), c10::List<std::optional<c10::Scalar>>(),
                            std::string("")};
    plain.callBoxed(&stack);
    return stack[0].toTensor();
  }

  Tensor weight, weight_t;  // W_h (G, H); W_h^T (H, G), made where a forward by rows reads it
  std::vector<Tensor> halves;  // oneDNN's packed halves
  GemmKernel kernel = GemmKernel::aten;
  bool own_halves = false;  // halves by the own kernel (see packed)
#if SMALL_GEMM_AVAILABLE
  std::vector<small_gemm::PackedB> packed;  // the own kernel's B: whole, or its two halves
#endif
};

}  // namespace
