// The CPU recurrence of the fused BN-LSTM as two compiled loops (forward, backward).
//
// Same function as the ATen loop of bnrnn/nn/fused.py, which stays the readable fallback.
// At the paper's seqMNIST size (B=64, H=100) a time step is a few dozen small ops; from
// Python each costs microseconds of dispatch and a pass over memory. Here everything but the
// recurrent GEMM is a handful of loops per step over contiguous rows: the batch statistics
// (one pass for the sums, one for the squared deviations), then one pass that normalises,
// adds the two terms, applies the activations and updates the cell.
//
// Layout: every (B, F) matrix is row-major and contiguous; gates are [i, f, g, o] blocks of
// H columns each (G = 4H). A norm that is off is the identity map (scale 1, shift 0), so one
// code path serves the four placements. Statistics are per step in the working precision;
// sums over time (the gamma and beta gradients) accumulate in double.
//
// sig (T, B, G) holds the activated gates [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)].

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- activations ---------------------------------------------------------------------------
// float: branch-free polynomial forms the compiler vectorises (a libm call per element would
// not be); relative error below 3e-7 (pinned by tests/test_cpu_kernels.py). NaN propagates.
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

// ---- batch statistics ----------------------------------------------------------------------

// One norm's per-feature affine map for this step: y = x * scale + shift (identity when off).
template <typename T>
struct Affine {
  explicit Affine(int64_t width) : scale(width, T(1)), shift(width, T(0)) {}
  std::vector<T> scale, shift;
};

// Batch statistics of x (B, F): mean and invstd = 1 / sqrt(biased var + eps), written to
// `mean`, `invstd` (F), and the map x -> gamma * (x - mean) * invstd + beta into `affine`.
template <typename T>
void normalise(const T* x, int64_t B, int64_t F, const T* gamma, const T* beta, double eps, T* mean, T* invstd,
               Affine<T>& affine) {
  std::fill(mean, mean + F, T(0));
  for (int64_t b = 0; b < B; ++b) {
    const T* row = x + b * F;
    for (int64_t f = 0; f < F; ++f) mean[f] += row[f];
  }
  const T inv_b = T(1) / static_cast<T>(B);
  for (int64_t f = 0; f < F; ++f) mean[f] *= inv_b;
  // Squared deviations in a second pass: no cancellation when |mean| >> std.
  std::fill(invstd, invstd + F, T(0));
  for (int64_t b = 0; b < B; ++b) {
    const T* row = x + b * F;
    for (int64_t f = 0; f < F; ++f) {
      const T d = row[f] - mean[f];
      invstd[f] += d * d;
    }
  }
  for (int64_t f = 0; f < F; ++f) {
    invstd[f] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(invstd[f] * inv_b) + eps));
    affine.scale[f] = gamma[f] * invstd[f];
    affine.shift[f] = (beta ? beta[f] : T(0)) - mean[f] * affine.scale[f];
  }
}

// The backward of one norm at one step, in two halves so that BN_h and BN_x share the pass
// over their common upstream gradient dy (B, F).
template <typename T>
struct NormBackward {
  explicit NormBackward(int64_t width) : sum_dy_xhat(width), coef(width), proj(width) {}
  std::vector<T> sum_dy_xhat;  // sum_b dy * xhat, this step
  std::vector<T> coef, proj;   // dx = coef * (dy - mean_b dy - (x - mean) * proj)
  std::vector<double> d_gamma_total;

