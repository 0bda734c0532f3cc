// The CPU recurrence of the fused BN-LSTM as two compiled loops (forward, backward).
//
// Same function as the ATen loop of bnrnn/nn/fused.py, which stays the readable fallback.
// At the paper's seqMNIST size (B=64, H=100) a time step is a few dozen small ops; from
// Python each costs microseconds of dispatch and a pass over memory. Here everything but the
// recurrent GEMM is a handful of loops per step over contiguous rows: the batch statistics
// (one pass), then one pass that normalises, adds the two terms, applies the activations and
// updates the cell.
//
// Threads. With 16 rows or more both loops split each step's batch into BATCH_PARTS = 2 parts,
// one per thread, in one OpenMP region for the whole sequence: each part's GEMMs
// (single-threaded inside the region) and loops over its rows; the threads meet at a spin
// barrier only where a norm needs the whole batch's sums (twice a step with BN, never for a
// vanilla LSTM). With a large hidden size each thread instead computes one half of the
// recurrent product over every row (forward: a column half; backward with the own kernel: a
// half of its sum, which each thread then adds up for its rows), and the threads also meet
// before and after it (PTB forward 0.78-0.82x, inference 0.82x). The parts' sums combine in a
// fixed order, so results are bit-identical on one thread or two (on the BLAS path from 16
// rows: below, the forward runs outside the region, where MKL threads its GEMMs). Measured on
// 2 cores at seqMNIST, interleaved in one process against the previous design: forward
// 0.77-0.81x (BN-LSTM) and 0.65x (vanilla); backward 0.97x (BN-LSTM) and 0.79x (vanilla). That
// previous design ran the loops on one thread and the GEMMs on all; splitting only the loops
// (at::parallel_for, ~9 regions a step) had cost twice as much once the process had used
// oneDNN (libgomp then put the threads to sleep between regions). With one part (below 16
// rows) the backward runs a step's loops beside the previous step's weight-gradient GEMMs
// instead (beside()).
//
// GEMMs (GemmKernel): float32 on a CPU with AVX-512 uses small_gemm.h's kernel, with W_h
// packed once per sequence. torch's MKL runs its AVX2 code on AMD processors (about 90
// GFLOP/s on a Zen 5 core, the kernel 190-240): at seqMNIST a training step took 48 ms
// against 92 (vanilla), 65 against 109 (BN-LSTM). Otherwise the BLAS, called directly
// (through ATen each small GEMM cost a few microseconds of dispatch and operand tensors more;
// direct, a seqMNIST step took 0.92x), and from H = 256 oneDNN's GEMM on W_h packed in
// halves. With BN the threads wait at the barriers for 2-6% of the step, as one thread runs
// slower than the other for a whole run (which one varies; on a shared VM by up to 40%).
//
// What else was measured and left out: streaming the saved buffers with non-temporal stores
// from cache-resident step buffers (no gain: the copies cost what the avoided reads saved);
// software prefetch of step t-1's saved rows before step t's GEMMs (0-2%, within noise);
// computing dgates rows inside the norms' first pass (2-3%, within noise); the norms' column
// sums with their accumulators in vector registers (1.00x: that pass waits on W_h h's saved
// rows coming from memory, not on its loads and stores of accumulators).
//
// Layout: every (B, F) matrix is row-major and contiguous; gates are [i, f, g, o] blocks of
// H columns each (G = 4H). A norm that is off is the identity map (scale 1, shift 0), so one
// code path serves the four placements. Statistics are per step in the working precision;
// sums over time (the gamma and beta gradients) accumulate in double.
//
// sig (T, B, G) holds the activated gates [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)].
// GATES: or one step's, (1, B, G), where the caller chooses so (cpu_recurrence.py's
// keeps_one_gate_step: BN_h, and a wide input or BN_x): the forward then writes each step's
// gates over the last's, and the backward forms them again, the same values, from wh (which
// BN_h keeps anyway) and the input term (backward_rows' gates_of_step). That saves writing
// and reading back a (T, B, G) buffer, the BN-LSTM's peak memory at seqMNIST 238 -> 162 MB
// and at PTB 457 -> 360, for about what forming the gates costs: the training step took
// 0.98-1.02x its time at seqMNIST and 1.01x at PTB (interleaved in one process).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include "small_gemm.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- activations ---------------------------------------------------------------------------
// float: branch-free polynomial forms the compiler vectorises (a libm call per element would
// not be; GCC needs -fno-trapping-math for their compares, see cpu_kernels.MATH_FLAGS);
// relative error below 3e-7 (pinned by tests/test_cpu_kernels.py). NaN propagates.
// double: the libm functions, exact to rounding (the gradcheck precision).

inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // x = n ln2 + r with |r| <= ln2 / 2; n rounded to nearest by the 1.5 * 2^23 trick.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

inline float tanh_approx(float x) {
  const float ax = std::fabs(x);
  // Small |x|: odd polynomial (no cancellation); otherwise 1 - 2 / (e^{2|x|} + 1).
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float large = std::copysign(1.0f - 2.0f / (exp_approx(2.0f * ax) + 1.0f), x);
  return ax < 0.625f ? small : large;
}

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_approx(double x) { return std::tanh(x); }

// ---- per-row arithmetic ---------------------------------------------------------------------
// Small functions over contiguous rows with restrict-qualified pointers: the compiler then
// vectorises each loop without run-time overlap checks (which it gives up on past a handful
// of pointers, falling back to scalar code).

// acc[f] += x[f]
template <typename T>
inline void add_row(int64_t n, const T* __restrict__ x, T* __restrict__ acc) {
  for (int64_t f = 0; f < n; ++f) acc[f] += x[f];
}

// sum[f] += x[f] - shift[f], squares[f] += (x[f] - shift[f])^2
template <typename T>
inline void add_shifted_moments(int64_t n, const T* __restrict__ x, const T* __restrict__ shift,
                                T* __restrict__ sum, T* __restrict__ squares) {
  for (int64_t f = 0; f < n; ++f) {
    const T d = x[f] - shift[f];
    sum[f] += d;
    squares[f] += d * d;
  }
}

// acc[f] += dy[f] * (x[f] - mean[f]) * invstd[f]   (dy times the normalised input)
template <typename T>
inline void add_dy_xhat(int64_t n, const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ mean,
                        const T* __restrict__ invstd, T* __restrict__ acc) {
  for (int64_t f = 0; f < n; ++f) acc[f] += dy[f] * ((x[f] - mean[f]) * invstd[f]);
}

// Pre-activations of one row: a = (x * sx + tx) + (p * sh + th), the two (possibly
// normalised) terms; `a` may not alias `p` (see gates_row_in_place).
template <typename T>
inline void gates_row(int64_t n, const T* __restrict__ x, const T* __restrict__ sx, const T* __restrict__ tx,
                      const T* __restrict__ p, const T* __restrict__ sh, const T* __restrict__ th,
                      T* __restrict__ a) {
  for (int64_t f = 0; f < n; ++f) a[f] = (x[f] * sx[f] + tx[f]) + (p[f] * sh[f] + th[f]);
}

template <typename T>
inline void gates_row_in_place(int64_t n, const T* __restrict__ x, const T* __restrict__ sx,
                               const T* __restrict__ tx, const T* __restrict__ sh, const T* __restrict__ th,
                               T* __restrict__ a) {
  for (int64_t f = 0; f < n; ++f) a[f] = (x[f] * sx[f] + tx[f]) + (a[f] * sh[f] + th[f]);
}

// Pre-activations of one row with a narrow input term (see NarrowInput): a = p * sh + shift +
// sum_i x[i] coef[i] for the row's I inputs x and coef (I, G).
template <typename T>
inline void gates_row_narrow(int64_t n, int64_t I, const T* __restrict__ x, const T* __restrict__ coef,
                             const T* __restrict__ shift, const T* __restrict__ p, const T* __restrict__ sh,
                             T* __restrict__ a) {
  for (int64_t f = 0; f < n; ++f) a[f] = p[f] * sh[f] + shift[f] + x[0] * coef[f];
  for (int64_t i = 1; i < I; ++i)
    for (int64_t f = 0; f < n; ++f) a[f] += x[i] * coef[i * n + f];
}

// The same without BN_h: a (holding W_h h_{t-1}) += shift + sum_i x[i] coef[i].
template <typename T>
inline void gates_row_narrow_in_place(int64_t n, int64_t I, const T* __restrict__ x, const T* __restrict__ coef,
                                      const T* __restrict__ shift, T* __restrict__ a) {
  for (int64_t f = 0; f < n; ++f) a[f] += shift[f] + x[0] * coef[f];
  for (int64_t i = 1; i < I; ++i)
    for (int64_t f = 0; f < n; ++f) a[f] += x[i] * coef[i * n + f];
}

// Ragged ends of the activation loops. GCC vectorises a loop over n values as 16-lane
// iterations, then an 8-lane one, then scalar code for the rest: at H = 100 each of those
// loops ends in 4 scalar activations (a polynomial and a divide apiece), which took about as
// long as the 96 before them. From one vector's width on, the rest is instead one more
// vector over the last `lanes` values, computed again from their inputs (an in-place map
// saves those first): the same values, as vector and scalar code do the same arithmetic
// (outputs and gradients bit-identical to the scalar ends'). The cell and hidden rows of 32
// rows at H = 100 took 0.87x (4.66 us against 5.37, alone); folded inference at seqMNIST
// 0.96-0.99x, the training step within noise. (`noinline`: inlined with its constant length,
// GCC unrolls the last vector into scalar code.)
template <typename T>
constexpr int64_t lanes = 64 / sizeof(T);

template <typename T, typename F>
__attribute__((noinline)) void map_to(int64_t n, const T* __restrict__ in, T* __restrict__ out, F f) {
  for (int64_t j = 0; j < n; ++j) out[j] = f(in[j]);
}

// s[j] = f(s[j]) for j < n.
template <typename T, typename F>
inline void map_in_place(int64_t n, T* __restrict__ s, F f) {
  constexpr int64_t L = lanes<T>;
  const int64_t body = n - n % L;
  if (body == n || n < L) {
    for (int64_t j = 0; j < n; ++j) s[j] = f(s[j]);
    return;
  }
  alignas(64) T last[L];
  std::copy(s + n - L, s + n, last);
  for (int64_t j = 0; j < body; ++j) s[j] = f(s[j]);
  map_to<T>(L, last, s + n - L, f);
}

template <typename T>
struct Sigmoid {
  T operator()(T x) const { return sigmoid(x); }
};
template <typename T>
struct Tanh {
  T operator()(T x) const { return tanh_approx(x); }
};

// One row's gates [i, f, g, o] (4H pre-activations, in place) -> [sig(i), sig(f), tanh(g),
// sig(o)]. (noinline, like the other functions that the backward's gates_of_step shares with
// the forward: one copy of the machine code for both, so that they compute the same bits;
// inlined into two callers, GCC could vectorise or contract a loop differently in each.)
template <typename T>
__attribute__((noinline)) void activate_row(int64_t H, T* __restrict__ s) {
  map_in_place(2 * H, s, Sigmoid<T>());
  map_in_place(H, s + 2 * H, Tanh<T>());
  map_in_place(H, s + 3 * H, Sigmoid<T>());
}

// The same, and c = sig(f) * c_prev + sig(i) * tanh(g).
template <typename T>
inline void cell_row(int64_t H, T* __restrict__ s, const T* __restrict__ c_prev, T* __restrict__ c) {
  activate_row<T>(H, s);
  for (int64_t j = 0; j < H; ++j) c[j] = s[H + j] * c_prev[j] + s[j] * s[2 * H + j];
}

