// Float GEMMs of the recurrence's own shapes, with AVX-512 (built with -march=native on a CPU
// that has it; elsewhere SMALL_GEMM_AVAILABLE is 0 and the loops call the BLAS).
//
// Why not the BLAS: torch's MKL picks its AVX2 code on AMD processors, AVX-512 or not. On a
// Zen 5 core the seqMNIST step's GEMMs (32x100 by 100x400, 32x400 by 400x100, 400x32 by
// 32x100) then run at half of what the core does, while oneDNN (torch.nn.LSTM's library)
// runs at full width (docs/performance.md).
//
//     C (M, N) = beta C + A (M, K) B (K, N)
//
// A is read through strides (a(i, k) = a[i rsa + k csa]), so A^T needs no copy (the weight
// gradient's dL/d(W_h h)^T); B is row-major with row stride ldb. Each output block of MR rows
// by NV vectors of 16 columns stays in 24 registers over its whole K range (or KC of it),
// every k adding the broadcast a(i, k) times NV vectors of B's row k: 24 FMAs for NV + MR
// loads. Ragged edges use masked loads and stores (masked-off lanes never touch memory).
// Each value of C is a sum over k in order, one FMA at a time from zero, then beta C added
// (with K > KC, pass by pass, each pass adding to the last): the same bits whatever the
// block, call or thread that computes it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#define SMALL_GEMM_AVAILABLE 1
#else
#define SMALL_GEMM_AVAILABLE 0
#endif

namespace small_gemm {

#if SMALL_GEMM_AVAILABLE

constexpr int LANES = 16;    // floats in a register
constexpr int MR = 8;        // rows of a block
constexpr int NV = 3;        // registers across a block's row (48 columns)
constexpr int64_t KC = 512;  // k per pass over C (B's rows for one pass stay in L2)

// One block: rows [0, R) by V registers of columns (the last one's lanes masked by `last`).
// `ahead`, where not null: a panel whose row k (row stride ahead_ld) to prefetch into L2 at
// each k.
template <int R, int V>
void block(int64_t K, const float* __restrict__ a, int64_t rsa, int64_t csa, const float* __restrict__ b,
           int64_t ldb, float beta, float* __restrict__ c, int64_t ldc, __mmask16 last, const float* ahead,
           int64_t ahead_ld) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    __m512 bv[V];
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v)
      bv[v] = v + 1 < V ? _mm512_loadu_ps(bk + v * LANES) : _mm512_maskz_loadu_ps(last, bk + v * LANES);
    if (ahead)
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + k * ahead_ld + v * LANES), _MM_HINT_T1);
    const float* ak = a + k * csa;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(ak[r * rsa]);
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(beta);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      float* cv = c + r * ldc + v * LANES;
      const __mmask16 mask = v + 1 < V ? __mmask16(0xFFFF) : last;
      __m512 out = acc[r][v];
      if (beta != 0.0f) out = _mm512_fmadd_ps(scale, _mm512_maskz_loadu_ps(mask, cv), out);
      _mm512_mask_storeu_ps(cv, mask, out);
    }
}

using BlockFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float, float*, int64_t,
                         __mmask16, const float*, int64_t);

template <int R>
constexpr BlockFn block_of_width(int v) {
  return v == 1 ? &block<R, 1> : v == 2 ? &block<R, 2> : &block<R, 3>;
}

// table[r - 1][v - 1]: the block of r rows by v registers.
inline BlockFn block_fn(int r, int v) {
  static const BlockFn table[MR][NV] = {
      {block_of_width<1>(1), block_of_width<1>(2), block_of_width<1>(3)},
      {block_of_width<2>(1), block_of_width<2>(2), block_of_width<2>(3)},
      {block_of_width<3>(1), block_of_width<3>(2), block_of_width<3>(3)},
      {block_of_width<4>(1), block_of_width<4>(2), block_of_width<4>(3)},
      {block_of_width<5>(1), block_of_width<5>(2), block_of_width<5>(3)},
      {block_of_width<6>(1), block_of_width<6>(2), block_of_width<6>(3)},
      {block_of_width<7>(1), block_of_width<7>(2), block_of_width<7>(3)},
      {block_of_width<8>(1), block_of_width<8>(2), block_of_width<8>(3)},
  };
  return table[r - 1][v - 1];
}

constexpr int64_t WIDTH = NV * LANES;  // columns of a block, and of a packed panel