  // After the sums: the per-feature coefficients, and the gamma gradient over time.
  void finish(int64_t B, int64_t F, const T* gamma, const T* invstd) {
    if (d_gamma_total.empty()) d_gamma_total.assign(F, 0.0);
    const T inv_b = T(1) / static_cast<T>(B);
    for (int64_t f = 0; f < F; ++f) {
      d_gamma_total[f] += sum_dy_xhat[f];
      coef[f] = gamma[f] * invstd[f];
      proj[f] = sum_dy_xhat[f] * inv_b * invstd[f];
    }
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

// ---- forward -------------------------------------------------------------------------------

template <typename T>
void forward_loop(const Tensor& wx, const Tensor& weight_hh, const Norm<T>& nx, const Norm<T>& nh, const Norm<T>& nc,
                  const Tensor& h0, const Tensor& c0, const Tensor& hs, const Tensor& cs, const Tensor& sig,
                  const Tensor& tanh_c, const OptTensor& wh) {
  const int64_t steps = wx.size(0), B = wx.size(1), G = wx.size(2), H = G / 4;
  const Tensor w_t = weight_hh.t();
  Affine<T> ax(G), ah(G), ac(H);
  const T* c_prev = c0.data_ptr<T>();
  Tensor h = h0;
  for (int64_t t = 0; t < steps; ++t) {
    const T* x = wx.data_ptr<T>() + t * B * G;
    T* s = sig.data_ptr<T>() + t * B * G;
    T* c = cs.data_ptr<T>() + t * B * H;
    T* tc = tanh_c.data_ptr<T>() + t * B * H;
    if (nx.on()) normalise<T>(x, B, G, nx.gamma, nx.beta, nx.eps, nx.mean_at(t), nx.invstd_at(t), ax);
    // W_h h_{t-1}: kept in wh for BN_h's statistics and backward, else straight into sig.
    Tensor product = nh.on() ? (*wh)[t] : sig[t];
    at::mm_out(product, h, w_t);
    const T* p = product.data_ptr<T>();
    if (nh.on()) normalise<T>(p, B, G, nh.gamma, nullptr, nh.eps, nh.mean_at(t), nh.invstd_at(t), ah);
    const T *sx = ax.scale.data(), *tx = ax.shift.data(), *sh = ah.scale.data(), *th = ah.shift.data();
    for (int64_t b = 0; b < B; ++b) {
      const T* xr = x + b * G;
      const T* pr = p + b * G;
      T* sr = s + b * G;
      for (int64_t f = 0; f < G; ++f) sr[f] = (xr[f] * sx[f] + tx[f]) + (pr[f] * sh[f] + th[f]);
      for (int64_t j = 0; j < 2 * H; ++j) sr[j] = sigmoid(sr[j]);
      for (int64_t j = 2 * H; j < 3 * H; ++j) sr[j] = tanh_approx(sr[j]);
      for (int64_t j = 3 * H; j < G; ++j) sr[j] = sigmoid(sr[j]);
      const T* cp = c_prev + b * H;
      T* cr = c + b * H;
      for (int64_t j = 0; j < H; ++j) cr[j] = sr[H + j] * cp[j] + sr[j] * sr[2 * H + j];
    }
    if (nc.on()) normalise<T>(c, B, H, nc.gamma, nc.beta, nc.eps, nc.mean_at(t), nc.invstd_at(t), ac);
    const T *scl = ac.scale.data(), *sft = ac.shift.data();
    T* hp = hs.data_ptr<T>() + t * B * H;
    for (int64_t b = 0; b < B; ++b) {
      const T* o = s + b * G + 3 * H;
      for (int64_t j = 0; j < H; ++j) {
        const int64_t k = b * H + j;
        tc[k] = tanh_approx(c[k] * scl[j] + sft[j]);
        hp[k] = o[j] * tc[k];
      }
    }
    c_prev = c;
    h = hs[t];
  }
}

void recurrence_forward(const Tensor& wx, const Tensor& weight_hh, const OptTensor& gamma_x, const OptTensor& beta_x,
                        const OptTensor& gamma_h, const OptTensor& gamma_c, const OptTensor& beta_c, const Tensor& h0,
                        const Tensor& c0, double eps_x, double eps_h, double eps_c, const Tensor& hs, const Tensor& cs,
                        const Tensor& sig, const Tensor& tanh_c, const OptTensor& wh, const OptTensor& mean_x,
                        const OptTensor& invstd_x, const OptTensor& mean_h, const OptTensor& invstd_h,
                        const OptTensor& mean_c, const OptTensor& invstd_c) {
  check_cpu_contiguous({{&wx, "wx"}, {&weight_hh, "weight_hh"}, {&h0, "h0"}, {&c0, "c0"}, {&hs, "hs"},
                        {&cs, "cs"}, {&sig, "sig"}, {&tanh_c, "tanh_c"}});
  TORCH_CHECK(!gamma_h.has_value() || wh.has_value(), "bnrnn_cpu: BN_h needs the wh buffer");
  const int64_t G = wx.size(2), H = G / 4;
  AT_DISPATCH_FLOATING_TYPES(wx.scalar_type(), "bnrnn_recurrence_forward", [&] {
    forward_loop<scalar_t>(wx, weight_hh, make_norm<scalar_t>(gamma_x, beta_x, eps_x, mean_x, invstd_x, G),
                           make_norm<scalar_t>(gamma_h, std::nullopt, eps_h, mean_h, invstd_h, G),
                           make_norm<scalar_t>(gamma_c, beta_c, eps_c, mean_c, invstd_c, H), h0, c0, hs, cs, sig,
                           tanh_c, wh);
  });
}

// ---- backward ------------------------------------------------------------------------------

// Writes a gradient summed over time (double accumulators) into its output, if any.
template <typename T>
void store(const std::vector<double>& total, const OptTensor& out) {
  if (!out.has_value()) return;
  T* p = out->data_ptr<T>();
  for (size_t f = 0; f < total.size(); ++f) p[f] = static_cast<T>(total[f]);
}

template <typename T>
void backward_loop(const Tensor& grad_hs, const Tensor& grad_c_last, const Tensor& wx, const Tensor& weight_hh,
                   const Norm<T>& nx, const Norm<T>& nh, const Norm<T>& nc, const Tensor& c0, const Tensor& cs,
                   const Tensor& sig, const Tensor& tanh_c, const OptTensor& wh, const OptTensor& grad_gates,
                   const OptTensor& grad_wh, const OptTensor& grad_wx, const Tensor& grad_h0, const Tensor& grad_c0,
                   const OptTensor& grad_gamma_x, const OptTensor& grad_beta_x, const OptTensor& grad_gamma_h,
                   const OptTensor& grad_gamma_c, const OptTensor& grad_beta_c) {
  const int64_t steps = cs.size(0), B = cs.size(1), H = cs.size(2), G = 4 * H;
  // dL/d(pre-activation) of one step: a slice of grad_gates when the caller needs all of
  // them (a norm is off, so they are dL/d(W_x x) or dL/d(W_h h) too), else a scratch row.
  Tensor gates_scratch = grad_gates.has_value() ? Tensor() : at::empty({B, G}, cs.options());
  Tensor dh = grad_hs[steps - 1].clone();
  Tensor dh0 = grad_h0;  // a handle on the output, for mm_out
  std::vector<T> dc_next(grad_c_last.data_ptr<T>(), grad_c_last.data_ptr<T>() + B * H);
  std::vector<T> dcn(B * H), dc(B * H), sum_dy(G), sum_dcn(H);
  NormBackward<T> bx(G), bh(G), bc(H);
  std::vector<double> d_beta_x(G, 0.0), d_beta_c(H, 0.0);
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T* s = sig.data_ptr<T>() + t * B * G;
    const T* tc = tanh_c.data_ptr<T>() + t * B * H;
    const T* c = cs.data_ptr<T>() + t * B * H;
    const T* c_prev = t > 0 ? c - B * H : c0.data_ptr<T>();
    Tensor dgates_t = grad_gates.has_value() ? (*grad_gates)[t] : gates_scratch;
    T* dg = dgates_t.data_ptr<T>();
    const T* dhp = dh.data_ptr<T>();
    // h = o * tanh(cn): dL/d(pre-activation of o) and dL/dcn.
    for (int64_t b = 0; b < B; ++b) {
      const T* o = s + b * G + 3 * H;
      T* d_o = dg + b * G + 3 * H;
      for (int64_t j = 0; j < H; ++j) {
        const int64_t k = b * H + j;
        d_o[j] = dhp[k] * tc[k] * o[j] * (T(1) - o[j]);
        dcn[k] = dhp[k] * o[j] * (T(1) - tc[k] * tc[k]);
      }
    }
    // Through BN_c into dL/dc (plus the gradient from step t+1).
    if (nc.on()) {
      const T* mean = nc.mean_at(t);
      const T* invstd = nc.invstd_at(t);
      std::fill(sum_dcn.begin(), sum_dcn.end(), T(0));
      std::fill(bc.sum_dy_xhat.begin(), bc.sum_dy_xhat.end(), T(0));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = b * H + j;
          sum_dcn[j] += dcn[k];
          bc.sum_dy_xhat[j] += dcn[k] * ((c[k] - mean[j]) * invstd[j]);
        }
      bc.finish(B, H, nc.gamma, invstd);
      const T inv_b = T(1) / static_cast<T>(B);
      for (int64_t j = 0; j < H; ++j) d_beta_c[j] += sum_dcn[j];
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = b * H + j;
          dc[k] = bc.coef[j] * (dcn[k] - sum_dcn[j] * inv_b - (c[k] - mean[j]) * bc.proj[j]);
        }
    } else {
      std::copy(dcn.begin(), dcn.end(), dc.begin());
    }
    // c = f * c_prev + i * g: the i, f, g pre-activation gradients; dL/dc_{t-1} = dc * f.
    for (int64_t b = 0; b < B; ++b) {
      const T* i = s + b * G;
      const T* f = i + H;
      const T* g = i + 2 * H;
      T* d_i = dg + b * G;
      T* d_f = d_i + H;
      T* d_g = d_i + 2 * H;
      for (int64_t j = 0; j < H; ++j) {
        const int64_t k = b * H + j;
        const T d = dc[k] + dc_next[k];
        d_i[j] = d * g[j] * i[j] * (T(1) - i[j]);
        d_f[j] = d * c_prev[k] * f[j] * (T(1) - f[j]);
        d_g[j] = d * i[j] * (T(1) - g[j] * g[j]);
        dc_next[k] = d * f[j];
      }
    }
    // Through BN_h (into dL/d(W_h h)) and BN_x (into dL/d(W_x x)): one pass for both sums.
    if (nh.on() || nx.on()) {
      const T* xh = nh.on() ? (*wh)[t].data_ptr<T>() : nullptr;
      const T* xx = nx.on() ? wx.data_ptr<T>() + t * B * G : nullptr;
      const T *mh = nh.on() ? nh.mean_at(t) : nullptr, *ih = nh.on() ? nh.invstd_at(t) : nullptr;
      const T *mx = nx.on() ? nx.mean_at(t) : nullptr, *ix = nx.on() ? nx.invstd_at(t) : nullptr;
      std::fill(sum_dy.begin(), sum_dy.end(), T(0));
      std::fill(bh.sum_dy_xhat.begin(), bh.sum_dy_xhat.end(), T(0));
      std::fill(bx.sum_dy_xhat.begin(), bx.sum_dy_xhat.end(), T(0));
      for (int64_t b = 0; b < B; ++b) {
        const T* dy = dg + b * G;
        for (int64_t f = 0; f < G; ++f) sum_dy[f] += dy[f];
        if (xh)
          for (int64_t f = 0; f < G; ++f) bh.sum_dy_xhat[f] += dy[f] * ((xh[b * G + f] - mh[f]) * ih[f]);
        if (xx)
          for (int64_t f = 0; f < G; ++f) bx.sum_dy_xhat[f] += dy[f] * ((xx[b * G + f] - mx[f]) * ix[f]);
      }
      const T inv_b = T(1) / static_cast<T>(B);
      if (xh) {
        bh.finish(B, G, nh.gamma, ih);
        T* out = (*grad_wh)[t].data_ptr<T>();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t f = 0; f < G; ++f) {
            const int64_t k = b * G + f;
            out[k] = bh.coef[f] * (dg[k] - sum_dy[f] * inv_b - (xh[k] - mh[f]) * bh.proj[f]);
          }
      }
      if (xx) {
        bx.finish(B, G, nx.gamma, ix);
        for (int64_t f = 0; f < G; ++f) d_beta_x[f] += sum_dy[f];
        T* out = grad_wx->data_ptr<T>() + t * B * G;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t f = 0; f < G; ++f) {
            const int64_t k = b * G + f;
            out[k] = bx.coef[f] * (dg[k] - sum_dy[f] * inv_b - (xx[k] - mx[f]) * bx.proj[f]);
          }
      }
    }
    // dL/dh_{t-1} = dL/d(W_h h_{t-1}) W_h (+ the loss's own gradient of h_{t-1})
    const Tensor dwh_t = nh.on() ? (*grad_wh)[t] : dgates_t;
    if (t > 0)
      at::addmm_out(dh, grad_hs[t - 1], dwh_t, weight_hh);
    else
      at::mm_out(dh0, dwh_t, weight_hh);
  }
  std::copy(dc_next.begin(), dc_next.end(), grad_c0.data_ptr<T>());
  if (nx.on()) store<T>(bx.d_gamma_total, grad_gamma_x);
  if (nx.on()) store<T>(d_beta_x, grad_beta_x);
  if (nh.on()) store<T>(bh.d_gamma_total, grad_gamma_h);
  if (nc.on()) store<T>(bc.d_gamma_total, grad_gamma_c);
  if (nc.on()) store<T>(d_beta_c, grad_beta_c);
}

