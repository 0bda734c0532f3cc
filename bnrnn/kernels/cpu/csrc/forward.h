// forward.h: the forward loop with batch statistics (training), and the
// loop with population statistics folded in (inference).
//
// sig (T, B, G) holds the activated gates [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)], or
// only one step's, (1, B, G), where the caller chooses so (cpu_recurrence.py's
// keeps_one_gate_step): the forward then writes each step's gates over the last's, and the
// backward forms them again, the same values, from wh and the input term (backward_rows'
// gates_of_step), which saves a (T, B, G) buffer.
//
// Part of the cpu backend's compiled loops; recurrence_cpu.cpp includes every part in one
// translation unit and registers the ops. Design notes and measurements: docs/performance.md.

#pragma once

#include "threads.h"

namespace {

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
    // keeps oneDNN's single-threaded GEMM on its own half of W_h (see RecurrentProduct);
    // otherwise each part's rows.
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

}  // namespace
