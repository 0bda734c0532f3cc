// input_term.h: the input term W_x x_t of a narrow input (seqMNIST's one pixel)
// formed inside the loops, its batch statistics from x's covariance, and its gradient.
//
// Part of the cpu backend's compiled loops; recurrence_cpu.cpp includes every part in one
// translation unit and registers the ops. Design notes and measurements: docs/performance.md.

#pragma once

#include "recurrent_product.h"

namespace {

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
  // between the threads' first meeting and the gates, where a loop per feature over its I
  // inputs was slow: docs/performance.md): mean = W_x mu and var_f = sum_ij w_fi C_ij w_fj.
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

}  // namespace
