"""The ``aten`` backend: the recurrence as one autograd Function of ATen ops
(:mod:`bnrnn.nn.aten_recurrence`), on any device and dtype, for batch norm and layer norm.

In training, W_x x for all steps is one GEMM (:class:`InputProjection`) and the Function
normalises it step by step with BN_x; the layer-normalised LSTM normalises its x term over
every step at once in autograd instead (no recurrence) and adds every bias to it. Inference
with population statistics folds BN_x and BN_h into the input term and a per-step scale of
W_h h (:func:`~bnrnn.nn.backends.folded_input_term`). Under bf16 autocast its GEMMs (W_x x,
W_h h and their backward products) take bf16 operands, while the statistics, the gates and
the cell state stay float32 (``gemm_dtypes``).
"""

from __future__ import annotations

from functools import partial

import torch

from bnrnn.nn.aten_recurrence import (FusedLSTMRecurrence, InputProjection, Norms, population_recurrence, project_input,
                                      recurrence_forward)
from bnrnn.nn.backends import Backend, fold_into_population, folded_input_term, register


@register
class AtenBackend(Backend):
    name = "aten"
    norms = ("batch", "layer")
    priority = 10
    gemm_dtypes = (torch.bfloat16, torch.float16)

    def train(self, layer, x, h0, c0, t0, needs_grad, stats, gemm_dtype=None):
        if layer.norm == "layer":
            return layer_norm_training(layer, x, h0, c0, gemm_dtype)
        # W_x x for all steps in one GEMM; b rides along unless it is BN_x's beta.
        wx = InputProjection.apply(x, layer.weight_ih, layer.bias if layer.norm_x is None else None, gemm_dtype)
        (gamma_x, gamma_h, gamma_c), beta_c, eps = layer.norm_tensors()
        beta_x = layer.bias if layer.norm_x is not None else None  # b is BN_x's beta
        if needs_grad:
            found: dict[str, torch.Tensor] = {}
            hs, c_last = FusedLSTMRecurrence.apply(wx, layer.weight_hh, gamma_x, beta_x, gamma_h, gamma_c, beta_c, h0,
                                                   c0, eps, found, False, gemm_dtype)
        else:
            with torch.no_grad():
                norms = Norms(gamma_x, beta_x, gamma_h, gamma_c, beta_c, eps)
                hs, cs, found = recurrence_forward(wx, layer.weight_hh, norms, h0, c0, False, gemm_dtype)
            c_last = cs[-1]
        fold_into_population(layer, found, t0, stats, "xhc")
        return hs, (hs[-1], c_last)

    def infer(self, layer, x, h0, c0, t0, gemm_dtype=None):
        with torch.no_grad():
            project = partial(project_input, gemm_dtype=gemm_dtype)
            xin, (h_scale, c_scale, c_shift) = folded_input_term(layer, x, t0, project)
            hs, c_last = population_recurrence(xin, layer.weight_hh, h_scale, c_scale, c_shift, h0, c0, gemm_dtype)
        return hs, (hs[-1], c_last)


def layer_norm_training(layer, x, h0, c0, gemm_dtype=None):
    """The layer-normalised LSTM, in every statistics mode (layer norm keeps no statistics):
    LN_x(W_x x) over every step at once in autograd, with every bias (LN_x's, LN_h's, b)
    added to it, since the terms are summed; LN_h and LN_c inside the Function."""
    wx = InputProjection.apply(x, layer.weight_ih, None, gemm_dtype)
    bias = layer.bias if layer.norm_h is None else layer.bias + layer.norm_h.bias
    xin = (wx if layer.norm_x is None else layer.norm_x.forward_sequence(wx)) + bias
    (_, gamma_h, gamma_c), beta_c, eps = layer.norm_tensors()
    hs, c_last = FusedLSTMRecurrence.apply(xin, layer.weight_hh, None, None, gamma_h, gamma_c, beta_c, h0, c0, eps,
                                           {}, True, gemm_dtype)
    return hs, (hs[-1], c_last)
