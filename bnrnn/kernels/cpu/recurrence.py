"""The ``cpu`` backend: the compiled loops of :mod:`bnrnn.kernels.cpu.extension`.

The same function as :class:`~bnrnn.nn.aten_recurrence.FusedLSTMRecurrence` (the aten backend), with the
input projection inside: the Function takes x and W_x, so that its backward accumulates
dW_x, dW_h and db step by step, from one step's gradients still in cache, instead of
writing (T, B, 4H) gradient buffers (80 MB each at seqMNIST) and reading them back for one
large GEMM each. From hidden size 256 (PTB's 1000) the balance turns: the recurrent products
come in halves, one per thread, and dW_h is one GEMM per chunk of WEIGHT_GRAD_CHUNK
steps (CHUNKED_WEIGHT_GRAD_MIN_HIDDEN). The float32 GEMMs run on the extension's own
AVX-512 kernel where the CPU has one (``csrc/small_gemm.h``, W_h packed in its panels by the
C++ code), else on torch's BLAS, with W_h packed for oneDNN in two row halves from H = 256
(recurrent_weight_halves).

Buffers (all from the :mod:`~bnrnn.nn.workspace` pool):
    wx (T, B, 4H): W_x x (+ b when x is not normalised), for inputs wider than
        NARROW_INPUT_MAX (for narrower ones the loops never form W_x x: see below);
    hs, cs, tanh_c (T, B, H): h_t, c_t, tanh(BN_c(c_t));
    sig (T, B, 4H): the activated gates [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)], or one
        step's (1, B, 4H) where the backward forms them again (keeps_one_gate_step);
    wh (T, B, 4H): W_h h_{t-1}, BN_h's input (with BN_h only);
    dwh_steps (2 * WEIGHT_GRAD_CHUNK, B, 4H), backward, from H = 256: dL/d(W_h h_{t-1}) of two
        chunks of steps;
    mean_<term>, invstd_<term> (T, F): the batch statistics of each norm in use.
"""

from __future__ import annotations

import torch

from bnrnn.kernels.cpu import extension as cpu_extension
from bnrnn.nn import aten_recurrence
from bnrnn.nn.aten_recurrence import STATISTICS, Norms, statistics_buffers
from bnrnn.nn.recurrent_product import PACKED_MIN_HIDDEN, packed_column_halves
from bnrnn.nn.workspace import WORKSPACE


# Up to this input width (seqMNIST's I = 1) the loops take the input term from x itself: BN_x's
# statistics from the (I, I) covariance of x_t, the normalised term as I multiply-adds per
# value in the gates pass, its backward from dy^T x_t (NarrowInput in the C++ source). Wider
# inputs are projected by one GEMM into wx and normalised like the recurrent term.
NARROW_INPUT_MAX = 8

# From this hidden size on, the backward keeps dL/d(W_h h_{t-1}) of WEIGHT_GRAD_CHUNK steps at
# a time (in a ring of two chunks) and forms dW_h as one GEMM per chunk, over chunk * B rows
# while they are still in cache (cuDNN forms it as one GEMM over the sequence); below it, dW_h
# accumulates step by step from gradients still in cache. Chunks hold 16 steps' buffer
# instead of T's at the speed of one GEMM over the sequence (docs/performance.md).
CHUNKED_WEIGHT_GRAD_MIN_HIDDEN = PACKED_MIN_HIDDEN
WEIGHT_GRAD_CHUNK = 8


def recurrent_weight_halves(weight_hh: torch.Tensor, batch: int, transposed: bool = False) -> list[torch.Tensor]:
    """W_h (forward) or W_h^T (backward) packed for oneDNN in two row halves where the loops
    form the recurrent products by oneDNN (see packed_column_halves), or []: always where
    the extension's own AVX-512 kernel forms them (it reads W_h as it is)."""
    return [] if cpu_extension.own_gemm() else packed_column_halves(weight_hh, batch, transposed)