// tc = tanh(c * scale + shift) (BN_c, or the identity), h = sig(o) * tc
template <typename T>
__attribute__((noinline)) void hidden_values(int64_t H, const T* __restrict__ c, const T* __restrict__ scale,
                                             const T* __restrict__ shift, const T* __restrict__ o,
                                             T* __restrict__ tc, T* __restrict__ h) {
  for (int64_t j = 0; j < H; ++j) {
    tc[j] = tanh_approx(c[j] * scale[j] + shift[j]);
    h[j] = o[j] * tc[j];
  }
}
// (Its ragged end as one more vector over the last values: see map_in_place.)
template <typename T>
inline void hidden_row(int64_t H, const T* c, const T* scale, const T* shift, const T* o, T* tc, T* h) {
  constexpr int64_t L = lanes<T>;
  const int64_t body = H - H % L;
  if (body == H || H < L) return hidden_values(H, c, scale, shift, o, tc, h);
  hidden_values(body, c, scale, shift, o, tc, h);
  const int64_t k = H - L;
  hidden_values(L, c + k, scale + k, shift + k, o + k, tc + k, h + k);
}

// Backward of hidden_row: d(pre-activation of o) and dL/d(BN_c(c)).
template <typename T>
inline void hidden_row_backward(int64_t H, const T* __restrict__ dh, const T* __restrict__ tc,
                                const T* __restrict__ o, T* __restrict__ d_o, T* __restrict__ dcn) {
  for (int64_t j = 0; j < H; ++j) {
    d_o[j] = dh[j] * tc[j] * o[j] * (T(1) - o[j]);
    dcn[j] = dh[j] * o[j] * (T(1) - tc[j] * tc[j]);
  }
}

// Backward of cell_row: with d = dc + dc_next (dL/dc from this step's output and from step
// t+1), the i, f, g pre-activation gradients; dc_next becomes dL/dc_{t-1} = d * sig(f).
template <typename T>
inline void cell_row_backward(int64_t H, const T* __restrict__ s, const T* __restrict__ c_prev,
                              const T* __restrict__ dc, T* __restrict__ dc_next, T* __restrict__ dg) {
  const T* i = s;
  const T* f = s + H;
  const T* g = s + 2 * H;
  for (int64_t j = 0; j < H; ++j) {
    const T d = dc[j] + dc_next[j];
    dg[j] = d * g[j] * i[j] * (T(1) - i[j]);
    dg[H + j] = d * c_prev[j] * f[j] * (T(1) - f[j]);
    dg[2 * H + j] = d * i[j] * (T(1) - g[j] * g[j]);
    dc_next[j] = d * f[j];
  }
}

// dx = coef * (dy - mean_dy - (x - mean) * proj): the input gradient of a batch norm.
template <typename T>
inline void norm_input_gradient_row(int64_t n, const T* __restrict__ dy, const T* __restrict__ x,
                                    const T* __restrict__ mean, const T* __restrict__ coef,
                                    const T* __restrict__ mean_dy, const T* __restrict__ proj, T* __restrict__ dx) {
  for (int64_t f = 0; f < n; ++f) dx[f] = coef[f] * (dy[f] - mean_dy[f] - (x[f] - mean[f]) * proj[f]);
}

// ---- batch statistics ----------------------------------------------------------------------

// One norm's per-feature affine map for this step: y = x * scale + shift (identity when off).
template <typename T>
struct Affine {
  explicit Affine(int64_t width) : scale(width, T(1)), shift(width, T(0)) {}
  std::vector<T> scale, shift;
};

// Batch statistics come from the batch's rows in parts (BATCH_PARTS, spread over threads; see
// forward_rows): each part's moments about its own first row, which is as close to the mean
// as the data's spread, so |mean| >> std loses no precision (the shifted-data algorithm).
template <typename T>
struct PartMoments {
  explicit PartMoments(int64_t width) : sum(width), squares(width) {}

  // The moments of x (rows, F) about its first row.
  void compute(const T* x, int64_t rows, int64_t F) {
    count = rows;
    shift = x;
    std::fill(sum.begin(), sum.end(), T(0));
    std::fill(squares.begin(), squares.end(), T(0));
    for (int64_t b = 1; b < rows; ++b) add_shifted_moments<T>(F, x + b * F, x, sum.data(), squares.data());
  }

  std::vector<T> sum, squares;  // of x - shift, (x - shift)^2
  const T* shift = nullptr;     // (F)
  int64_t count = 0;            // rows
};

// A norm's map from its statistics, x -> gamma (x - mean) invstd + beta, in place: `affine`
// holds invstd in scale and mean in shift on entry. (One vectorised loop: restrict-qualified
// pointers, the branch on beta outside it.)
template <typename T>
__attribute__((noinline)) void affine_from_statistics(int64_t F, const T* __restrict__ gamma,
                                                      const T* __restrict__ beta, Affine<T>& affine) {
  T* __restrict__ scale = affine.scale.data();
  T* __restrict__ shift = affine.shift.data();
  if (beta)
    for (int64_t f = 0; f < F; ++f) {
      scale[f] = gamma[f] * scale[f];
      shift[f] = beta[f] - shift[f] * scale[f];
    }
  else
    for (int64_t f = 0; f < F; ++f) {
      scale[f] = gamma[f] * scale[f];
      shift[f] = T(0) - shift[f] * scale[f];
    }
}

// The batch statistics of one norm from the moments of the parts of its input (F features):
// the map x -> gamma * (x - mean) * invstd + beta into `affine`, invstd = 1 / sqrt(biased
// var + eps), and mean and invstd written to `mean`, `invstd` where not null. The parts
// combine pairwise in double (Chan, Golub and LeVeque's update); a part with no rows adds
// nothing. mu, m2: scratch (F).
template <typename T>
void combine_statistics(const PartMoments<T>* const* parts, int64_t count, int64_t F, const T* gamma, const T* beta,
                        double eps, T* mean, T* invstd, Affine<T>& affine, std::vector<double>& mu,
                        std::vector<double>& m2) {
  mu.resize(F);
  m2.resize(F);
  double* __restrict__ m = mu.data();
  double* __restrict__ q = m2.data();
  double n = 0.0;
  for (int64_t k = 0; k < count; ++k) {
    const PartMoments<T>& part = *parts[k];
    if (part.count == 0) continue;
    const double c = static_cast<double>(part.count), inv_c = 1.0 / c;
    const T* __restrict__ shift = part.shift;
    const T* __restrict__ sum = part.sum.data();
    const T* __restrict__ squares = part.squares.data();
    if (n == 0.0) {
      for (int64_t f = 0; f < F; ++f) {
        const double s = sum[f];
        m[f] = shift[f] + s * inv_c;
        q[f] = std::max(squares[f] - s * s * inv_c, 0.0);
      }
    } else {
      const double total = n + c, weight = c / total, cross = n * c / total;
      for (int64_t f = 0; f < F; ++f) {
        const double s = sum[f];
        const double delta = shift[f] + s * inv_c - m[f];
        m[f] += delta * weight;
        q[f] += std::max(squares[f] - s * s * inv_c, 0.0) + delta * delta * cross;
      }
    }
    n += c;
  }
  // mean and invstd in T first (into shift and scale), in one vectorised loop: with the
  // stores to mean and invstd in it, GCC left it scalar, a double sqrt and divide at a time
  // (BN_h's 400 features at seqMNIST: 0.9-1.0 ms of a training step on each thread, now
  // 0.4-0.7)
  const double inv_n = 1.0 / n;
  T* __restrict__ sc = affine.scale.data();
  T* __restrict__ sh = affine.shift.data();
  for (int64_t f = 0; f < F; ++f) {
    sh[f] = static_cast<T>(m[f]);
    sc[f] = static_cast<T>(1.0 / std::sqrt(q[f] * inv_n + eps));
  }
  if (mean) std::copy(sh, sh + F, mean);
  if (invstd) std::copy(sc, sc + F, invstd);
  affine_from_statistics(F, gamma, beta, affine);
}

// The backward of one batch norm at one step: dx from dy (B, F). In steps, so that BN_h and
// BN_x, whose upstream gradient dy is the same, share each pass over the rows, and so that
// the first pass's sums can come from parts of the rows (see backward_rows).
template <typename T>
struct NormBackward {
  explicit NormBackward(int64_t width) : coef(width), mean_dy(width), proj(width) {}
  std::vector<T> coef, mean_dy, proj;
  const T* x = nullptr;  // this step's input (B, F), its statistics and gamma
  const T* mean = nullptr;
  const T* invstd = nullptr;
  const T* gamma = nullptr;
  T* dx = nullptr;  // where the input gradient goes (B, F)

  void begin(const T* input, const T* step_mean, const T* step_invstd, const T* weight, T* grad_input) {
    x = input;
    mean = step_mean;
    invstd = step_invstd;
    gamma = weight;
    dx = grad_input;
  }
  // First pass: acc (F) += row b of dy times the normalised input.
  void add_row(int64_t F, int64_t b, const T* dy, T* acc) const {
    add_dy_xhat<T>(F, dy + b * F, x + b * F, mean, invstd, acc);
  }
  // From the whole batch's sums of dy and dy * xhat (F each).
  void finish(int64_t B, int64_t F, const T* sum_dy, const T* sum_dy_xhat) {
    const T inv_b = T(1) / static_cast<T>(B);
    for (int64_t f = 0; f < F; ++f) {
      coef[f] = gamma[f] * invstd[f];
      mean_dy[f] = sum_dy[f] * inv_b;
      proj[f] = sum_dy_xhat[f] * inv_b * invstd[f];
    }
  }
  // Second pass: row b of dx.
  void input_gradient_row(int64_t F, int64_t b, const T* dy) const {
    norm_input_gradient_row<T>(F, dy + b * F, x + b * F, mean, coef.data(), mean_dy.data(), proj.data(), dx + b * F);
  }
};

// ---- buffers -------------------------------------------------------------------------------

template <typename T>
T* data_or_null(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

// One norm as the loops see it: parameters, and its (T, F) statistics buffers.
template <typename T>
struct Norm {
  const T* gamma;
  const T* beta;
  double eps;
  T* mean;
  T* invstd;
  int64_t width;
  bool on() const { return gamma != nullptr; }
  T* mean_at(int64_t t) const { return mean + t * width; }
  T* invstd_at(int64_t t) const { return invstd + t * width; }
  // Step t's map from its stored statistics, the same values combine_statistics set.
  void affine_at(int64_t t, Affine<T>& affine) const {
    if (!on()) return;
    std::copy(invstd_at(t), invstd_at(t) + width, affine.scale.begin());
    std::copy(mean_at(t), mean_at(t) + width, affine.shift.begin());
    affine_from_statistics(width, gamma, beta, affine);
  }
};

template <typename T>
Norm<T> make_norm(const OptTensor& gamma, const OptTensor& beta, double eps, const OptTensor& mean,
                  const OptTensor& invstd, int64_t width) {
  return {data_or_null<T>(gamma), data_or_null<T>(beta), eps, data_or_null<T>(mean), data_or_null<T>(invstd), width};
}

void check_cpu_contiguous(std::initializer_list<std::pair<const Tensor*, const char*>> tensors) {
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK(t->device().is_cpu(), "bnrnn_cpu: ", name, " must be on the CPU");
    TORCH_CHECK(t->is_contiguous(), "bnrnn_cpu: ", name, " must be contiguous");
  }
}

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

bool setting_is_off(const char* name) {
  const char* setting = std::getenv(name);
  return setting && std::string(setting) == "0";
}

// Who computes the loops' GEMMs: small_gemm.h's kernel (float, where the build has AVX-512),
// the BLAS directly, or ATen's mm (tensors, dispatch). The environment can step down, for
// the tests and for measuring: BNRNN_SMALL_GEMM=0 (the BLAS instead of the own kernel),
// BNRNN_DIRECT_BLAS=0 (ATen's mm for everything).
enum class GemmKernel { own, blas, aten };

