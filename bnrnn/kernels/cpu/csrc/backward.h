// backward.h: the backward loop (backward_rows for one thread's rows, step by
// step in reverse) and the recurrence_backward op.
//
// Part of the cpu backend's compiled loops; recurrence_cpu.cpp includes every part in one
// translation unit and registers the ops. Design notes and measurements: docs/performance.md.

#pragma once

#include "backward_parts.h"

namespace {

// The backward recurrence on one thread of sh.threads, for its share of the parts of the
// batch's rows (as in the forward). Each step a part takes its rows through the hidden
// output, BN_c, the cell and the norms of the gates; a norm's input gradient needs the whole
// batch's column sums, so the threads meet after BN_c's sums and after those behind dgates
// (not at all for a vanilla LSTM). Then each part's rows of the weight gradients and of
// dL/dh_{t-1}, one GEMM each. Thread 0 accumulates what comes from the whole batch's sums
// (a narrow input's dW_x with BN_x). Every step method returns false if another thread failed.
template <typename T>
struct BackwardThread {
  BackwardThread(BackwardShared<T>& shared, int thread_index)
      : sh(shared),
        thread(thread_index),
        B(sh.B),
        H(sh.H),
        G(sh.G),
        p0(sh.parts * thread / sh.threads),
        p1(sh.parts * (thread + 1) / sh.threads),
        b0(sh.first_row(p0)),
        b1(sh.first_row(p1)),
        meet(sh.threads > 1),
        g0(G * thread / sh.threads),
        g1(G * (thread + 1) / sh.threads),
        nx(sh.nx),
        nh(sh.nh),
        nc(sh.nc),
        bx(G),
        bh(G),
        bc(H),
        ax(G),
        ah(G),
        recompute_gates(sh.sig.size(0) < sh.steps),
        dcn(sh.dcn.data()) {
    if (sh.narrow) narrow.emplace(*sh.narrow);
    if (narrow) narrow_grad.emplace(*narrow);
    I = narrow ? narrow->I : 0;
    width_g = G * (1 + sh.norms) + I * G;
    sums_g.resize(width_g);
    sums_c.resize(2 * H);
    combine_g = sh.norms > 0 || (narrow && nx.on());
  }

  // Gates not kept (sig holds one step, GATES): this thread's rows of step t's
  // pre-activations formed again from W_h h_{t-1} (wh) and the input term, with the maps
  // from the stored statistics (a narrow input's recomputed from x_t as the forward did),
  // then activated: the same values the forward computed.
  T* gates_of_step(int64_t t) {
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
  }

  // Step t from dh = dL/dh_t to its gradients g, for rows [b0, b1).
  bool step(int64_t t, const StepGradients<T>& g, int64_t slot) {
    const T* s = gates_of_step(t);
    const T* c = sh.cs.template data_ptr<T>() + t * B * H;
    hidden_rows(t, g, s);
    const T* dc = dcn;
    if (nc.on()) {
      if (!through_norm_c(t, c, slot)) return false;
      dc = sh.dc_buffer.data();
    }
    cell_rows(t, g, s, c, dc);
    return through_gate_norms(t, g, slot);
  }

  // dL/dh_t through h = o tanh(BN_c(c)): the output gate's gradient and dL/d(BN_c(c)) (dcn).
  void hidden_rows(int64_t t, const StepGradients<T>& g, const T* s) {
    T* dg = g.dgates;
    const T* tc = sh.tanh_c.template data_ptr<T>() + t * B * H;
    const T* dhp = sh.dh.template data_ptr<T>();
    for (int64_t b = b0; b < b1; ++b)
      hidden_row_backward<T>(H, dhp + b * H, tc + b * H, s + b * G + 3 * H, dg + b * G + 3 * H, dcn + b * H);
  }

  // Through BN_c into dL/dc (sh.dc_buffer); its gamma and beta gradients by part.
  bool through_norm_c(int64_t t, const T* c, int64_t slot) {
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
    return true;
  }

  // Through the cell update into the other gates' gradients and dL/dc_{t-1} (sh.dc_next).
  void cell_rows(int64_t t, const StepGradients<T>& g, const T* s, const T* c, const T* dc) {
    T* dg = g.dgates;
    const T* c_prev = t > 0 ? c - B * H : sh.c0_data;
    for (int64_t b = b0; b < b1; ++b) {
      cell_row_backward<T>(H, s + b * G, c_prev + b * H, dc + b * H, sh.dc_next.data() + b * H, dg + b * G);
    }
  }

  bool through_gate_norms(int64_t t, const StepGradients<T>& g, int64_t slot) {
    T* dg = g.dgates;
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
  }

  // The whole backward recurrence, last step first.
  bool run() {
    for (int64_t t = sh.steps - 1; t >= 0; --t) {
      const StepGradients<T> g = sh.gradients_of_step(t);
      const int64_t slot = t % 2;
      if (!step_and_weight_gradients(t, g, slot)) return false;
    }
    if (sh.parts == 1 && sh.per_step_gemms && p0 < p1) sh.weight_gradients(0, sh.gradients_of_step(0), sh.part[0], 0, B, 0, 1);
    if (narrow && nx.on()) narrow_grad->store_totals(g0, g1, sh.narrow_d_weight, sh.narrow_d_gamma);
    return true;
  }

