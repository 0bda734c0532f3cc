// statistics.h: a step's batch statistics and the batch-norm maps, forward and
// backward.
//
// Forward, per feature over the B rows of a step: mean m, biased variance v, invstd
// s = 1 / sqrt(v + eps), xhat = (x - m) s, y = gamma xhat + beta (as one affine map
// y = x * scale + shift). The parts of a batch each sum their rows' moments about a shift
// (the first row), and combine_statistics adds them in a fixed order.
//
// Backward, with dy = dL/dy:
//     dL/dbeta  = sum_b dy
//     dL/dgamma = sum_b dy xhat
//     dL/dx     = gamma s (dy - (sum_b dy) / B - xhat (sum_b dy xhat) / B)
// The two column sums need the whole batch, so the threads meet once per norm and step
// (NormBackward); the last line is norm_input_gradient_row.
//
// Part of the cpu backend's compiled loops; recurrence_cpu.cpp includes every part in one
// translation unit and registers the ops. Design notes and measurements: docs/performance.md.

#pragma once

#include "rows.h"

namespace {

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
  // (docs/performance.md)
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

}  // namespace