template <typename T>
GemmKernel gemm_kernel() {
  if (setting_is_off("BNRNN_DIRECT_BLAS")) return GemmKernel::aten;
  if (std::is_same_v<T, float> && SMALL_GEMM_AVAILABLE && !setting_is_off("BNRNN_SMALL_GEMM"))
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
// fused.py (the same 256): each thread then streams half of W_h from the shared cache
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
// GEMM on its own half of the weight (at PTB's shape 4.6 ms against 5.4 for oneDNN's GEMM of
// the whole product on both threads). Otherwise the BLAS directly, or ATen's mm.
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
  // (single-threaded halves on 2 threads at PTB's shape: 1.26 ms at 500 columns, 1.17 at
  // 480; in the loop the step's dL/dh_{t-1} products took 0.94x with halves of the sum).
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

// ---- the input term ------------------------------------------------------------------------

// The input term of the pre-activations, BN_x(W_x x_t) + b (or W_x x_t + b without BN_x),
// comes in one of two forms.
//
// Wide: wx (T, B, G) holds W_x x (+ b without BN_x), one GEMM before the loop; the loops
// read it, and normalise it like the recurrent term.
//
// Narrow (no wx; x (T, B, I) with a few columns, seqMNIST's I = 1): the loops never form
// W_x x_t. Its batch statistics follow from the mean mu and the (I, I) covariance C of x_t
// over the batch, mean_f = w_f . mu and var_f = w_f^T C w_f (w_f: row f of W_x), so the term
// is an affine map of x_t itself,
//     BN_x(W_x x_t)_f + b_f = sum_i x_ti coef_if + shift_f,
//     coef_if = scale_f w_fi, shift_f = b_f - scale_f mean_f, scale_f = gamma_f invstd_f,
// I multiply-adds per value inside the gates pass; without BN_x, coef = W_x^T and shift = b.
// That saves writing a (B, G) product every step and reading it for the statistics, the
// gates and twice in the backward, which needs only dy^T x_t (NarrowInputGradient).
template <typename T>
struct NarrowInput {
  NarrowInput(const Tensor& x, const Tensor& weight_ih, const OptTensor& bias)
      : B(x.size(1)), I(x.size(2)), G(weight_ih.size(0)), x(x.data_ptr<T>()), w(G * I), wt(I * G), mu(I),
        cov(I * I), coef(I * G), shift(G, T(0)) {
    const Tensor wc = weight_ih.contiguous();
    const T* pw = wc.data_ptr<T>();
    for (int64_t f = 0; f < G; ++f)
      for (int64_t i = 0; i < I; ++i) {
        w[f * I + i] = wt[i * G + f] = pw[f * I + i];
        coef[i * G + f] = pw[f * I + i];
      }
    if (const T* b = data_or_null<T>(bias)) std::copy(b, b + G, shift.begin());
  }
  // x_t (B, I)
  const T* rows(int64_t t) const { return x + t * B * I; }

  // mu (I) and the biased covariance cov (I, I) of x_t over the batch, in two passes, in
  // double: I is small, and var_f = w_f^T C w_f must not lose what a direct pass keeps.
  void moments(int64_t t) {
    const T* xt = rows(t);
    std::fill(mu.begin(), mu.end(), 0.0);
    std::fill(cov.begin(), cov.end(), 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I; ++i) mu[i] += xt[b * I + i];
    for (int64_t i = 0; i < I; ++i) mu[i] /= static_cast<double>(B);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I; ++i)
        for (int64_t j = 0; j <= i; ++j) cov[i * I + j] += (xt[b * I + i] - mu[i]) * (xt[b * I + j] - mu[j]);
    for (int64_t i = 0; i < I; ++i)
      for (int64_t j = 0; j <= i; ++j) cov[j * I + i] = cov[i * I + j] /= static_cast<double>(B);
  }

  // BN_x at step t: the map's coef and shift, and with `store` its statistics into nx's
  // buffers.
  //
  // In passes over the G features, each one vectorised (on the critical path of every step,
  // between the threads' first meeting and the gates; a loop per feature over its I inputs
  // took 4 us a step at seqMNIST): mean = W_x mu and var_f = sum_ij w_fi C_ij w_fj.
  __attribute__((noinline)) void normalise(int64_t t, const Norm<T>& nx, bool store) {
    moments(t);
    mean_f.assign(G, 0.0);
    var_f.assign(G, 0.0);
    scale_f.resize(G);
    double* __restrict__ m = mean_f.data();
    double* __restrict__ v = var_f.data();
    double* __restrict__ sc = scale_f.data();
    for (int64_t i = 0; i < I; ++i) {
      const double* __restrict__ wi = wt.data() + i * G;
      const double mu_i = mu[i];
      for (int64_t f = 0; f < G; ++f) m[f] += wi[f] * mu_i;
      for (int64_t j = 0; j < I; ++j) {
        const double* __restrict__ wj = wt.data() + j * G;
        const double c_ij = cov[i * I + j];
        for (int64_t f = 0; f < G; ++f) v[f] += wi[f] * wj[f] * c_ij;
      }
    }
    const T* __restrict__ gamma = nx.gamma;
    const T* __restrict__ beta = nx.beta;
    T* __restrict__ sh = shift.data();
    for (int64_t f = 0; f < G; ++f) {
      const double is = 1.0 / std::sqrt(std::max(v[f], 0.0) + nx.eps);
      sc[f] = gamma[f] * is;
      sh[f] = static_cast<T>((beta ? static_cast<double>(beta[f]) : 0.0) - sc[f] * m[f]);
      v[f] = is;
    }
    if (store) {
      T* __restrict__ mean = nx.mean_at(t);
      T* __restrict__ invstd = nx.invstd_at(t);
      for (int64_t f = 0; f < G; ++f) {
        mean[f] = static_cast<T>(m[f]);
        invstd[f] = static_cast<T>(v[f]);
      }
    }
    for (int64_t i = 0; i < I; ++i) {
      const double* __restrict__ wi = wt.data() + i * G;
      T* __restrict__ ci = coef.data() + i * G;
      for (int64_t f = 0; f < G; ++f) ci[f] = static_cast<T>(sc[f] * wi[f]);
    }
  }
  const double* w_row(int64_t f) const { return w.data() + f * I; }

  int64_t B, I, G;
  const T* x;
  std::vector<double> w, wt;     // W_x (G, I), W_x^T (I, G)
  std::vector<double> mu, cov;   // this step's moments of x_t
  std::vector<double> mean_f, var_f, scale_f;  // normalise()'s scratch (G)
  std::vector<T> coef, shift;    // (I, G), (G): this step's term is x_t coef + shift
};

// The backward of the narrow input term at one step, from dy = dL/d(pre-activations) (B, G).
// The pass over dy's rows accumulates D = dy^T x_t (I, G) (add_row, by parts of the rows).
// Without BN_x, dW_x = sum over steps of D. With it, finish() takes the whole batch's D and
// sums, adds this step's dW_x and BN_x's gamma gradient to their totals (double), and
// input_gradient() writes rows of dL/dx_t. dax = dL/d(W_x x_t) = coef_f (dy - mean_dy -
// proj (z - mean)) (the batch norm's input gradient, z = W_x x_t), and its sums over the
// batch against x_t need only D, the moments and W_x:
//     sum_b dy_bf xhat_bf = invstd_f w_f . (D_f - sum_dy_f mu)
//     dW_x[f, i] += coef_f (D_if - sum_dy_f mu_i - proj_f B (C w_f)_i)
//     dx_bi = sum_f U_if dy_bf - k_i - sum_j (x_bj - mu_j) M_ji,
// with U_if = coef_f w_fi, k_i = sum_f U_if mean_dy_f, M_ji = sum_f U_if proj_f w_fj.
template <typename T>
struct NarrowInputGradient {
  explicit NarrowInputGradient(NarrowInput<T>& input)
      : in(input), d_weight_t(input.I * input.G, 0.0), d_gamma(input.G, 0.0) {}

  // With `shifted` (BN_x on), D is taken about x_t's first row, D = dy^T (x_t - 1 x_t0^T),
  // which keeps the digits that D - sum_dy mu^T would cancel when |mu| >> spread.
  void begin(int64_t t, bool shifted) {
    xt = in.rows(t);
    shift.assign(in.I, T(0));
    if (shifted) std::copy(xt, xt + in.I, shift.begin());
  }
  // D (I, G) += (x_tb - shift)^T dy_b for row b
  void add_row(int64_t b, const T* __restrict__ dy, T* D) const {
    for (int64_t i = 0; i < in.I; ++i) axpy_row(in.G, xt[b * in.I + i] - shift[i], dy, D + i * in.G);
  }
  // With BN_x: the whole batch's D (I, G, shifted) and sum_dy (G) give this step's coef and
  // proj and, for features [f0, f1), its dW_x and gamma gradient (added to the totals; each
  // thread takes its share of the features, so that none waits for another at the next
  // meeting).
  //
  // In passes over the G features, each one vectorised, as NarrowInput::normalise (a loop per
  // feature over its I inputs cost microseconds a step).
  void finish(int64_t t, const Norm<T>& nx, const T* D, const T* sum_dy, int64_t f0, int64_t f1) {
    const int64_t B = in.B, I = in.I, G = in.G;
    in.moments(t);  // this step's mu and cov, recomputed as the forward computed them
    std::vector<double> mu(I);  // about the shift, as D
    for (int64_t i = 0; i < I; ++i) mu[i] = in.mu[i] - static_cast<double>(shift[i]);
    coef.resize(G);
    proj.resize(G);
    sum_dy_xhat.assign(G, 0.0);
    const T* __restrict__ invstd = nx.invstd_at(t);
    const T* __restrict__ gamma = nx.gamma;
    const T* __restrict__ sdy = sum_dy;
    double* __restrict__ s = sum_dy_xhat.data();
    double* __restrict__ cf = coef.data();
    double* __restrict__ pj = proj.data();
    for (int64_t i = 0; i < I; ++i) {  // s = sum_i w_i (D_i - sum_dy mu_i)
      const double* __restrict__ wi = in.wt.data() + i * G;
      const T* __restrict__ Di = D + i * G;
      const double mu_i = mu[i];
      for (int64_t f = 0; f < G; ++f) s[f] += wi[f] * (Di[f] - sdy[f] * mu_i);
    }
    const double inv_b = 1.0 / static_cast<double>(B);
    for (int64_t f = 0; f < G; ++f) {
      s[f] *= invstd[f];  // sum of dy times the normalised term
      cf[f] = gamma[f] * static_cast<double>(invstd[f]);
      pj[f] = s[f] * inv_b * invstd[f];
    }
    double* __restrict__ dg = d_gamma.data();
    for (int64_t f = f0; f < f1; ++f) dg[f] += s[f];
    for (int64_t i = 0; i < I; ++i) {  // dW_x^T row i += coef (D_i - sum_dy mu_i - proj B (C w)_i)
      cw.assign(G, 0.0);
      double* __restrict__ c = cw.data();
      for (int64_t j = 0; j < I; ++j) {
        const double* __restrict__ wj = in.wt.data() + j * G;
        const double c_ij = in.cov[i * I + j];
        for (int64_t f = f0; f < f1; ++f) c[f] += c_ij * wj[f];
      }
      double* __restrict__ dw = d_weight_t.data() + i * G;
      const T* __restrict__ Di = D + i * G;
      const double mu_i = mu[i], b = static_cast<double>(B);
      for (int64_t f = f0; f < f1; ++f) dw[f] += cf[f] * (Di[f] - sdy[f] * mu_i - pj[f] * b * c[f]);
    }
  }
  // This thread's totals with BN_x, features [f0, f1), into dW_x (G, I) and d gamma (G).
  void store_totals(int64_t f0, int64_t f1, std::vector<double>& weight, std::vector<double>& gamma) const {
    for (int64_t i = 0; i < in.I; ++i)
      for (int64_t f = f0; f < f1; ++f) weight[f * in.I + i] = d_weight_t[i * in.G + f];
    std::copy(d_gamma.begin() + f0, d_gamma.begin() + f1, gamma.begin() + f0);
  }
  // Rows [b0, b1) of dL/dx_t (B, I) = dax W_x; without BN_x (bn_x false) dax = dy; with it,
  // after finish(). sum_dy (G): the whole batch's.
  void input_gradient(const T* dy, bool bn_x, const T* sum_dy, int64_t b0, int64_t b1, T* grad_x_t) {
    const int64_t B = in.B, I = in.I, G = in.G;
    U.resize(I * G);
    std::vector<double> k(I, 0.0), M(I * I, 0.0);
    for (int64_t f = 0; f < G; ++f) {
      const double* wf = in.w_row(f);
      for (int64_t i = 0; i < I; ++i) {
        const double u = (bn_x ? coef[f] : 1.0) * wf[i];
        U[i * G + f] = static_cast<T>(u);
        if (!bn_x) continue;
        k[i] += u * sum_dy[f] / static_cast<double>(B);
        for (int64_t j = 0; j < I; ++j) M[j * I + i] += u * proj[f] * wf[j];
      }
    }
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t i = 0; i < I; ++i) {
        const T* __restrict__ u = U.data() + i * G;
        const T* __restrict__ d = dy + b * G;
        T s = T(0);
        for (int64_t f = 0; f < G; ++f) s += u[f] * d[f];
        double v = s - k[i];
        if (bn_x)
          for (int64_t j = 0; j < I; ++j) v -= (xt[b * I + j] - in.mu[j]) * M[j * I + i];
        grad_x_t[b * I + i] = static_cast<T>(v);
      }
  }

  NarrowInput<T>& in;
  const T* xt = nullptr;
  std::vector<T> shift;                   // (I)
  std::vector<double> d_weight_t, d_gamma;  // totals over time with BN_x: (I, G), (G)

 private:
  static void axpy_row(int64_t n, T a, const T* __restrict__ x, T* __restrict__ y) {
    for (int64_t f = 0; f < n; ++f) y[f] += a * x[f];
  }
  std::vector<double> coef, proj, sum_dy_xhat, cw;  // (G) each, this step's
  std::vector<T> U;
};

