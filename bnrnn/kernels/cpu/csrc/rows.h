// rows.h: the float activations (sigmoid, tanh) and the per-row arithmetic
// of a step: moments, gates, the cell and hidden updates and their gradients.
//
// Part of the cpu backend's compiled loops; recurrence_cpu.cpp includes every part in one
// translation unit and registers the ops. Design notes and measurements: docs/performance.md.

#pragma once

#include "common.h"

namespace {

// ---- activations ---------------------------------------------------------------------------
// float: branch-free polynomial forms the compiler vectorises (a libm call per element would
// not be; GCC needs -fno-trapping-math for their compares, see cpu_extension.MATH_FLAGS);
// relative error below 3e-7 (pinned by tests/test_cpu_extension.py). NaN propagates.
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
// (outputs and gradients bit-identical to the scalar ends'; the gain: docs/performance.md).
// (`noinline`: inlined with its constant length, GCC unrolls the last vector into scalar
// code.)
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

}  // namespace