// Every block of C (M, N) = beta C + A B, B's columns [j0, j0 + WIDTH) at rows [k0, k0 + kc)
// given by panel(j0, k0) -> (pointer, row stride). K in passes of KC: a pass's rows of B
// stay in cache while every row block of A meets them.
template <typename Panel>
void blocked_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t rsa, int64_t csa, Panel&& panel,
                  float beta, float* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // no products: C = beta C
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    const float pass_beta = k0 == 0 ? beta : 1.0f;
    for (int64_t j0 = 0; j0 < N; j0 += WIDTH) {
      const int64_t cols = std::min(WIDTH, N - j0);
      const int vectors = static_cast<int>((cols + LANES - 1) / LANES);
      const int tail = static_cast<int>(cols - (vectors - 1) * LANES);
      const __mmask16 last = static_cast<__mmask16>((1u << tail) - 1u);
      const auto [b, ldb] = panel(j0, k0);
      // the second row block pulls the next panel's rows into L2 while its own come from there
      const auto [next, next_ld] = j0 + WIDTH < N ? panel(j0 + WIDTH, k0) : std::pair(b, ldb);
      for (int64_t i0 = 0; i0 < M; i0 += MR) {
        const int rows = static_cast<int>(std::min<int64_t>(MR, M - i0));
        const bool fetch = i0 == MR && j0 + WIDTH < N;
        block_fn(rows, vectors)(kc, a + i0 * rsa + k0 * csa, rsa, csa, b, ldb, pass_beta, c + i0 * ldc + j0, ldc,
                                last, fetch ? next : nullptr, next_ld);
      }
    }
  }
}

// C (M, N) = beta C + A B on the calling thread, B row-major (row stride ldb); see the top of
// the file for A.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t rsa, int64_t csa, const float* b,
                 int64_t ldb, float beta, float* c, int64_t ldc) {
  blocked_gemm(M, N, K, a, rsa, csa, [&](int64_t j0, int64_t k0) { return std::pair(b + k0 * ldb + j0, ldb); },
               beta, c, ldc);
}

// A weight B (K, N) repacked once for many products: panels of WIDTH columns, each its K rows
// of WIDTH contiguous floats (the last panel's missing columns zero), 64-byte aligned. A
// block then reads B sequentially; from a row-major W_h^T at PTB's size (16 KB rows) it read
// one row per page and missed the TLB (docs/performance.md).
class PackedB {
 public:
  PackedB() = default;
  // B (k, j) = b[k * row_stride + j * col_stride]: a row-major B (col_stride 1), or the
  // transpose of a row-major matrix read in place (row_stride 1).
  PackedB(int64_t K, int64_t N, const float* b, int64_t row_stride, int64_t col_stride = 1) {
    assign(K, N, b, row_stride, col_stride);
  }
  // Packs another B of the same kind, reusing the buffer where it is large enough (a new
  // operand every few steps, e.g. the weight gradient's chunks of h).
  void assign(int64_t K, int64_t N, const float* b, int64_t row_stride, int64_t col_stride = 1) {
    K_ = K, N_ = N, panels_ = (N + WIDTH - 1) / WIDTH;
    const size_t bytes = round_up(std::max<int64_t>(panels_ * K * WIDTH, 1) * sizeof(float), 64);
    if (bytes > capacity_) {
      data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      capacity_ = bytes;
    }
    if (col_stride == 1)  // row by row: each row of b read once, in order
      for (int64_t k = 0; k < K; ++k)
        for (int64_t p = 0; p < panels_; ++p) {
          const int64_t j0 = p * WIDTH, cols = std::min(WIDTH, N - j0);
          const float* row = b + k * row_stride + j0;
          float* o = data_.get() + p * K * WIDTH + k * WIDTH;
          std::copy(row, row + cols, o);
          std::fill(o + cols, o + WIDTH, 0.0f);
        }
    else  // panel by panel: each column of b read in order
      for (int64_t p = 0; p < panels_; ++p) {
        const int64_t j0 = p * WIDTH, cols = std::min(WIDTH, N - j0);
        float* out = data_.get() + p * K * WIDTH;
        for (int64_t k = 0; k < K; ++k) {
          float* o = out + k * WIDTH;
          for (int64_t j = 0; j < cols; ++j) o[j] = b[k * row_stride + (j0 + j) * col_stride];
          std::fill(o + cols, o + WIDTH, 0.0f);
        }
      }
  }
  int64_t rows() const { return K_; }
  int64_t cols() const { return N_; }
  // rows [k0, K) of the panel holding columns [j0, j0 + WIDTH) (j0 a multiple of WIDTH)
  std::pair<const float*, int64_t> panel(int64_t j0, int64_t k0) const {
    return {data_.get() + (j0 / WIDTH) * K_ * WIDTH + k0 * WIDTH, WIDTH};
  }

 private:
  static size_t round_up(size_t bytes, size_t to) { return (bytes + to - 1) / to * to; }
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  int64_t K_ = 0, N_ = 0, panels_ = 0;
  size_t capacity_ = 0;
  std::unique_ptr<float[], Free> data_;
};

// C (M, N) = beta C + A B with B packed (N = b.cols(), K = b.rows()).
inline void gemm(int64_t M, const float* a, int64_t rsa, int64_t csa, const PackedB& b, float beta, float* c,
                 int64_t ldc) {
  blocked_gemm(M, b.cols(), b.rows(), a, rsa, csa, [&](int64_t j0, int64_t k0) { return b.panel(j0, k0); }, beta,
               c, ldc);
}

#endif  // SMALL_GEMM_AVAILABLE

}  // namespace small_gemm