// ---- forward -------------------------------------------------------------------------------

// The pre-activations of a step's rows: the input term (wide: wx_t mapped by ax; narrow:
// x_t coef + shift, see NarrowInput) plus the recurrent term W_h h_{t-1} (mapped by ah).
template <typename T>
struct PreActivationRows {
  // wide: wx_t (B, G) (null for a narrow input)
  void begin(int64_t width, const T* wide, const NarrowInput<T>* narrow_input, int64_t t, const Affine<T>& x_map,
             const Affine<T>& h_map, bool bn_h) {
    G = width;
    x = wide;
    narrow = narrow_input;
    ax = &x_map;
    ah = &h_map;
    normalised_h = bn_h;
    if (narrow) {
      x = narrow->rows(t);
      narrow_shift.resize(G);
      for (int64_t f = 0; f < G; ++f) narrow_shift[f] = narrow->shift[f] + ah->shift[f];
    }
  }
  // Row b (G) into a, from p = row b of W_h h_{t-1}; without BN_h, a must be p itself (the
  // product was written where the gates go), with it a must not be.
  __attribute__((noinline)) void row(int64_t b, const T* p, T* a) const {
    if (narrow && normalised_h)
      gates_row_narrow<T>(G, narrow->I, x + b * narrow->I, narrow->coef.data(), narrow_shift.data(), p,
                          ah->scale.data(), a);
    else if (narrow)
      gates_row_narrow_in_place<T>(G, narrow->I, x + b * narrow->I, narrow->coef.data(), narrow_shift.data(), a);
    else if (normalised_h)
      gates_row<T>(G, x + b * G, ax->scale.data(), ax->shift.data(), p, ah->scale.data(), ah->shift.data(), a);
    else
      gates_row_in_place<T>(G, x + b * G, ax->scale.data(), ax->shift.data(), ah->scale.data(), ah->shift.data(), a);
  }

  int64_t G = 0;
  const T* x = nullptr;
  const NarrowInput<T>* narrow = nullptr;
  const Affine<T>*ax = nullptr, *ah = nullptr;
  bool normalised_h = false;
  std::vector<T> narrow_shift;  // the narrow term's shift plus BN_h's
};

// Where the threads of the forward meet, twice a step at most. It spins (yielding after a
// while) instead of sleeping: the wait is a few microseconds, and a sleeping thread takes
// longer than that to wake. `abort` releases every waiter for good (a thread that failed).
class SpinBarrier {
 public:
  explicit SpinBarrier(int parties) : parties_(parties) {}
  // false once aborted
  bool wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == parties_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    } else {
      for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
        if (aborted_.load(std::memory_order_relaxed)) return false;
        if (spins < (1 << 14))
          pause();
        else
          std::this_thread::yield();
      }
    }
    return !aborted_.load(std::memory_order_relaxed);
  }
  void abort() { aborted_.store(true, std::memory_order_relaxed); }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }
  const int parties_;
  std::atomic<int> arrived_{0}, generation_{0};
  std::atomic<bool> aborted_{false};
};

// Both loops split each step's batch rows into this many parts, whatever the number of
// threads: every part's rows of a recurrent product or weight gradient are one GEMM, and the
// batch statistics and column sums combine the parts' in a fixed order, so that results do
// not depend on the thread count (tests/test_cpu_kernels.py pins them bit-identical).
constexpr int BATCH_PARTS = 2;

// Runs body(thread) for thread = 0 .. threads - 1 (threads > 1) at once on torch's OpenMP
// threads, in one parallel region. Returns false, having run nothing, where the region has
// fewer threads. A body that throws aborts `barrier` (releasing the others' waits); its
// exception is rethrown.
template <typename Body>
bool run_on_threads(int threads, SpinBarrier& barrier, Body&& body) {
#ifdef _OPENMP
  std::exception_ptr failure;
  std::atomic<bool> failed{false}, too_few{false};
  const at::ThreadLocalState state;  // the caller's (grad mode, dispatch keys), for torch's ops
#pragma omp parallel
  {
    if (omp_get_num_threads() < threads) {
      too_few = true;
    } else if (omp_get_thread_num() < threads) {
      try {
        const at::ThreadLocalStateGuard guard(state);
        body(omp_get_thread_num());
      } catch (...) {
        if (!failed.exchange(true)) failure = std::current_exception();
        barrier.abort();
      }
    }
  }
  if (failure) std::rethrow_exception(failure);
  return !too_few;
#else
  (void)threads, (void)barrier, (void)body;
  return false;
#endif
}

// How many parts the batch's rows split into (BATCH_PARTS, or one below 16 rows), and on
// how many threads they run (one inside another parallel region). The halves of a product
// by halves go to two threads even where the rows make one part.
inline std::pair<int, int> parts_and_threads(int64_t batch, const RecurrentProduct& recurrent) {
  const int parts = batch < 16 ? 1 : BATCH_PARTS;
  const int wanted = recurrent.by_halves() ? 2 : parts;
  int threads = 1;
#ifdef _OPENMP
  if (!at::in_parallel_region()) threads = static_cast<int>(std::min<int64_t>(wanted, at::get_num_threads()));
#endif
  return {parts, threads};
}

// Thread `thread` of `threads`' share of a product by halves (half(k) for its halves k): the
// threads meet before it, where wait_before (every row of the operand written), and after it
// (every half formed). False once the barrier is aborted.
template <typename Half>
bool product_halves(SpinBarrier& barrier, int thread, int threads, bool wait_before, Half&& half) {
  const bool meet = threads > 1;
  if (meet && wait_before && !barrier.wait()) return false;
  for (int k = thread; k < 2; k += threads) half(k);
  return !meet || barrier.wait();
}

// What the threads of the forward share: the arguments, the moments of each part's rows
// (two sets, by the step's parity: a thread may start step t + 1 while another still reads
// step t's), and the barrier.
template <typename T>
struct ForwardShared {
  const T* wx;
  const NarrowInput<T>* narrow;
  const RecurrentProduct& recurrent;
  const Norm<T>&nx, &nh, &nc;
  const Tensor &h0, &c0, &hs, &cs, &sig, &tanh_c;
  const OptTensor& wh;
  int parts, threads;
  std::vector<PartMoments<T>> moments_x, moments_h, moments_c;  // [parity * parts + part]
  SpinBarrier barrier;

  ForwardShared(const T* wx, const NarrowInput<T>* narrow, const RecurrentProduct& recurrent, const Norm<T>& nx,
                const Norm<T>& nh, const Norm<T>& nc, const Tensor& h0, const Tensor& c0, const Tensor& hs,
                const Tensor& cs, const Tensor& sig, const Tensor& tanh_c, const OptTensor& wh, int parts,
                int threads)
      : wx(wx), narrow(narrow), recurrent(recurrent), nx(nx), nh(nh), nc(nc), h0(h0), c0(c0), hs(hs), cs(cs),
        sig(sig), tanh_c(tanh_c), wh(wh), parts(parts), threads(threads),
        moments_x(2 * parts, PartMoments<T>(wx && nx.on() ? nx.width : 0)),
        moments_h(2 * parts, PartMoments<T>(nh.on() ? nh.width : 0)),
        moments_c(2 * parts, PartMoments<T>(nc.on() ? nc.width : 0)),
        barrier(threads) {}

  int64_t first_row(int part) const { return cs.size(1) * part / parts; }
};

// The batch statistics of step t from every part's moments (after the barrier).
template <typename T>
void combine_parts(std::vector<PartMoments<T>>& moments, int64_t t, int parts, int64_t F, const Norm<T>& norm,
                   bool store, Affine<T>& affine, std::vector<double>& mu, std::vector<double>& m2) {
  const PartMoments<T>* step[BATCH_PARTS];
  for (int k = 0; k < parts; ++k) step[k] = &moments[(t % 2) * parts + k];
  combine_statistics<T>(step, parts, F, norm.gamma, norm.beta, norm.eps, store ? norm.mean_at(t) : nullptr,
                        store ? norm.invstd_at(t) : nullptr, affine, mu, m2);
}