  bool step_and_weight_gradients(int64_t t, const StepGradients<T>& g, int64_t slot) {
    const bool overlap = sh.parts == 1 && sh.per_step_gemms && t + 1 < sh.steps;
    if (overlap && meet) {
      // one part on two threads (few rows, W_h^T packed in halves): the thread without rows
      // takes the previous step's weight GEMMs while the other runs the loops
      if (p0 == p1) sh.weight_gradients(t + 1, sh.gradients_of_step(t + 1), sh.part[0], 0, B, 0, 1);
      if (!step(t, g, slot)) return false;
    } else if (overlap) {
      // one part: the loops beside the previous step's weight GEMMs
      const StepGradients<T> later = sh.gradients_of_step(t + 1);
      beside([&] { step(t, g, slot); },
             [&](int64_t block, int64_t blocks) {
               sh.weight_gradients(t + 1, later, sh.part[0], 0, B, block, blocks);
             });
    } else if (!step(t, g, slot)) {
      return false;
    }
    const bool by_halves = sh.recurrent.by_halves();
    // Step t's per-step weight GEMMs (a wide input's dW_x; dW_h without dwh_steps): each
    // part's rows, or with products by halves, once every row is written, half of the
    // features of each on each half's thread. (That dW_x (G, I) accumulates in one (G / 2, I)
    // block a thread from all B rows at once instead of in all of G from its own rows: it
    // stays in cache.)
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
    return true;
  }

  BackwardShared<T>& sh;
  const int thread;
  const int64_t B, H, G;
  const int p0, p1;  // this thread's parts
  const int64_t b0, b1;  // and their rows
  const bool meet;
  const int64_t g0, g1;  // this thread's share of the features of a narrow input's dW_x with BN_x
  const Norm<T>&nx, &nh, &nc;
  std::optional<NarrowInput<T>> narrow;  // this thread's own (it holds the step's moments)
  std::optional<NarrowInputGradient<T>> narrow_grad;
  NormBackward<T> bx, bh, bc;
  NormBackward<T>* norms[2];
  std::vector<double>* norm_totals[2][BATCH_PARTS];  // d_gamma of norms[k], by part
  int64_t I = 0, width_g = 0;
  std::vector<T> sums_g, sums_c;  // the whole batch's, this step
  bool combine_g = false;
  Affine<T> ax, ah;
  PreActivationRows<T> pre;
  const bool recompute_gates;
  T* const dcn;
};

template <typename T>
bool backward_rows(BackwardShared<T>& sh, int thread) {
  return BackwardThread<T>(sh, thread).run();
}

template <typename T>
void backward_loop(const Tensor& grad_hs, const Tensor& grad_c_last, const SavedForward& saved,
                   const RecurrentProduct& recurrent, const Norm<T>& nx, const Norm<T>& nh, const Norm<T>& nc,
                   const BackwardOutputs& out) {
  const Tensor& cs = saved.cs;
  const auto [parts, threads] = parts_and_threads(cs.size(1), recurrent);
  BackwardShared<T> sh(grad_hs, grad_c_last, saved, recurrent, nx, nh, nc, out, parts, threads);
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
    sum_parts(&BackwardPart<T>::gw_hh, out.grad_weight_hh);
    sum_parts(&BackwardPart<T>::gw_ih, out.grad_weight_ih);
  }
  std::copy(sh.dc_next.begin(), sh.dc_next.end(), out.grad_c0.data_ptr<T>());
  const auto total = [&](std::vector<double> BackwardPart<T>::*member) {
    std::vector<double> sum = sh.part[0].*member;
    for (int k = 1; k < parts; ++k)
      for (size_t f = 0; f < sum.size(); ++f) sum[f] += (sh.part[k].*member)[f];
    return sum;
  };
  store<T>(total(&BackwardPart<T>::d_bias), out.grad_bias);
  if (sh.narrow) store<T>(nx.on() ? sh.narrow_d_weight : total(&BackwardPart<T>::d_weight_ih), out.grad_weight_ih);
  if (nx.on()) store<T>(sh.narrow ? sh.narrow_d_gamma : total(&BackwardPart<T>::d_gamma_x), out.grad_gamma_x);
  if (nh.on()) store<T>(total(&BackwardPart<T>::d_gamma_h), out.grad_gamma_h);
  if (nc.on()) store<T>(total(&BackwardPart<T>::d_gamma_c), out.grad_gamma_c);
  if (nc.on()) store<T>(total(&BackwardPart<T>::d_beta_c), out.grad_beta_c);
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
  // The op's flat arguments (its schema), grouped: what the forward saved, where gradients go.
  const SavedForward saved{x, wx, weight_ih, h0, c0, hs, cs, tanh_c, sig, wh};
  const BackwardOutputs out{grad_x,       grad_weight_ih, grad_bias,    grad_weight_hh, grad_h0,  grad_c0,
                            grad_gamma_x, grad_gamma_h,   grad_gamma_c, grad_beta_c,    dwh_steps};
  AT_DISPATCH_FLOATING_TYPES(cs.scalar_type(), "bnrnn_recurrence_backward", [&] {
    backward_loop<scalar_t>(grad_hs, grad_c_last, saved, RecurrentProduct(weight_hh, packed_hh_t, Products::backward),
                            make_norm<scalar_t>(gamma_x, beta_x, eps_x, mean_x, invstd_x, G),
                            make_norm<scalar_t>(gamma_h, std::nullopt, 0.0, mean_h, invstd_h, G),
                            make_norm<scalar_t>(gamma_c, std::nullopt, 0.0, mean_c, invstd_c, H), out);
  });
}

}  // namespace