def project_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """W_x x [+ b]: (T, B, I) -> (T, B, 4H) into a pooled buffer, as aten_recurrence.project_input, on the
    extension's own kernel for float32 where it has one (torch's MKL runs its AVX2 code on
    AMD CPUs). No autograd."""
    if x.dtype != torch.float32 or not cpu_extension.own_gemm():
        return aten_recurrence.project_input(x, weight, bias)
    T, B, I = x.shape
    wx = WORKSPACE.empty((T, B, weight.shape[0]), x)
    torch.ops.bnrnn_cpu.project_input(x.contiguous().view(T * B, I), weight.detach(),
                                      None if bias is None else bias.detach(), wx.view(T * B, -1))
    return wx


def keeps_one_gate_step(gamma_x, gamma_h, wx) -> bool:
    """Whether sig keeps one step's gates instead of T's: with BN_h the backward forms each
    step's gates again from W_h h_{t-1} (kept for BN_h anyway) and the input term (wx, or a
    narrow input normalised by BN_x; a narrow one's bias without BN_x is not passed to it),
    which saves writing and reading back a (T, B, 4H) buffer (80 MB at seqMNIST)."""
    return gamma_h is not None and (wx is not None or gamma_x is not None)


def run_forward(x, weight_ih, bias, weight_hh, gamma_x, gamma_h, gamma_c, beta_c, eps, h0, c0):
    """The recurrence with batch statistics on the compiled loop.

    Args:
        x: (T, B, I); weight_ih: (4H, I); bias: (4H,), BN_x's beta with BN_x (gamma_x given),
            else added to W_x x; weight_hh: (4H, H).
        gamma_x, gamma_h (4H,), gamma_c, beta_c (H,): None for a norm that is off; eps: one
            float per norm (x, h, c).
        h0, c0: (B, H).
    Returns:
        hs (T, B, H), cs (T, B, H) and a dict with the statistics (``mean_x`` ...) and the
        buffers the backward reads (``sig``, ``tanh_c``, ``wh``, ``wx``: None where not kept).
    """
    x = x.contiguous()
    T, B, I = x.shape
    G = weight_ih.shape[0]
    H = G // 4
    n = Norms(gamma_x, bias if gamma_x is not None else None, gamma_h, gamma_c, beta_c, eps)
    input_bias = bias if gamma_x is None else None
    wx = project_input(x, weight_ih, input_bias) if I > NARROW_INPUT_MAX else None
    hs = WORKSPACE.empty((T, B, H), x)
    cs = WORKSPACE.empty((T, B, H), x)
    sig = WORKSPACE.empty((1 if keeps_one_gate_step(gamma_x, gamma_h, wx) else T, B, G), x)
    tanh_c = WORKSPACE.empty((T, B, H), x)
    wh = WORKSPACE.empty((T, B, G), x) if gamma_h is not None else None
    stats = statistics_buffers(T, G, x, n)
    torch.ops.bnrnn_cpu.recurrence_forward(
        x, weight_ih.contiguous(), input_bias, wx, weight_hh.contiguous(), n.gamma_x, n.beta_x, n.gamma_h,
        n.gamma_c, n.beta_c, h0.contiguous(), c0.contiguous(), n.eps_x, n.eps_h, n.eps_c, hs, cs, sig, tanh_c, wh,
        *(stats.get(k) for k in STATISTICS), recurrent_weight_halves(weight_hh, B))
    stats.update(sig=sig, tanh_c=tanh_c, wh=wh, wx=wx)
    return hs, cs, stats