// The forward recurrence on thread `thread` of sh.threads, for its share of the parts of the
// batch's rows. Each step a part computes its own rows of W_h h_{t-1} (which needs only its
// rows of h_{t-1}), gates, c and h; the batch statistics combine every part's moments (the
// threads meet after BN_x's and BN_h's moments, and after BN_c's). Thread 0 stores the
// statistics. Returns false if another thread failed (the barrier was aborted).
template <typename T>
bool forward_rows(ForwardShared<T>& sh, int thread) {
  const int64_t steps = sh.cs.size(0), B = sh.cs.size(1), H = sh.cs.size(2), G = 4 * H;
  const int p0 = sh.parts * thread / sh.threads, p1 = sh.parts * (thread + 1) / sh.threads;
  const int64_t b0 = sh.first_row(p0), b1 = sh.first_row(p1);
  const bool store = thread == 0, meet = sh.threads > 1;
  std::optional<NarrowInput<T>> narrow;  // this thread's own (it holds the step's map)
  if (sh.narrow) narrow.emplace(*sh.narrow);
  Affine<T> ax(G), ah(G), ac(H);
  std::vector<double> mu, m2;  // scratch of combine_statistics
  PreActivationRows<T> pre;
  for (int64_t t = 0; t < steps; ++t) {
    T* s = sh.sig.template data_ptr<T>() + (t % sh.sig.size(0)) * B * G;  // every step's, or one (GATES)
    T* c = sh.cs.template data_ptr<T>() + t * B * H;
    const T* c_prev = t > 0 ? c - B * H : sh.c0.template data_ptr<T>();
    const T* x = sh.wx ? sh.wx + t * B * G : nullptr;
    const bool wide_x = sh.nx.on() && x;
    // W_h h_{t-1}, a GEMM per part: kept in wh for BN_h's statistics and backward, else
    // straight into sig.
    T* const product = sh.nh.on() ? sh.wh->template data_ptr<T>() + t * B * G : s;
    const T* h = t > 0 ? sh.hs.template data_ptr<T>() + (t - 1) * B * H : sh.h0.template data_ptr<T>();
    const bool by_halves = sh.recurrent.by_halves();
    // W_h packed in halves (large H): a thread's half of the columns over every row, which
    // keeps oneDNN's single-threaded GEMM on its own half of W_h (at PTB's shape 4.6 ms
    // against 5.4 for the whole product on both threads); otherwise each part's rows.
    if (by_halves && !product_halves(sh.barrier, thread, sh.threads, t > 0, [&](int half) {
          sh.recurrent.template forward_half<T>(h, B, half, product);
        }))
      return false;
    for (int part = p0; part < p1; ++part) {
      const int64_t r0 = sh.first_row(part), rows = sh.first_row(part + 1) - r0;
      if (!by_halves) sh.recurrent.template forward_rows<T>(h, r0, rows, product);
      const int64_t slot = (t % 2) * sh.parts + part;
      if (wide_x) sh.moments_x[slot].compute(x + r0 * G, rows, G);
      if (sh.nh.on()) sh.moments_h[slot].compute(product + r0 * G, rows, G);
    }
    if ((wide_x || sh.nh.on()) && meet && !sh.barrier.wait()) return false;
    if (wide_x) combine_parts<T>(sh.moments_x, t, sh.parts, G, sh.nx, store, ax, mu, m2);
    if (sh.nx.on() && narrow) narrow->normalise(t, sh.nx, store);
    if (sh.nh.on()) combine_parts<T>(sh.moments_h, t, sh.parts, G, sh.nh, store, ah, mu, m2);
    const T* p = product;
    pre.begin(G, x, narrow ? &*narrow : nullptr, t, ax, ah, sh.nh.on());
    for (int64_t b = b0; b < b1; ++b) {
      pre.row(b, p + b * G, s + b * G);
      cell_row<T>(H, s + b * G, c_prev + b * H, c + b * H);
    }
    if (sh.nc.on()) {
      for (int part = p0; part < p1; ++part) {
        const int64_t r0 = sh.first_row(part);
        sh.moments_c[(t % 2) * sh.parts + part].compute(c + r0 * H, sh.first_row(part + 1) - r0, H);
      }
      if (meet && !sh.barrier.wait()) return false;
      combine_parts<T>(sh.moments_c, t, sh.parts, H, sh.nc, store, ac, mu, m2);
    }
    T* tc = sh.tanh_c.template data_ptr<T>() + t * B * H;
    T* hp = sh.hs.template data_ptr<T>() + t * B * H;
    for (int64_t b = b0; b < b1; ++b)
      hidden_row<T>(H, c + b * H, ac.scale.data(), ac.shift.data(), s + b * G + 3 * H, tc + b * H, hp + b * H);
  }
  return true;
}

// The forward, its parts spread over up to BATCH_PARTS of torch's threads in one parallel
// region for the whole sequence: each step's small GEMM and loops run on both threads, where
// a GEMM on all threads followed by loops on one left the others waiting through the loops.
template <typename T>
void forward_loop(const T* wx, NarrowInput<T>* narrow, const RecurrentProduct& recurrent, const Norm<T>& nx,
                  const Norm<T>& nh, const Norm<T>& nc, const Tensor& h0, const Tensor& c0, const Tensor& hs,
                  const Tensor& cs, const Tensor& sig, const Tensor& tanh_c, const OptTensor& wh) {
  const auto [parts, threads] = parts_and_threads(cs.size(1), recurrent);
  ForwardShared<T> sh(wx, narrow, recurrent, nx, nh, nc, h0, c0, hs, cs, sig, tanh_c, wh, parts, threads);
  if (threads == 1 || !run_on_threads(threads, sh.barrier, [&](int thread) { forward_rows<T>(sh, thread); })) {
    sh.threads = 1;
    forward_rows<T>(sh, 0);
  }
}

void recurrence_forward(const Tensor& x, const Tensor& weight_ih, const OptTensor& input_bias, const OptTensor& wx,
                        const Tensor& weight_hh, const OptTensor& gamma_x, const OptTensor& beta_x,
                        const OptTensor& gamma_h, const OptTensor& gamma_c, const OptTensor& beta_c, const Tensor& h0,
                        const Tensor& c0, double eps_x, double eps_h, double eps_c, const Tensor& hs, const Tensor& cs,
                        const Tensor& sig, const Tensor& tanh_c, const OptTensor& wh, const OptTensor& mean_x,
                        const OptTensor& invstd_x, const OptTensor& mean_h, const OptTensor& invstd_h,
                        const OptTensor& mean_c, const OptTensor& invstd_c, at::TensorList packed_hh) {
  check_cpu_contiguous({{&x, "x"}, {&weight_hh, "weight_hh"}, {&h0, "h0"}, {&c0, "c0"}, {&hs, "hs"}, {&cs, "cs"},
                        {&sig, "sig"}, {&tanh_c, "tanh_c"}});
  if (wx.has_value()) check_cpu_contiguous({{&*wx, "wx"}});
  TORCH_CHECK(!gamma_h.has_value() || wh.has_value(), "bnrnn_cpu: BN_h needs the wh buffer");
  const int64_t G = weight_ih.size(0), H = G / 4;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnrnn_recurrence_forward", [&] {
    std::optional<NarrowInput<scalar_t>> narrow;
    if (!wx.has_value()) narrow.emplace(x, weight_ih, input_bias);
    forward_loop<scalar_t>(data_or_null<scalar_t>(wx), narrow ? &*narrow : nullptr,
                           RecurrentProduct(weight_hh, packed_hh, Products::forward),
                           make_norm<scalar_t>(gamma_x, beta_x, eps_x, mean_x, invstd_x, G),
                           make_norm<scalar_t>(gamma_h, std::nullopt, eps_h, mean_h, invstd_h, G),
                           make_norm<scalar_t>(gamma_c, beta_c, eps_c, mean_c, invstd_c, H), h0, c0, hs, cs, sig,
                           tanh_c, wh);
  });
}

// ---- inference with population statistics ---------------------------------------------------

// The recurrence with every norm an affine map (population statistics, folded): xin_t
// already holds BN_x(W_x x_t) + b + BN_h's shift (T, B, G), or, for a narrow input (given
// x_coef), xin is x itself (T, B, I) and its term is x_t x_coef[t] + x_shift[t], with
// x_coef (T, I, G) W_x^T scaled by BN_x's scale and x_shift (T, G) the shifts and b: no
// (T, B, G) tensor to write and read back (80 MB at seqMNIST). W_h h_{t-1} is scaled per
// column by h_scale[t] (or not, without BN_h); c is mapped by c_scale[t], c_shift[t] before
// its tanh (or not, without BN_c). Only hs and the final c are written.
template <typename T>
void population_loop(const Tensor& xin, const OptTensor& x_coef, const OptTensor& x_shift,
                     const RecurrentProduct& recurrent, const OptTensor& h_scale, const OptTensor& c_scale,
                     const OptTensor& c_shift, const Tensor& h0, const Tensor& c0, const Tensor& hs,
                     const Tensor& c_last) {
  const int64_t steps = xin.size(0), B = xin.size(1), G = recurrent.weight_hh().size(0), H = G / 4;
  const int64_t width = xin.size(2);  // of xin's rows: G, or a narrow input's I
  const T* coef = data_or_null<T>(x_coef);
  const T* coef_shift = data_or_null<T>(x_shift);
  const std::vector<T> ones(G, T(1)), zeros(G, T(0));
  const T* hsc = data_or_null<T>(h_scale);
  const T* csc = data_or_null<T>(c_scale);
  const T* csh = data_or_null<T>(c_shift);
  std::vector<T> cells(2 * B * H);  // c_{t-1} and c_t, by parity
  std::copy(c0.data_ptr<T>(), c0.data_ptr<T>() + B * H, cells.begin());
  const Tensor buffer = at::empty({B, G}, xin.options());
  // The rows of each part of the batch (see BATCH_PARTS): rows never meet, so the threads
  // wait for each other only around a product by halves (see forward_rows).
  const auto [parts, threads] = parts_and_threads(B, recurrent);
  SpinBarrier barrier(threads);
  const auto rows_of_thread = [&, parts = parts](int thread, int count) {
    const int p0 = parts * thread / count, p1 = parts * (thread + 1) / count;
    std::vector<T> gates(B * G), tanh_c(B * H);
    for (int64_t t = 0; t < steps; ++t) {
      const T* x = xin.data_ptr<T>() + t * B * width;
      const T* c_prev = cells.data() + (t % 2) * B * H;
      T* c = cells.data() + ((t + 1) % 2) * B * H;
      const T* sh = hsc ? hsc + t * G : ones.data();
      const T* sc = csc ? csc + t * H : ones.data();
      const T* sf = csh ? csh + t * H : zeros.data();
      T* hp = hs.data_ptr<T>() + t * B * H;
      const T* h = t > 0 ? hs.data_ptr<T>() + (t - 1) * B * H : h0.data_ptr<T>();
      const bool by_halves = recurrent.by_halves();
      if (by_halves && !product_halves(barrier, thread, count, t > 0, [&](int half) {
            recurrent.template forward_half<T>(h, B, half, buffer.data_ptr<T>());
          }))
        return;
      for (int k = p0; k < p1; ++k) {
        const int64_t r0 = B * k / parts, r1 = B * (k + 1) / parts;
        if (!by_halves) recurrent.template forward_rows<T>(h, r0, r1 - r0, buffer.data_ptr<T>());
        const T* p = buffer.data_ptr<T>();
        for (int64_t b = r0; b < r1; ++b) {
          T* s = gates.data() + b * G;
          if (coef)
            gates_row_narrow<T>(G, width, x + b * width, coef + t * width * G, coef_shift + t * G, p + b * G, sh, s);
          else
            gates_row<T>(G, x + b * G, ones.data(), zeros.data(), p + b * G, sh, zeros.data(), s);
          cell_row<T>(H, s, c_prev + b * H, c + b * H);
          hidden_row<T>(H, c + b * H, sc, sf, s + 3 * H, tanh_c.data() + b * H, hp + b * H);
        }
      }
    }
  };
  if (threads == 1 || !run_on_threads(threads, barrier, [&](int thread) { rows_of_thread(thread, threads); }))
    rows_of_thread(0, 1);
  const T* c_final = cells.data() + (steps % 2) * B * H;
  std::copy(c_final, c_final + B * H, c_last.data_ptr<T>());
}

