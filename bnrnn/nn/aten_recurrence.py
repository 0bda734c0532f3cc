"""The ``aten`` backend of :class:`~bnrnn.nn.lstm.LSTMLayer`: the recurrence as one autograd Function.

At the paper's sizes (hidden 100, batch 64-100) a time step is a few dozen small ops, and
per-op overhead (Python, dispatch, autograd bookkeeping) dominates the arithmetic. Here the
whole recurrence is one ``torch.autograd.Function``:

- forward: a no-grad loop writing into preallocated (T, B, .) buffers; each batch norm is
  one fused ``native_batch_norm`` call (mean, biased variance, normalise, gamma, beta);
- backward: one reverse loop with the hand-derived gradients (``native_batch_norm_backward``
  for each norm), and the recurrent weight gradient as one GEMM over all time steps, as
  cuDNN does, instead of one small GEMM per step.

The input projection W_x x for all steps is one GEMM before it (:class:`InputProjection`);
the Function receives W_x x (plus b when x is not normalised) of shape (T, B, 4H) and
normalises it step by step with BN_x.

It runs with ``model.backend=aten``, and under ``auto`` where neither the Triton kernels nor
the compiled CPU loops can (:mod:`bnrnn.nn.backends`).

Inference with population statistics uses :func:`population_recurrence`: the x and h
normalisations are affine maps folded into the input projection, the bias and a per-step
column scale of W_h h (applied in the same fused multiply-add that adds the input term), so
only the normalisation of c remains a separate (one-op) affine step.

The readable reference is :func:`bnrnn.nn.reference.reference_forward`; tests hold the two equal.
"""

from __future__ import annotations

import torch

from bnrnn.nn.recurrent_product import RecurrentProduct, low_precision_mm
from bnrnn.nn.workspace import WORKSPACE

aten = torch.ops.aten


def split_gates(buffer: torch.Tensor, hidden: int) -> list[list[torch.Tensor]]:
    """Per-step views of the four gate blocks of a (T, B, 4H) buffer: [i, f, g, o][t] -> (B, H).

    Made once per sequence (a handful of ops) so that the time loop does no slicing.
    """
    T, B = buffer.shape[:2]
    blocks = buffer.view(T, B, 4, hidden).permute(2, 0, 1, 3).unbind(0)
    return [list(block.unbind(0)) for block in blocks]


class Norms:
    """The three optional normalisations as the Function sees them.

    gamma_x (4H,) with beta_x = the LSTM bias b (4H,); gamma_h (4H,) without beta;
    gamma_c, beta_c (H,). A missing gamma means that term is not normalised (and, for x,
    that b was already added to W_x x). eps is one float per norm.

    ``layer``: layer norm (Ba et al.) instead of batch norm: statistics over each row's
    features, not over the batch. The caller then normalises the x term itself (it has no
    recurrence: one op over every step) and adds every bias to it (LN_h's bias included,
    since the terms are summed), so gamma_x is None and gamma_h has no beta here either.
    """

    def __init__(self, gamma_x, beta_x, gamma_h, gamma_c, beta_c, eps, layer: bool = False):
        self.gamma_x, self.beta_x, self.gamma_h, self.gamma_c, self.beta_c = gamma_x, beta_x, gamma_h, gamma_c, beta_c
        self.eps_x, self.eps_h, self.eps_c = eps
        self.layer = layer
        if layer and gamma_x is not None:
            raise ValueError("with layer norm the caller normalises the x term (gamma_x must be None)")


def normalise(layer: bool, inp, gamma, beta, eps: float, out, mean, invstd):
    """One step's norm of ``inp`` (B, F) into ``out``, its statistics into ``mean`` and
    ``invstd``: batch norm ((F,) each: over the batch) or layer norm ((B, 1): over the row)."""
    if layer:
        aten.native_layer_norm.out(inp, [inp.shape[1]], gamma, beta, eps, out0=out, out1=mean, out2=invstd)
    else:
        aten.native_batch_norm.out(inp, gamma, beta, None, None, True, 0.0, eps, out=out, save_mean=mean,
                                   save_invstd=invstd)
    return out