@torch.no_grad()
def population_forward(xin, weight_hh, h_scale, c_scale, c_shift, h0, c0, x_coef=None, x_shift=None):
    """Inference with population statistics on the compiled loop: the arguments and results
    of :func:`bnrnn.nn.aten_recurrence.population_recurrence` (hs (T, B, H), c_T (B, H)).

    For a narrow input (up to NARROW_INPUT_MAX features) ``xin`` may be x itself (T, B, I),
    with ``x_coef`` (T, I, 4H), W_x^T scaled by BN_x's per-step scale, and ``x_shift``
    (T, 4H): the input term is then x_t x_coef[t] + x_shift[t], formed inside the loop."""
    T, B, _ = xin.shape
    H = weight_hh.shape[1]
    hs = xin.new_empty(T, B, H)
    c_last = xin.new_empty(B, H)
    torch.ops.bnrnn_cpu.population_forward(
        xin.contiguous(), *(None if t is None else t.contiguous() for t in (x_coef, x_shift)),
        weight_hh.contiguous(), *(None if t is None else t.contiguous() for t in (h_scale, c_scale, c_shift)),
        h0.contiguous(), c0.contiguous(), hs, c_last, recurrent_weight_halves(weight_hh, B))
    return hs, c_last


class CompiledLSTMRecurrence(torch.autograd.Function):
    """(x, W_x, b, W_h, gamma_x, gamma_h, gamma_c, beta_c, h0, c0, eps, stats) -> (hs, c_T).

    x (T, B, I); hs (T, B, H), c_T (B, H). b is BN_x's beta when gamma_x is given, else added
    to W_x x. ``stats``, a dict, receives the per-step batch statistics (``mean_x``,
    ``invstd_x``, ...) for the caller to fold into the population.
    """

    @staticmethod
    def forward(ctx, x, weight_ih, bias, weight_hh, gamma_x, gamma_h, gamma_c, beta_c, h0, c0, eps, stats):
        x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
        hs, cs, saved = run_forward(x, weight_ih, bias, weight_hh, gamma_x, gamma_h, gamma_c, beta_c, eps, h0, c0)
        stats.update({k: saved[k] for k in STATISTICS if k in saved})
        ctx.saved = saved
        ctx.eps_x = eps[0]
        ctx.save_for_backward(x, weight_ih, bias, weight_hh, gamma_x, gamma_h, gamma_c, h0, c0, hs, cs)
        return hs, cs[-1].clone()

    @staticmethod
    def backward(ctx, grad_hs, grad_c_last):
        x, weight_ih, bias, weight_hh, gamma_x, gamma_h, gamma_c, h0, c0, hs, cs = ctx.saved_tensors
        saved = ctx.saved
        B, H = h0.shape
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_weight_ih = torch.empty_like(weight_ih)
        grad_bias = weight_ih.new_empty(weight_ih.shape[0])
        grad_weight_hh = torch.empty_like(weight_hh)
        grad_h0, grad_c0 = hs.new_empty(B, H), hs.new_empty(B, H)
        norm_grads = [torch.empty_like(p) if p is not None else None for p in (gamma_x, gamma_h, gamma_c, gamma_c)]
        T = hs.shape[0]
        G = weight_hh.shape[0]
        dwh_steps = None  # the ring of chunks (see WEIGHT_GRAD_CHUNK), for large hidden sizes
        if H >= CHUNKED_WEIGHT_GRAD_MIN_HIDDEN:
            dwh_steps = WORKSPACE.empty((min(T, 2 * WEIGHT_GRAD_CHUNK), B, G), hs)
        torch.ops.bnrnn_cpu.recurrence_backward(
            grad_hs.contiguous(), grad_c_last.contiguous(), x, saved["wx"], weight_ih.contiguous(),
            weight_hh.contiguous(), gamma_x, gamma_h, gamma_c, bias if gamma_x is not None else None, ctx.eps_x, h0, c0,
            hs, cs, saved["sig"], saved["tanh_c"], saved["wh"],
            *(saved.get(k) for k in STATISTICS), grad_x, grad_weight_ih, grad_bias, grad_weight_hh, grad_h0, grad_c0,
            *norm_grads, recurrent_weight_halves(weight_hh, B, transposed=True), dwh_steps)
        grad_gamma_x, grad_gamma_h, grad_gamma_c, grad_beta_c = norm_grads
        return (grad_x, grad_weight_ih, grad_bias, grad_weight_hh, grad_gamma_x, grad_gamma_h, grad_gamma_c,
                grad_beta_c, grad_h0, grad_c0, None, None)