void population_forward(const Tensor& xin, const OptTensor& x_coef, const OptTensor& x_shift,
                        const Tensor& weight_hh, const OptTensor& h_scale, const OptTensor& c_scale,
                        const OptTensor& c_shift, const Tensor& h0, const Tensor& c0, const Tensor& hs,
                        const Tensor& c_last, at::TensorList packed_hh) {
  check_cpu_contiguous({{&xin, "xin"}, {&weight_hh, "weight_hh"}, {&h0, "h0"}, {&c0, "c0"}, {&hs, "hs"},
                        {&c_last, "c_last"}});
  for (const OptTensor* t : {&x_coef, &x_shift, &h_scale, &c_scale, &c_shift})
    if (t->has_value()) check_cpu_contiguous({{&**t, "population scale/shift"}});
  const int64_t steps = xin.size(0), G = weight_hh.size(0);
  TORCH_CHECK(x_coef.has_value() == x_shift.has_value(), "bnrnn_cpu: a narrow input needs x_coef and x_shift");
  if (x_coef.has_value()) {
    TORCH_CHECK(x_coef->sizes() == at::IntArrayRef({steps, xin.size(2), G}) &&
                    x_shift->sizes() == at::IntArrayRef({steps, G}),
                "bnrnn_cpu: x_coef (T, I, G) and x_shift (T, G) expected");
  } else {
    TORCH_CHECK(xin.size(2) == G, "bnrnn_cpu: xin (T, B, 4H) expected");
  }
  AT_DISPATCH_FLOATING_TYPES(xin.scalar_type(), "bnrnn_population_forward", [&] {
    population_loop<scalar_t>(xin, x_coef, x_shift, RecurrentProduct(weight_hh, packed_hh, Products::forward),
                              h_scale, c_scale, c_shift, h0, c0, hs, c_last);
  });
}

// ---- backward ------------------------------------------------------------------------------

// The gradients of one backward step (B, 4H) each: dL/d(pre-activations), dL/d(W_h h_{t-1})
// and dL/d(W_x x_t); dwh and dax are dgates itself where their norm is off.
template <typename T>
struct StepGradients {
  T *dgates, *dwh, *dax;  // (B, G) each
};

// Runs first() on one of torch's threads and second(part, parts), for part = 0 .. parts - 1,
// on each of the others, all at the same time (one after the other, parts = 1, with one
// thread). With the batch in one part (below 16 rows), the backward runs a step's loops
// beside the previous step's weight-gradient GEMMs, which nothing on the recurrence's path
// waits for: otherwise the other threads idle through the loops, and the loops wait through
// the GEMMs. One parallel region a step, as many as the GEMM's own it replaces; inside it
// torch's ops, and MKL's GEMM, run single-threaded on the calling thread.
template <typename First, typename Second>
void beside(First&& first, Second&& second) {
#ifdef _OPENMP
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
#else
  const int64_t threads = 1;  // at::parallel_for's region is OpenMP, compiled in here
#endif
  if (threads < 2) {
    first();
    second(0, 1);
    return;
  }
  // The caller's thread-local state (grad mode off in a backward, dispatch keys) for the
  // torch ops on the other threads.
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t k = begin; k < end; ++k) {
      if (k == 0)
        first();
      else
        second(k - 1, threads - 1);
    }
  });
}

// Writes a gradient summed over time (double accumulators) into its output, if any.
template <typename T>
void store(const std::vector<double>& total, const OptTensor& out) {
  if (!out.has_value()) return;
  T* p = out->data_ptr<T>();
  for (size_t f = 0; f < total.size(); ++f) p[f] = static_cast<T>(total[f]);
}

// What one part of the batch's rows sums on its own, so that results do not depend on how
// the parts are spread over threads: one step's column sums (two sets, by the step's parity:
// a thread may start step t - 1 while another still reads step t's), and totals over time.
template <typename T>
struct BackwardPart {
  BackwardPart(int64_t G, int64_t H, int64_t step_width)
      : step_g{std::vector<T>(step_width), std::vector<T>(step_width)},
        step_c{std::vector<T>(2 * H), std::vector<T>(2 * H)}, d_bias(G, 0.0), d_gamma_h(G, 0.0), d_gamma_x(G, 0.0),
        d_gamma_c(H, 0.0), d_beta_c(H, 0.0) {}
  // over the step's dgates: [sum dy | sum dy xhat for each norm behind it | D = dy^T x_t];
  // over dL/d(BN_c(c)): [sum | sum times xhat_c]
  std::array<std::vector<T>, 2> step_g, step_c;
  std::vector<double> d_bias, d_gamma_h, d_gamma_x, d_gamma_c, d_beta_c;
  std::vector<double> d_weight_ih;  // a narrow input's dW_x without BN_x, (G, I)
  Tensor gw_hh, gw_ih;              // this part's dW_h (G, H) and a wide input's dW_x (G, I)
};

// The backward's arguments and what its threads share.
template <typename T>
struct BackwardShared {
  const Tensor &grad_hs, &x, &weight_ih, &h0, &hs, &cs, &sig, &tanh_c, &grad_h0;
  const OptTensor &wh, &grad_x, &dwh_steps;
  const RecurrentProduct& recurrent;
  const Norm<T>&nx, &nh, &nc;
  int64_t steps, B, H, G;
  const T* c0_data;                     // c_0 (B, H)
  const T* wide;                        // wx (T, B, G), or null
  std::optional<NarrowInput<T>> narrow;  // without wx
  int norms;                            // behind dgates: BN_h, and BN_x of a wide input
  int parts, threads;
  bool per_step_gemms;  // a weight gradient GEMM each step: dW_h without dwh_steps, a wide dW_x
  // Whether each part accumulates those into its own buffers, summed at the end: with the
  // rows in parts, not with products by halves (each half's thread then takes its features
  // over every row, into part 0's, the outputs themselves) nor with one part.
  bool parts_accumulate;
  std::array<Tensor, 2> dgates_slots, dwh_slots, dax_slots;  // step t's in slot t % 2
  Tensor dh;                                                 // dL/dh_t (B, H), then dL/dh_{t-1}
  OptTensor dh_partial;  // (B, H): the second half of dL/dh_{t-1}'s sum (backward_by_sum_halves)
  std::vector<T> dc_next, dcn, dc_buffer;                    // (B, H) each
  std::vector<BackwardPart<T>> part;
  std::vector<double> narrow_d_weight, narrow_d_gamma;  // a narrow input's with BN_x (G, I), (G)
  SpinBarrier barrier;
  GemmKernel kernel;  // of the per-step dW_h (the recurrent products: see RecurrentProduct)
  const Tensor& grad_weight_hh;
  int64_t ring, chunk;  // dwh_steps' slots, and the steps of a chunk (see chunk_weight_gradient)
#if SMALL_GEMM_AVAILABLE
  std::vector<small_gemm::PackedB> chunk_h;  // each thread's packed rows of h for its chunk GEMMs
#endif

  BackwardShared(const Tensor& grad_hs, const Tensor& grad_c_last, const Tensor& x, const OptTensor& wx,
                 const Tensor& weight_ih, const RecurrentProduct& recurrent, const Norm<T>& nx, const Norm<T>& nh,
                 const Norm<T>& nc, const Tensor& h0, const Tensor& c0, const Tensor& hs, const Tensor& cs,
                 const Tensor& sig, const Tensor& tanh_c, const OptTensor& wh, const OptTensor& grad_x,
                 const Tensor& grad_weight_ih, const Tensor& grad_weight_hh, const Tensor& grad_h0,
                 const OptTensor& dwh_steps, int parts, int threads)
      : grad_hs(grad_hs), x(x), weight_ih(weight_ih), h0(h0), hs(hs), cs(cs), sig(sig), tanh_c(tanh_c),
        grad_h0(grad_h0), wh(wh), grad_x(grad_x), dwh_steps(dwh_steps), recurrent(recurrent), nx(nx), nh(nh),
        nc(nc), steps(cs.size(0)), B(cs.size(1)), H(cs.size(2)), G(4 * cs.size(2)), c0_data(c0.data_ptr<T>()),
        wide(data_or_null<T>(wx)), norms(int(nh.on()) + int(nx.on() && wide)), parts(parts), threads(threads),
        per_step_gemms(!dwh_steps.has_value() || wide),
        dc_next(grad_c_last.data_ptr<T>(), grad_c_last.data_ptr<T>() + B * H),
        dcn(B * H), dc_buffer(B * H), barrier(threads),
        kernel(recurrent.kernel_in_use()), grad_weight_hh(grad_weight_hh),
        ring(dwh_steps.has_value() ? dwh_steps->size(0) : 0), chunk(ring >= steps ? steps : ring / 2) {
    TORCH_CHECK(!dwh_steps.has_value() || ring >= std::min<int64_t>(steps, 2), "bnrnn_cpu: dwh_steps too short");
#if SMALL_GEMM_AVAILABLE
    if (dwh_steps.has_value()) chunk_h.resize(threads);
#endif
    if (!wide) narrow.emplace(x, weight_ih, std::nullopt);  // (b is BN_x's beta here, not needed)
    if (narrow && nx.on()) {
      narrow_d_weight.assign(G * narrow->I, 0.0);
      narrow_d_gamma.assign(G, 0.0);
    }
    const auto step_buffers = [&](bool needed) {
      std::array<Tensor, 2> slots;
      if (needed)
        for (Tensor& slot : slots) slot = at::empty({B, G}, cs.options());
      return slots;
    };
    dgates_slots = step_buffers(nh.on() || !dwh_steps.has_value());
    dwh_slots = step_buffers(nh.on() && !dwh_steps.has_value());
    dax_slots = step_buffers(nx.on() && wide);
    dh = grad_hs[steps - 1].clone();
    parts_accumulate = parts > 1 && !recurrent.by_halves();
    if (recurrent.backward_by_sum_halves()) dh_partial = at::empty({B, H}, cs.options());
    const int64_t I = narrow ? narrow->I : 0;
    part.assign(parts, BackwardPart<T>(G, H, G * (1 + norms) + I * G));
    for (int k = 0; k < parts; ++k) {
      BackwardPart<T>& p = part[k];
      if (narrow && !nx.on()) p.d_weight_ih.assign(G * I, 0.0);
      // part 0 accumulates into the outputs; with parts_accumulate each part into its own,
      // summed at the end (only those the steps accumulate: not dW_h when it is one GEMM per
      // chunk of steps, 16 MB each at PTB, nor a narrow input's dW_x, which sums in double)
      const auto accumulator = [&](const Tensor& out) {
        if (!parts_accumulate && k > 0) return Tensor();
        Tensor acc = parts_accumulate ? at::empty_like(out) : out;
        return acc.zero_();
      };
      if (!dwh_steps.has_value()) p.gw_hh = accumulator(grad_weight_hh);
      if (wide) p.gw_ih = accumulator(grad_weight_ih);
    }
  }

