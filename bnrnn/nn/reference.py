"""The paper's model, as the paper writes it: per-time-step batch norm and the BN-LSTM.

Cooijmans et al. (2017), eqs. 5-8. For a time step t, features over a minibatch of B:

    BN(h; gamma, beta) = beta + gamma * (h - E[h]) / sqrt(Var[h] + eps)          (5)

with E and Var the batch mean and (biased) variance of *that step* in training, and the
population statistics of that step at inference (the last step's beyond T_max). The LSTM:

    (i~, f~, g~, o~) = BN(W_h h_{t-1}; gamma_h, 0) + BN(W_x x_t; gamma_x, 0) + b     (6)
    c_t = sigmoid(f~) * c_{t-1} + sigmoid(i~) * tanh(g~)                             (7)
    h_t = sigmoid(o~) * tanh(BN(c_t; gamma_c, beta_c))                               (8)

The x and h terms carry no beta of their own (the bias b plays that role), the cell
*update* is never normalised, and each of the three norms can be switched off
(all off: a vanilla LSTM; BN_x alone: Laurent et al.'s BN-input LSTM). BN is one of the
norms of :mod:`bnrnn.nn.norms` (layer norm and RMS norm are others): each term goes through
the layer's norm of that term, whichever it is, with the statistics the caller asks for.

:func:`reference_forward` is this, step by step, and the ``reference`` backend runs it
(every norm, any device and dtype, gradients through population statistics too): every
other backend of :mod:`bnrnn.nn.backends` is tested against it (tests/test_bnlstm_reference.py,
tests/test_backends.py, tests/test_cpu_extension.py, tests/test_triton_path.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bnrnn.nn.backends import Backend, State, register
from bnrnn.nn.norms import Statistics
from bnrnn.nn.recurrent_product import low_precision_mm


def reference_forward(layer, x: torch.Tensor, state: State | None = None, t0: int = 0,
                      step_hook: Callable[[int, torch.Tensor], None] | None = None,
                      stats: Statistics | None = None, gemm_dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, State]:
    """Eqs. 6-8 over a sequence, one step at a time, for a :class:`~bnrnn.nn.lstm.LSTMLayer` layer.

    Args:
        layer: the parameters (weight_ih (4H, I), weight_hh (4H, H), bias (4H,)) and the
            norms norm_x, norm_h (4H features), norm_c (H features); None where switched off.
        x: (T, B, I), time-major.
        state: (h, c), each (B, H); None for the layer's learned initial state.
        t0: the time index of x[0], for the per-step statistics of a sequence cut in pieces.
        step_hook: ``step_hook(t, h_t)`` sees every hidden state (B, H) as a node of the graph
            (e.g. to read dL/dh_t, the paper's Fig. 1).
        stats: the statistics every norm uses (:class:`~bnrnn.nn.norms.Statistics`); None:
            the layer's train() / eval() convention.
        gemm_dtype: W_x x and W_h h with operands in this dtype (bf16 under autocast), their
            products back in x's; everything else in x's dtype.
    Returns:
        the hidden states (T, B, H), and the final (h_T, c_T).
    """
    stats = Statistics.of(layer, stats)
    h, c = layer.initial_state(x.shape[1], stats) if state is None else state
    # W_x x for all steps in one product; its per-step statistics do not depend on h.
    wx = low_precision_mm(x.flatten(0, 1), layer.weight_ih.t(), gemm_dtype).view(*x.shape[:2], -1)
    if layer.norm_x is not None:
        wx = layer.norm_x.forward_sequence(wx, t0, stats)
    wx = wx + layer.bias
    outputs = []
    # unbind(0), not wx[t]: indexing a tensor that needs grad makes every step's backward
    # allocate a full (T, B, 4H) zero gradient.
    for step, wx_t in enumerate(wx.unbind(0)):
        wh = low_precision_mm(h, layer.weight_hh.t(), gemm_dtype)
        if layer.norm_h is not None:
            wh = layer.norm_h(wh, t0 + step, stats)
        i, f, g, o = (wx_t + wh).chunk(4, dim=1)  # gate order of torch.nn.LSTM
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        c_out = c if layer.norm_c is None else layer.norm_c(c, t0 + step, stats)
        h = torch.sigmoid(o) * torch.tanh(c_out)
        if step_hook is not None:
            step_hook(t0 + step, h)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


@register
class ReferenceBackend(Backend):
    """The paper's equations step by step: every norm, any device, any dtype; ``auto`` takes
    it only where no faster backend computes the layer's norm (RMS norm)."""

    name = "reference"
    priority = 0
    gemm_dtypes = (torch.bfloat16, torch.float16)

    def train(self, layer, x, h0, c0, t0, needs_grad, stats, gemm_dtype=None):
        return reference_forward(layer, x, (h0, c0), t0, stats=stats, gemm_dtype=gemm_dtype)

    def infer(self, layer, x, h0, c0, t0, gemm_dtype=None):
        return reference_forward(layer, x, (h0, c0), t0, stats=Statistics.POPULATION, gemm_dtype=gemm_dtype)