void recurrence_backward(const Tensor& grad_hs, const Tensor& grad_c_last, const Tensor& wx, const Tensor& weight_hh,
                         const OptTensor& gamma_x, const OptTensor& gamma_h, const OptTensor& gamma_c, const Tensor& c0,
                         const Tensor& cs, const Tensor& sig, const Tensor& tanh_c, const OptTensor& wh,
                         const OptTensor& mean_x, const OptTensor& invstd_x, const OptTensor& mean_h,
                         const OptTensor& invstd_h, const OptTensor& mean_c, const OptTensor& invstd_c,
                         const OptTensor& grad_gates, const OptTensor& grad_wh, const OptTensor& grad_wx,
                         const Tensor& grad_h0, const Tensor& grad_c0, const OptTensor& grad_gamma_x,
                         const OptTensor& grad_beta_x, const OptTensor& grad_gamma_h, const OptTensor& grad_gamma_c,
                         const OptTensor& grad_beta_c) {
  check_cpu_contiguous({{&grad_hs, "grad_hs"}, {&grad_c_last, "grad_c_last"}, {&wx, "wx"}, {&c0, "c0"},
                        {&cs, "cs"}, {&sig, "sig"}, {&tanh_c, "tanh_c"}, {&grad_h0, "grad_h0"},
                        {&grad_c0, "grad_c0"}});
  TORCH_CHECK(!gamma_h.has_value() || (wh.has_value() && grad_wh.has_value()),
              "bnrnn_cpu: BN_h needs the wh and grad_wh buffers");
  TORCH_CHECK(!gamma_x.has_value() || grad_wx.has_value(), "bnrnn_cpu: BN_x needs the grad_wx buffer");
  TORCH_CHECK((gamma_h.has_value() && gamma_x.has_value()) || grad_gates.has_value(),
              "bnrnn_cpu: without BN_h or BN_x the pre-activation gradients are returned in grad_gates");
  const int64_t H = cs.size(2), G = 4 * H;
  AT_DISPATCH_FLOATING_TYPES(cs.scalar_type(), "bnrnn_recurrence_backward", [&] {
    backward_loop<scalar_t>(grad_hs, grad_c_last, wx, weight_hh,
                            make_norm<scalar_t>(gamma_x, std::nullopt, 0.0, mean_x, invstd_x, G),
                            make_norm<scalar_t>(gamma_h, std::nullopt, 0.0, mean_h, invstd_h, G),
                            make_norm<scalar_t>(gamma_c, std::nullopt, 0.0, mean_c, invstd_c, H), c0, cs, sig, tanh_c,
                            wh, grad_gates, grad_wh, grad_wx, grad_h0, grad_c0, grad_gamma_x, grad_beta_x,
                            grad_gamma_h, grad_gamma_c, grad_beta_c);
  });
}