  int64_t first_row(int k) const { return B * k / parts; }
  StepGradients<T> gradients_of_step(int64_t t) const {
    StepGradients<T> g;
    const auto slot = [t](const std::array<Tensor, 2>& slots) { return slots[t % 2].template data_ptr<T>(); };
    g.dwh = dwh_steps.has_value() ? dwh_steps->template data_ptr<T>() + ring_slot(t) * B * G
            : nh.on()             ? slot(dwh_slots)
                                  : slot(dgates_slots);
    g.dgates = nh.on() ? slot(dgates_slots) : g.dwh;  // without BN_h, dL/d(W_h h) = dgates
    g.dax = nx.on() && wide ? slot(dax_slots) : g.dgates;
    return g;
  }
  // The GEMMs of step t's weight gradients over rows [r0, r0 + rows) of the batch, into part
  // p's accumulators, in block `block` of `blocks` of their rows: dW_h += dwh^T h_{t-1} (step
  // by step), and for a wide input dW_x += dax^T x_t and dL/dx_t = dax W_x.
  void weight_gradients(int64_t t, const StepGradients<T>& g, BackwardPart<T>& p, int64_t r0, int64_t rows,
                        int64_t block, int64_t blocks) const {
    const int64_t f0 = G * block / blocks, width = G * (block + 1) / blocks - f0;
    const T* h_prev = t > 0 ? hs.template data_ptr<T>() + (t - 1) * B * H : h0.template data_ptr<T>();
    if (!dwh_steps.has_value())  // dwh^T read in place
      any_gemm<T>(kernel, width, H, rows, g.dwh + r0 * G + f0, 1, G, h_prev + r0 * H, H, T(1),
                  p.gw_hh.template data_ptr<T>() + f0 * H, H);
    if (!wide) return;
    const int64_t I = x.size(2), b0 = r0 + rows * block / blocks, batch = r0 + rows * (block + 1) / blocks - b0;
    any_gemm<T>(kernel, width, I, rows, g.dax + r0 * G + f0, 1, G, x.template data_ptr<T>() + (t * B + r0) * I, I,
                T(1), p.gw_ih.template data_ptr<T>() + f0 * I, I);
    if (grad_x.has_value())
      any_gemm<T>(kernel, batch, I, G, g.dax + b0 * G, G, 1, weight_ih.template data_ptr<T>(), I, T(0),
                  grad_x->template data_ptr<T>() + (t * B + b0) * I, I);
  }
  // With dwh_steps, a ring of `ring` steps' dL/d(W_h h): dW_h += sum_s dwh_s^T h_{s-1} over the
  // chunk of steps s in [t, t + chunk) (h_{-1} = h0) once the backward has reached t (a
  // multiple of chunk), for rows [G k / threads, G (k + 1) / threads) of dW_h on thread k: one
  // GEMM over chunk * B rows while they are still in cache (cuDNN's one GEMM over the
  // sequence, in pieces). Each row of dW_h sums in the same order on any thread count.
  // Step t's slot: chunks alternate between the ring's two halves, so that a thread may write
  // the next chunk while another still reads this one (the whole sequence where it fits).
  int64_t ring_slot(int64_t t) const { return ((t / chunk) % 2) * chunk + t % chunk; }
  void chunk_weight_gradient(int64_t t, int thread) {
    const int64_t n = std::min(chunk, steps - t), f0 = G * thread / threads, f1 = G * (thread + 1) / threads;
    const T* d = dwh_steps->template data_ptr<T>() + ring_slot(t) * B * G + f0;
    T* out = grad_weight_hh.template data_ptr<T>() + f0 * H;
    const T beta = t + chunk >= steps ? T(0) : T(1);  // the first chunk the backward meets
    const int64_t first = t > 0 ? 0 : 1;  // steps of the chunk whose h_{s-1} is h0
    if (first) any_gemm<T>(kernel, f1 - f0, H, B, d, 1, G, h0.template data_ptr<T>(), H, beta, out, H);
    if (n <= first) return;
    const int64_t K = (n - first) * B;
    const T* h_rows = hs.template data_ptr<T>() + (t + first - 1) * B * H;
    const T* a = d + first * B * G;
#if SMALL_GEMM_AVAILABLE
    if constexpr (std::is_same_v<T, float>) {
      if (kernel == GemmKernel::own) {
        // B, the chunk's rows of h (4 KB apart at PTB), packed into panels first: the
        // chunk GEMMs took 0.93-0.97x of their time on the rows in place, packing included
        small_gemm::PackedB& packed = chunk_h[thread];
        packed.assign(K, H, h_rows, H);
        small_gemm::gemm(f1 - f0, a, 1, G, packed, first ? T(1) : beta, out, H);
        return;
      }
    }
#endif
    any_gemm<T>(kernel, f1 - f0, H, K, a, 1, G, h_rows, H, first ? T(1) : beta, out, H);
  }
  // The loss's own gradient of h_t (B, H), null before the first step (h0's).
  const T* loss_gradient_of_h(int64_t t) const {
    return t >= 0 ? grad_hs.template data_ptr<T>() + t * B * H : nullptr;
  }
  // dL/dh_{t-1} = dwh W_h (+ the loss's own gradient of h_{t-1}) for rows [r0, r0 + rows);
  // at t = 0 into grad_h0.
  void hidden_gradient(int64_t t, const StepGradients<T>& g, int64_t r0, int64_t rows) const {
    recurrent.template backward_rows<T>(g.dwh, r0, rows, loss_gradient_of_h(t - 1), hidden_gradient_out(t));
  }
  // The same for every row, half `half` of the product (see RecurrentProduct::backward_half):
  // a column half of dL/dh_{t-1}, or a half of its sum over G, the second into dh_partial
  // (then added by add_partial_hidden_gradient).
  void hidden_gradient_half(int64_t t, const StepGradients<T>& g, int half) const {
    recurrent.template backward_half<T>(g.dwh, B, half, loss_gradient_of_h(t - 1), hidden_gradient_out(t),
                                        data_or_null<T>(dh_partial));
  }
  // Rows [b0, b1) of dL/dh_{t-1} += the second half of its sum, once both halves are formed.
  void add_partial_hidden_gradient(int64_t t, int64_t b0, int64_t b1) const {
    const T* partial = dh_partial->template data_ptr<T>();
    T* out = hidden_gradient_out(t);
    for (int64_t b = b0; b < b1; ++b) add_row<T>(H, partial + b * H, out + b * H);
  }
  // Where step t's dL/dh_{t-1} goes: dh, or grad_h0 at t = 0.
  T* hidden_gradient_out(int64_t t) const {
    return t > 0 ? dh.template data_ptr<T>() : grad_h0.template data_ptr<T>();
  }
};

// The backward recurrence on thread `thread` of sh.threads, for its share of the parts of
// the batch's rows (as in the forward). Each step a part takes its rows through the cell and
// the norms; a norm's input gradient needs the whole batch's column sums, so the threads
// meet after BN_c's sums and after those behind dgates (not at all for a vanilla LSTM).
// Then each part's rows of the weight gradients and of dL/dh_{t-1}, one GEMM each. Thread
// 0 accumulates what comes from the whole batch's sums (a narrow input's dW_x with BN_x).
// Returns false if another thread failed.
template <typename T>
bool backward_rows(BackwardShared<T>& sh, int thread) {
  const int64_t B = sh.B, H = sh.H, G = sh.G;
  const int p0 = sh.parts * thread / sh.threads, p1 = sh.parts * (thread + 1) / sh.threads;
  const int64_t b0 = sh.first_row(p0), b1 = sh.first_row(p1);
  const bool meet = sh.threads > 1;
  // this thread's share of the features of a narrow input's dW_x with BN_x
  const int64_t g0 = G * thread / sh.threads, g1 = G * (thread + 1) / sh.threads;
  const Norm<T>&nx = sh.nx, &nh = sh.nh, &nc = sh.nc;
  std::optional<NarrowInput<T>> narrow;  // this thread's own (it holds the step's moments)
  if (sh.narrow) narrow.emplace(*sh.narrow);
  std::optional<NarrowInputGradient<T>> narrow_grad;
  if (narrow) narrow_grad.emplace(*narrow);
  NormBackward<T> bx(G), bh(G), bc(H);
  NormBackward<T>* norms[2];
  std::vector<double>* norm_totals[2][BATCH_PARTS];  // d_gamma of norms[k], by part
  const int64_t I = narrow ? narrow->I : 0, width_g = G * (1 + sh.norms) + I * G;
  std::vector<T> sums_g(width_g), sums_c(2 * H);  // the whole batch's, this step
  const bool combine_g = sh.norms > 0 || (narrow && nx.on());
  // Gates not kept (sig holds one step, GATES): this thread's rows of step t's
  // pre-activations formed again from W_h h_{t-1} (wh) and the input term, with the maps
  // from the stored statistics (a narrow input's recomputed from x_t as the forward did),
  // then activated: the same values the forward computed.
  const bool recompute_gates = sh.sig.size(0) < sh.steps;
  Affine<T> ax(G), ah(G);
  PreActivationRows<T> pre;
  const auto gates_of_step = [&](int64_t t) -> T* {
    T* s = sh.sig.template data_ptr<T>();
    if (!recompute_gates) return s + t * B * G;
    const T* wide_x = sh.wide ? sh.wide + t * B * G : nullptr;
    if (wide_x) nx.affine_at(t, ax);
    if (narrow && nx.on()) narrow->normalise(t, nx, false);
    nh.affine_at(t, ah);
    pre.begin(G, wide_x, narrow ? &*narrow : nullptr, t, ax, ah, true);
    const T* p = sh.wh->template data_ptr<T>() + t * B * G;
    for (int64_t b = b0; b < b1; ++b) {
      pre.row(b, p + b * G, s + b * G);
      activate_row<T>(H, s + b * G);
    }
    return s;
  };
  T* const dcn = sh.dcn.data();
  for (int64_t t = sh.steps - 1; t >= 0; --t) {
    const StepGradients<T> g = sh.gradients_of_step(t);
    const int64_t slot = t % 2;
    // Step t from dh = dL/dh_t to its gradients g, for rows [b0, b1); false if aborted.
    const auto step_backward = [&]() -> bool {
      T* dg = g.dgates;
      const T* s = gates_of_step(t);
      const T* tc = sh.tanh_c.template data_ptr<T>() + t * B * H;
      const T* c = sh.cs.template data_ptr<T>() + t * B * H;
      const T* c_prev = t > 0 ? c - B * H : sh.c0_data;
      const T* dhp = sh.dh.template data_ptr<T>();
      for (int64_t b = b0; b < b1; ++b)
        hidden_row_backward<T>(H, dhp + b * H, tc + b * H, s + b * G + 3 * H, dg + b * G + 3 * H, dcn + b * H);
      // Through BN_c into dL/dc.
      const T* dc = dcn;
      if (nc.on()) {
        bc.begin(c, nc.mean_at(t), nc.invstd_at(t), nc.gamma, sh.dc_buffer.data());
        for (int k = p0; k < p1; ++k) {
          BackwardPart<T>& p = sh.part[k];
          T* acc = p.step_c[slot].data();
          std::fill(acc, acc + 2 * H, T(0));
          for (int64_t b = sh.first_row(k); b < sh.first_row(k + 1); ++b) {
            add_row<T>(H, dcn + b * H, acc);
            bc.add_row(H, b, dcn, acc + H);
          }
          for (int64_t j = 0; j < H; ++j) {
            p.d_beta_c[j] += acc[j];
            p.d_gamma_c[j] += acc[H + j];
          }
        }
        if (meet && !sh.barrier.wait()) return false;
        std::fill(sums_c.begin(), sums_c.end(), T(0));
        for (int k = 0; k < sh.parts; ++k) add_row<T>(2 * H, sh.part[k].step_c[slot].data(), sums_c.data());
        bc.finish(B, H, sums_c.data(), sums_c.data() + H);
        for (int64_t b = b0; b < b1; ++b) bc.input_gradient_row(H, b, dcn);
        dc = sh.dc_buffer.data();
      }
      for (int64_t b = b0; b < b1; ++b) {
        cell_row_backward<T>(H, s + b * G, c_prev + b * H, dc + b * H, sh.dc_next.data() + b * H, dg + b * G);
      }
      // Through BN_h and BN_x, sharing the passes over dgates; d b = sum_b dgates either way
      // (b is BN_x's beta, or is added to the pre-activation directly).
      int count = 0;
      if (nh.on()) {
        bh.begin(sh.wh->template data_ptr<T>() + t * B * G, nh.mean_at(t), nh.invstd_at(t), nh.gamma,
                 g.dwh);
        for (int k = 0; k < sh.parts; ++k) norm_totals[count][k] = &sh.part[k].d_gamma_h;
        norms[count++] = &bh;
      }
      if (nx.on() && sh.wide) {
        bx.begin(sh.wide + t * B * G, nx.mean_at(t), nx.invstd_at(t), nx.gamma, g.dax);
        for (int k = 0; k < sh.parts; ++k) norm_totals[count][k] = &sh.part[k].d_gamma_x;
        norms[count++] = &bx;
      }
      if (narrow) narrow_grad->begin(t, nx.on());
      for (int k = p0; k < p1; ++k) {
        BackwardPart<T>& p = sh.part[k];
        T* acc = p.step_g[slot].data();
        std::fill(acc, acc + width_g, T(0));
        for (int64_t b = sh.first_row(k); b < sh.first_row(k + 1); ++b) {
          add_row<T>(G, dg + b * G, acc);
          for (int n = 0; n < count; ++n) norms[n]->add_row(G, b, dg, acc + G * (1 + n));
          if (narrow) narrow_grad->add_row(b, dg + b * G, acc + G * (1 + count));
        }
        for (int64_t f = 0; f < G; ++f) p.d_bias[f] += acc[f];
        for (int n = 0; n < count; ++n)
          for (int64_t f = 0; f < G; ++f) (*norm_totals[n][k])[f] += acc[G * (1 + n) + f];
        if (narrow && !nx.on())
          for (int64_t f = 0; f < G; ++f)
            for (int64_t i = 0; i < I; ++i) p.d_weight_ih[f * I + i] += acc[G * (1 + count) + i * G + f];
      }
      if (combine_g) {
        if (meet && !sh.barrier.wait()) return false;
        std::fill(sums_g.begin(), sums_g.end(), T(0));
        for (int k = 0; k < sh.parts; ++k) add_row<T>(width_g, sh.part[k].step_g[slot].data(), sums_g.data());
        for (int n = 0; n < count; ++n) norms[n]->finish(B, G, sums_g.data(), sums_g.data() + G * (1 + n));
        if (narrow && nx.on())
          narrow_grad->finish(t, nx, sums_g.data() + G * (1 + count), sums_g.data(), g0, g1);
        for (int64_t b = b0; b < b1; ++b)
          for (int n = 0; n < count; ++n) norms[n]->input_gradient_row(G, b, dg);
      }
      if (narrow && sh.grad_x.has_value())
        narrow_grad->input_gradient(dg, nx.on(), sums_g.data(), b0, b1,
                                    sh.grad_x->template data_ptr<T>() + t * B * I);
      return true;
    };
    const bool overlap = sh.parts == 1 && sh.per_step_gemms && t + 1 < sh.steps;
    if (overlap && meet) {
      // one part on two threads (few rows, W_h^T packed in halves): the thread without rows
      // takes the previous step's weight GEMMs while the other runs the loops
      if (p0 == p1) sh.weight_gradients(t + 1, sh.gradients_of_step(t + 1), sh.part[0], 0, B, 0, 1);
      if (!step_backward()) return false;
    } else if (overlap) {
      // one part: the loops beside the previous step's weight GEMMs
      const StepGradients<T> later = sh.gradients_of_step(t + 1);
      beside([&] { step_backward(); },
             [&](int64_t block, int64_t blocks) {
               sh.weight_gradients(t + 1, later, sh.part[0], 0, B, block, blocks);
             });
    } else if (!step_backward()) {
      return false;
    }
    const bool by_halves = sh.recurrent.by_halves();
    // Step t's per-step weight GEMMs (a wide input's dW_x; dW_h without dwh_steps): each
    // part's rows, or with products by halves, once every row is written, half of the
    // features of each on each half's thread. (That dW_x (G, I) accumulates in one (G / 2, I)
    // block a thread from all B rows at once instead of in all of G from its own rows, in
    // cache: at PTB's shape 0.95x the backward's time in these GEMMs.)
    const bool weight_gemms = sh.parts > 1 && sh.per_step_gemms;
    for (int k = p0; k < p1; ++k) {
      const int64_t r0 = sh.first_row(k), rows = sh.first_row(k + 1) - r0;
      if (weight_gemms && !by_halves) sh.weight_gradients(t, g, sh.part[k], r0, rows, 0, 1);
      if (!by_halves) sh.hidden_gradient(t, g, r0, rows);
    }
    if (by_halves && !product_halves(sh.barrier, thread, sh.threads, true, [&](int half) {
          if (weight_gemms) sh.weight_gradients(t, g, sh.part[0], 0, B, half, 2);
          sh.hidden_gradient_half(t, g, half);
        }))
      return false;
    // each thread adds up the rows it reads next
    if (by_halves && sh.recurrent.backward_by_sum_halves()) sh.add_partial_hidden_gradient(t, b0, b1);
    if (sh.ring && t % sh.chunk == 0) {
      // every row of the chunk's dwh written (products by halves: the threads met above)
      if (!by_halves && meet && !sh.barrier.wait()) return false;
      sh.chunk_weight_gradient(t, thread);
    }
  }
  if (sh.parts == 1 && sh.per_step_gemms && p0 < p1) sh.weight_gradients(0, sh.gradients_of_step(0), sh.part[0], 0, B, 0, 1);
  if (narrow && nx.on()) narrow_grad->store_totals(g0, g1, sh.narrow_d_weight, sh.narrow_d_gamma);
  return true;
}