def normalise_backward(layer: bool, grad, inp, gamma, mean, invstd, eps: float, mask: list[bool]):
    """The backward of :func:`normalise`: (d input (B, F), d gamma (F,), d beta (F,) or None
    where ``mask`` says so)."""
    if layer:  # ATen's op wants the bias itself to give its gradient: the sum over rows here
        d_inp, d_gamma, _ = aten.native_layer_norm_backward(grad, inp, [inp.shape[1]], mean, invstd, gamma, None,
                                                            [mask[0], mask[1], False])
        return d_inp, d_gamma, grad.sum(0) if mask[2] else None
    return aten.native_batch_norm_backward(grad, inp, gamma, None, None, mean, invstd, True, eps, mask)


def recurrence_forward(wx, weight_hh, norms: Norms, h0, c0, keep_for_backward: bool,
                       gemm_dtype: torch.dtype | None = None):
    """The LSTM recurrence with batch statistics for the normalised terms (ATen ops).

    Args:
        wx: (T, B, 4H) = W_x x of every step (plus b when x is not normalised).
        weight_hh: (4H, H).
        h0, c0: (B, H).
    Returns:
        hs (T, B, H), cs (T, B, H) (the cell states), and a dict holding the per-step
        statistics ``mean_x, invstd_x, mean_h, invstd_h, mean_c, invstd_c`` ((T, F) each,
        for the norms in use) and, with ``keep_for_backward``, what backward needs.
        ``gemm_dtype``: W_h h's operands in this dtype (bf16 under autocast); the statistics,
        the gates and the cell state stay in wx's.
    """
    T, B, G = wx.shape
    H = G // 4
    n = norms
    hs = WORKSPACE.empty((T, B, H), wx)
    cs = WORKSPACE.empty((T, B, H), wx)
    sig = WORKSPACE.empty((T, B, G), wx)  # sigmoid of every pre-activation (the g block is unused)
    tanh_g = WORKSPACE.empty((T, B, H), wx)
    tanh_c = WORKSPACE.empty((T, B, H), wx)
    stats = statistics_buffers(T, G, wx, norms)
    wh, product = aten_recurrence_forward(wx, weight_hh, n, h0, c0, (hs, cs, sig, tanh_g, tanh_c), stats, gemm_dtype)
    if keep_for_backward:
        stats.update(sig=sig, tanh_g=tanh_g, tanh_c=tanh_c, wh=wh, product=product)
    return hs, cs, stats