// The float activations of the loops, exposed for their accuracy tests: (sigmoid, tanh).
std::tuple<Tensor, Tensor> activations(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "bnrnn_cpu.activations: float32 CPU tensor");
  const Tensor in = x.contiguous();
  Tensor sig = at::empty_like(in), th = at::empty_like(in);
  const float* p = in.data_ptr<float>();
  float *ps = sig.data_ptr<float>(), *pt = th.data_ptr<float>();
  for (int64_t k = 0; k < in.numel(); ++k) {
    ps[k] = sigmoid(p[k]);
    pt[k] = tanh_approx(p[k]);
  }
  return {sig, th};
}

}  // namespace

TORCH_LIBRARY(bnrnn_cpu, m) {
  m.def(
      "recurrence_forward(Tensor wx, Tensor weight_hh, Tensor? gamma_x, Tensor? beta_x, Tensor? gamma_h, "
      "Tensor? gamma_c, Tensor? beta_c, Tensor h0, Tensor c0, float eps_x, float eps_h, float eps_c, "
      "Tensor(a!) hs, Tensor(b!) cs, Tensor(c!) sig, Tensor(d!) tanh_c, Tensor(e!)? wh, Tensor(f!)? mean_x, "
      "Tensor(g!)? invstd_x, Tensor(h!)? mean_h, Tensor(i!)? invstd_h, Tensor(j!)? mean_c, Tensor(k!)? invstd_c) -> ()");
  m.def(
      "recurrence_backward(Tensor grad_hs, Tensor grad_c_last, Tensor wx, Tensor weight_hh, Tensor? gamma_x, "
      "Tensor? gamma_h, Tensor? gamma_c, Tensor c0, Tensor cs, Tensor sig, Tensor tanh_c, Tensor? wh, "
      "Tensor? mean_x, Tensor? invstd_x, Tensor? mean_h, Tensor? invstd_h, Tensor? mean_c, Tensor? invstd_c, "
      "Tensor(a!)? grad_gates, Tensor(b!)? grad_wh, Tensor(c!)? grad_wx, Tensor(d!) grad_h0, Tensor(e!) grad_c0, "
      "Tensor(f!)? grad_gamma_x, Tensor(g!)? grad_beta_x, Tensor(h!)? grad_gamma_h, Tensor(i!)? grad_gamma_c, "
      "Tensor(j!)? grad_beta_c) -> ()");
  m.def("activations(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnrnn_cpu, CPU, m) {
  m.impl("recurrence_forward", &recurrence_forward);
  m.impl("recurrence_backward", &recurrence_backward);
  m.impl("activations", &activations);
}