template <typename T>
void backward_loop(const Tensor& grad_hs, const Tensor& grad_c_last, const Tensor& x, const OptTensor& wx,
                   const Tensor& weight_ih, const RecurrentProduct& recurrent, const Norm<T>& nx, const Norm<T>& nh,
                   const Norm<T>& nc, const Tensor& h0, const Tensor& c0, const Tensor& hs, const Tensor& cs,
                   const Tensor& sig, const Tensor& tanh_c, const OptTensor& wh, const OptTensor& grad_x,
                   const Tensor& grad_weight_ih, const Tensor& grad_bias, const Tensor& grad_weight_hh,
                   const Tensor& grad_h0, const Tensor& grad_c0, const OptTensor& grad_gamma_x,
                   const OptTensor& grad_gamma_h, const OptTensor& grad_gamma_c, const OptTensor& grad_beta_c,
                   const OptTensor& dwh_steps) {
  const auto [parts, threads] = parts_and_threads(cs.size(1), recurrent);
  BackwardShared<T> sh(grad_hs, grad_c_last, x, wx, weight_ih, recurrent, nx, nh, nc, h0, c0, hs, cs, sig, tanh_c, wh,
                       grad_x, grad_weight_ih, grad_weight_hh, grad_h0, dwh_steps, parts, threads);
  if (threads == 1 || !run_on_threads(threads, sh.barrier, [&](int thread) { backward_rows<T>(sh, thread); })) {
    sh.threads = 1;
    backward_rows<T>(sh, 0);
  }
  const int64_t steps = sh.steps, B = sh.B, H = sh.H, G = sh.G;
  if (sh.parts_accumulate) {  // the parts' weight gradients, in order
    const auto sum_parts = [&](Tensor BackwardPart<T>::*member, const Tensor& out) {
      if (!(sh.part[0].*member).defined()) return;
      Tensor total = out;  // a handle on the output
      total.copy_(sh.part[0].*member);
      for (int k = 1; k < parts; ++k) total.add_(sh.part[k].*member);
    };
    sum_parts(&BackwardPart<T>::gw_hh, grad_weight_hh);
    sum_parts(&BackwardPart<T>::gw_ih, grad_weight_ih);
  }
  std::copy(sh.dc_next.begin(), sh.dc_next.end(), grad_c0.data_ptr<T>());
  const auto total = [&](std::vector<double> BackwardPart<T>::*member) {
    std::vector<double> sum = sh.part[0].*member;
    for (int k = 1; k < parts; ++k)
      for (size_t f = 0; f < sum.size(); ++f) sum[f] += (sh.part[k].*member)[f];
    return sum;
  };
  store<T>(total(&BackwardPart<T>::d_bias), grad_bias);
  if (sh.narrow) store<T>(nx.on() ? sh.narrow_d_weight : total(&BackwardPart<T>::d_weight_ih), grad_weight_ih);
  if (nx.on()) store<T>(sh.narrow ? sh.narrow_d_gamma : total(&BackwardPart<T>::d_gamma_x), grad_gamma_x);
  if (nh.on()) store<T>(total(&BackwardPart<T>::d_gamma_h), grad_gamma_h);
  if (nc.on()) store<T>(total(&BackwardPart<T>::d_gamma_c), grad_gamma_c);
  if (nc.on()) store<T>(total(&BackwardPart<T>::d_beta_c), grad_beta_c);
}

void recurrence_backward(const Tensor& grad_hs, const Tensor& grad_c_last, const Tensor& x, const OptTensor& wx,
                         const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& gamma_x,
                         const OptTensor& gamma_h, const OptTensor& gamma_c, const OptTensor& beta_x, double eps_x,
                         const Tensor& h0, const Tensor& c0, const Tensor& hs, const Tensor& cs, const Tensor& sig,
                         const Tensor& tanh_c, const OptTensor& wh, const OptTensor& mean_x, const OptTensor& invstd_x,
                         const OptTensor& mean_h, const OptTensor& invstd_h, const OptTensor& mean_c,
                         const OptTensor& invstd_c, const OptTensor& grad_x, const Tensor& grad_weight_ih,
                         const Tensor& grad_bias, const Tensor& grad_weight_hh, const Tensor& grad_h0,
                         const Tensor& grad_c0, const OptTensor& grad_gamma_x, const OptTensor& grad_gamma_h,
                         const OptTensor& grad_gamma_c, const OptTensor& grad_beta_c, at::TensorList packed_hh_t,
                         const OptTensor& dwh_steps) {
  TORCH_CHECK(sig.size(0) == cs.size(0) || (sig.size(0) == 1 && gamma_h.has_value() && wh.has_value() &&
                                             (wx.has_value() || gamma_x.has_value())),
              "bnrnn_cpu: sig holds every step, or one step where the backward can form the gates again (BN_h, "
              "and a wide input or BN_x)");
  check_cpu_contiguous({{&grad_hs, "grad_hs"}, {&grad_c_last, "grad_c_last"}, {&x, "x"}, {&weight_hh, "weight_hh"},
                        {&h0, "h0"}, {&c0, "c0"}, {&hs, "hs"}, {&cs, "cs"}, {&sig, "sig"}, {&tanh_c, "tanh_c"},
                        {&grad_weight_ih, "grad_weight_ih"}, {&grad_weight_hh, "grad_weight_hh"},
                        {&grad_h0, "grad_h0"}, {&grad_c0, "grad_c0"}});
  if (grad_x.has_value()) check_cpu_contiguous({{&*grad_x, "grad_x"}});
  if (wx.has_value()) check_cpu_contiguous({{&*wx, "wx"}});
  if (dwh_steps.has_value()) check_cpu_contiguous({{&*dwh_steps, "dwh_steps"}});
  TORCH_CHECK(!gamma_h.has_value() || wh.has_value(), "bnrnn_cpu: BN_h needs the wh buffer");
  const int64_t H = cs.size(2), G = 4 * H;
  AT_DISPATCH_FLOATING_TYPES(cs.scalar_type(), "bnrnn_recurrence_backward", [&] {
    backward_loop<scalar_t>(grad_hs, grad_c_last, x, wx, weight_ih,
                            RecurrentProduct(weight_hh, packed_hh_t, Products::backward),
                            make_norm<scalar_t>(gamma_x, beta_x, eps_x, mean_x, invstd_x, G),
                            make_norm<scalar_t>(gamma_h, std::nullopt, 0.0, mean_h, invstd_h, G),
                            make_norm<scalar_t>(gamma_c, std::nullopt, 0.0, mean_c, invstd_c, H), h0, c0, hs, cs,
                            sig, tanh_c, wh, grad_x, grad_weight_ih, grad_bias, grad_weight_hh, grad_h0, grad_c0,
                            grad_gamma_x, grad_gamma_h, grad_gamma_c, grad_beta_c, dwh_steps);
  });
}

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
// turned off by BNRNN_SMALL_GEMM=0 or BNRNN_DIRECT_BLAS=0); cpu_recurrence.py packs no
// weights for oneDNN then.
bool own_gemm() { return gemm_kernel<float>() == GemmKernel::own; }

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