def statistics_buffers(T: int, G: int, like: torch.Tensor, norms: Norms) -> dict[str, torch.Tensor]:
    """Empty (T, F) ``mean_<term>`` and ``invstd_<term>`` for each norm in use (F = G = 4H for
    x and h, H for c), with ``like``'s dtype and device; with layer norm (T, B, 1), one
    statistic per row."""
    stats = {}
    for term, gamma, width in (("x", norms.gamma_x, G), ("h", norms.gamma_h, G), ("c", norms.gamma_c, G // 4)):
        if gamma is not None:
            shape = (T, like.shape[1], 1) if norms.layer else (T, width)
            stats["mean_" + term] = like.new_empty(shape)
            stats["invstd_" + term] = like.new_empty(shape)
    return stats


STATISTICS = ("mean_x", "invstd_x", "mean_h", "invstd_h", "mean_c", "invstd_c")


def aten_recurrence_forward(wx, weight_hh, n: Norms, h0, c0, buffers, stats, gemm_dtype=None):
    """The forward loop in ATen ops, filling ``buffers`` = (hs, cs, sig, tanh_g, tanh_c) and
    the (T, F) statistics in ``stats``. Returns BN_h's inputs W_h h_{t-1} (a list of (B, 4H),
    None without BN_h) and the :class:`RecurrentProduct`, for the backward."""
    hs, cs, sig, tanh_g, tanh_c = buffers
    T, B, G = wx.shape
    H = G // 4
    product = RecurrentProduct(weight_hh, B, gemm_dtype)
    wh_steps = [] if n.gamma_h is not None else None
    sig_i, sig_f, _, sig_o = split_gates(sig, H)
    wx_t, hs_t, cs_t, sig_t = wx.unbind(0), hs.unbind(0), cs.unbind(0), sig.unbind(0)
    tg_t, tc_t = tanh_g.unbind(0), tanh_c.unbind(0)
    mx, ix, mh, ih, mc, ic = (stats[k].unbind(0) if k in stats else None for k in STATISTICS)
    cn = wx.new_empty(B, H) if n.gamma_c is not None else None
    ax = wx.new_empty(B, G) if n.gamma_x is not None else None
    h, c = h0, c0
    for t in range(T):
        if n.gamma_x is None:
            ax = wx_t[t]
        else:
            normalise(n.layer, wx_t[t], n.gamma_x, n.beta_x, n.eps_x, ax, mx[t], ix[t])
        if n.gamma_h is None:
            a = product.forward(h, ax)
        else:
            wh = product.forward(h)
            wh_steps.append(wh)
            a = normalise(n.layer, wh, n.gamma_h, None, n.eps_h, sig_t[t], mh[t], ih[t]).add_(ax)
        torch.tanh(a[:, 2 * H : 3 * H], out=tg_t[t])
        torch.sigmoid(a, out=sig_t[t])
        c = torch.mul(sig_f[t], c, out=cs_t[t]).addcmul_(sig_i[t], tg_t[t])
        if n.gamma_c is None:
            torch.tanh(c, out=tc_t[t])
        else:
            torch.tanh(normalise(n.layer, c, n.gamma_c, n.beta_c, n.eps_c, cn, mc[t], ic[t]), out=tc_t[t])
        h = torch.mul(sig_o[t], tc_t[t], out=hs_t[t])
    return wh_steps, product


@torch.no_grad()
def project_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  gemm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W_x x [+ b]: (T, B, I) -> (T, B, 4H), one GEMM over the flattened sequence into a
    buffer of the :mod:`~bnrnn.nn.workspace` pool (80 MB at seqMNIST: fresh pages would
    cost more than the product). ``gemm_dtype``: the operands in this dtype (bf16 under
    autocast), the result in x's. No autograd: see :class:`InputProjection`."""
    T, B, _ = x.shape
    wx = WORKSPACE.empty((T, B, weight.shape[0]), x)
    flat, out = x.reshape(T * B, -1), wx.view(T * B, -1)
    if gemm_dtype is not None and gemm_dtype != x.dtype:
        out.copy_(low_precision_mm(flat, weight.t(), gemm_dtype))
        if bias is not None:
            out.add_(bias)
    elif bias is None:
        torch.mm(flat, weight.t(), out=out)
    else:
        torch.addmm(bias, flat, weight.t(), out=out)
    return wx


class InputProjection(torch.autograd.Function):
    """(x (T, B, I), W_x (4H, I), b (4H,) or None, gemm_dtype) -> W_x x [+ b] (T, B, 4H):
    :func:`project_input` with its backward, whose GEMMs take the same dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, gemm_dtype=None):
        out = project_input(x, weight, bias, gemm_dtype)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.gemm_dtype = gemm_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        T, B, G = grad_out.shape
        grad, low = grad_out.reshape(T * B, G), ctx.gemm_dtype
        grad_x = low_precision_mm(grad, weight, low).view_as(x) if ctx.needs_input_grad[0] else None
        grad_weight = low_precision_mm(grad.t(), x.reshape(T * B, -1), low) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


class FusedLSTMRecurrence(torch.autograd.Function):
    """(wx, W_h, gamma_x, b, gamma_h, gamma_c, beta_c, h0, c0, eps, stats, layer, gemm_dtype)
    -> (hs, c_T).

    hs (T, B, H) and c_T (B, H). ``stats``, a dict, receives the per-step batch statistics
    (``mean_x``, ``invstd_x``, ...) for the caller to fold into the population. ``layer``:
    layer norms instead (:class:`Norms`). ``gemm_dtype``: every GEMM's operands in this dtype
    (bf16 under autocast), forward and backward; the rest in wx's dtype.
    """

    @staticmethod
    def forward(ctx, wx, weight_hh, gamma_x, beta_x, gamma_h, gamma_c, beta_c, h0, c0, eps, stats, layer=False,
                gemm_dtype=None):
        norms = Norms(gamma_x, beta_x, gamma_h, gamma_c, beta_c, eps, layer)
        ctx.layer, ctx.gemm_dtype = layer, gemm_dtype
        hs, cs, saved = recurrence_forward(wx, weight_hh, norms, h0, c0, True, gemm_dtype)
        stats.update({k: v for k, v in saved.items() if k.startswith(("mean_", "invstd_"))})
        ctx.eps = eps
        ctx.saved = saved
        ctx.save_for_backward(wx, weight_hh, gamma_x, beta_x, gamma_h, gamma_c, beta_c, h0, c0, hs, cs)
        return hs, cs[-1].clone()

    @staticmethod
    def backward(ctx, grad_hs, grad_c_last):
        wx, weight_hh, gamma_x, beta_x, gamma_h, gamma_c, beta_c, h0, c0, hs, cs = ctx.saved_tensors
        grad_gates, grad_wh, grad_wx, norm_grads, dh0, dc0 = aten_backward(
            grad_hs, grad_c_last, wx, gamma_x, gamma_h, gamma_c, c0, cs, ctx.saved, ctx.eps, ctx.layer)
        grad_wh = grad_wh if grad_wh is not None else grad_gates
        grad_wx = grad_wx if grad_wx is not None else grad_gates
        # W_h gradient as one GEMM over all steps (cuDNN's way): sum_t dwh_t^T h_{t-1}, with
        # h_{t-1} = h0 at t = 0 (its own small GEMM: no (T, B, H) concatenation).
        grad_weight_hh = None
        if ctx.needs_input_grad[1]:
            T, B, H = hs.shape
            grad_weight_hh = low_precision_mm(grad_wh[0].t(), h0, ctx.gemm_dtype)
            if T > 1:
                later = grad_wh[1:].reshape((T - 1) * B, 4 * H).t(), hs[:-1].reshape((T - 1) * B, H)
                if ctx.gemm_dtype is None:
                    grad_weight_hh.addmm_(*later)
                else:
                    grad_weight_hh.add_(low_precision_mm(*later, ctx.gemm_dtype))
        return (grad_wx, grad_weight_hh, *norm_grads, dh0, dc0, None, None, None, None)


def aten_backward(grad_hs, grad_c_last, wx, gamma_x, gamma_h, gamma_c, c0, cs, saved, eps, layer: bool = False):
    """The backward loop of :func:`recurrence_forward`, in ATen ops.

    Returns:
        grad_gates (T, B, 4H) = dL/d(pre-activations); dL/d(W_h h_{t-1}) (T, B, 4H) with BN_h,
        else None (it is grad_gates); dL/d(W_x x) (T, B, 4H) with BN_x, else None (it is
        grad_gates); the list [d gamma_x, d beta_x, d gamma_h, d gamma_c, d beta_c] (None
        where a norm is off); dL/dh0 and dL/dc0 (B, H). ``layer``: the norms are layer norms
        (:class:`Norms`).
    """
    eps_x, eps_h, eps_c = eps
    T, B, H = cs.shape
    sig, tanh_g, tanh_c, wh_t, product = saved["sig"], saved["tanh_g"], saved["tanh_c"], saved["wh"], saved["product"]
    sig_i, sig_f, _, sig_o = split_gates(sig, H)
    grad_gates = WORKSPACE.empty(sig.shape, sig)  # dL/d(pre-activation), (T, B, 4H)
    d_i, d_f, d_g, d_o = split_gates(grad_gates, H)
    dgates_t, sig_t = grad_gates.unbind(0), sig.unbind(0)
    tg_t, tc_t, cs_t, grad_hs_t = tanh_g.unbind(0), tanh_c.unbind(0), cs.unbind(0), grad_hs.unbind(0)
    wx_t = wx.unbind(0)
    # Per-step results of each norm's backward, in reverse time order; the functional
    # native_batch_norm_backward (its .out variant copies every result once more).
    d_wh, d_gamma_h = [], []
    d_ax, d_gamma_x, d_beta_x = [], [], []
    d_gamma_c, d_beta_c = [], []
    mask = [True, True, True]
    mask_no_beta = [True, True, False]

    dh = grad_hs_t[T - 1]
    dc_next = grad_c_last
    for t in range(T - 1, -1, -1):
        c_prev = cs_t[t - 1] if t > 0 else c0
        # h = o * tanh(cn)
        torch.mul(dh, tc_t[t], out=d_o[t])
        dcn = aten.tanh_backward(dh * sig_o[t], tc_t[t])
        if gamma_c is None:
            dc = dcn
        else:
            dc, dgc, dbc = normalise_backward(layer, dcn, cs_t[t], gamma_c, saved["mean_c"][t],
                                              saved["invstd_c"][t], eps_c, mask)
            d_gamma_c.append(dgc)
            d_beta_c.append(dbc)
        dc = dc.add_(dc_next)
        # c = f * c_prev + i * g
        torch.mul(dc, tg_t[t], out=d_i[t])
        torch.mul(dc, c_prev, out=d_f[t])
        dg = dc * sig_i[t]
        dc_next = dc * sig_f[t]
        # Through the activations: sigmoid for the whole row (wrong for the g block), then
        # tanh for the g block, overwriting it.
        aten.sigmoid_backward.grad_input(dgates_t[t], sig_t[t], grad_input=dgates_t[t])
        aten.tanh_backward.grad_input(dg, tg_t[t], grad_input=d_g[t])
        if gamma_h is None:
            dwh = dgates_t[t]
        else:
            dwh, dgh, _ = normalise_backward(layer, dgates_t[t], wh_t[t], gamma_h, saved["mean_h"][t],
                                             saved["invstd_h"][t], eps_h, mask_no_beta)
            d_wh.append(dwh)
            d_gamma_h.append(dgh)
        if gamma_x is not None:
            dax, dgx, dbx = normalise_backward(layer, dgates_t[t], wx_t[t], gamma_x, saved["mean_x"][t],
                                               saved["invstd_x"][t], eps_x, mask)
            d_ax.append(dax)
            d_gamma_x.append(dgx)
            d_beta_x.append(dbx)
        dh = product.backward(dwh, grad_hs_t[t - 1]) if t > 0 else product.backward(dwh)

    def over_time(steps: list[torch.Tensor]) -> torch.Tensor | None:
        """The per-step results (collected from t = T-1 down) as one (T, ...) tensor, in a
        pooled buffer: a fresh 100 MB one (PTB) cost more in page faults than the copy."""
        if not steps:
            return None
        return torch.stack(steps[::-1], out=WORKSPACE.empty((len(steps), *steps[0].shape), steps[0]))

    def summed(steps: list[torch.Tensor]) -> torch.Tensor | None:
        return torch.stack(steps).sum(0) if steps else None

    norm_grads = [summed(steps) for steps in (d_gamma_x, d_beta_x, d_gamma_h, d_gamma_c, d_beta_c)]
    return grad_gates, over_time(d_wh), over_time(d_ax), norm_grads, dh, dc_next


@torch.no_grad()
def population_recurrence(xin, weight_hh, h_scale, c_scale, c_shift, h0, c0, gemm_dtype=None):
    """The recurrence with every normalisation an affine map (population statistics).

    Args:
        xin: (T, B, 4H) input term, with the x normalisation, the bias and the shift of the
            h normalisation already folded in.
        weight_hh: (4H, H).
        h_scale: (T, 4H) per-step column scale of W_h h (gamma_h / sqrt(var_h + eps)) or None.
        c_scale, c_shift: (T, H) per-step affine map of c, or None.
        h0, c0: (B, H).
        gemm_dtype: W_h h's operands in this dtype (bf16 under autocast), or None.
    Returns:
        hs (T, B, H), c_T (B, H).
    """
    T, B, G = xin.shape
    H = G // 4
    product = RecurrentProduct(weight_hh, B, gemm_dtype)
    hs = xin.new_empty(T, B, H)
    gates = xin.new_empty(B, G)
    tanh_g = xin.new_empty(B, H)
    cn = xin.new_empty(B, H)
    i, f, g, o = gates.view(B, 4, H).unbind(1)
    h, c = h0, c0.clone()
    for t, (x_t, h_out) in enumerate(zip(xin.unbind(0), hs.unbind(0))):
        if h_scale is None:
            gates.copy_(product.forward(h, x_t))
        else:
            torch.addcmul(x_t, product.forward(h), h_scale[t], out=gates)
        torch.tanh(g, out=tanh_g)
        gates.sigmoid_()
        c.mul_(f).addcmul_(i, tanh_g)
        if c_scale is None:
            torch.tanh(c, out=cn)
        else:
            torch.addcmul(c_shift[t], c, c_scale[t], out=cn).tanh_()
        h = torch.mul(o, cn, out=h_out)
    return hs, c
