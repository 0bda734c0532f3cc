// backward_parts.h: what the backward loop shares between its threads: a step's
// gradients, running the weight-gradient GEMMs beside the next step's loops, and the
// per-part sums over time.
//
// Part of the cpu backend's compiled loops; recurrence_cpu.cpp includes every part in one
// translation unit and registers the ops. Design notes and measurements: docs/performance.md.

#pragma once

#include "forward.h"

namespace {

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

// What the forward saved for the backward, and what it ran on: the op's arguments, by name.
struct SavedForward {
  const Tensor& x;  // (T, B, I)
  const OptTensor& wx;  // (T, B, G): a wide input's W_x x, or none (a narrow input)
  const Tensor& weight_ih;  // (G, I)
  const Tensor &h0, &c0;  // (B, H)
  const Tensor &hs, &cs, &tanh_c;  // (T, B, H)
  const Tensor& sig;  // (T, B, G), or one step's (1, B, G): see forward.h
  const OptTensor& wh;  // (T, B, G): W_h h_{t-1}, kept with BN_h
};

// Where the backward writes: each gradient, (T, B, G) dwh_steps a ring for dW_h's chunks.
struct BackwardOutputs {
  const OptTensor& grad_x;  // (T, B, I), or none when x needs none
  const Tensor &grad_weight_ih, &grad_bias, &grad_weight_hh, &grad_h0, &grad_c0;
  const OptTensor &grad_gamma_x, &grad_gamma_h, &grad_gamma_c, &grad_beta_c;
  const OptTensor& dwh_steps;
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

  BackwardShared(const Tensor& grad_hs, const Tensor& grad_c_last, const SavedForward& saved,
                 const RecurrentProduct& recurrent, const Norm<T>& nx, const Norm<T>& nh, const Norm<T>& nc,
                 const BackwardOutputs& out, int parts, int threads)
      : grad_hs(grad_hs), x(saved.x), weight_ih(saved.weight_ih), h0(saved.h0), hs(saved.hs), cs(saved.cs),
        sig(saved.sig), tanh_c(saved.tanh_c),
        grad_h0(out.grad_h0), wh(saved.wh), grad_x(out.grad_x), dwh_steps(out.dwh_steps), recurrent(recurrent),
        nx(nx), nh(nh), nc(nc), steps(cs.size(0)), B(cs.size(1)), H(cs.size(2)), G(4 * cs.size(2)),
        c0_data(saved.c0.data_ptr<T>()), wide(data_or_null<T>(saved.wx)), norms(int(nh.on()) + int(nx.on() && wide)), parts(parts), threads(threads),
        per_step_gemms(!out.dwh_steps.has_value() || wide),
        dc_next(grad_c_last.data_ptr<T>(), grad_c_last.data_ptr<T>() + B * H),
        dcn(B * H), dc_buffer(B * H), barrier(threads),
        kernel(recurrent.kernel_in_use()), grad_weight_hh(out.grad_weight_hh),
        ring(out.dwh_steps.has_value() ? out.dwh_steps->size(0) : 0), chunk(ring >= steps ? steps : ring / 2) {
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
      if (wide) p.gw_ih = accumulator(out.grad_weight_ih);
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
        // B, the chunk's rows of h (4 KB apart at PTB), packed into panels first, which
        // costs less than it saves (docs/performance.md)
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

}  // namespace
